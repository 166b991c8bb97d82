"""Fine-Pruning (FP): Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID 2018.

1. :func:`rank_feature_channels` -- rank the channels of the last convolutional feature map by
   their mean activation on clean data, least active first (backdoor neurons are dormant on
   clean inputs); or, with ``order="nwc"`` (TSBD paper App. F), :func:`nwc_feature_order` --
   largest Neuron Weight Change of TSBD's clean unlearning first;
2. :func:`prune_sweep` -- prune them in steps of ``once_prune_ratio`` of the channels and keep
   the LAST step whose held-out clean accuracy dropped by less than ``acc_ratio`` (relative);
3. fine-tune with the pruned channels held at zero (:func:`tsbd.defenses.ft.finetune`).

Where the pruning happens. The paper prunes the last conv layer's channels. We prune the
channels of the feature map the classifier reads (:func:`tsbd.models.surgery.classifier_layout`)
by zeroing the classifier's input columns of each pruned channel: nothing else reads that map, so
this removes the channel exactly, and the state dict keeps its keys. For PreActResNet18 these are
layer4's 512 output channels after global pooling -- the ``linear`` inputs BackdoorBench prunes;
for VGG19-BN the 512 channels of the last (1x1, replicated to 7x7) map, 49 ``classifier.0``
columns each, where BackdoorBench prunes the 25,088 columns one at a time.

Deviations from BackdoorBench (SCLBD/BackdoorBench @ f02e353 ``defense/fp.py``: the hook on the last
child, lines 294-301; the pruning loop and its stop rule on test accuracy, lines 339-380), as the
paper intends:
* the pruning level is chosen on a held-out part of the clean set, not on the test set;
* the step kept is the last one within the accuracy budget (BackdoorBench keeps the mask of the
  first violating step), and step k prunes exactly k channels (BackdoorBench prunes k - 1);
* the budget is one-sided: a step violates it when accuracy FALLS by ``acc_ratio`` or more
  (BackdoorBench's ``abs`` also stops on a 10% rise).
The fine-tuning uses the whole clean set (held-out part included) with BackdoorBench's schedule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from tsbd.config import AT_LEAST_ONE, FRACTION, POSITIVE, Range, option
from tsbd.data.base import ImageSet
from tsbd.data.poison import holdout_split
from tsbd.defenses.base import DEFENSES, Defense
from tsbd.defenses.ft import FTConfig, after_each_step, finetune
from tsbd.defenses.tsbd import TSBDConfig, clean_unlearn
from tsbd.errors import TsbdError
from tsbd.metrics import accuracy
from tsbd.models.surgery import (
    ClassifierLayout,
    classifier_layout,
    layer_activations,
    neuron_weight_change,
    prunable_units,
    zero_linear_inputs,
)
from tsbd.train.engine import cross_entropy_step, predict
from tsbd.train.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class FPConfig(FTConfig):
    acc_ratio: float = option(0.1, "stop pruning once held-out clean accuracy falls by this fraction of its start",
                              "BackdoorBench config/defense/fp/config.yaml", check=FRACTION)
    once_prune_ratio: float = option(0.01, "fraction of the channels pruned per step (rounded up)",
                                     "BackdoorBench config/defense/fp/config.yaml", check=Range(0, 1, low_open=True))
    holdout_fraction: float = option(0.2, "part of the clean set held out to choose the pruning level",
                                     "tsbd (BackdoorBench used the test set)",
                                     check=Range(0, 1, low_open=True, high_open=True))
    order: Literal["activation", "nwc"] = option(
        "activation", "pruning order: least clean mean activation first (FP), or largest NWC of TSBD's clean "
        "unlearning of the last conv layer first", "FP paper (nwc: TSBD paper App. F)")
    nwc_unlearn_lr: float = option(1e-4, "order=nwc: clean-unlearning learning rate (TSBD unlearn_lr)",
                                   "TSBD paper App. C", check=POSITIVE)
    nwc_unlearn_max_epochs: int = option(1000, "order=nwc: most clean-unlearning epochs (TSBD unlearn_max_epochs)",
                                         "TSBD authors' config", check=AT_LEAST_ONE)


def rank_feature_channels(model: nn.Module, layout: ClassifierLayout, images: torch.Tensor, runtime: Runtime,
                          batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(channel order, mean activation per channel): the mean over images and positions of each
    channel of the features the classifier reads (eval mode), order ascending, ties by index."""
    c, s = layout.channels, layout.positions
    means = layer_activations(model, f"{layout.linear}:input", images, runtime, batch_size=batch_size,
                              reduce=lambda a: a.reshape(len(a), c, s).mean(2)).mean(0)
    return torch.argsort(means, stable=True), means


def nwc_feature_order(model: nn.Module, layout: ClassifierLayout, clean: ImageSet, cfg: TSBDConfig, runtime: Runtime,
                      *, seed: int = 0, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(channel order, NWC per channel, unlearning info): the classifier's feature channels by
    descending NWC (ties by index) of the last prunable conv under TSBD's clean unlearning
    (:func:`tsbd.defenses.tsbd.clean_unlearn` with ``cfg``). Feature channel k is taken to be that
    conv's neuron k: the same channel through BN / activation / pooling (and, in a residual net,
    plus the shortcut's channel k)."""
    name, conv = prunable_units(model)[-1]
    if conv.out_channels != layout.channels:
        raise TsbdError(f"order=nwc: the last conv {name!r} has {conv.out_channels} channels but the classifier "
                        f"reads {layout.channels}; use order=activation for this architecture")
    unlearned, info = clean_unlearn(model, clean, cfg, runtime, seed=seed, progress=progress)
    nwc = neuron_weight_change(model, unlearned)[name]
    return torch.argsort(nwc, descending=True, stable=True), nwc, {**info, "layer": name}


def prune_sweep(order: torch.Tensor, step: int, holdout_acc: Callable[[torch.Tensor], float],
                acc_ratio: float) -> tuple[int, list[dict]]:
    """Prune ``order[:k]`` for k = step, 2 step, ... and return (k kept, history).

    ``holdout_acc(channels)`` is the held-out accuracy with exactly those channels pruned. The
    sweep stops at the first k whose accuracy fell by ``acc_ratio`` or more relative to k = 0 and
    keeps the k before it (0 if the first step already violates); it also ends once all are pruned.
    """
    if step < 1:
        raise ValueError("step must be >= 1")
    acc0 = holdout_acc(order[:0])
    history = [{"pruned": 0, "holdout_acc": acc0}]
    kept = 0
    k = 0
    while k < len(order):
        k = min(k + step, len(order))
        acc = holdout_acc(order[:k])
        history.append({"pruned": k, "holdout_acc": acc})
        if acc0 - acc >= acc_ratio * acc0:
            break
        kept = k
    return kept, history


@DEFENSES.register("fp")
class FinePruning(Defense):
    """Fine-Pruning (Liu et al. 2018) on the channels of the classifier's feature map."""

    name = "fp"
    config_class = FPConfig

    def run(self, model, clean, *, runtime, seed, progress, stages, result):
        cfg: FPConfig = self.config
        fit_part, holdout = holdout_split(clean, cfg.holdout_fraction, seed)
        with stages.stage("rank"):
            layout = classifier_layout(model, clean.image_shape)
            order, means = rank_feature_channels(model, layout, fit_part.x, runtime, cfg.batch_size)
        if cfg.order == "nwc":
            with stages.stage("nwc"):
                unlearn_cfg = TSBDConfig(batch_size=cfg.batch_size, unlearn_lr=cfg.nwc_unlearn_lr,
                                         unlearn_max_epochs=cfg.nwc_unlearn_max_epochs)
                order, nwc, result.info["unlearn"] = nwc_feature_order(model, layout, fit_part, unlearn_cfg, runtime,
                                                                       seed=seed, progress=progress)
        linear = dict(model.named_modules())[layout.linear]
        original = linear.weight.detach().clone()

        def holdout_acc(channels: torch.Tensor) -> float:
            with torch.no_grad():
                linear.weight.copy_(original)
            zero_linear_inputs(linear, layout.columns(channels))
            return accuracy(predict(model, holdout.x, runtime, cfg.batch_size), holdout.y)

        with stages.stage("prune"):
            step = max(1, math.ceil(cfg.once_prune_ratio * layout.channels))
            kept, history = prune_sweep(order, step, holdout_acc, cfg.acc_ratio)
            pruned = order[:kept]
            columns = layout.columns(pruned)
            with torch.no_grad():
                linear.weight.copy_(original)
            zero_linear_inputs(linear, columns)
        result.info.update({
            "classifier": layout.linear, "channels": layout.channels, "positions": layout.positions,
            "holdout_images": len(holdout), "step": step, "sweep": history, "pruned": int(kept),
            "pruned_fraction": kept / layout.channels, "pruned_channels": pruned.tolist(),
            "holdout_acc_kept": next(h["holdout_acc"] for h in history if h["pruned"] == kept),
            "mean_activation_pruned": means[pruned].tolist(),
        })
        if cfg.order == "nwc":
            result.info["nwc_pruned"] = nwc[pruned].tolist()
        stages.observe("after_prune", model)

        def hold(m: nn.Module) -> None:
            zero_linear_inputs(dict(m.named_modules())[layout.linear], columns)

        with stages.stage("finetune"):
            result.info["finetune"] = finetune(model, clean, cfg, runtime, seed=seed, progress=progress,
                                               step=after_each_step(cross_entropy_step(), hold), desc="FP fine-tune")
        stages.observe("after_finetune", model)
        return model
