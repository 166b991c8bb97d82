"""Batch augmentation with torch ops (no per-sample Python work).

BackdoorBench's train transform is RandomCrop(32, padding=4), plus RandomHorizontalFlip on CIFAR-10
only (GTSRB and Tiny ImageNet are not flipped; :attr:`tsbd.data.ImageSet.hflip`); these do
the same on a whole uint8 batch at once, on whatever device the batch lives on.
"""

from __future__ import annotations

import torch


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop each image back to its size at a random offset.

    Rows, then columns: for each of the ``2 * padding + 1`` offsets, one slice copies every image
    that drew it (a few large copies instead of a per-pixel gather).
    """
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    rows = torch.empty((n, c, h, w + 2 * padding), dtype=x.dtype, device=x.device)
    out = torch.empty_like(x)
    for shift in range(2 * padding + 1):
        pick = (dy == shift).nonzero().squeeze(1)
        if len(pick):
            rows[pick] = padded[pick, :, shift : shift + h, :]
    for shift in range(2 * padding + 1):
        pick = (dx == shift).nonzero().squeeze(1)
        if len(pick):
            out[pick] = rows[pick, :, :, shift : shift + w]
    return out


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4,
              flip: bool = True) -> torch.Tensor:
    """RandomCrop(size, padding) then, if ``flip``, RandomHorizontalFlip, as BackdoorBench trains
    (it flips CIFAR-10 only: ``get_transform`` in utils/aggregate_block/dataset_and_transform_generate.py)."""
    x = random_crop(x, padding, generator)
    return random_hflip(x, generator) if flip else x
