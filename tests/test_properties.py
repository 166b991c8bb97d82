"""Property-based tests (hypothesis): config parsing, poisoning fractions and index selection."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tsbd.attacks import build_attack
from tsbd.config import override
from tsbd.data.poison import clean_defense_split, sample_indices
from tsbd.errors import TsbdError
from tsbd.train.engine import TrainConfig

SETTINGS = settings(max_examples=60, deadline=None)
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


# ------------------------------------------------------------------------------------------
# config parsing
@SETTINGS
@given(epochs=st.integers(0, 10_000), lr=st.floats(1e-8, 10, allow_nan=False), nesterov=st.booleans(),
       schedule=st.sampled_from(["cosine", "onecycle", "constant"]), as_text=st.booleans())
def test_override_parses_cli_text_and_typed_values_alike(epochs, lr, nesterov, schedule, as_text):
    values = {"epochs": epochs, "lr": lr, "nesterov": nesterov, "schedule": schedule}
    if as_text:  # what --train-opt KEY=VALUE hands over
        values = {"epochs": str(epochs), "lr": repr(lr), "nesterov": str(nesterov).lower(), "schedule": schedule}
    cfg = override(TrainConfig(), values)
    assert (cfg.epochs, cfg.lr, cfg.nesterov, cfg.schedule) == (epochs, lr, nesterov, schedule)
    assert type(cfg.epochs) is int and type(cfg.lr) is float and type(cfg.nesterov) is bool
    assert cfg.batch_size == TrainConfig().batch_size  # untouched fields keep their defaults


@SETTINGS
@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20), value=st.text(max_size=10))
def test_unknown_keys_are_one_line_errors(key, value):
    if key in FIELDS:
        return
    with pytest.raises(TsbdError, match="unknown option") as err:
        override(TrainConfig(), {key: value})
    assert "\n" not in str(err.value)


@SETTINGS
@given(field=st.sampled_from(["epochs", "batch_size", "lr", "nesterov", "schedule"]),
       value=st.text(alphabet="xyz!?# ", min_size=1, max_size=8))
def test_bad_values_raise_tsbd_error_never_a_traceback(field, value):
    with pytest.raises(TsbdError) as err:
        override(TrainConfig(), {field: value})
    assert "\n" not in str(err.value)


@SETTINGS
@given(key=st.sampled_from(["batch-size", "batch_size"]), n=st.integers(1, 4096))
def test_dashes_and_underscores_name_the_same_option(key, n):
    assert override(TrainConfig(), {key: str(n)}).batch_size == n


# ------------------------------------------------------------------------------------------
# poisoning fractions
@SETTINGS
@given(n=st.integers(1, 3000), ratio=st.floats(0, 1), target=st.integers(0, 9), seed=st.integers(0, 2**31 - 1))
def test_dirty_label_attack_poisons_round_ratio_n_distinct_indices(n, ratio, target, seed):
    labels = torch.arange(n) % 10
    attack = build_attack("badnets", {"poison_ratio": ratio, "target": target})
    idx = attack.poison_indices(labels, seed)
    assert len(idx) == round(ratio * n)
    assert len(torch.unique(idx)) == len(idx) and bool((idx[1:] > idx[:-1]).all())
    assert len(idx) == 0 or (int(idx.min()) >= 0 and int(idx.max()) < n)
    assert torch.equal(idx, attack.poison_indices(labels, seed))  # seeded


@SETTINGS
@given(n=st.integers(10, 2000), ratio=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_clean_label_attack_poisons_only_the_target_class(n, ratio, seed):
    labels = torch.arange(n) % 10
    attack = build_attack("sig", {"poison_ratio": ratio, "target": 3})
    idx = attack.poison_indices(labels, seed)
    in_target = int((labels == 3).sum())
    assert len(idx) == min(round(ratio * n), in_target)
    assert bool((labels[idx] == 3).all())


@SETTINGS
@given(ratio=st.one_of(st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
                       st.floats(min_value=1 + 1e-9, allow_nan=False, allow_infinity=False)))
def test_poison_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(TsbdError, match=r"poison_ratio=.*: must be in \[0, 1\]"):
        build_attack("badnets", {"poison_ratio": ratio})


# ------------------------------------------------------------------------------------------
# index selection
@SETTINGS
@given(data=st.data(), pool_size=st.integers(0, 500), seed=st.integers(0, 2**31 - 1))
def test_sample_indices_draws_distinct_sorted_members_of_the_pool(data, pool_size, seed):
    pool = torch.tensor(sorted(data.draw(st.sets(st.integers(0, 10_000), min_size=pool_size, max_size=pool_size))),
                        dtype=torch.int64)
    count = data.draw(st.integers(0, pool_size))
    pick = sample_indices(pool, count, seed)
    assert len(pick) == count and len(torch.unique(pick)) == count
    assert bool(torch.isin(pick, pool).all()) and bool((pick[1:] > pick[:-1]).all())
    assert torch.equal(pick, sample_indices(pool, count, seed))
    with pytest.raises(TsbdError, match="cannot draw"):
        sample_indices(pool, pool_size + 1, seed)


@SETTINGS
@given(n=st.integers(1, 3000), poison_ratio=st.floats(0, 0.5), ratio=st.floats(0.001, 0.5),
       seed=st.integers(0, 2**31 - 1))
def test_clean_split_never_contains_a_poisoned_index(n, poison_ratio, ratio, seed):
    poison = sample_indices(torch.arange(n), round(poison_ratio * n), seed + 1)
    count = round(ratio * n)
    if count < 1:
        with pytest.raises(TsbdError, match="selects no image"):
            clean_defense_split(n, poison, ratio, seed)
        return
    if count > n - len(poison):
        with pytest.raises(TsbdError, match="cannot draw"):
            clean_defense_split(n, poison, ratio, seed)
        return
    idx = clean_defense_split(n, poison, ratio, seed)
    assert len(idx) == count and not bool(torch.isin(idx, poison).any())
    assert len(torch.unique(idx)) == count and int(idx.max()) < n
    assert torch.equal(idx, clean_defense_split(n, poison, ratio, seed))


@SETTINGS
@given(ratio=st.one_of(st.floats(max_value=0, allow_nan=False), st.floats(min_value=1 + 1e-9, allow_nan=False),
                       st.just(math.nan)))
def test_clean_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(TsbdError):
        clean_defense_split(100, None, ratio, 0)
