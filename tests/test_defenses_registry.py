"""Every registered defense, picked up from the registry: same architecture back, input model
untouched, identical weights for one seed, a JSON-serializable record.

A new defense is tested the moment it is registered. Give it a tiny config in ``TINY`` (each run
here should take a few seconds); otherwise the ``GENERIC`` overrides that name one of its integer
fields are applied.
"""

import json
import time

import pytest
import torch
from conftest import state_copy

from tsbd.defenses import DEFENSES, build_defense

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: seconds to minutes per test

TINY = {
    "tsbd": {"unlearn_lr": 1e-2, "unlearn_max_epochs": 5, "finetune_epochs": 1},
    "ft": {"epochs": 1},
    "fp": {"epochs": 1},
    "nad": {"teacher_epochs": 1, "epochs": 1},
    "clp": {},
    "ibau": {"n_rounds": 1, "K": 1},
}
# applied to defenses missing from TINY, for each of these integer fields the config has
GENERIC = {"epochs": 1, "finetune_epochs": 1, "teacher_epochs": 1, "unlearn_max_epochs": 5, "unlearn_epochs": 1,
           "recover_epochs": 1, "nc_epoch": 1, "nb_iter": 5, "n_rounds": 1}


def tiny_config(name: str) -> dict:
    if name in TINY:
        return TINY[name]
    fields = DEFENSES.get(name).config_class.__dataclass_fields__
    return {k: v for k, v in GENERIC.items() if k in fields and fields[k].type in (int, "int")}




@pytest.fixture(scope="module", params=DEFENSES.names())
def runs(request, trained, small, runtime):
    """(name, input state before, input state after, two results with seed 0, seconds per run)."""
    name = request.param
    before = state_copy(trained)
    t0 = time.perf_counter()
    first = build_defense(name, tiny_config(name)).purify(trained, small.train, runtime=runtime, seed=0)
    seconds = time.perf_counter() - t0
    second = build_defense(name, tiny_config(name)).purify(trained, small.train, runtime=runtime, seed=0)
    return name, before, state_copy(trained), first, second, seconds


def test_same_architecture(runs, trained):
    name, before, _, first, _, _ = runs
    state = first.model.state_dict()
    assert state.keys() == before.keys(), f"{name} changed the state dict keys"
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in before.items()}
    assert type(first.model) is type(trained) and first.defense == name


def test_input_model_unchanged(runs):
    name, before, after, *_ = runs
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{name} modified the input model: {changed[:5]}"


def test_deterministic_for_a_seed(runs):
    name, _, _, first, second, _ = runs
    s1, s2 = first.model.state_dict(), second.model.state_dict()
    differ = [k for k in s1 if not torch.equal(s1[k], s2[k])]
    assert not differ, f"{name} gave different weights for one seed: {differ[:5]}"


def test_record_is_json(runs):
    name, _, _, first, _, seconds = runs
    record = json.loads(json.dumps(first.record()))
    assert record["defense"] == name and record["config"] == first.config
    assert "total" in record["timings"]
    print(f"{name}: {seconds:.1f} s per run")
