"""Decoded splits, their fingerprints, and the ``.npy`` cache that makes reloading fast.

A cache entry is a folder ``<cache_dir>/datasets/<name>-<key>/`` holding ``train_x.npy``,
``train_y.npy``, ``test_x.npy``, ``test_y.npy`` and ``meta.json`` (written last). The key
hashes the source (an archive's bytes; a folder's sorted (path, size, mtime) list), the
loader's options and the Pillow version, so a changed source or decoder never hits a stale
entry. Files are written under a temporary name and renamed; an entry that fails to load,
or whose recomputed fingerprint differs from ``meta.json``, is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import PIL
import torch

from tsbd.data.base import ImageSet
from tsbd.errors import TsbdError

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "TSBD_CACHE_DIR"
CACHE_FORMAT = 1  # bump when decoding changes, so old entries are not reused
_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


class Splits(NamedTuple):
    """What a decoder produces: the two splits and the class names."""

    train: ImageSet
    test: ImageSet
    classes: list[str]


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir`` if given, else ``$TSBD_CACHE_DIR``, else ``~/.cache/tsbd``."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV, "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tsbd"


def hash_file(path: Path) -> str:
    """sha256 of a file's bytes (about 0.1 s for a 55 MB archive)."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def hash_listing(base: Path, files: Iterable[Path]) -> str:
    """sha256 of the sorted (path relative to ``base``, size, mtime) of ``files``."""
    h = hashlib.sha256()
    for rel, path in sorted((p.relative_to(base).as_posix(), p) for p in files):
        st = path.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def dataset_fingerprint(train: ImageSet, test: ImageSet) -> str:
    """sha256 (first 16 hex) of the train and test images and labels, in that order."""
    h = hashlib.sha256()
    for t in (train.x, train.y, test.x, test.y):
        h.update(np.ascontiguousarray(t.numpy()).reshape(-1).view(np.uint8))
    return h.hexdigest()[:16]


def check_splits(splits: Splits, source: str) -> None:
    """Raise TsbdError unless both splits are non-empty RGB images of one shape with valid labels."""
    n_classes = len(splits.classes)
    if n_classes == 0:
        raise TsbdError(f"{source} names no classes; the data is incomplete, re-create it")
    for split, data in (("train", splits.train), ("test", splits.test)):
        if len(data) == 0:
            raise TsbdError(f"the {split} split of {source} is empty; add images or re-create the data")
        if data.x.shape[1] != 3:
            raise TsbdError(f"{split} images of {source} have {data.x.shape[1]} channels, expected 3 (RGB)")
        low, high = int(data.y.min()), int(data.y.max())
        if low < 0 or high >= n_classes:
            bad = low if low < 0 else high
            raise TsbdError(
                f"{split} label {bad} of {source} is out of range for {n_classes} classes; fix the labels"
            )
    if splits.train.image_shape != splits.test.image_shape:
        raise TsbdError(
            f"train images of {source} are {splits.train.image_shape} but test images are "
            f"{splits.test.image_shape}; both splits need one image size"
        )


def load_or_decode(
    name: str,
    key: Mapping[str, Any],
    decode: Callable[[], Splits],
    cache_dir: Path,
    source: str,
) -> tuple[Splits, str]:
    """The decoded splits and their fingerprint, from the cache if there, else ``decode()``d and stored.

    ``key`` identifies the source and options (JSON-serializable); ``source`` names it in messages.
    """
    meta_key = {"format": CACHE_FORMAT, "dataset": name, "pillow": PIL.__version__, **key}
    digest = hashlib.sha256(json.dumps(meta_key, sort_keys=True).encode()).hexdigest()[:20]
    entry = cache_dir / "datasets" / f"{name}-{digest}"
    cached = _read_entry(entry)
    if cached is not None:
        log.info("loaded %s from cache %s", name, entry)
        return cached
    start = time.perf_counter()
    log.info("decoding %s from %s", name, source)
    splits = decode()
    check_splits(splits, source)
    fingerprint = dataset_fingerprint(splits.train, splits.test)
    log.info("decoded %s in %.1f s", name, time.perf_counter() - start)
    _write_entry(entry, splits, fingerprint, meta_key)
    return splits, fingerprint


def _read_entry(entry: Path) -> tuple[Splits, str] | None:
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"cache format {meta.get('format')} is not {CACHE_FORMAT}")
        arrays = {k: np.load(entry / f"{k}.npy", allow_pickle=False) for k in _ARRAYS}
        train = ImageSet(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]))
        test = ImageSet(torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"]))
        fingerprint = dataset_fingerprint(train, test)
        if fingerprint != meta["fingerprint"]:
            raise ValueError(f"fingerprint {fingerprint} differs from the stored {meta['fingerprint']}")
        return Splits(train, test, [str(c) for c in meta["classes"]]), fingerprint
    except (OSError, ValueError, KeyError, TypeError, EOFError, TsbdError) as err:
        log.warning("ignoring corrupt cache entry %s (%s); rebuilding it", entry, err)
        return None


def _write_entry(entry: Path, splits: Splits, fingerprint: str, meta_key: dict) -> None:
    arrays = {
        "train_x": splits.train.x, "train_y": splits.train.y,
        "test_x": splits.test.x, "test_y": splits.test.y,
    }
    meta = {**meta_key, "classes": list(splits.classes), "fingerprint": fingerprint}
    try:
        entry.mkdir(parents=True, exist_ok=True)
        (entry / "meta.json").unlink(missing_ok=True)  # an entry without meta is never read
        for k, tensor in arrays.items():
            _atomic_write(entry / f"{k}.npy", lambda fh, t=tensor: np.save(fh, t.numpy()))
        _atomic_write(entry / "meta.json", lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    except OSError as err:
        log.warning("could not write cache entry %s (%s); continuing without the cache", entry, err)


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write via ``write(file)`` to a temporary name beside ``path``, then rename onto it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
