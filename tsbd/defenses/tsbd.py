"""Two-Stage Backdoor Defense (Lin et al., "Unveiling and Mitigating Backdoor Vulnerabilities
based on Unlearning Weight Changes and Backdoor Activeness", NeurIPS 2024), Alg. 1 and 2.

Stage 1, NWC-based backdoor reinitialization:
  a. :func:`clean_unlearn` -- gradient ascent on clean cross-entropy until clean accuracy <= 10%;
  b. :func:`tsbd.models.surgery.neuron_weight_change` -- NWC = L1(theta_ul - theta_bd) per neuron (Eq. 1);
  c. :func:`zero_reinit` -- among the top-n% neurons by NWC, zero the m% most-changed subweights
     in the ORIGINAL backdoored weights.
Stage 2, :func:`activeness_aware_finetune` -- fine-tune with the gradient-norm penalty (Eq. 2),
  approximated as g = (1 - a) g1 + a g2, g2 taken at theta + r g1 / ||g1|| (Eq. 5, Alg. 2).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from tsbd.artifacts import write_json_atomic
from tsbd.config import AT_LEAST_ONE, FRACTION, MOMENTUM, NON_NEGATIVE, POSITIVE, option
from tsbd.data.base import ImageSet
from tsbd.defenses.base import DEFENSES, Defense, DefenseConfig, Stages
from tsbd.errors import DivergedError
from tsbd.metrics import accuracy
from tsbd.models.surgery import batchnorm_buffers, bn_recomputed_copy, rank_neurons, subweight_change, zero_subweights
from tsbd.train.engine import TrainConfig, cross_entropy_step, fit, predict
from tsbd.train.runtime import Runtime

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TSBDConfig(DefenseConfig):
    unlearn_lr: float = option(1e-4, "clean-unlearning learning rate", "paper App. C; authors' config lr_un",
                               check=POSITIVE)
    unlearn_momentum: float = option(0.9, "clean-unlearning SGD momentum (no weight decay)", "authors' tsbd.py",
                                     check=MOMENTUM)
    unlearn_acc_threshold: float = option(0.10, "stop unlearning at the first epoch with clean acc <= this",
                                          "paper Alg. 1 / App. C", check=FRACTION)
    unlearn_max_epochs: int = option(1000, "give up unlearning after this many epochs (warns)",
                                     "authors' config epochs", check=AT_LEAST_ONE)
    neuron_ratio: float = option(0.15, "n: fraction of neurons (conv output channels) selected by NWC",
                                 "paper App. C", check=FRACTION)
    weight_ratio: float = option(0.7, "m: fraction of the selected neurons' subweights zeroed", "paper App. C",
                                 check=FRACTION)
    reinit_scheme: Literal["v3", "v2", "v1"] = option(
        "v3", "v3: m% most-changed subweights pooled over selected neurons; v2: m% per neuron; v1: whole neurons",
        "paper Table 3 (V3 is TSBD)")
    finetune_lr: float = option(0.01, "activeness-aware fine-tuning learning rate", "paper App. C", check=POSITIVE)
    finetune_momentum: float = option(0.9, "fine-tuning SGD momentum (no weight decay, no schedule)",
                                      "authors' tsbd.py", check=MOMENTUM)
    finetune_epochs: int = option(21, "fine-tuning epochs (paper App. C: 20; the authors' loop runs "
                                  "range(ft_epoch + 1) = 21, which produced the paper's numbers)",
                                  "authors' tsbd.py fine-tuning loop", check=NON_NEGATIVE)
    finetune_shuffle: bool = option(False, "shuffle the clean set every fine-tuning epoch; off: one seeded order "
                                    "for every epoch (the authors' clean loader does not shuffle; their clean "
                                    "set is in the order of its random draw, so its batches mix classes)",
                                    "authors' tsbd.py (shuffle=False), BackdoorBench choose_index")
    unlearn_shuffle: bool = option(False, "shuffle the clean set every unlearning epoch (same loader)",
                                   "authors' tsbd.py (shuffle=False)")
    passes_update_bn: bool = option(False, "let the two gradient passes of a step update BatchNorm running "
                                    "statistics (the authors take them on a per-batch copy: they do not)",
                                    "authors' tsbd.py train_finetuning_reg")
    post_step_bn: bool = option(True, "after each step, one train-mode forward of the batch updates BatchNorm "
                                "running statistics at the new weights", "authors' tsbd.py train_finetuning_reg")
    r: float = option(0.05, "perturbation radius of the gradient-norm approximation", "paper App. C, Zhao et al. 2022",
                      check=NON_NEGATIVE)
    alpha: float = option(0.7, "balance coefficient a = lambda / r", "paper App. C, Zhao et al. 2022", check=FRACTION)
    perturbation_norm: Literal["per-tensor", "global"] = option(
        "per-tensor", "normalize g1 per parameter tensor (authors' code) or globally (paper Eq. 5)",
        "authors' tsbd.py (produced the paper's numbers)")
    finetune_mode: Literal["activeness-aware", "vanilla", "none"] = option(
        "activeness-aware", "stage 2 variant (vanilla / none are the paper's Table 4 ablations)", "paper Table 4")
    augment: bool = option(True, "random crop (+ flip where the data set is flipped) on clean batches",
                           "authors' code (BackdoorBench train transform)")
    test_selected_n: tuple[float, ...] = option(
        (), "also sweep n over these values when the run is evaluated on test data and report the first n whose "
        "test ASR <= test_selected_asr, labelled 'selected on test data' (the returned model keeps neuron_ratio). "
        "The authors' sweep: 0.01,0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5,0.7,0.9", "authors' tsbd.py (ratios)",
        check=FRACTION)
    test_selected_asr: float = option(0.0005, "test ASR at or below which the sweep picks n (0.05%)",
                                      "paper Tables 3/4 (the n at which test ASR first reached 0.05%)", check=FRACTION)


# ------------------------------------------------------------------------------------------
# Stage 1a
UNLEARN_STALL_EPOCHS = 50  # epochs without a new lowest clean accuracy before clean_unlearn warns
def clean_unlearn(model: nn.Module, clean: ImageSet, cfg: TSBDConfig, runtime: Runtime, *, seed: int = 0,
                  progress: bool = False,
                  on_epoch: Callable[[int, nn.Module, float], None] | None = None,
                  stages: Stages | None = None) -> tuple[nn.Module, dict]:
    """Gradient ascent on clean cross-entropy (train mode, SGD, no weight decay) on a copy of
    ``model``; stops at the end of the first epoch whose clean accuracy is <= the threshold.
    ``on_epoch(epoch, model, clean_acc)``, if given, sees the unlearning model after every epoch
    (the analyses record activations there); it must leave the model as it found it. With
    ``stages`` that name checkpoints, every epoch is saved and a rerun resumes (a run stopped at
    the threshold resumes as stopped)."""
    unlearned = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in unlearned.parameters() if p.requires_grad], lr=cfg.unlearn_lr,
                          momentum=cfg.unlearn_momentum, weight_decay=0.0)
    train_cfg = TrainConfig(epochs=cfg.unlearn_max_epochs, batch_size=cfg.batch_size, lr=cfg.unlearn_lr,
                            momentum=cfg.unlearn_momentum, weight_decay=0.0, schedule="constant",
                            augment=cfg.augment, drop_last=False)
    accs: list[float] = []
    last_state = {k: v.detach().clone() for k, v in unlearned.state_dict().items()}

    def reached_threshold(epoch: int, m: nn.Module, stats: dict) -> bool:
        acc = accuracy(predict(m, clean.x, runtime), clean.y)
        stats["clean_acc"] = acc
        accs.append(acc)
        best = accs.index(min(accs)) + 1  # the first epoch at the lowest accuracy so far
        if epoch - best == UNLEARN_STALL_EPOCHS and acc > cfg.unlearn_acc_threshold:
            # the authors' loop goes on until the threshold or the epoch limit; say early that it may not come
            log.warning("clean unlearning: clean accuracy has not fallen for %d epochs (lowest %.3f, threshold "
                        "%.2f); it goes on until unlearn_max_epochs=%d -- if it stays there, raise unlearn_lr "
                        "or lower unlearn_max_epochs", UNLEARN_STALL_EPOCHS, min(accs), cfg.unlearn_acc_threshold,
                        cfg.unlearn_max_epochs)
        for k, v in m.state_dict().items():
            last_state[k].copy_(v)
        if on_epoch is not None:
            on_epoch(epoch, m, acc)
        return acc <= cfg.unlearn_acc_threshold

    try:
        res = fit(unlearned, clean, train_cfg, runtime, seed=seed, step=cross_entropy_step(ascent=True),
                  optimizer=opt, on_epoch_end=reached_threshold, desc="TSBD 1a clean unlearning", progress=progress,
                  on_resume=lambda earlier: accs.extend(e["clean_acc"] for e in earlier),
                  shuffle=cfg.unlearn_shuffle, checkpoint=stages.checkpoint("clean_unlearn") if stages else None)
        accs[:] = [h["clean_acc"] for h in res.history]  # with the epochs of runs a resume continued
        if stages is not None:
            stages.resumed("clean_unlearn", res.resumed_at, res.earlier_seconds)
    except DivergedError:
        # gradient ascent drove the loss to infinity before accuracy reached the threshold (a model
        # already near chance): the unlearning is as complete as it gets; use the last finite epoch
        unlearned.load_state_dict(last_state)
        log.warning("clean unlearning diverged after %d epochs (clean acc %.3f); using the last finite state",
                    len(accs), accs[-1] if accs else float("nan"))
        return unlearned, {"epochs": len(accs), "reached_threshold": False, "diverged": True,
                           "clean_acc_per_epoch": accs}
    if not res.stopped_early:
        log.warning("clean unlearning did not reach clean accuracy <= %.2f within %d epochs (last %.3f); "
                    "NWC is computed from the last state -- raise unlearn_lr or unlearn_max_epochs",
                    cfg.unlearn_acc_threshold, cfg.unlearn_max_epochs, accs[-1] if accs else float("nan"))
    return unlearned, {"epochs": res.epochs, "reached_threshold": res.stopped_early,
                       "clean_acc_per_epoch": accs}


# ------------------------------------------------------------------------------------------
# Stage 1c
def zero_reinit(backdoored: nn.Module, weight_change: dict[str, torch.Tensor], neuron_ratio: float,
                weight_ratio: float, scheme: str = "v3") -> tuple[nn.Module, dict]:
    """Copy of ``backdoored`` with the most-changed subweights of the top-NWC neurons set to 0.

    ``weight_change[layer]`` is |theta_ul - theta_bd| as K x I (see :func:`subweight_change`).
    The top ``neuron_ratio`` of all neurons by NWC (global ranking) are selected; then
    v3 (TSBD): the ``weight_ratio`` most-changed subweights pooled over all selected neurons
    (one threshold; ties at the threshold are zeroed too, as in the authors' code);
    v2: the ``weight_ratio`` most-changed subweights of each selected neuron; v1: whole neurons.
    """
    if not 0 <= neuron_ratio <= 1 or not 0 <= weight_ratio <= 1:
        raise ValueError("neuron_ratio and weight_ratio must be in [0, 1]")
    nwc = {name: d.sum(dim=1) for name, d in weight_change.items()}
    ranked = rank_neurons(nwc)
    n_select = int(neuron_ratio * len(ranked))
    selected = ranked[:n_select]
    masks = {name: torch.zeros_like(d, dtype=torch.bool) for name, d in weight_change.items()}
    for name, k in selected:
        masks[name][k] = True  # provisional: whole neuron (v1)
    if scheme not in ("v1", "v2", "v3"):
        raise ValueError(f"unknown reinit scheme {scheme!r}")
    if scheme == "v3" and selected:  # (n = 0 selects nothing: nothing to zero)
        pool = torch.cat([weight_change[name][masks[name].any(1)].flatten() for name in masks if masks[name].any()])
        n_zero = int(weight_ratio * pool.numel())
        if n_zero == 0:
            masks = {name: torch.zeros_like(m) for name, m in masks.items()}
        else:
            threshold = torch.topk(pool, n_zero).values[-1]
            masks = {name: m & (weight_change[name] >= threshold) for name, m in masks.items()}
    elif scheme == "v2":
        for name, m in masks.items():
            rows = m.any(1).nonzero().flatten()
            if len(rows):
                per = int(weight_ratio * m.shape[1])
                m[rows] = False
                if per:
                    top = torch.topk(weight_change[name][rows], per, dim=1).indices
                    m[rows.unsqueeze(1), top] = True
    model = copy.deepcopy(backdoored)
    zeroed = zero_subweights(model, masks)
    per_layer = {name: int(m.any(1).sum()) for name, m in masks.items() if m.any()}
    return model, {"neurons_total": len(ranked), "neurons_selected": n_select, "subweights_zeroed": zeroed,
                   "selected_per_layer": per_layer, "scheme": scheme}


# ------------------------------------------------------------------------------------------
# Stage 2
def activeness_aware_step(r: float, alpha: float, norm: str = "per-tensor", *, passes_update_bn: bool = False,
                          post_step_bn: bool = True):
    """The Aa-FT step (Alg. 2): g1 at theta; g2 at theta + r g1/||g1||; update with (1-a) g1 + a g2.

    ``norm="per-tensor"`` divides each tensor's g1 by its own L2 norm (authors' code);
    ``"global"`` by the norm of the whole gradient (paper Eq. 5).

    BatchNorm running statistics as in the authors' code: both gradient passes run in train mode
    (batch statistics) but leave the running statistics as they were (the authors take them on a
    per-batch deep copy; here the buffers are saved and put back, which is the same and copies
    a few kilobytes instead of the model); after the step, one train-mode forward of the batch
    updates them at the new weights. ``passes_update_bn=True, post_step_bn=False`` is the
    simpler variant in which the two passes update them (at theta and theta + eps) and nothing else.
    """
    if norm not in ("per-tensor", "global"):
        raise ValueError(f"unknown perturbation norm {norm!r}")

    def step(model, x, y, optimizer, runtime):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        saved = None if passes_update_bn else [b.clone() for b in batchnorm_buffers(model)]
        with runtime.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        g1 = torch.autograd.grad(loss, params, allow_unused=True)
        g1 = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g1)]
        with torch.no_grad():
            if norm == "global":
                total = torch.sqrt(sum((g.float() ** 2).sum() for g in g1)) + 1e-12
                eps = [r * g / total for g in g1]
            else:
                eps = [r * g / (g.norm() + 1e-12) for g in g1]
            for p, e in zip(params, eps):
                p.add_(e)
        with runtime.autocast():
            loss2 = nn.functional.cross_entropy(model(x), y)
        g2 = torch.autograd.grad(loss2, params, allow_unused=True)
        with torch.no_grad():
            for p, e, a, b in zip(params, eps, g1, g2):
                p.sub_(e)
                p.grad = (1 - alpha) * a + (alpha * b if b is not None else 0)
            if saved is not None:
                for buf, old in zip(batchnorm_buffers(model), saved):
                    buf.copy_(old)
        optimizer.step()
        if post_step_bn:
            with torch.no_grad(), runtime.autocast():
                model(x)
        return loss.detach()

    return step


def activeness_aware_finetune(model: nn.Module, clean: ImageSet, cfg: TSBDConfig, runtime: Runtime, *,
                              seed: int = 0, progress: bool = False, stages: Stages | None = None) -> dict:
    """Fine-tune ``model`` in place on the clean set (SGD, constant lr, no weight decay); with
    ``stages`` that name checkpoints, every epoch is saved and a rerun resumes."""
    if cfg.finetune_mode == "none" or cfg.finetune_epochs == 0:
        return {"epochs": 0}
    train_cfg = TrainConfig(epochs=cfg.finetune_epochs, batch_size=cfg.batch_size, lr=cfg.finetune_lr,
                            momentum=cfg.finetune_momentum, weight_decay=0.0, schedule="constant",
                            augment=cfg.augment, drop_last=False)
    step = (activeness_aware_step(cfg.r, cfg.alpha, cfg.perturbation_norm, passes_update_bn=cfg.passes_update_bn,
                                  post_step_bn=cfg.post_step_bn)
            if cfg.finetune_mode == "activeness-aware" else cross_entropy_step())
    res = fit(model, clean, train_cfg, runtime, seed=seed + 1, step=step, desc="TSBD 2 activeness-aware FT",
              progress=progress, shuffle=cfg.finetune_shuffle,
              checkpoint=stages.checkpoint("finetune") if stages else None)
    if stages is not None:
        stages.resumed("finetune", res.resumed_at, res.earlier_seconds)
    return {"epochs": res.epochs, "final_loss": res.history[-1]["loss"] if res.history else math.nan}


def select_n_on_test(backdoored: nn.Module, change: dict[str, torch.Tensor], clean: ImageSet, cfg: TSBDConfig,
                     runtime: Runtime, evaluate_on_test: Callable[[str, nn.Module], dict], *, seed: int = 0,
                     progress: bool = False, known: dict[float, dict] | None = None,
                     record: Path | None = None, stages: Stages | None = None) -> dict:
    """The paper's protocol made explicit: zero-reinit and fine-tune at each n of
    ``cfg.test_selected_n`` (from the same unlearning), evaluate each on TEST data, and pick the
    smallest n whose test ASR <= ``cfg.test_selected_asr`` (else the n with the lowest test ASR).
    A number selected on test data, reported beside the fixed n, never a defense's output.
    ``known``: {n: its test metrics} already measured by the same seeded reinit and fine-tune
    (the defense's own n), taken as they are instead of run again. ``record``: a JSON file where
    every finished point is kept, so a rerun of an interrupted sweep resumes after its last point
    (``stages`` is told how many points were taken from it and what they cost)."""
    done, earlier = _load_sweep_record(record)
    if stages is not None:
        stages.resumed("test_selected_n", len(done), earlier)
    known = {**done, **(known or {})}
    sweep = []
    for n in sorted(cfg.test_selected_n):
        if n in known:
            sweep.append({"n": n, **known[n]})
            continue
        t0 = time.perf_counter()
        tuned, _ = zero_reinit(backdoored, change, n, cfg.weight_ratio, cfg.reinit_scheme)
        activeness_aware_finetune(tuned, clean, cfg, runtime, seed=seed, progress=progress)
        sweep.append({"n": n, **evaluate_on_test(f"n={n:g}", tuned)})
        del tuned
        if record is not None:
            done[n] = {k: v for k, v in sweep[-1].items() if k != "n"}
            earlier += time.perf_counter() - t0
            write_json_atomic(record, {"points": [{"n": k, **v} for k, v in sorted(done.items())],
                                       "seconds": earlier})
    hit = [s for s in sweep if s.get("asr", 1.0) <= cfg.test_selected_asr]
    pick = hit[0] if hit else min(sweep, key=lambda s: s.get("asr", 1.0))
    return {**pick, "reached_threshold": bool(hit), "threshold": cfg.test_selected_asr, "sweep": sweep,
            "rule": "first n (ascending) with test ASR <= threshold, else lowest test ASR; selected on test data"}


def _sweep_record_path(stages: Stages) -> Path | None:
    path = stages.checkpoint("test_selected_n")
    return None if path is None else path.with_name("test_selected_n.points.json")


def _load_sweep_record(record: Path | None) -> tuple[dict[float, dict], float]:
    """The finished points ({n: test metrics}) and their seconds from an interrupted sweep's record."""
    if record is None or not record.is_file():
        return {}, 0.0
    try:
        data = json.loads(record.read_text())
        return {float(p["n"]): {k: v for k, v in p.items() if k != "n"} for p in data["points"]}, float(data["seconds"])
    except (ValueError, KeyError, TypeError) as e:  # a damaged record: run the sweep again
        log.warning("ignoring the sweep record %s (%s); the sweep starts again", record, e)
        return {}, 0.0


# ------------------------------------------------------------------------------------------
@DEFENSES.register("tsbd")
class TSBD(Defense):
    """Two-Stage Backdoor Defense (paper Alg. 1)."""

    name = "tsbd"
    config_class = TSBDConfig
    report_only = ("test_selected_n", "test_selected_asr")

    @classmethod
    def seconds_like(cls, options, like_options, like_timings, like_seconds):
        """Each point of the test-data sweep of n beyond the defense's own n costs one stage 2 and one
        test evaluation: measured per point where the like cell swept, else its stage 2 alone."""
        def points(o: dict) -> int:
            own = o.get("neuron_ratio", TSBDConfig.neuron_ratio)
            return sum(1 for n in o.get("test_selected_n") or () if n != own)

        mine, theirs = points(options), points(like_options)
        swept = like_timings.get("test_selected_n")
        per_point = swept / theirs if theirs and swept is not None else like_timings.get("finetune")
        if per_point is None or mine == theirs:
            return like_seconds
        return max(0.0, like_seconds + (mine - theirs) * per_point)

    def run(self, model, clean, *, runtime, seed, progress, stages, result):
        cfg: TSBDConfig = self.config
        with stages.stage("clean_unlearn"):
            unlearned, result.info["unlearn"] = clean_unlearn(model, clean, cfg, runtime, seed=seed, progress=progress,
                                                              stages=stages)
        with stages.stage("nwc"):
            change = subweight_change(model, unlearned)
        del unlearned
        backdoored = model
        with stages.stage("zero_reinit"):
            model, result.info["reinit"] = zero_reinit(model, change, cfg.neuron_ratio, cfg.weight_ratio,
                                                       cfg.reinit_scheme)
        stages.observe("after_reinit", model)
        if stages.monitor is not None:
            # the reinit leaves BN statistics that no longer match the weights; how much of the
            # backdoor they hide shows on a copy whose statistics are recomputed on the clean set
            fresh = bn_recomputed_copy(model, clean.x, runtime, batch_size=cfg.batch_size, seed=seed)
            stages.observe("after_reinit_bn_recomputed", model if fresh is None else fresh)
            # ... compared with the backdoored model under the same recompute: clean, unaugmented
            # images give other statistics than the poisoned, augmented training set did
            if fresh is not None:
                fresh = bn_recomputed_copy(backdoored, clean.x, runtime, batch_size=cfg.batch_size, seed=seed)
                stages.observe("backdoored_bn_recomputed", fresh)
            del fresh
        with stages.stage("finetune"):
            result.info["finetune"] = activeness_aware_finetune(model, clean, cfg, runtime, seed=seed,
                                                                progress=progress, stages=stages)
        stages.observe("after_finetune", model)
        if cfg.test_selected_n and stages.monitor is not None:
            with stages.stage("test_selected_n"):
                result.stages["n_selected_on_test"] = select_n_on_test(  # the fixed n's run is its point there
                    backdoored, change, clean, cfg, runtime, stages.monitor, seed=seed, progress=progress,
                    known={cfg.neuron_ratio: result.stages["after_finetune"]},
                    record=_sweep_record_path(stages), stages=stages)
        return model
