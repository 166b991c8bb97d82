"""Per-channel input normalization that lives inside every model.

Models take images in [0, 1] and normalize as the first step of ``forward``, so attacks,
defenses and metrics never have to know a data set's statistics. The statistics are
non-persistent buffers: they follow ``.to(device)`` but stay out of ``state_dict``, so a
model's keys are exactly its reference implementation's and BackdoorBench checkpoints load
with ``strict=True``. They are recorded in ``model.arch_spec`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tsbd.errors import TsbdError


def check_stats(mean: Sequence[float], std: Sequence[float], channels: int = 3) -> tuple[list[float], list[float]]:
    """Validate per-channel ``mean`` and ``std`` and return them as lists of floats."""
    try:
        mean_l = [float(v) for v in mean]
        std_l = [float(v) for v in std]
    except (TypeError, ValueError):
        raise TsbdError(
            f"normalization mean/std must be {channels} numbers each, got mean={mean!r} std={std!r}"
        ) from None
    if len(mean_l) != channels or len(std_l) != channels:
        raise TsbdError(
            f"normalization mean/std need {channels} values (one per channel), got "
            f"{len(mean_l)} and {len(std_l)}; pass e.g. mean=(0.4914, 0.4822, 0.4465)"
        )
    if not all(s > 0 for s in std_l) or not all(abs(v) < float("inf") for v in mean_l + std_l):
        raise TsbdError(f"normalization std must be finite and positive, got std={std_l}; fix the data set's stats")
    return mean_l, std_l


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with the statistics as non-persistent buffers."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)):
        super().__init__()
        mean_l, std_l = check_stats(mean, std)
        self.register_buffer("mean", torch.tensor(mean_l).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std_l).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
