"""Fine-tuning (FT): plain cross-entropy fine-tuning of the backdoored model on the clean set.

The baseline every purification paper compares against; BackdoorBench ``defense/ft.py`` with its
``config/defense/ft/config.yaml`` defaults (100 epochs, SGD 0.01 / momentum 0.9 / weight decay
5e-4, cosine schedule stepped per epoch, batch 256, train augmentation, last batch kept).

:func:`finetune` is the fine-tuning stage FP reuses (with its pruning mask held by ``step``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

from torch import nn

from tsbd.config import MOMENTUM, NON_NEGATIVE, POSITIVE, option
from tsbd.data.base import ImageSet
from tsbd.defenses.base import DEFENSES, Defense, DefenseConfig
from tsbd.train.engine import StepFn, TrainConfig, cross_entropy_step, fit
from tsbd.train.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class FTConfig(DefenseConfig):
    epochs: int = option(100, "fine-tuning epochs", "BackdoorBench config/defense/ft/config.yaml", check=NON_NEGATIVE)
    lr: float = option(0.01, "SGD learning rate (peak of the schedule)", "BackdoorBench config/defense/ft/config.yaml",
                       check=POSITIVE)
    momentum: float = option(0.9, "SGD momentum", "BackdoorBench config/defense/ft/config.yaml", check=MOMENTUM)
    weight_decay: float = option(5e-4, "SGD weight decay", "BackdoorBench config/defense/ft/config.yaml",
                                 check=NON_NEGATIVE)
    schedule: Literal["cosine", "constant"] = option(
        "cosine", "learning-rate schedule (cosine annealing to 0 over `epochs`, stepped per epoch)",
        "BackdoorBench CosineAnnealingLR")
    augment: bool = option(True, "random crop + flip on clean batches", "BackdoorBench train transform")


def finetune(model: nn.Module, clean: ImageSet, cfg: FTConfig, runtime: Runtime, *, seed: int = 0,
             progress: bool = False, step: StepFn | None = None, desc: str = "FT") -> dict:
    """Fine-tune ``model`` in place on ``clean`` with ``cfg``'s optimizer and schedule; ``step``
    defaults to a cross-entropy SGD step. Returns epochs run and the loss of the first and last epoch."""
    if cfg.epochs == 0:
        return {"epochs": 0}
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                            weight_decay=cfg.weight_decay, schedule=cfg.schedule, augment=cfg.augment,
                            drop_last=False)  # BackdoorBench's defense loaders keep the last batch
    res = fit(model, clean, train_cfg, runtime, seed=seed, step=step or cross_entropy_step(), desc=desc,
              progress=progress)
    losses = [h["loss"] for h in res.history]
    return {"epochs": res.epochs, "first_loss": losses[0] if losses else math.nan,
            "final_loss": losses[-1] if losses else math.nan}


def after_each_step(step: StepFn, hold: Callable[[nn.Module], object]) -> StepFn:
    """``step`` followed by ``hold(model)``: re-applies a pruning mask after every update so pruned
    units stay at zero through fine-tuning (momentum and weight decay would otherwise revive them)."""

    def masked(model, x, y, optimizer, runtime):
        loss = step(model, x, y, optimizer, runtime)
        hold(model)
        return loss

    return masked


@DEFENSES.register("ft")
class FineTuning(Defense):
    """Plain fine-tuning on the clean set (BackdoorBench ``ft``)."""

    name = "ft"
    config_class = FTConfig

    def run(self, model, clean, *, runtime, seed, progress, stages, result):
        with stages.stage("finetune"):
            result.info["finetune"] = finetune(model, clean, self.config, runtime, seed=seed, progress=progress)
        stages.observe("after_finetune", model)
        return model
