"""GTSRB, the German Traffic Sign Recognition Benchmark (Stallkamp et al., 2012): 43 classes.

Reads the JPEG archive ``gtsrb.npz`` or the official layout
``GTSRB/Final_Training/Images/000NN/*.ppm`` (class = folder number) plus
``GTSRB/Final_Test/Images/*.ppm`` labelled by ``GT-final_test.csv``. As in BackdoorBench,
each whole frame is resized to 32x32 (bilinear), without cropping to the sign's ROI.
"""

from __future__ import annotations

import csv
from pathlib import Path

from tsbd.data import DATASETS
from tsbd.data.archive import load_archive_dataset
from tsbd.data.base import Dataset
from tsbd.data.cache import Splits, hash_listing, load_or_decode
from tsbd.data.images import list_images, read_labelled
from tsbd.data.locate import find_source
from tsbd.errors import TsbdError

# BackdoorBench does not normalize GTSRB (identity mean/std).
MEAN = (0.0, 0.0, 0.0)
STD = (1.0, 1.0, 1.0)
NUM_CLASSES = 43
IMAGE_SIZE = 32
CLASSES = [f"{i:05d}" for i in range(NUM_CLASSES)]  # the official folder names, as in gtsrb.npz
CANDIDATES = ("gtsrb.npz", "GTSRB", "gtsrb")
TEST_CSV = "GT-final_test.csv"


def test_csv_places(folder: Path) -> list[Path]:
    """Where the test ground truth is looked for: it ships as a separate zip, so users unpack it anywhere."""
    return [
        folder / "Final_Test" / "Images" / TEST_CSV,
        folder / "Final_Test" / TEST_CSV,
        folder / TEST_CSV,
        folder.parent / TEST_CSV,
    ]


def _train_files(folder: Path) -> list[tuple[Path, int]]:
    images = folder / "Final_Training" / "Images"
    files = []
    for class_dir in sorted(p for p in images.iterdir() if p.is_dir()):
        if not class_dir.name.isdigit() or int(class_dir.name) >= NUM_CLASSES:
            raise TsbdError(
                f"{class_dir} is not a GTSRB class folder (00000..{NUM_CLASSES - 1:05d}); move it out of {images}"
            )
        files += [(p, int(class_dir.name)) for p in list_images(class_dir)]
    return files


def _test_files(folder: Path) -> tuple[list[tuple[Path, int]], Path]:
    places = test_csv_places(folder)
    csv_path = next((p for p in places if p.is_file()), None)
    if csv_path is None:
        raise TsbdError(
            f"GTSRB test labels {TEST_CSV} not found (looked in {', '.join(str(p.parent) for p in places)}); "
            "unpack GTSRB_Final_Test_GT.zip into one of them"
        )
    images = folder / "Final_Test" / "Images"
    files = []
    with open(csv_path, newline="") as fh:
        rows = csv.DictReader(fh, delimiter=";")
        if not rows.fieldnames or not {"Filename", "ClassId"} <= set(rows.fieldnames):
            raise TsbdError(f"{csv_path} lacks the Filename and ClassId columns; use the official {TEST_CSV}")
        for line, row in enumerate(rows, start=2):
            try:
                label = int(row["ClassId"])
            except (TypeError, ValueError):
                raise TsbdError(f"{csv_path} line {line}: ClassId {row['ClassId']!r} is not an integer") from None
            if not 0 <= label < NUM_CLASSES:
                raise TsbdError(f"{csv_path} line {line}: ClassId {label} is out of range 0..{NUM_CLASSES - 1}")
            path = images / row["Filename"]
            if not path.is_file():
                raise TsbdError(f"{path}, listed in {csv_path} line {line}, is missing; re-extract Final_Test")
            files.append((path, label))
    return files, csv_path



def detect(path: Path) -> str | None:
    """'archive' or 'official' if ``path`` is a GTSRB source of that kind."""
    if path.is_file() and path.suffix == ".npz":
        return "archive"
    if path.is_dir() and (path / "Final_Training" / "Images").is_dir():
        return "official"
    return None


@DATASETS.register("gtsrb")
def load_gtsrb(root: Path | None, cache_dir: Path) -> Dataset:
    """GTSRB from ``root`` (``gtsrb.npz`` or the official ``GTSRB/`` folder), images 32x32."""
    path, kind = find_source("gtsrb", root, CANDIDATES, detect)
    if kind == "archive":
        return load_archive_dataset(
            "gtsrb", path, num_classes=NUM_CLASSES, image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mean=MEAN, std=STD, cache_dir=cache_dir,
        )
    if not (path / "Final_Test" / "Images").is_dir():
        raise TsbdError(
            f"{path / 'Final_Test' / 'Images'} is missing; unpack GTSRB_Final_Test_Images.zip beside Final_Training"
        )
    train, (test, csv_path) = _train_files(path), _test_files(path)
    listing = hash_listing(path.parent, [p for p, _ in train + test] + [csv_path])
    splits, fingerprint = load_or_decode(
        "gtsrb", {"kind": "official", "listing": listing, "size": IMAGE_SIZE},
        lambda: Splits(read_labelled(train, IMAGE_SIZE), read_labelled(test, IMAGE_SIZE), list(CLASSES)),
        cache_dir, str(path),
    )
    return Dataset("gtsrb", splits.train, splits.test, splits.classes, MEAN, STD, fingerprint, str(path))
