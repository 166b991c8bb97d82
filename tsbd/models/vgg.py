"""VGG19 with batch norm, as torchvision builds it (BackdoorBench's ``vgg19_bn``).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015. BackdoorBench calls ``torchvision.models.vgg19_bn(num_classes=...)`` unchanged
(BB ``utils/aggregate_block/model_trainer_generate.py:90-96``), so layout, module names and
initialization follow torchvision ``models/vgg.py`` (config "E"): ``features.N`` with 16
conv3x3+BN+ReLU and 5 max-pools (last conv ``features.49``), ``avgpool`` to 7x7 (a 32x32
input's 1x1 map is replicated), ``classifier`` of three linear layers. Torchvision itself is
not a dependency; its state dicts load here with ``strict=True``.

``width`` (torchvision: 64) scales every layer for CPU-scale runs: the convolutions have
width x (1, 2, 4, 8, 8) channels per stage and the two hidden linear layers 64 x width units
(4096 at width 64), so layout, names and initialization stay torchvision's at any width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tsbd.errors import TsbdError
from tsbd.models import MODELS
from tsbd.models.normalize import Normalize

# torchvision vgg.py cfgs["E"]: channel counts, "M" = 2x2 max-pool.
VGG19_CFG: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
]


def scaled_cfg(cfg: Sequence[int | str], width: int) -> list[int | str]:
    """``cfg`` with every channel count scaled by ``width / 64`` (torchvision's first layer has 64)."""
    return [v if v == "M" else int(v) * width // 64 for v in cfg]


def make_layers(cfg: Sequence[int | str]) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1), nn.BatchNorm2d(int(v)),
                       nn.ReLU(inplace=True)]
            in_channels = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        dropout: float = 0.5,
        hidden: int = 4096,
    ):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = make_layers(cfg)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        last = [v for v in cfg if v != "M"][-1]
        self.classifier = nn.Sequential(
            nn.Linear(int(last) * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        # torchvision's init (vgg.py VGG.__init__).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


@MODELS.register("vgg19_bn")
def vgg19_bn(num_classes: int, *, mean: Sequence[float], std: Sequence[float], width: int = 64) -> VGG:
    """torchvision's ``vgg19_bn(num_classes=num_classes)`` (dropout 0.5), as BackdoorBench uses it;
    ``width`` (torchvision: 64) scales the convolutions (w, 2w, 4w, 8w, 8w) and the hidden layers (64w)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise TsbdError(f"vgg19_bn width must be a positive integer, got {width!r}; the default is 64")
    return VGG(scaled_cfg(VGG19_CFG, width), num_classes, mean, std, hidden=64 * width)
