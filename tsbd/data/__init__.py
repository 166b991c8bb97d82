"""Datasets: a name -> loader registry and one entry point, :func:`load_dataset`.

Every loader returns a :class:`Dataset` of uint8 N x C x H x W tensors with int64 labels.
Loader modules in this package register themselves with ``@DATASETS.register(name)`` and
are imported on the first lookup, so this module stays light. Decoded arrays are cached as
``.npy`` files (see :mod:`tsbd.data.cache`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tsbd.data.base import Dataset, ImageSet
from tsbd.errors import TsbdError
from tsbd.registry import Registry

__all__ = ["DATASETS", "Dataset", "ImageSet", "load_dataset", "resolve_data_root"]

DATA_ROOT_ENV = "TSBD_DATA_ROOT"

# A loader is called as loader(root=Path | None, cache_dir=Path, **options) -> Dataset.
DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset", "tsbd.data")


def resolve_data_root(root: str | os.PathLike | None) -> Path | None:
    """``root`` if given, else ``$TSBD_DATA_ROOT``, else None; existence is checked by the loader."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(DATA_ROOT_ENV, "")
    return Path(env).expanduser() if env else None


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Dataset:
    """Load dataset ``name`` (see ``DATASETS.names()``) from ``root`` or ``$TSBD_DATA_ROOT``.

    ``cache_dir`` (else ``$TSBD_CACHE_DIR``, else ``~/.cache/tsbd``) holds decoded arrays.
    Extra keyword arguments are the loader's options, e.g. ``size`` for ``imagefolder``.
    """
    from tsbd.data.cache import resolve_cache_dir

    loader = DATASETS.get(name)
    options = {key.replace("-", "_"): value for key, value in kwargs.items()}
    valid = [p for p in inspect.signature(loader).parameters if p not in ("root", "cache_dir")]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TsbdError(
            f"dataset {name!r} has no option {unknown[0]!r}; valid options: {', '.join(valid) or 'none'}"
        )
    return loader(root=resolve_data_root(root), cache_dir=resolve_cache_dir(cache_dir), **options)
