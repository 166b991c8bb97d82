"""Neuron-ratio (n) and weight-ratio (m) sweeps of TSBD (paper Fig. 5, Appendix G).

Clean unlearning runs once; for each ratio the zero reinitialization is redone from the same
weight change and the model evaluated after it and, unless ``finetune=False``, after
activeness-aware fine-tuning -- so a user sees the ACC / ASR trade-off on their own model and
which n the paper's default picks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

from torch import nn

from tsbd.data.base import ImageSet
from tsbd.defenses.tsbd import TSBDConfig, activeness_aware_finetune, clean_unlearn, zero_reinit
from tsbd.errors import TsbdError
from tsbd.models.surgery import bn_recomputed_copy, subweight_change
from tsbd.train.runtime import Runtime

Evaluate = Callable[[nn.Module], dict]


def ratio_sweep(model: nn.Module, clean: ImageSet, cfg: TSBDConfig, runtime: Runtime, evaluate: Evaluate, *,
                parameter: str = "neuron_ratio", values: Sequence[float] = (0.01, 0.05, 0.1, 0.15, 0.3, 0.5, 0.9),
                finetune: bool = True, seed: int = 0, progress: bool = False) -> dict:
    """TSBD with ``parameter`` (``neuron_ratio`` or ``weight_ratio``) set to each of ``values``,
    the other at ``cfg``'s value. Returns {"unlearn": info, "rows": [...]} with one row per value:
    the ratio, what was zeroed, the metrics after reinit (``reinit_*``), after reinit with the BN
    statistics recomputed on the clean set (``reinit_bn_*``, models with BatchNorm) and after
    fine-tuning. ``bn_control``: the backdoored model itself with its statistics recomputed the same
    way (None without BatchNorm) -- the baseline the ``reinit_bn_*`` columns compare with, since
    statistics of clean, unaugmented images differ from those the model was trained with (poisoned
    images and augmentation included) and move ACC and ASR on their own."""
    if parameter not in ("neuron_ratio", "weight_ratio"):
        raise TsbdError(f"sweep parameter must be neuron_ratio or weight_ratio, got {parameter!r}")
    bad = [v for v in values if not 0 <= v <= 1]
    if bad or not values:
        raise TsbdError(f"sweep values must be fractions in [0, 1], got {list(values)}")
    unlearned, unlearn_info = clean_unlearn(model, clean, cfg, runtime, seed=seed, progress=progress)
    change = subweight_change(model, unlearned)
    control = bn_recomputed_copy(model, clean.x, runtime, batch_size=cfg.batch_size, seed=seed)
    bn_control = None if control is None else evaluate(control)
    del control
    rows = []
    for value in values:
        run_cfg = dataclasses.replace(cfg, **{parameter: float(value)})
        t0 = time.perf_counter()
        reinit, info = zero_reinit(model, change, run_cfg.neuron_ratio, run_cfg.weight_ratio, run_cfg.reinit_scheme)
        row = {parameter: float(value), "neurons_selected": info["neurons_selected"],
               "subweights_zeroed": info["subweights_zeroed"]}
        row.update({f"reinit_{k}": v for k, v in evaluate(reinit).items()})
        # the reinit keeps the backdoored model's BN statistics, which can mask what it left: the
        # same weights with statistics recomputed on the clean set (none without BatchNorm)
        fresh = bn_recomputed_copy(reinit, clean.x, runtime, batch_size=cfg.batch_size, seed=seed)
        if fresh is not None:
            row.update({f"reinit_bn_{k}": v for k, v in evaluate(fresh).items()})
        del fresh
        if finetune:
            activeness_aware_finetune(reinit, clean, run_cfg, runtime, seed=seed, progress=progress)
            row.update(evaluate(reinit))
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return {"parameter": parameter, "unlearn": unlearn_info, "rows": rows, "default": getattr(cfg, parameter),
            "bn_control": bn_control}


def largest_ratio_within_acc(rows: Sequence[dict], acc_before: float, max_acc_drop: float, *,
                             parameter: str = "neuron_ratio", acc_key: str = "acc") -> dict | None:
    """The row with the largest ``parameter`` whose ``acc_key`` stays within ``max_acc_drop`` (a
    fraction) of ``acc_before``; None when every row drops more. A defender's rule for n: more
    neurons reinitialized removes more of the backdoor, and ACC is the one side of the trade-off
    measurable on clean data (ASR needs the trigger)."""
    ok = [r for r in rows if r[acc_key] >= acc_before - max_acc_drop]
    return max(ok, key=lambda r: r[parameter]) if ok else None
