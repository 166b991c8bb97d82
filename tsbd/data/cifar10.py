"""CIFAR-10 (Krizhevsky, 2009): 50,000 train / 10,000 test 32x32 RGB images in 10 classes.

Reads, whichever it finds under the data root: the JPEG archive ``cifar10.npz``, the
official Python release ``cifar-10-batches-py/`` or the binary release
``cifar-10-batches-bin/``. The Python release is a set of pickles; they are read with
:class:`ReleaseUnpickler`, which builds nothing but numpy arrays, dicts, lists, strings and
numbers, so a tampered file cannot run code.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsbd.data import DATASETS
from tsbd.data.archive import load_archive_dataset
from tsbd.data.base import Dataset, ImageSet
from tsbd.data.cache import Splits, hash_listing, load_or_decode
from tsbd.data.locate import find_source
from tsbd.errors import TsbdError

# BackdoorBench's CIFAR-10 normalization (utils/aggregate_block/dataset_and_transform_generate.py).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.247, 0.243, 0.261)
NUM_CLASSES = 10
CANDIDATES = ("cifar10.npz", "cifar-10-batches-py", "cifar-10-batches-bin")
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
_RECORD = 1 + 3 * 32 * 32  # binary release: one label byte, then the R, G, B planes


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise TsbdError(f"refusing to decode pickled bytes with codec {encoding!r}")
    return text.encode("latin1")


def _numpy_attr(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # numpy 2 moved numpy.core to numpy._core; pickles name whichever wrote them.
    for func, modules in (
        ("_reconstruct", ("numpy._core.multiarray", "numpy.core.multiarray")),
        ("_frombuffer", ("numpy._core.numeric", "numpy.core.numeric")),
    ):
        obj = next(filter(None, (_numpy_attr(m, func) for m in modules)), None)
        if obj is not None:
            allowed.update({(m, func): obj for m in modules})
    return allowed


class ReleaseUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-10 Python release holds: numpy arrays and builtin containers.

    Dicts, lists, bytes, strings and numbers need no globals; every global a pickle names
    is checked against a short list of numpy's array-reconstruction functions, and anything
    else (``os.system``, ``builtins.eval``, ...) raises :class:`TsbdError` before it is called.
    """

    _allowed = _allowed_globals()

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise TsbdError(
                f"{self.path} asks to load {module}.{name}, which a CIFAR-10 batch never contains; "
                "refusing to unpickle it — replace the file with the official release"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise TsbdError(f"{self.path} uses pickle persistent ids; replace the file with the official release")


def read_release_pickle(path: Path) -> dict[str, Any]:
    """One file of the Python release as a dict with ``str`` keys, read with :class:`ReleaseUnpickler`."""
    try:
        with open(path, "rb") as fh:
            obj = ReleaseUnpickler(fh, path).load()
    except TsbdError:
        raise
    except FileNotFoundError:
        needs = ", ".join((*TRAIN_BATCHES, TEST_BATCH, "batches.meta"))
        raise TsbdError(f"{path} is missing; the CIFAR-10 Python release needs {needs}") from None
    except Exception as err:  # a malformed pickle can raise nearly anything; all mean "corrupt"
        reason = f"{type(err).__name__}: {err}"
        raise TsbdError(f"cannot read {path}: corrupt or truncated ({reason}); replace it") from None
    if not isinstance(obj, dict):
        raise TsbdError(f"{path} holds a {type(obj).__name__}, not a CIFAR-10 batch dict; replace it")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _python_batch(path: Path) -> ImageSet:
    batch = read_release_pickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise TsbdError(f"{path}: 'data' must be a uint8 N x 3072 array, got {got}; replace the file")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise TsbdError(f"{path}: 'labels' must list one label per image ({len(data)}); replace the file")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise TsbdError(f"{path}: 'labels' are not integers; replace the file") from None
    return ImageSet(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y))


def _binary_batch(path: Path) -> ImageSet:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise TsbdError(
            f"{path} is missing; the CIFAR-10 binary release needs data_batch_1..5.bin and test_batch.bin"
        ) from None
    if raw.size == 0 or raw.size % _RECORD:
        raise TsbdError(f"{path} is {raw.size} bytes, not a whole number of {_RECORD}-byte records; replace it")
    records = raw.reshape(-1, _RECORD)
    return ImageSet(
        torch.from_numpy(np.ascontiguousarray(records[:, 1:]).reshape(-1, 3, 32, 32)),
        torch.from_numpy(records[:, 0].astype(np.int64)),
    )


def _concat(parts: list[ImageSet]) -> ImageSet:
    return ImageSet(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


def _decode_python(folder: Path) -> Splits:
    names = read_release_pickle(folder / "batches.meta").get("label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES:
        raise TsbdError(f"{folder / 'batches.meta'}: 'label_names' must list {NUM_CLASSES} names; replace it")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    train = _concat([_python_batch(folder / b) for b in TRAIN_BATCHES])
    return Splits(train, _python_batch(folder / TEST_BATCH), classes)


def _decode_binary(folder: Path) -> Splits:
    meta = folder / "batches.meta.txt"
    try:
        classes = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise TsbdError(f"cannot read {meta} ({err}); the binary release needs it for class names") from None
    if len(classes) != NUM_CLASSES:
        raise TsbdError(f"{meta} names {len(classes)} classes, expected {NUM_CLASSES}; replace it")
    train = _concat([_binary_batch(folder / f"{b}.bin") for b in TRAIN_BATCHES])
    return Splits(train, _binary_batch(folder / f"{TEST_BATCH}.bin"), classes)


def detect(path: Path) -> str | None:
    """'archive', 'python' or 'binary' if ``path`` is a CIFAR-10 source of that kind."""
    if path.is_file() and path.suffix == ".npz":
        return "archive"
    if path.is_dir() and (path / "data_batch_1").is_file():
        return "python"
    if path.is_dir() and (path / "data_batch_1.bin").is_file():
        return "binary"
    return None


@DATASETS.register("cifar10")
def load_cifar10(root: Path | None, cache_dir: Path) -> Dataset:
    """CIFAR-10 from ``root`` (``cifar10.npz``, ``cifar-10-batches-py/`` or ``cifar-10-batches-bin/``)."""
    path, kind = find_source("cifar10", root, CANDIDATES, detect)
    if kind == "archive":
        return load_archive_dataset(
            "cifar10", path, num_classes=NUM_CLASSES, image_size=(32, 32), mean=MEAN, std=STD, cache_dir=cache_dir
        )
    decode = _decode_python if kind == "python" else _decode_binary
    files = [p for p in path.iterdir() if p.is_file()]
    splits, fingerprint = load_or_decode(
        "cifar10", {"kind": kind, "listing": hash_listing(path, files)}, lambda: decode(path), cache_dir, str(path)
    )
    return Dataset("cifar10", splits.train, splits.test, splits.classes, MEAN, STD, fingerprint, str(path))
