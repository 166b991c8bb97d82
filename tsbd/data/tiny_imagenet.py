"""Tiny ImageNet (Le & Yang, 2015): 200 classes of 64x64 images, 500 train / 50 val each.

Reads the standard ``tiny-imagenet-200/`` layout: ``wnids.txt`` (the classes, indexed in
sorted order as torchvision's ImageFolder and BackdoorBench do), ``words.txt`` (readable
names, optional), ``train/<wnid>/images/*.JPEG`` and ``val/images/*.JPEG`` labelled by
``val/val_annotations.txt``; the val split is the test split (the official test labels
are not public). Grayscale images are converted to RGB.
"""

from __future__ import annotations

from pathlib import Path

from tsbd.data import DATASETS
from tsbd.data.base import Dataset
from tsbd.data.cache import Splits, hash_listing, load_or_decode
from tsbd.data.images import list_images, read_labelled
from tsbd.data.locate import find_source
from tsbd.errors import TsbdError

# BackdoorBench's Tiny ImageNet normalization.
MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)
IMAGE_SIZE = 64
CANDIDATES = ("tiny-imagenet-200",)
_FIX = "re-extract tiny-imagenet-200.zip"


def _read_lines(path: Path) -> list[str]:
    try:
        return [line.rstrip("\r\n") for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise TsbdError(f"cannot read {path} ({err}); {_FIX}") from None


def class_names(folder: Path, wnids: list[str]) -> list[str]:
    """The first synonym in ``words.txt`` for each wnid (the wnid itself where missing or ambiguous)."""
    words = folder / "words.txt"
    lookup = {}
    if words.is_file():
        for line in _read_lines(words):
            wnid, _, text = line.partition("\t")
            lookup[wnid.strip()] = text.split(",")[0].strip()
    names = [lookup.get(w) or w for w in wnids]
    return [n if names.count(n) == 1 else f"{n} ({w})" for n, w in zip(names, wnids)]


def _train_files(folder: Path, wnids: list[str]) -> list[tuple[Path, int]]:
    files = []
    for label, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        if not images.is_dir():
            raise TsbdError(f"{images} is missing for class {wnid} listed in wnids.txt; {_FIX}")
        files += [(p, label) for p in list_images(images)]
    return files


def _val_files(folder: Path, wnids: list[str]) -> list[tuple[Path, int]]:
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise TsbdError(f"{annotations} is missing; it labels the val (test) split; {_FIX}")
    index = {w: i for i, w in enumerate(wnids)}
    files = []
    for line_no, line in enumerate(_read_lines(annotations), start=1):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise TsbdError(f"{annotations} line {line_no} names no class from wnids.txt: {line[:60]!r}; {_FIX}")
        path = folder / "val" / "images" / parts[0]
        if not path.is_file():
            raise TsbdError(f"{path}, listed in {annotations} line {line_no}, is missing; {_FIX}")
        files.append((path, index[parts[1]]))
    return files



def detect(path: Path) -> str | None:
    return "folder" if path.is_dir() and (path / "wnids.txt").is_file() and (path / "train").is_dir() else None


@DATASETS.register("tiny-imagenet")
def load_tiny_imagenet(root: Path | None, cache_dir: Path) -> Dataset:
    """Tiny ImageNet from ``root`` (``tiny-imagenet-200/`` or that folder itself), images 64x64."""
    path, _ = find_source("tiny-imagenet", root, CANDIDATES, detect)
    wnids = sorted({w.strip() for w in _read_lines(path / "wnids.txt")})
    if not wnids:
        raise TsbdError(f"{path / 'wnids.txt'} lists no classes; {_FIX}")
    train, test = _train_files(path, wnids), _val_files(path, wnids)
    meta_files = [path / "wnids.txt", path / "val" / "val_annotations.txt"]
    if (path / "words.txt").is_file():
        meta_files.append(path / "words.txt")
    listing = hash_listing(path, [p for p, _ in train + test] + meta_files)
    splits, fingerprint = load_or_decode(
        "tiny-imagenet", {"kind": "folder", "listing": listing, "size": IMAGE_SIZE},
        lambda: Splits(read_labelled(train, IMAGE_SIZE), read_labelled(test, IMAGE_SIZE), class_names(path, wnids)),
        cache_dir, str(path),
    )
    return Dataset("tiny-imagenet", splits.train, splits.test, splits.classes, MEAN, STD, fingerprint, str(path))
