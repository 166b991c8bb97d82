"""``python -m tsbd.cli``: the ``tsbd`` command."""

import sys

from tsbd.cli import main

sys.exit(main())
