"""The Input-aware attack's generator and mask networks (Nguyen & Tran, NeurIPS 2020).

Both are the same encoder-decoder as BackdoorBench's ``InputAwareGenerator``
(attack/inputaware.py:117-247): ``steps`` down stages of two Conv3x3-BN-ReLU blocks and a 2x2
max-pool (widths 32, 64, 128 on 32-pixel images), a middle block, then ``steps`` up stages of a
bilinear x2 upsample and two blocks back down to the output channels; the very last block has
no ReLU, and the output is squashed to [0, 1] by ``tanh(.) / (2 + 1e-7) + 0.5`` (once, as in
the authors' code; BackdoorBench's forward loop also runs its registered ``self.tanh`` child,
squashing twice). Module names match BackdoorBench's, so its ``netG`` / ``netM`` state dicts
load unchanged (at width 1).

The networks take *normalized* images (as BackdoorBench's data pipeline hands them over);
callers normalize with the data set's mean/std first.
"""

from __future__ import annotations

import torch
from torch import nn

EPSILON = 1e-7  # BackdoorBench inputaware default.yaml EPSILON
BN_MOMENTUM = 0.05  # BackdoorBench Conv2dBlock BatchNorm2d(momentum=0.05)


class ConvBlock(nn.Sequential):
    """Conv3x3 (with bias) -> BatchNorm -> ReLU (BackdoorBench ``Conv2dBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True):
        super().__init__()
        self.add_module("conv2d", nn.Conv2d(in_channels, out_channels, 3, 1, 1))
        self.add_module("batch_norm", nn.BatchNorm2d(out_channels, eps=1e-5, momentum=BN_MOMENTUM))
        if relu:
            self.add_module("relu", nn.ReLU(inplace=True))


class InputAwareGenerator(nn.Sequential):
    """Encoder-decoder mapping normalized images to ``out_channels`` maps in [0, 1].

    ``width`` scales the channel counts (1.0 = BackdoorBench's 32/64/128); ``steps`` is the
    number of down/up stages (3 for 32-pixel and larger images, BackdoorBench's non-MNIST case).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: float = 1.0, steps: int = 3):
        super().__init__()
        first = max(1, round(32 * width))
        current, nxt = in_channels, first
        for step in range(steps):
            self.add_module(f"convblock_down_{2 * step}", ConvBlock(current, nxt))
            self.add_module(f"convblock_down_{2 * step + 1}", ConvBlock(nxt, nxt))
            self.add_module(f"downsample_{step}", nn.MaxPool2d(2, 2))
            if step < steps - 1:
                current, nxt = nxt, nxt * 2
        self.add_module("convblock_middle", ConvBlock(nxt, nxt))
        current, nxt = nxt, nxt // 2
        for step in range(steps):
            self.add_module(f"upsample_{step}", nn.Upsample(scale_factor=2, mode="bilinear"))
            self.add_module(f"convblock_up_{2 * step}", ConvBlock(current, current))
            last = step == steps - 1
            self.add_module(f"convblock_up_{2 * step + 1}", ConvBlock(current, nxt, relu=not last))
            current, nxt = nxt, nxt // 2
            if step == steps - 2:
                nxt = out_channels
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x)) / (2 + EPSILON) + 0.5


def mask_threshold(m: torch.Tensor) -> torch.Tensor:
    """BackdoorBench's ``Threshold``: a steep squash of the mask net's output toward {0, 1}."""
    return torch.tanh(m * 20 - 10) / (2 + EPSILON) + 0.5


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance (BackdoorBench's sqrt(mean(MSE, dims 1-3))).

    The mean square is floored at 1e-12 before the root: sqrt's gradient at 0 is infinite, so
    two identical masks (a mask net saturated to all-0 does that) made the diversity loss's
    gradient NaN and killed the mask stage on some data. Below the floor the gradient is 0."""
    return (a - b).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12).sqrt()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """The paper's diversity term: mean over pairs of d(x1, x2) / (d(p1, p2) + eps). Two
    different inputs must get different patterns (masks)."""
    return (rms_distance(x1, x2) / (rms_distance(p1, p2) + EPSILON)).mean()


class InputAwareTrigger(nn.Module):
    """G and M with the data set's normalization: poisons [0, 1] images as
    ``x + (G(src) - x) * M(src)``, where ``src`` is ``x`` itself (backdoor mode) or another
    image (cross mode, whose trigger must not work on ``x``)."""

    def __init__(self, mean, std, channels: int = 3, width: float = 1.0, steps: int = 3):
        super().__init__()
        from tsbd.models.normalize import Normalize

        self.normalize = Normalize(mean, std)
        self.generator = InputAwareGenerator(channels, channels, width, steps)
        self.mask_net = InputAwareGenerator(channels, 1, width, steps)

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        """Masks in [0, 1] (1 x H x W per image) for [0, 1] images."""
        return mask_threshold(self.mask_net(self.normalize(x)))

    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        """Patterns in [0, 1] (C x H x W per image) for [0, 1] images."""
        return self.generator(self.normalize(x))

    def forward(self, x: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        source = x if source is None else source
        return blend(x, self.patterns(source), self.masks(source))


def blend(x: torch.Tensor, patterns: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The Input-aware trigger function: x + (pattern - x) * mask."""
    return x + (patterns - x) * masks
