"""Attack-training presets: named :class:`~tsbd.train.engine.TrainConfig` recipes (``--preset``).

"backdoorbench" is the paper's schedule (BackdoorBench defaults); "cpu" is the airbench-style recipe
that trains the CPU-scale model in minutes on 2 cores; "gpu" is for paper-scale models.
"""

from __future__ import annotations

from typing import Any

from tsbd.config import override
from tsbd.errors import TsbdError
from tsbd.train.engine import TrainConfig

TRAIN_PRESETS: dict[str, TrainConfig] = {
    "backdoorbench": TrainConfig(),
    "cpu": TrainConfig(epochs=30, batch_size=256, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       schedule="onecycle", warmup=0.2, label_smoothing=0.1),
    "gpu": TrainConfig(epochs=35, batch_size=512, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       schedule="onecycle", warmup=0.15),
}
PRESET_HELP = {
    "backdoorbench": "BackdoorBench defaults: 100 epochs, batch 128, SGD 0.01/0.9/5e-4, cosine (paper scale)",
    "cpu": "CPU preset: 30 epochs, batch 256, SGD nesterov lr 0.2, wd 5e-4, onecycle, label smoothing 0.1",
    "gpu": "GPU preset for paper-scale models: 35 epochs, batch 512, SGD nesterov lr 0.1, wd 5e-4, onecycle",
}


def train_config(preset: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    if preset not in TRAIN_PRESETS:
        raise TsbdError(f"unknown training preset {preset!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    return override(TRAIN_PRESETS[preset], overrides)
