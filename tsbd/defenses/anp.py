"""Adversarial Neuron Pruning (Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
Models", NeurIPS 2021), as BackdoorBench runs it (``defense/anp.py``), with the pruning level
chosen on held-out clean data instead of the test set.

1. :func:`optimize_anp_masks` -- on a copy of the model, every BN channel gets a mask m in [0, 1]
   (init 1). Per batch: draw perturbations delta ~ U(-eps, eps) on gamma (as gamma (m + delta))
   and on beta (as beta (1 + delta_b)), take ``anp_steps`` signed ascent steps of size
   eps / steps on them, then update m by SGD on alpha CE(natural) + (1 - alpha) CE(perturbed)
   and clip m to [0, 1]. Model in train mode, as the authors' and BackdoorBench's ``mask_train``.
2. :func:`select_threshold` -- prune the ORIGINAL model's channels with m <= t (gamma = 0) for
   t = 0, 0.05, ..., 0.90 and measure accuracy on a held-out part of the clean data; keep the
   largest t whose relative held-out accuracy drop is < ``acc_ratio``.

Differences from BackdoorBench: it keeps the threshold with the lowest TEST ASR among those
whose TEST accuracy dropped < 10% (it reads the test set); we cannot look at poisoned data, so we
take the most pruning that the held-out clean accuracy tolerates, on a held-out part that the
masks never saw. Its held-out drop is two-sided (|acc - acc0| / acc0); ours counts drops only.
Masks are compared at full precision (BackdoorBench rounds them to 4 decimals via a text file).
Iterations run as whole epochs over the mask-training part (sampling without replacement inside
an epoch; BackdoorBench samples with replacement), so ``nb_iter`` is rounded up to an epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path

import torch
from torch import nn

from tsbd.config import FRACTION, MOMENTUM, NON_NEGATIVE, POSITIVE, Range, option
from tsbd.data.base import ImageSet
from tsbd.data.poison import holdout_split
from tsbd.defenses.base import DEFENSES, Defense, DefenseConfig
from tsbd.defenses.masking import BNMasks, mask_summary, masked_batchnorm, prune_bn_channels, thresholds
from tsbd.metrics import accuracy
from tsbd.train.engine import FitResult, TrainConfig, fit, predict
from tsbd.train.runtime import Runtime

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ANPConfig(DefenseConfig):
    anp_eps: float = option(0.4, "perturbation bound eps on BN gamma/beta", "BackdoorBench anp config; ANP paper",
                            check=NON_NEGATIVE)
    anp_steps: int = option(1, "signed ascent steps on the perturbation per batch", "BackdoorBench anp config",
                            check=NON_NEGATIVE)
    anp_alpha: float = option(0.2, "weight of the natural loss (1 - alpha on the perturbed loss)",
                              "BackdoorBench anp config; ANP paper", check=FRACTION)
    mask_lr: float = option(0.01, "mask SGD learning rate (the ANP paper/authors' code use 0.2)",
                            "BackdoorBench anp config lr (anp.py:736-738)", check=POSITIVE)
    mask_momentum: float = option(0.9, "mask SGD momentum", "BackdoorBench anp.py / ANP code", check=MOMENTUM)
    nb_iter: int = option(2000, "mask optimization iterations (rounded up to whole epochs)",
                          "BackdoorBench anp config; ANP paper", check=NON_NEGATIVE)
    pruning_max: float = option(0.90, "largest mask threshold tried", "BackdoorBench anp config", check=FRACTION)
    pruning_step: float = option(0.05, "threshold step of the sweep", "BackdoorBench anp config",
                                 check=Range(0, 1, low_open=True))
    acc_ratio: float = option(0.1, "largest tolerated relative drop of held-out clean accuracy",
                              "BackdoorBench anp config (applied to held-out data here)", check=FRACTION)
    holdout_fraction: float = option(0.2, "fraction of the clean data held out to choose the threshold",
                                     "tsbd, as FP (BackdoorBench chooses on the test set)",
                                     check=Range(0, 1, low_open=True, high_open=True))
    augment: bool = option(True, "random crop + flip on clean batches", "BackdoorBench train transform")


def anp_step(bn: BNMasks, eps: float, steps: int, alpha: float, generator: torch.Generator):
    """One ANP mask update (BackdoorBench ``mask_train`` body) as a :func:`fit` step."""
    noise_opt = torch.optim.SGD(bn.noises(), lr=eps / max(1, steps)) if eps > 0 else None
    masks = bn.masks()

    def step(model, x, y, optimizer, runtime):
        if noise_opt is not None:
            bn.reset_noise(eps, generator)
            bn.perturb(True)
            noises = bn.noises()
            for _ in range(steps):  # maximize CE over the perturbation: signed gradient ascent
                with runtime.autocast():
                    loss_noise = -nn.functional.cross_entropy(model(x).float(), y)
                grads = torch.autograd.grad(loss_noise, noises)
                for p, g in zip(noises, grads):
                    p.grad = g.sign()
                noise_opt.step()
            with runtime.autocast():
                loss_rob = nn.functional.cross_entropy(model(x).float(), y)
        else:
            loss_rob = torch.zeros((), device=x.device)
        bn.perturb(False)
        with runtime.autocast():
            loss_nat = nn.functional.cross_entropy(model(x).float(), y)
        loss = alpha * loss_nat + (1 - alpha) * loss_rob
        grads = torch.autograd.grad(loss, masks)
        for p, g in zip(masks, grads):
            p.grad = g
        optimizer.step()
        bn.clip_masks()
        return loss.detach()

    return step


def optimize_anp_masks(model: nn.Module, data: ImageSet, cfg: ANPConfig, runtime: Runtime, *, seed: int = 0,
                       progress: bool = False, checkpoint: str | Path | None = None,
                       ) -> tuple[dict[str, torch.Tensor], dict, FitResult]:
    """Learn ANP's BN channel masks on a copy of ``model``; returns (masks per BN layer, info, the
    fit's result). With ``checkpoint``, every epoch is saved there (masks, their momentum, the BN
    statistics, the perturbation draws) and a rerun resumes."""
    work = copy.deepcopy(model)
    batch = min(cfg.batch_size, len(data))
    steps_per_epoch = max(1, len(data) // batch)
    epochs = max(1, math.ceil(cfg.nb_iter / steps_per_epoch)) if cfg.nb_iter > 0 else 0
    train_cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=cfg.mask_lr, momentum=cfg.mask_momentum,
                            weight_decay=0.0, schedule="constant", augment=cfg.augment, drop_last=True)
    generator = torch.Generator().manual_seed(seed + 1)
    with masked_batchnorm(work, perturbable=True) as bn:
        opt = torch.optim.SGD(bn.masks(), lr=cfg.mask_lr, momentum=cfg.mask_momentum)
        res = fit(work, data, train_cfg, runtime, seed=seed, optimizer=opt, progress=progress,
                  step=anp_step(bn, cfg.anp_eps, cfg.anp_steps, cfg.anp_alpha, generator),
                  desc="ANP mask optimization", checkpoint=checkpoint,
                  checkpoint_generators={"perturbation": generator})
        masks = bn.values()
    return masks, {"iterations": res.epochs * steps_per_epoch, "epochs": res.epochs,
                   "final_loss": res.history[-1]["loss"] if res.history else math.nan}, res


def select_threshold(model: nn.Module, masks: dict[str, torch.Tensor], heldout: ImageSet, cfg: ANPConfig,
                     runtime: Runtime) -> tuple[float | None, list[dict]]:
    """Sweep thresholds on copies of ``model``; the largest whose held-out accuracy dropped by a
    relative < ``acc_ratio`` (None when even threshold 0 costs more)."""
    acc0 = accuracy(predict(model, heldout.x, runtime), heldout.y)
    sweep, chosen = [], None
    for t in thresholds(cfg.pruning_max, cfg.pruning_step):
        pruned_model = copy.deepcopy(model)
        pruned = prune_bn_channels(pruned_model, masks, t)
        acc = accuracy(predict(pruned_model, heldout.x, runtime), heldout.y)
        drop = (acc0 - acc) / acc0 if acc0 > 0 else 0.0
        ok = drop < cfg.acc_ratio
        sweep.append({"threshold": t, "pruned": sum(map(len, pruned.values())), "heldout_acc": acc,
                      "relative_drop": drop, "eligible": ok})
        if ok:
            chosen = t
    return chosen, sweep


@DEFENSES.register("anp")
class ANP(Defense):
    """Adversarial Neuron Pruning (mask optimization under neuron perturbation, then pruning)."""

    name = "anp"
    config_class = ANPConfig

    def run(self, model, clean, *, runtime, seed, progress, stages, result):
        cfg: ANPConfig = self.config
        fit_part, heldout = holdout_split(clean, cfg.holdout_fraction, seed)
        with stages.stage("mask_optimization"):
            masks, result.info["mask_optimization"], res = optimize_anp_masks(
                model, fit_part, cfg, runtime, seed=seed, progress=progress,
                checkpoint=stages.checkpoint("mask_optimization"))
        stages.resumed("mask_optimization", res.resumed_at, res.earlier_seconds)
        with stages.stage("threshold_selection"):
            chosen, sweep = select_threshold(model, masks, heldout, cfg, runtime)
        if chosen is None:
            log.warning("ANP: every threshold costs more than %.0f%% held-out accuracy; the model is not pruned",
                        100 * cfg.acc_ratio)
            pruned = {}
        else:
            pruned = prune_bn_channels(model, masks, chosen)
        stages.observe("after_prune", model)
        result.info.update({
            "mask_stats": mask_summary(masks),
            "mask_values": {name: v.tolist() for name, v in masks.items()},
            "threshold": chosen,
            "sweep": sweep,
            "heldout_size": len(heldout),
            "pruned_total": sum(map(len, pruned.values())),
            "pruned_channels": pruned,
        })
        return model
