"""``python -m tsbd``: the ``tsbd`` command without installing the package (e.g. on a device machine
that gets only the checkout)."""

import sys

from tsbd.cli import main

sys.exit(main())
