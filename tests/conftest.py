"""Shared fixtures: a tiny real data set (from the embedded demo subset), tiny models, a CPU runtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from tsbd.train.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TSBD_TEST_SHARED_DATA", REPO.parent / "shared" / "data"))

# a grid of tiny cells on the embedded demo subset: seconds each
TINY_GRID = """\
name = "{name}"
dataset = "demo"
model = "airbench"
preset = "cpu"
attack = {attacks}
defense = {defenses}
poison_ratio = 0.1
clean_ratio = 0.25
seed = 0
limit_train = 300
limit_test = 100

[train]
epochs = {epochs}
batch_size = 64

[model_opts.airbench]
widths = {widths}

[defense_opts.tsbd]
unlearn_lr = 0.01
unlearn_max_epochs = 3
finetune_epochs = 1
"""


def write_tiny_grid(folder: Path, *, name: str = "tiny", attacks=("badnets", "blended"), defenses=("none", "tsbd"),
                    epochs: int = 1, widths=(16, 32, 32)) -> Path:
    """Write a tiny grid (default: 2 attacks x (No Defense + TSBD)) to ``folder/NAME.toml``."""
    path = Path(folder) / f"{name}.toml"
    path.write_text(TINY_GRID.format(name=name, attacks=json.dumps(list(attacks)), defenses=json.dumps(list(defenses)),
                                     epochs=epochs, widths=list(widths)))
    return path


@pytest.fixture(scope="session")
def runtime() -> Runtime:
    # fp32 keeps the hand computations exact; 2 threads is the CI machine
    return Runtime.create("cpu", "fp32", threads=2)


@pytest.fixture(scope="session")
def demo():
    from tsbd.data import load_dataset

    return load_dataset("demo")


@pytest.fixture(scope="session")
def small(demo):
    """A few hundred real CIFAR-10 images: 1,200 train / 400 test, class-balanced."""
    from tsbd.data.base import Dataset

    def take(split, per_class):
        idx = torch.cat([torch.nonzero(split.y == c).flatten()[:per_class] for c in range(10)])
        return split.subset(torch.sort(idx).values)

    train, test = take(demo.train, 120), take(demo.test, 40)
    return Dataset("demo-small", train, test, demo.classes, demo.mean, demo.std,
                   fingerprint=train.fingerprint() + test.fingerprint(), source="demo subset")


class TinyNet(nn.Module):
    """A 3-conv net with a 1x1 shortcut, for surgery tests."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False))
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + self.shortcut(h))
        return self.linear(h.mean((2, 3)))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


# Tiny settings for attacks that generate resources, so registry-wide tests run in seconds.
TINY_ARCH = {"arch": "airbench", "arch_kwargs": {"widths": [8, 16, 32]}}
TINY_ATTACKS = {
    "inputaware": {"width": 0.125, "mask_epochs": 1, "joint_epochs": 1, "batch_size": 64},
    "lf": {"images": 300, "epochs": 2, "batch_size": 100, "clean_epochs": 2},
    "ssba": {"train_images": 512, "epochs": 6, "width": 8, "secret_bits": 16, "batch_size": 16},
    "trojan": {"mask_update_iters": 40, "clean_epochs": 2},
}


@pytest.fixture(scope="module")
def trained(small, runtime):
    """A tiny airbench trained 2 epochs on the small set (weak but far above chance)."""
    from tsbd.models import build_model
    from tsbd.train import TrainConfig, fit

    torch.manual_seed(0)
    model = build_model("airbench", 10, mean=small.mean, std=small.std, widths=(16, 32, 32))
    fit(model, small.train, TrainConfig(epochs=2, batch_size=128, lr=0.2, nesterov=True, schedule="onecycle"),
        runtime, progress=False)
    return model.eval()


def state_copy(model):
    """A detached copy of a model's state dict, to check later that the model was not modified."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
