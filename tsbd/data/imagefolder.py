"""Any folder of images: ``root/train/<class>/*`` and ``root/test/<class>/*`` (or ``val/``).

Classes are the train sub-folders sorted by name (torchvision's ImageFolder convention);
images are converted to RGB and resized to ``size`` x ``size`` (bilinear). Normalization is
the per-channel mean and std of the train images.
"""

from __future__ import annotations

from pathlib import Path

from tsbd.data import DATASETS
from tsbd.data.base import Dataset
from tsbd.data.cache import Splits, hash_listing, load_or_decode
from tsbd.data.images import channel_stats, list_images, read_labelled
from tsbd.data.locate import find_source
from tsbd.errors import TsbdError

TEST_SPLITS = ("test", "val")


def _split_files(split_dir: Path, classes: list[str] | None) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, label) pairs under ``split_dir/<class>/``; ``classes`` None means: take them from here."""
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise TsbdError(
            f"{split_dir / unknown[0]} is a class that train/ does not have; add it to train/ or remove it"
        )
    index = {c: i for i, c in enumerate(classes)}
    files = [(p, index[c]) for c in found for p in list_images(split_dir / c)]
    if not files:
        raise TsbdError(f"{split_dir} holds no images in class sub-folders; put images in {split_dir}/<class>/")
    return files, classes



def detect(path: Path) -> str | None:
    if path.is_dir() and (path / "train").is_dir() and any((path / s).is_dir() for s in TEST_SPLITS):
        return "folder"
    return None


@DATASETS.register("imagefolder")
def load_imagefolder(root: Path | None, cache_dir: Path, size: int = 32) -> Dataset:
    """Images under ``root/train/<class>/`` and ``root/test/<class>/`` (or ``val/``), resized to ``size``."""
    try:
        size = int(size)
    except (TypeError, ValueError):
        raise TsbdError(f"imagefolder size must be an integer number of pixels, got {size!r}") from None
    if not 1 <= size <= 4096:
        raise TsbdError(f"imagefolder size {size} is out of range; use 1..4096 pixels")
    path, _ = find_source(
        "imagefolder", root, (), detect, looked_for="train/<class>/ with test/<class>/ or val/<class>/"
    )
    test_dir = next(path / s for s in TEST_SPLITS if (path / s).is_dir())
    train, classes = _split_files(path / "train", None)
    test, _ = _split_files(test_dir, classes)
    listing = hash_listing(path, [p for p, _ in train + test])
    splits, fingerprint = load_or_decode(
        "imagefolder", {"kind": "folder", "listing": listing, "size": size},
        lambda: Splits(read_labelled(train, size), read_labelled(test, size), classes), cache_dir, str(path),
    )
    mean, std = channel_stats(splits.train.x)
    return Dataset("imagefolder", splits.train, splits.test, splits.classes, mean, std, fingerprint, str(path))
