"""SIG (Barni et al., 2019, "A new backdoor attack in CNNs by training set corruption without
label poisoning"): a clean-label attack that adds a horizontal sinusoid to target-class images.

As BackdoorBench configures it (``config/attack/sig/default.yaml``,
``utils/bd_img_transform/sig.py``): pattern(i, j) = delta * sin(2 pi j f / W) over columns j,
the same for every row and channel, delta = 40, f = 6; x' = uint8(clip(x + pattern, 0, 255))
(the cast truncates). Only target-class training images are poisoned, round(ratio * N) of them
capped at the class size (on CIFAR-10 that is all 5,000), labels kept; at test time every
non-target image gets the same signal.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from tsbd.attacks.base import ATTACKS, Attack, AttackConfig
from tsbd.attacks.resources import tensors_sha256
from tsbd.config import NON_NEGATIVE, POSITIVE, option


@dataclasses.dataclass(frozen=True)
class SIGConfig(AttackConfig):
    delta: float = option(40.0, "amplitude of the sinusoid on the 0-255 scale",
                          "BackdoorBench sig/default.yaml sig_delta", check=NON_NEGATIVE)
    frequency: float = option(6.0, "periods of the sinusoid across the image width",
                              "BackdoorBench sig/default.yaml sig_f", check=POSITIVE)


def sig_pattern(shape: tuple[int, int, int], delta: float, frequency: float) -> torch.Tensor:
    """The C x H x W float pattern delta * sin(2 pi j f / W), constant over rows and channels."""
    c, h, w = shape
    j = torch.arange(w, dtype=torch.float64)
    row = delta * torch.sin(2 * math.pi * j * frequency / w)
    return row.to(torch.float32).view(1, 1, w).expand(c, h, w).contiguous()


@ATTACKS.register("sig")
class SIG(Attack):
    """SIG (Barni et al., 2019): clean-label; a horizontal sinusoid added to target-class images."""

    name = "sig"
    config_class = SIGConfig
    clean_label = True

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._pattern: torch.Tensor | None = None

    def prepare(self, dataset, **context):
        super().prepare(dataset, **context)
        self.pattern(dataset.train.image_shape)

    def pattern(self, shape: tuple[int, int, int]) -> torch.Tensor:
        if self._pattern is None or tuple(self._pattern.shape) != tuple(shape):
            self._pattern = sig_pattern(shape, self.config.delta, self.config.frequency)
        return self._pattern

    def apply(self, x, index=None, split="train"):
        out = x.float() + self.pattern(tuple(x.shape[1:]))
        return out.clamp_(0, 255).to(torch.uint8)  # truncation, as BackdoorBench's astype(np.uint8)

    def describe(self):
        out = super().describe()
        if self._pattern is not None:
            out["resource"] = {"kind": "analytic sinusoid", "shape": list(self._pattern.shape),
                               "fingerprint": tensors_sha256({"pattern": self._pattern})[:16]}
        return out
