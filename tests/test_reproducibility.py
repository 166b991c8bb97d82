"""Same machine, same seed, same numbers: an attack and TSBD run twice give identical metrics and weights.

The whole path of ``tsbd demo`` on a tiny scale (poison the data, train the attacked model, purify it
with TSBD, evaluate), built from scratch each time. Across processors the kernels differ and the
metrics move (README: the demo's spread); on one machine nothing may.
"""

from __future__ import annotations

import pytest
import torch

from tsbd.attacks import build_attack
from tsbd.data.base import Dataset
from tsbd.pipeline import defend_model, setup_attack, train_attacked_model
from tsbd.train.presets import train_config

ARCH = {"widths": (8, 16, 32)}
TSBD_TINY = {"unlearn_lr": 0.01, "unlearn_max_epochs": 2, "finetune_epochs": 1}


@pytest.fixture(scope="module")
def tiny(small):
    """400 training and 200 test images of the small set (every third / every second)."""
    return Dataset("demo-tiny", small.train.subset(torch.arange(0, len(small.train), 3)),
                   small.test.subset(torch.arange(0, len(small.test), 2)), small.classes, small.mean, small.std,
                   fingerprint=small.fingerprint + "-tiny", source="demo subset")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _attack_then_tsbd(data, runtime, seed, *, defend=True):
    setup = setup_attack(data, build_attack("badnets", {"poison_ratio": 0.2}), seed, runtime, arch="airbench",
                         arch_kwargs=ARCH)
    model, meta = train_attacked_model(setup, "airbench", train_config("cpu", {"epochs": 2, "batch_size": 64}),
                                       runtime, arch_kwargs=ARCH)
    if not defend:
        return meta["metrics"], None, None, {"attacked": _weights(model)}
    result, record = defend_model(model, setup, "tsbd", TSBD_TINY, 0.25, runtime, seed=seed,
                                  metrics_before=meta["metrics"])
    return meta["metrics"], record["metrics"], result.info, {"attacked": _weights(model),
                                                             "purified": _weights(result.model)}


@pytest.mark.slow  # three tiny trainings and two TSBD runs: about 30 s of CPU
def test_attack_and_tsbd_twice_with_one_seed_give_identical_metrics_and_weights(tiny, runtime):
    first = _attack_then_tsbd(tiny, runtime, seed=0)
    second = _attack_then_tsbd(tiny, runtime, seed=0)
    assert first[0] == second[0], "the attacked model's ACC/ASR/RA differ between two runs"
    assert first[1] == second[1], "the purified model's metrics differ between two runs"
    assert first[2] == second[2], "TSBD's record (epochs, neurons, subweights) differs between two runs"
    for name in ("attacked", "purified"):
        a, b = first[3][name], second[3][name]
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{name} weights differ between two runs: {differ[:5]}"

    # not vacuous: another seed poisons other images and trains from another start
    other = _attack_then_tsbd(tiny, runtime, seed=1, defend=False)
    assert any(not torch.equal(first[3]["attacked"][k], other[3]["attacked"][k]) for k in first[3]["attacked"])
