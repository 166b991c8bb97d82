"""BadNets (Gu et al., 2019): a small patch stamped on the image, label flipped to the target.

Default trigger as in BackdoorBench: a white 3x3 square in the bottom-right corner (6x6 on
64-pixel images, paper App. C). ``trigger_image`` takes any image: its non-zero pixels mark and
fill the patch (BackdoorBench's formula x' = x*[t=0] + t*[t>0]).
"""

from __future__ import annotations

import dataclasses

import torch

from tsbd.attacks.base import ATTACKS, Attack, AttackConfig, load_trigger_image
from tsbd.config import NON_NEGATIVE, UNCONSTRAINED, option


@dataclasses.dataclass(frozen=True)
class BadNetsConfig(AttackConfig):
    patch_size: int = option(0, "side of the white square; 0 = 3 per 32 px of image (3 on CIFAR, 6 on Tiny ImageNet)",
                             "BackdoorBench resource/badnet; paper App. C", check=NON_NEGATIVE)
    trigger_image: str = option("", "image file whose non-zero pixels are the patch (overrides patch_size)",
                                "BackdoorBench trigger_image.png format", check=UNCONSTRAINED)


@ATTACKS.register("badnets")
class BadNets(Attack):
    """BadNets (Gu et al., 2019): a small white patch stamped on the image, label flipped to the target."""

    name = "badnets"
    config_class = BadNetsConfig

    def trigger(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The C x H x W uint8 trigger for images of ``shape`` (zero where the image is kept)."""
        return self.memo_trigger(shape, self._build_trigger)

    def _build_trigger(self, shape: tuple[int, int, int]) -> torch.Tensor:
        c, h, w = shape
        if self.config.trigger_image:
            return load_trigger_image(self.config.trigger_image, (h, w))[:c]
        k = self.config.patch_size or max(1, round(3 * h / 32))
        t = torch.zeros(shape, dtype=torch.uint8)
        t[:, h - k :, w - k :] = 255
        return t

    def apply(self, x, index=None, split="train"):
        t = self.trigger(tuple(x.shape[1:]))
        return torch.where(t > 0, t, x)
