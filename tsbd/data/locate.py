"""Finding a dataset's files under a data root.

A root may hold the data (``root/cifar10.npz``) or be the data itself (``root`` is the
``.npz`` or the release folder); each loader passes the names it knows and a ``detect``
function that says which format, if any, a path is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tsbd.errors import TsbdError

FIX = "pass --data-root DIR or set TSBD_DATA_ROOT to a folder that holds one of them"


def find_source(
    dataset: str,
    root: Path | None,
    candidates: Sequence[str],
    detect: Callable[[Path], str | None],
    looked_for: str | None = None,
) -> tuple[Path, str]:
    """The first of ``root``, ``root/<candidate>``... that ``detect`` recognizes, and its format.

    ``looked_for`` describes the expected files in messages (default: the candidate names).
    """
    wanted = looked_for or ", ".join(candidates)
    if root is None:
        raise TsbdError(f"no data root given for {dataset} (it looks for {wanted}); {FIX}")
    if not root.exists():
        raise TsbdError(f"data root {root} does not exist (looked for {dataset}: {wanted}); {FIX}")
    for path in (root, *(root / name for name in candidates)):
        kind = detect(path)
        if kind is not None:
            return path, kind
    raise TsbdError(f"no {dataset} data under {root}: looked for {wanted}; {FIX}")
