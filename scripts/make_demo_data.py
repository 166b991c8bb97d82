"""Make tsbd/data/assets/demo_cifar10.npz: a fixed, class-balanced CIFAR-10 subset.

Copies the chosen images' JPEG bytes unchanged from a CIFAR-10 JPEG archive (no
recompression) and records their indices in the source as ``train_source_index`` and
``test_source_index``. Deterministic: the same source and seed give the same file.

    python scripts/make_demo_data.py [--source DATA_ROOT/cifar10.npz] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from tsbd.data.archive import SPLITS, open_jpeg_archive, write_jpeg_archive  # noqa: E402 -- needs the sys.path line above

log = logging.getLogger("make_demo_data")


def choose(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of each class, drawn without replacement, in source order."""
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise SystemExit(f"class {c} has only {len(members)} images, need {per_class}")
        picks.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "cifar10.npz")
    parser.add_argument("--out", type=Path, default=REPO / "tsbd" / "data" / "assets" / "demo_cifar10.npz")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    archive = open_jpeg_archive(args.source, num_classes=10)
    rng = np.random.default_rng(args.seed)
    parts, extra = [], {}
    for split, per_class in zip(SPLITS, (args.train_per_class, args.test_per_class)):
        idx = choose(archive.labels[split], per_class, rng)
        parts.append(([archive.image_bytes(split, int(i)) for i in idx], archive.labels[split][idx]))
        extra[f"{split}_source_index"] = idx.astype(np.int32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_jpeg_archive(args.out, parts[0], parts[1], archive.classes, extra)
    log.info("wrote %s (%.1f MB): %d train, %d test", args.out, args.out.stat().st_size / 1e6,
             len(parts[0][0]), len(parts[1][0]))


if __name__ == "__main__":
    main()
