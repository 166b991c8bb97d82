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
    """Images ``x`` (uint8, N x C x H x W) with integer labels ``y`` (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor

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

    def subset(self, indices) -> "ImageSet":
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageSet(self.x[idx], self.y[idx])

    def fingerprint(self) -> str:
        """sha256 (first 16 hex) of the images and labels."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.x.numpy()).tobytes())
        h.update(np.ascontiguousarray(self.y.numpy()).tobytes())
        return h.hexdigest()[:16]


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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "train": len(self.train),
            "test": len(self.test),
            "image_shape": list(self.train.image_shape),
            "num_classes": self.num_classes,
        }
