"""Clean (or test) images from wherever the user has them: a registered data set, a class-per-folder
image tree, or a ``.npz``/``.npy`` array file. Everything becomes an :class:`~tsbd.data.ImageSet`
(uint8 N x C x H x W); array files are read with ``allow_pickle=False``, so they hold numbers only.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsbd.data.base import ImageSet
from tsbd.errors import TsbdError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("x", "images", "data", "x_train")
LABEL_KEYS = ("y", "labels", "targets", "y_train")


@dataclasses.dataclass
class LoadedImages:
    """Images for a defense: ``images`` (the clean set), and a clean ``test`` split when the source has one."""

    images: ImageSet
    source: str
    test: ImageSet | None = None
    classes: list[str] | None = None
    mean: tuple[float, ...] | None = None  # the data set's normalization, for registered data sets
    std: tuple[float, ...] | None = None
    dataset: Any = None  # the registered Dataset, when the source named one

    def describe(self) -> dict:
        return {"source": self.source, "count": len(self.images), "image_shape": list(self.images.image_shape),
                "fingerprint": self.images.fingerprint(), "test_count": len(self.test) if self.test is not None else 0,
                "hflip": self.images.hflip}


def arrays_to_images(x: Any, y: Any, source: str) -> ImageSet:
    """Images as uint8 or float arrays (N x H x W x C, N x C x H x W or N x H x W) with integer labels."""
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if x.dtype == object or y.dtype == object:
        raise TsbdError(f"{source} holds Python objects, not numbers; store images and labels as numeric arrays")
    if x.ndim == 3:  # N x H x W: one channel
        x = x[:, None]
    if x.ndim != 4:
        raise TsbdError(f"{source}: images must be N x H x W x C or N x C x H x W, got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise TsbdError(f"{source} holds no images; the clean set must not be empty")
    if x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        pass  # N x C x H x W
    elif x.shape[-1] in (1, 3, 4):
        x = np.moveaxis(x, -1, 1)
    else:
        raise TsbdError(f"{source}: cannot tell the channel axis of images shaped {tuple(x.shape)}; "
                        "use N x H x W x C or N x C x H x W with 1 or 3 channels")
    if x.dtype == np.uint8:
        pixels = x
    elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        xf = x.astype(np.float64)
        if not np.isfinite(xf).all():
            raise TsbdError(f"{source}: images contain NaN or infinite values; fix the array")
        lo, hi = float(xf.min()), float(xf.max())
        if lo < 0 or hi > 255:
            raise TsbdError(f"{source}: pixel values span {lo:g}..{hi:g}; expected 0..1 (float) or 0..255")
        scale = 255.0 if np.issubdtype(x.dtype, np.floating) and hi <= 1.0 else 1.0
        pixels = np.rint(xf * scale).astype(np.uint8)
    else:
        raise TsbdError(f"{source}: images of dtype {x.dtype} are not supported; use uint8 or float")
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating)
                                                                   and np.all(np.mod(y, 1) == 0))):
        raise TsbdError(f"{source}: labels must be a 1-D array of integer class indices, got {y.dtype} "
                        f"shape {tuple(y.shape)}")
    if len(y) != len(pixels):
        raise TsbdError(f"{source}: {len(y)} labels for {len(pixels)} images; give one label per image")
    if len(y) and y.min() < 0:
        raise TsbdError(f"{source}: labels must be >= 0, found {int(y.min())}")
    return ImageSet(torch.from_numpy(np.ascontiguousarray(pixels)), torch.from_numpy(y.astype(np.int64)))


def _first(keys: Sequence[str], names: Sequence[str]) -> str | None:
    return next((k for k in names if k in keys), None)


# what numpy raises for a damaged array file: zip and zlib damage, a header its tokenizer cannot
# read, a declared shape too large to allocate, short data
_ARRAY_FILE_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, tokenize.TokenError,
                      SyntaxError, struct.error, NotImplementedError, OverflowError, TypeError, MemoryError)


def _array_file_error(path: Path, err: BaseException, kind: str) -> TsbdError:
    if isinstance(err, ValueError) and "pickle" in str(err).lower():
        return TsbdError(f"{path} holds pickled Python objects, which tsbd does not load; store numeric arrays")
    if isinstance(err, MemoryError):
        return TsbdError(f"{path} declares an array too large to load; re-create it")
    why = str(err).splitlines()[0][:200] if str(err) else ""
    return TsbdError(f"{path} is corrupt or not a {kind} file ({err.__class__.__name__}{': ' + why if why else ''}); "
                     "re-create it")


def _read_npz(path: Path) -> tuple[ImageSet, ImageSet | None]:
    try:
        with open(path, "rb") as fh:  # closed also when np.load fails
            z = np.load(fh, allow_pickle=False)
            if not hasattr(z, "files"):
                raise TsbdError(f"{path} holds one array, not a .npz archive of images and labels; save it with "
                                "np.savez(path, x=images, y=labels)")
            keys = list(z.files)
            xk, yk = _first(keys, IMAGE_KEYS), _first(keys, LABEL_KEYS)
            if xk is None or yk is None:
                raise TsbdError(f"{path} needs an image array ({'/'.join(IMAGE_KEYS)}) and a label array "
                                f"({'/'.join(LABEL_KEYS)}); it has {', '.join(keys) or 'nothing'}")
            images = arrays_to_images(z[xk], z[yk], str(path))
            test = arrays_to_images(z["x_test"], z["y_test"], f"{path} (test)") \
                if "x_test" in keys and "y_test" in keys else None
    except TsbdError:
        raise
    except _ARRAY_FILE_ERRORS as err:
        raise _array_file_error(path, err, ".npz") from None
    return images, test


def _read_npy(path: Path, labels: Any) -> ImageSet:
    def load(p: Path) -> np.ndarray:
        try:
            return np.load(p, allow_pickle=False)
        except _ARRAY_FILE_ERRORS as err:
            raise _array_file_error(p, err, ".npy") from None

    if labels is None:
        raise TsbdError(f"{path} holds images only; pass the labels too (--labels labels.npy), "
                        "or use a .npz file with arrays x and y")
    if isinstance(labels, (str, Path)):
        lp = Path(labels)
        if not lp.is_file():
            raise TsbdError(f"labels file {str(lp)!r} not found")
        labels = load(lp)
    return arrays_to_images(load(path), labels, str(path))


def _read_folder(path: Path, size: int) -> tuple[ImageSet, ImageSet | None, list[str]]:
    from tsbd.data.imagefolder import TEST_SPLITS, _split_files
    from tsbd.data.images import read_labelled

    if (path / "train").is_dir():
        files, classes = _split_files(path / "train", None)
        test_dir = next((path / s for s in TEST_SPLITS if (path / s).is_dir()), None)
        test = read_labelled(_split_files(test_dir, classes)[0], size) if test_dir else None
    else:
        files, classes = _split_files(path, None)
        test = None
    return read_labelled(files, size), test, classes


def load_images(source: Any, *, labels: Any = None, image_size: int | None = None, ratio: float | None = None,
                seed: int = 0, data_root: str | None = None, cache_dir: str | None = None) -> LoadedImages:
    """Images from ``source``: an :class:`ImageSet`; an ``(images, labels)`` pair of arrays; a registered
    data set name (a seeded ``ratio`` of its training set, default 5%, and its test split); a folder
    (``<class>/*`` or ``train/<class>/*`` with optional ``test/``/``val/``, resized to ``image_size``,
    default 32); a ``.npz`` file (``x``/``y``, optionally ``x_test``/``y_test``); or a ``.npy`` image
    array with ``labels`` (an array or a ``.npy`` file)."""
    if isinstance(source, ImageSet):
        return LoadedImages(source, "ImageSet")
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return LoadedImages(arrays_to_images(source[0], source[1], "the (images, labels) arrays"), "arrays")
    if not isinstance(source, (str, Path)):
        raise TsbdError(f"clean data must be an ImageSet, an (images, labels) pair, a data set name or a path; "
                        f"got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        from tsbd.data import DATASETS, load_dataset
        from tsbd.data.poison import clean_defense_split

        if str(source).lower() in DATASETS.names():
            ds = load_dataset(str(source), root=data_root, cache_dir=cache_dir)
            ratio = 0.05 if ratio is None else ratio
            idx = clean_defense_split(len(ds.train), None, ratio, seed)
            return LoadedImages(ds.train.subset(idx), f"{ds.name} ({ratio:g} of train, seed {seed})", ds.test,
                                ds.classes, tuple(ds.mean), tuple(ds.std), ds)
        raise TsbdError(f"data {str(source)!r} is neither a file, a folder nor a data set name "
                        f"({', '.join(DATASETS.names())})")
    if path.is_dir():
        images, test, classes = _read_folder(path, int(image_size or 32))
        return LoadedImages(images, str(path), test, classes)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        images, test = _read_npz(path)
        return LoadedImages(images, str(path), test)
    if suffix == ".npy":
        return LoadedImages(_read_npy(path, labels), str(path))
    raise TsbdError(f"{path} is not a data source tsbd reads; pass a data set name, a class-per-folder image folder, "
                    "a .npz file (x, y) or a .npy image array with --labels")


def check_images(images: Any, expected: Sequence[int] | None, what: str = "clean images") -> None:
    """One clear line when ``images`` (anything with uint8 ``x``, N x C x H x W) are not RGB or not the
    size (C x H x W) the model was trained on."""
    c, h, w = (int(v) for v in images.x.shape[1:])
    want_c = int(expected[0]) if expected else 3
    if c != want_c:
        raise TsbdError(f"{what} have {c} channel(s) but the model takes {want_c} (RGB); convert them to RGB")
    if expected and (h, w) != (int(expected[1]), int(expected[2])):
        raise TsbdError(f"{what} are {h}x{w} pixels but the model was trained on {expected[1]}x{expected[2]}; "
                        f"resize them (an image folder is resized with --image-size {expected[1]})")


def check_labels(images: Any, num_classes: int, what: str, hint: str = "") -> None:
    """One clear line when ``images`` (an ImageSet, or None) has labels the model has no class for."""
    if images is not None and len(images) and int(images.y.max()) >= num_classes:
        raise TsbdError(f"{what} labels go up to {int(images.y.max())} but the model has {num_classes} classes; "
                        f"use data with the model's classes{hint}")
