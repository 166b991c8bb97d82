"""Backdoor metrics as pure functions (fractions in [0, 1]).

ACC: clean test accuracy. ASR: fraction of poisoned non-target test images classified as the
attack's target. RA (robust accuracy): fraction of those classified as their true class.
DER (defense effectiveness rating, BackdoorBench's ``defense_effectiveness_rate_simplied``):
[max(0, ASR_bd - ASR_def) - max(0, ACC_bd - ACC_def) + 1] / 2.
"""

from __future__ import annotations

import torch
from torch import nn

from tsbd.data.base import ImageSet
from tsbd.train.engine import predict
from tsbd.train.runtime import Runtime


def _fraction(hits: torch.Tensor) -> float:
    # count / total in Python: exact, where a float32 mean made 250/2500 = 0.10000000149 > 0.1 and
    # an unlearning that reached exactly the 10% threshold did not stop
    return int(hits.sum()) / hits.numel() if hits.numel() else float("nan")


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to the labels."""
    return _fraction(torch.as_tensor(preds) == torch.as_tensor(labels))


def attack_success_rate(preds: torch.Tensor, targets: torch.Tensor | int) -> float:
    """Fraction of poisoned images predicted as the attacker's target label(s)."""
    return _fraction(torch.as_tensor(preds) == torch.as_tensor(targets))


def robust_accuracy(preds: torch.Tensor, true_labels: torch.Tensor) -> float:
    """Fraction of poisoned images still predicted as their original class."""
    return accuracy(preds, true_labels)


def der(acc_bd: float, asr_bd: float, acc_def: float, asr_def: float) -> float:
    """Defense effectiveness rating in [0, 1]; 0.5 means no change, 1 means ASR removed at no ACC cost."""
    return (max(0.0, asr_bd - asr_def) - max(0.0, acc_bd - acc_def) + 1.0) / 2.0


def evaluate(model: nn.Module, clean_test: ImageSet, poisoned_test=None, runtime: Runtime | None = None,
             batch_size: int = 1024) -> dict[str, float]:
    """ACC on ``clean_test``; ASR and RA on ``poisoned_test`` (a :class:`PoisonedTest`) if given."""
    runtime = runtime or Runtime.create("cpu")
    out = {"acc": accuracy(predict(model, clean_test.x, runtime, batch_size), clean_test.y)}
    if poisoned_test is not None and len(poisoned_test.x):
        preds = predict(model, poisoned_test.x, runtime, batch_size)
        out["asr"] = attack_success_rate(preds, poisoned_test.y_target)
        out["ra"] = robust_accuracy(preds, poisoned_test.y_true)
    return out
