"""PreAct-ResNet18 exactly as BackdoorBench defines it (its default model).

He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (arXiv:1603.05027);
layout and parameter names from BackdoorBench ``models/preact_resnet.py`` (SCLBD/BackdoorBench
@ f02e353, lines 15-108), so its checkpoints load here with ``strict=True``:
``conv1``; ``layer1..layer4`` of two :class:`PreActBlock` each (``bn1``, ``conv1``, ``bn2``,
``conv2``, and ``shortcut.0`` when the shape changes); ``avgpool``; ``linear``. All convs are
bias-free and there is no BN/ReLU after ``layer4``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tsbd.errors import TsbdError
from tsbd.models import MODELS
from tsbd.models.normalize import Normalize


class PreActBlock(nn.Module):
    """relu(bn1(x)) -> conv1 -> relu(bn2) -> conv2, plus a shortcut taken after relu(bn1(x))
    when the shape changes (1x1 conv) and from ``x`` itself otherwise."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: int = 64,
    ):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(8 * width * PreActBlock.expansion, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes * PreActBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


@MODELS.register("preact_resnet18")
def preact_resnet18(
    num_classes: int, *, mean: Sequence[float], std: Sequence[float], width: int = 64
) -> PreActResNet:
    """BackdoorBench's PreActResNet18; ``width`` (BB: 64) sets stage widths w, 2w, 4w, 8w."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise TsbdError(f"preact_resnet18 width must be a positive integer, got {width!r}; the default is 64")
    return PreActResNet([2, 2, 2, 2], num_classes, mean, std, width=width)
