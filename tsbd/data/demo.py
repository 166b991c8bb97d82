"""``demo``: a small real CIFAR-10 subset shipped inside the package, for trying tsbd offline.

10,000 train (1,000 per class) and 2,000 test (200 per class) images drawn with a fixed
seed from CIFAR-10 and stored as their original JPEG bytes in the archive format
(``assets/demo_cifar10.npz``, made by ``scripts/make_demo_data.py``). Needs no data root.
"""

from __future__ import annotations

from pathlib import Path

from tsbd.data import DATASETS, cifar10
from tsbd.data.archive import load_archive_dataset
from tsbd.data.base import Dataset
from tsbd.errors import TsbdError

ASSET = Path(__file__).resolve().parent / "assets" / "demo_cifar10.npz"


@DATASETS.register("demo")
def load_demo(root: Path | None, cache_dir: Path) -> Dataset:
    """The embedded CIFAR-10 subset; ``root`` is ignored."""
    if not ASSET.is_file():
        raise TsbdError(f"the demo data {ASSET} is missing from this install; reinstall tsbd")
    return load_archive_dataset(
        "demo", ASSET, num_classes=cifar10.NUM_CLASSES, image_size=(32, 32),
        mean=cifar10.MEAN, std=cifar10.STD, cache_dir=cache_dir,
    )
