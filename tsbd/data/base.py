"""In-memory image data: uint8 NCHW tensors plus labels.

Every dataset, poisoned set and clean defense set is an :class:`ImageSet`; images stay uint8
in memory and become floats in [0, 1] only per batch inside the engine.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch

from tsbd.errors import TsbdError


@dataclasses.dataclass
class ImageSet:
    """Images ``x`` (uint8, N x C x H x W) with integer labels ``y`` (int64, N). ``hflip``: whether
    training augmentation may mirror them (a :class:`Dataset` sets it for its splits)."""

    x: torch.Tensor
    y: torch.Tensor
    hflip: bool = True

    def __post_init__(self):
        if self.x.dtype != torch.uint8 or self.x.ndim != 4:
            raise TsbdError(f"images must be uint8 N x C x H x W, got {self.x.dtype} {tuple(self.x.shape)}")
        self.y = torch.as_tensor(self.y, dtype=torch.int64)
        if self.y.ndim != 1 or len(self.y) != len(self.x):
            raise TsbdError(f"labels must be 1-D with one per image: {len(self.y)} labels for {len(self.x)} images")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, indices) -> ImageSet:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageSet(self.x[idx], self.y[idx], hflip=self.hflip)

    def balanced_subset(self, limit: int, num_classes: int, seed: int = 0) -> ImageSet:
        """``limit`` images, as equal a number per class as the data allows, drawn in a seeded
        random order and kept in dataset order; the whole set when ``limit`` is 0 or larger."""
        if limit <= 0 or limit >= len(self):
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        per_class = [order[self.y[order] == c] for c in range(num_classes)]
        quota = [limit // num_classes + (1 if c < limit % num_classes else 0) for c in range(num_classes)]
        # classes with fewer images than their quota hand the rest to the others, in class order
        short = sum(max(0, q - len(p)) for q, p in zip(quota, per_class))
        chosen = []
        for c, p in enumerate(per_class):
            take = min(len(p), quota[c])
            extra = min(short, len(p) - take)
            short -= extra
            chosen.append(p[: take + extra])
        return self.subset(torch.sort(torch.cat(chosen)).values)

    def fingerprint(self) -> str:
        """sha256 (first 16 hex) of the images and labels."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.x.numpy()).tobytes())
        h.update(np.ascontiguousarray(self.y.numpy()).tobytes())
        return h.hexdigest()[:16]


HFLIP_DATASETS = frozenset({"cifar10", "demo"})  # demo: a CIFAR-10 subset


@dataclasses.dataclass
class Dataset:
    """A train/test pair with class names, the normalization models use, and a fingerprint."""

    name: str
    train: ImageSet
    test: ImageSet
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str  # hash of the decoded train and test images and labels
    source: str = ""  # where it was read from
    limit_train: int = 0  # > 0: a class-balanced subset of this many training images (see limited)
    limit_test: int = 0

    def __post_init__(self):
        for split in (self.train, self.test):
            split.hflip = self.hflip

    @property
    def hflip(self) -> bool:
        """Whether training augmentation mirrors images: BackdoorBench flips CIFAR-10 only (its
        ``get_transform``), not traffic signs, Tiny ImageNet or other data."""
        return self.name in HFLIP_DATASETS

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def limited(self, limit_train: int = 0, limit_test: int = 0, seed: int = 0) -> Dataset:
        """A class-balanced random subset (0 = the whole split), with its own fingerprint and the
        limits recorded in :meth:`describe` so a model trained on it can be evaluated on it again."""
        if not limit_train and not limit_test:
            return self
        train = self.train.balanced_subset(limit_train, self.num_classes, seed)
        test = self.test.balanced_subset(limit_test, self.num_classes, seed)
        fp = hashlib.sha256(f"{self.fingerprint}:{train.fingerprint()}:{test.fingerprint()}".encode()).hexdigest()[:16]
        return Dataset(self.name, train, test, self.classes, self.mean, self.std, fingerprint=fp,
                       source=f"{self.source} (subset: {len(train)} train, {len(test)} test)",
                       limit_train=limit_train, limit_test=limit_test)

    def describe(self) -> dict:
        return {
            "limit_train": self.limit_train,
            "limit_test": self.limit_test,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "train": len(self.train),
            "test": len(self.test),
            "image_shape": list(self.train.image_shape),
            "num_classes": self.num_classes,
            "hflip": self.hflip,
        }
