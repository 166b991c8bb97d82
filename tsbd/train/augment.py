"""Batch augmentation with torch ops (no per-sample Python work).

BackdoorBench's train transform is RandomCrop(32, padding=4) + RandomHorizontalFlip; these do
the same on a whole uint8 batch at once, on whatever device the batch lives on.
"""

from __future__ import annotations

import torch


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop each image back to its size at a random offset."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # n x h
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # n x w
    batch = torch.arange(n, device=x.device)[:, None, None]
    # advanced indexing picks padded[b, :, rows[b, i], cols[b, j]] -> n x h x w x c
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4) -> torch.Tensor:
    """RandomCrop(size, padding) then RandomHorizontalFlip, as BackdoorBench trains."""
    return random_hflip(random_crop(x, padding, generator), generator)
