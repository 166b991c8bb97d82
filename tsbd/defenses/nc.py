"""Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019), as BackdoorBench runs it (``defense/nc.py``), returning the
fine-tuned model.

1. :func:`reverse_engineer_trigger` -- for each label, a mask m = tanh(theta_m)/(2+eps)+0.5
   (1 x H x W) and a pattern p (C x H x W, same parametrization; theta initialized to 1) stamp
   x' = (1 - m) x + m p; Adam(0.1, betas (0.5, 0.9)) minimizes CE(label) + cost |m|_1 over the
   clean data with the model in eval mode, with the authors' cost schedule (init 1e-3; after
   ``patience`` epochs at/below the 98% attack-success threshold multiply/divide by 2 / 2^1.5)
   and early stop; the smallest-L1 mask among epochs that reached the threshold is kept.
2. :func:`flag_outliers` -- MAD anomaly index |L1 - median| / (1.4826 MAD); labels with
   L1 <= median and index > 2 are flagged.
3. If any label is flagged: :func:`unlearning_set` keeps 80% of the clean data as is and stamps
   the other 20% with each flagged label's recovered trigger, TRUE labels kept; the model is
   fine-tuned on it (SGD 0.01, momentum 0.9, wd 5e-4, cosine, 100 epochs). Otherwise the model
   is returned unchanged.

Differences from BackdoorBench: it saves a freshly loaded copy of the backdoored weights after
fine-tuning a different object (nc.py:760-762 vs :845-852), i.e. returns the UN-fine-tuned model;
we return the fine-tuned one, as the paper's mitigation intends. It stamps triggers re-read from
min-max-normalized PNG files; we stamp the recovered mask and pattern themselves. Its MAD uses
``torch.median`` (the lower middle value for an even count); we use the usual median (mean of
the two middle values), as the paper's MAD.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from tsbd.config import AT_LEAST_ONE, FRACTION, MOMENTUM, NON_NEGATIVE, POSITIVE, Range, option
from tsbd.data.base import ImageSet
from tsbd.defenses.base import DEFENSES, Defense, DefenseConfig, Stages
from tsbd.models.surgery import frozen
from tsbd.train.engine import TrainConfig, fit, save_checkpoint
from tsbd.train.runtime import Runtime

log = logging.getLogger(__name__)

EPSILON = 1e-7  # BackdoorBench nc config EPSILON (keeps tanh/(2+eps)+0.5 strictly inside (0, 1))
MAD_CONSISTENCY = 1.4826  # MAD -> standard deviation under normality (Wang et al. 2019, Sec. IV)


@dataclasses.dataclass(frozen=True)
class NCConfig(DefenseConfig):
    nc_epoch: int = option(80, "most trigger reverse-engineering epochs per label", "BackdoorBench nc config",
                           check=AT_LEAST_ONE)
    mask_lr: float = option(0.1, "Adam learning rate of mask and pattern (betas 0.5, 0.9)", "BackdoorBench nc config",
                            check=POSITIVE)
    init_cost: float = option(1e-3, "initial weight of the mask L1 term", "BackdoorBench nc config; NC paper",
                              check=NON_NEGATIVE)
    cost_multiplier: float = option(2.0, "cost x this going up, / this^1.5 going down", "BackdoorBench nc config",
                                    check=Range(1))
    patience: int = option(5, "epochs above/below the success threshold before the cost changes",
                           "BackdoorBench nc config", check=AT_LEAST_ONE)
    attack_success_threshold: float = option(0.98, "trigger success rate that counts as reached",
                                             "BackdoorBench nc config atk_succ_threshold 98.0", check=FRACTION)
    early_stop: bool = option(True, "stop once the best L1 stalls", "BackdoorBench nc config")
    early_stop_threshold: float = option(0.99, "best L1 must shrink below this fraction to count as progress",
                                         "BackdoorBench nc config", check=FRACTION)
    early_stop_patience: int = option(25, "epochs without progress before stopping", "BackdoorBench nc config",
                                      check=AT_LEAST_ONE)
    anomaly_threshold: float = option(2.0, "flag labels whose anomaly index exceeds this", "NC paper Sec. IV",
                                      check=NON_NEGATIVE)
    unlearning_ratio: float = option(0.2, "fraction of the clean data stamped with recovered triggers",
                                     "BackdoorBench nc config; NC paper Sec. VI", check=FRACTION)
    epochs: int = option(100, "fine-tuning epochs when a label is flagged", "BackdoorBench nc config",
                         check=NON_NEGATIVE)
    lr: float = option(0.01, "fine-tuning SGD learning rate (cosine schedule)", "BackdoorBench nc config",
                       check=POSITIVE)
    momentum: float = option(0.9, "fine-tuning SGD momentum", "BackdoorBench defense configs", check=MOMENTUM)
    weight_decay: float = option(5e-4, "fine-tuning SGD weight decay", "BackdoorBench defense configs",
                                 check=NON_NEGATIVE)
    augment: bool = option(True, "random crop + flip on clean batches (reverse engineering and fine-tuning)",
                           "BackdoorBench nc.py train transform")


@dataclasses.dataclass
class RecoveredTrigger:
    label: int
    mask: torch.Tensor  # 1 x H x W in (0, 1), CPU
    pattern: torch.Tensor  # C x H x W in (0, 1), CPU
    l1: float  # |mask|_1 of the kept mask
    reached: bool  # some epoch reached the attack-success threshold
    epochs: int
    seconds: float = math.nan  # wall time of this label's search, set by reverse_engineer_all


def _squash(theta: torch.Tensor) -> torch.Tensor:
    return torch.tanh(theta) / (2 + EPSILON) + 0.5


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m) x + m p on float images in [0, 1]."""
    return (1 - mask) * x + mask * pattern


class CostSchedule:
    """The NC authors' adaptive weight of the L1 term, best-mask record and early stop
    (BackdoorBench ``Recorder`` and the end of ``train_step``)."""

    def __init__(self, cfg: NCConfig):
        self.cfg = cfg
        self.cost = cfg.init_cost
        self.up_counter = self.down_counter = self.set_counter = 0
        self.up_flag = self.down_flag = False
        self.best_l1 = math.inf
        self.early_stop_best = math.inf
        self.early_stop_counter = 0
        self.best: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reached = False

    def end_epoch(self, acc: float, l1: float, mask: torch.Tensor, pattern: torch.Tensor) -> bool:
        """Record an epoch's mean success rate and mean L1; returns True to stop."""
        cfg = self.cfg
        success = acc >= cfg.attack_success_threshold
        if success and l1 < self.best_l1:
            self.best, self.best_l1, self.reached = (mask.clone(), pattern.clone()), l1, True
        if cfg.early_stop:
            if self.best_l1 < math.inf:
                if self.best_l1 >= cfg.early_stop_threshold * self.early_stop_best:
                    self.early_stop_counter += 1
                else:
                    self.early_stop_counter = 0
            self.early_stop_best = min(self.early_stop_best, self.best_l1)
            if self.up_flag and self.down_flag and self.early_stop_counter >= cfg.early_stop_patience:
                return True
        if self.cost == 0 and success:
            self.set_counter += 1
            if self.set_counter >= cfg.patience:
                self.cost = cfg.init_cost
                self.up_counter = self.down_counter = 0
                self.up_flag = self.down_flag = False
        else:
            self.set_counter = 0
        if success:
            self.up_counter, self.down_counter = self.up_counter + 1, 0
        else:
            self.up_counter, self.down_counter = 0, self.down_counter + 1
        if self.up_counter >= cfg.patience:
            self.up_counter = 0
            self.cost *= cfg.cost_multiplier
            self.up_flag = True
        elif self.down_counter >= cfg.patience:
            self.down_counter = 0
            self.cost /= cfg.cost_multiplier ** 1.5
            self.down_flag = True
        if self.best is None:  # nothing reached the threshold yet: keep the latest
            self.best = (mask.clone(), pattern.clone())
        return False


def reverse_engineer_trigger(model: nn.Module, clean: ImageSet, label: int, cfg: NCConfig, runtime: Runtime, *,
                             seed: int = 0, progress: bool = False) -> RecoveredTrigger:
    """The smallest trigger (mask, pattern) that sends the clean images to ``label``."""
    c, h, w = clean.image_shape
    theta_mask = torch.ones(1, h, w, device=runtime.device, requires_grad=True)
    theta_pattern = torch.ones(c, h, w, device=runtime.device, requires_grad=True)
    params = [theta_mask, theta_pattern]
    opt = torch.optim.Adam(params, lr=cfg.mask_lr, betas=(0.5, 0.9))
    schedule = CostSchedule(cfg)
    batch_acc: list[torch.Tensor] = []
    batch_l1: list[torch.Tensor] = []

    def step(m, x, y, optimizer, rt):
        mask, pattern = _squash(theta_mask), _squash(theta_pattern)
        target = torch.full_like(y, label)
        with rt.autocast():
            logits = m(stamp(x, mask, pattern)).float()
        ce = nn.functional.cross_entropy(logits, target)
        l1 = mask.abs().sum()
        loss = ce + schedule.cost * l1
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        batch_acc.append((logits.detach().argmax(1) == target).float().mean())
        batch_l1.append(l1.detach())
        return loss.detach()

    def end_epoch(epoch, m, stats):
        acc, l1 = float(torch.stack(batch_acc).mean()), float(torch.stack(batch_l1).mean())
        batch_acc.clear()
        batch_l1.clear()
        stats.update(success=acc, l1=l1, cost=schedule.cost)
        with torch.no_grad():
            return schedule.end_epoch(acc, l1, _squash(theta_mask).cpu(), _squash(theta_pattern).cpu())

    train_cfg = TrainConfig(epochs=cfg.nc_epoch, batch_size=cfg.batch_size, lr=cfg.mask_lr, schedule="constant",
                            augment=cfg.augment, drop_last=False)
    with frozen(model):  # only the trigger trains: no weight gradient is needed
        res = fit(model, clean, train_cfg, runtime, seed=seed, step=step, optimizer=opt, on_epoch_end=end_epoch,
                  train_mode=False, desc=f"NC label {label}", progress=progress)
    if schedule.best is None:  # nc_epoch == 0
        with torch.no_grad():
            schedule.best = (_squash(theta_mask).cpu(), _squash(theta_pattern).cpu())
    mask, pattern = schedule.best
    return RecoveredTrigger(label, mask, pattern, float(mask.abs().sum()), schedule.reached, res.epochs)


def reverse_engineer_all(model: nn.Module, clean: ImageSet, num_classes: int, cfg: NCConfig, runtime: Runtime, *,
                         seed: int = 0, progress: bool = False, checkpoint: Path | None = None,
                         stages: Stages | None = None) -> list[RecoveredTrigger]:
    """:func:`reverse_engineer_trigger` for every label, one after another. With ``checkpoint``,
    each finished label is saved there and a rerun reverse-engineers only the labels left (each
    label's optimization depends on nothing but the model, data, config and seed, so the result
    is the same). ``stages`` (a :class:`~tsbd.defenses.base.Stages`) records a resume."""
    done: dict[int, RecoveredTrigger] = {}
    seconds: dict[int, float] = {}
    if checkpoint is not None and checkpoint.exists():
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if state["num_classes"] != num_classes:
                raise ValueError("another class count")
            done = {int(k): RecoveredTrigger(**t) for k, t in state["labels"].items()}
            seconds = {int(k): float(v) for k, v in state["seconds"].items()}
            log.info("NC: resumed with %d of %d labels reverse-engineered (%s)", len(done), num_classes, checkpoint)
        except Exception as err:  # a torn or foreign file: start over rather than fail
            log.warning("ignoring unreadable checkpoint %s (%s); reverse-engineering every label", checkpoint,
                        err.__class__.__name__)
            done, seconds = {}, {}
    if stages is not None:
        stages.resumed("reverse_engineering", len(done), sum(seconds.values()))
    for k in range(num_classes):
        if k in done:
            continue
        t0 = time.perf_counter()
        done[k] = reverse_engineer_trigger(model, clean, k, cfg, runtime, seed=seed, progress=progress)
        seconds[k] = time.perf_counter() - t0
        if checkpoint is not None:
            save_checkpoint(checkpoint, {"num_classes": num_classes, "seconds": {str(j): v for j, v in seconds.items()},
                                         "labels": {str(j): dataclasses.asdict(t) for j, t in done.items()}})
    # each label's time lives in ``seconds`` alone (the checkpoint keeps it there), attached here
    return [dataclasses.replace(done[k], seconds=seconds.get(k, math.nan)) for k in range(num_classes)]


def anomaly_index(l1: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(|L1 - median| / (1.4826 MAD) per label, median, consistency-scaled MAD)."""
    l1 = torch.as_tensor(l1, dtype=torch.float64)
    median = torch.quantile(l1, 0.5)
    dev = (l1 - median).abs()
    mad = MAD_CONSISTENCY * torch.quantile(dev, 0.5)
    if mad > 0:
        index = dev / mad
    else:  # all but at most half the labels tie: any deviation is infinitely anomalous
        index = torch.where(dev > 0, torch.full_like(dev, math.inf), torch.zeros_like(dev))
    return index, float(median), float(mad)


def flag_outliers(l1: torch.Tensor, threshold: float = 2.0) -> list[int]:
    """Labels with L1 <= median and anomaly index > ``threshold``, smallest L1 first."""
    l1 = torch.as_tensor(l1, dtype=torch.float64)
    index, median, _ = anomaly_index(l1)
    flagged = [k for k in range(len(l1)) if l1[k] <= median and index[k] > threshold]
    return sorted(flagged, key=lambda k: float(l1[k]))


def unlearning_set(clean: ImageSet, triggers: list[RecoveredTrigger], ratio: float, seed: int) -> ImageSet:
    """A seeded (1 - ratio) part of ``clean`` as is, plus the other part stamped once with each
    trigger, every image keeping its true label (BackdoorBench nc.py:780-843)."""
    n = len(clean)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_keep = int(n * (1 - ratio))
    keep, rest = perm[:n_keep], perm[n_keep:]
    xs, ys = [clean.x[keep]], [clean.y[keep]]
    src = clean.x[rest].float() / 255
    for trig in triggers:
        stamped = stamp(src, trig.mask.float(), trig.pattern.float())
        xs.append((stamped * 255).round().clamp(0, 255).to(torch.uint8))
        ys.append(clean.y[rest])
    return ImageSet(torch.cat(xs), torch.cat(ys), hflip=clean.hflip)


def _centroid(mask: torch.Tensor) -> list[float]:
    """(row, col) centre of mass of a 1 x H x W mask."""
    m = mask[0].double()
    rows = torch.arange(m.shape[0], dtype=torch.float64)
    cols = torch.arange(m.shape[1], dtype=torch.float64)
    total = m.sum()
    return [float((m.sum(1) * rows).sum() / total), float((m.sum(0) * cols).sum() / total)]


@DEFENSES.register("nc")
class NeuralCleanse(Defense):
    """Neural Cleanse: reverse-engineer per-label triggers, detect outliers, unlearn them."""

    name = "nc"
    config_class = NCConfig

    def run(self, model, clean, *, runtime, seed, progress, stages, result):
        cfg: NCConfig = self.config
        num_classes = _num_classes(model, clean, runtime)
        with stages.stage("reverse_engineering"):
            triggers = reverse_engineer_all(model, clean, num_classes, cfg, runtime, seed=seed, progress=progress,
                                            checkpoint=stages.checkpoint("reverse_engineering"), stages=stages)
        l1 = torch.tensor([t.l1 for t in triggers], dtype=torch.float64)
        index, median, mad = anomaly_index(l1)
        flagged = flag_outliers(l1, cfg.anomaly_threshold)
        result.info.update({
            "mask_l1": [t.l1 for t in triggers],
            "anomaly_index": [float(v) for v in index],
            "median_l1": median,
            "mad": mad,
            "flagged": flagged,
            "reached_success_threshold": [t.reached for t in triggers],
            "reverse_epochs": [t.epochs for t in triggers],
            "reverse_seconds": [t.seconds for t in triggers],  # each label's cost, resumed labels' too
            "flagged_mask_centroids": {str(k): _centroid(triggers[k].mask) for k in flagged},
        })
        if not flagged:
            log.info("NC flagged no label (largest anomaly index %.2f); the model is returned unchanged",
                     float(index.max()))
            result.info["finetune"] = {"epochs": 0}
            return model
        data = unlearning_set(clean, [triggers[k] for k in flagged], cfg.unlearning_ratio, seed)
        train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, schedule="cosine", augment=cfg.augment,
                                drop_last=False)
        with stages.stage("unlearning_finetune"):
            res = fit(model, data, train_cfg, runtime, seed=seed + 1, desc="NC unlearning fine-tune",
                      progress=progress)
        stages.observe("after_finetune", model)
        result.info["finetune"] = {"epochs": res.epochs, "images": len(data),
                                   "final_loss": res.history[-1]["loss"] if res.history else math.nan}
        return model


def _num_classes(model: nn.Module, clean: ImageSet, runtime: Runtime) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(clean.x[:1].to(runtime.device).float() / 255)
    model.train(was_training)
    return int(out.shape[1])
