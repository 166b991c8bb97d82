"""Blended (Chen et al., 2017): blend a whole trigger image into the input, x' = (1-a) x + a t.

BackdoorBench blends Hello Kitty with a = 0.2 (pass it with ``trigger_image``). Its licence
keeps it out of this package, so the default trigger is our own: uniform random RGB noise from
a fixed seed (the Blended paper's other trigger kind), made at the data's image size.
"""

from __future__ import annotations

import dataclasses

import torch

from tsbd.attacks.base import ATTACKS, Attack, AttackConfig, load_trigger_image
from tsbd.config import FRACTION, UNCONSTRAINED, option

DEFAULT_PATTERN_SEED = 20171215  # the Blended paper's arXiv date; fixed so every run gets the same trigger


def default_blend_pattern(shape: tuple[int, int, int]) -> torch.Tensor:
    """tsbd's default Blended trigger: seeded uniform noise, uint8 C x H x W."""
    gen = torch.Generator().manual_seed(DEFAULT_PATTERN_SEED)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


@dataclasses.dataclass(frozen=True)
class BlendedConfig(AttackConfig):
    blend_ratio: float = option(0.2, "trigger weight alpha in training and test", "BackdoorBench blended/default.yaml",
                                check=FRACTION)
    trigger_image: str = option("", "image file to blend (BackdoorBench: hello_kitty.jpeg); empty = seeded noise",
                                "tsbd default (Hello Kitty licence excludes it)", check=UNCONSTRAINED)


@ATTACKS.register("blended")
class Blended(Attack):
    """Blended (Chen et al., 2017): a trigger image blended into the whole input."""

    name = "blended"
    config_class = BlendedConfig

    def trigger(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The C x H x W uint8 image blended into the input."""
        return self.memo_trigger(shape, self._build_trigger)

    def _build_trigger(self, shape: tuple[int, int, int]) -> torch.Tensor:
        if self.config.trigger_image:
            return load_trigger_image(self.config.trigger_image, shape[1:])[: shape[0]]
        return default_blend_pattern(shape)

    def apply(self, x, index=None, split="train"):
        a = self.config.blend_ratio
        t = self.trigger(tuple(x.shape[1:])).float()
        out = (1 - a) * x.float() + a * t
        return out.clamp_(0, 255).to(torch.uint8)  # truncation, as BackdoorBench's astype(uint8)
