"""Poisoned training/test sets and the clean defense split."""

from __future__ import annotations

import dataclasses

import torch

from tsbd.data.base import ImageSet
from tsbd.errors import TsbdError


@dataclasses.dataclass
class PoisonedTrain:
    """The attacker's training set: ``data`` with poisoned images/labels at ``poison_index``."""

    data: ImageSet
    poison_index: torch.Tensor  # int64 indices into the training set that carry the trigger

    @property
    def poison_mask(self) -> torch.Tensor:
        mask = torch.zeros(len(self.data), dtype=torch.bool)
        mask[self.poison_index] = True
        return mask


@dataclasses.dataclass
class PoisonedTest:
    """Triggered test images (non-target originals), the attacker's labels and the true ones."""

    x: torch.Tensor  # uint8 N x C x H x W
    y_target: torch.Tensor  # int64, the label the attacker wants
    y_true: torch.Tensor  # int64, the original class (for RA)

    def __len__(self) -> int:
        return len(self.x)


def sample_indices(pool: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct elements of ``pool`` chosen with a seeded generator, sorted."""
    if count > len(pool):
        raise TsbdError(f"cannot draw {count} samples from {len(pool)} candidates; lower the ratio")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pool), generator=gen)[:count]
    return torch.sort(pool[pick]).values


def clean_defense_split(n_train: int, poison_index: torch.Tensor | None, ratio: float, seed: int) -> torch.Tensor:
    """Indices of the defender's clean set: a seeded random ``ratio`` of the training set, drawn
    only from images the attack did not poison (the paper's 5% clean data)."""
    if not 0 < ratio <= 1:
        raise TsbdError(f"clean ratio must be in (0, 1], got {ratio}")
    count = round(ratio * n_train)
    if count < 1:
        raise TsbdError(f"clean ratio {ratio} of {n_train} training images selects no image; raise --clean-ratio")
    mask = torch.ones(n_train, dtype=torch.bool)
    if poison_index is not None and len(poison_index):
        mask[poison_index] = False
    return sample_indices(torch.nonzero(mask).flatten(), count, seed)


def holdout_split(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split the defender's clean set into (fit part, held-out part) for choosing a pruning level
    or threshold without touching test data. ``fraction`` of the images go to the held-out part."""
    if not 0 < fraction < 1:
        raise TsbdError(f"held-out fraction must be in (0, 1), got {fraction}")
    n_hold = max(1, round(fraction * len(data)))
    if n_hold >= len(data):
        raise TsbdError(f"the clean set ({len(data)} images) is too small to hold out {fraction:.0%}; add clean data")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(torch.sort(perm[n_hold:]).values), data.subset(torch.sort(perm[:n_hold]).values)
