"""Grid expansion pinned cell by cell: every built-in preset and two grids that sweep every axis expand
to the cells recorded in ``grid_cells.json`` -- the same ids, kinds and order, and the same configs
(their JSON, key order included) -- and bad grids fail with the recorded one-line messages.

The data sets are stubs (a fingerprint from the dataset spec, a class count per data set, GTSRB and
image folders unflipped) and the versions are pinned, so the test depends neither on the installed
torch nor on the real archives; the presets' trigger files under the shared data folder are hashed
into their ids, so they must be there.

The file records what the expansion produced when it was written. A change that moves a cell or an
error on purpose regenerates it: ``PYTHONPATH=. python3 tests/test_grid_expansion.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import SHARED_DATA

from tsbd.bench import grid
from tsbd.errors import TsbdError

GOLDEN = Path(__file__).with_name("grid_cells.json")
VERSIONS = {"tsbd": "0.1", "torch": "2.13"}
CLASSES = {"gtsrb": 43, "tiny-imagenet": 200}
UNFLIPPED = ("gtsrb", "imagefolder")

# every data and model axis: two data sets (one with an option axis), two training-set sizes, two
# architectures (one with a sequence-typed option axis) under two training presets
DATA_AND_MODELS = {
    "name": "data-and-models", "dataset": ["demo", "imagefolder"], "dataset_opts": {"imagefolder": {"size": [32, 64]}},
    "limit_train": [0, 100], "limit_test": 50, "model": ["airbench", "preact_resnet18"],
    "preset": ["cpu", "backdoorbench"], "model_opts": {"airbench": {"widths": [[16, 32, 32], [8, 16, 16]]}},
    "attack": "badnets", "defense": ["none", "tsbd"], "seed": 0,
}
# every attack, training and defense axis: a [train] axis, poison ratios overridden for one attack (so
# some of its cells repeat), an attack option and its own training axis, options for all attacks,
# defense option axes, a per-defense clean-ratio axis and two seeds
ATTACKS_AND_DEFENSES = {
    "name": "attacks-and-defenses", "dataset": "demo", "model": "airbench", "preset": "cpu",
    "train": {"epochs": [1, 2], "batch_size": 64}, "attack": ["badnets", "blended"], "poison_ratio": [0.05, 0.1],
    "attack_opts": {"target": 1, "badnets": {"poison_ratio": 0.1},
                    "blended": {"blend_ratio": [0.1, 0.2], "train": {"epochs": [3, 4]}}},
    "defense": ["none", "tsbd", "rnp"], "clean_ratio": [0.05, 0.1],
    "defense_opts": {"tsbd": {"neuron_ratio": [0.1, 0.15]}, "rnp": {"clean_ratio": [0.005, 0.01]}},
    "seed": [0, 1],
}
SWEEPS = {s["name"]: s for s in (DATA_AND_MODELS, ATTACKS_AND_DEFENSES)}

BASE = {"name": "bad", "dataset": "demo", "model": "airbench", "attack": "badnets", "defense": ["none", "tsbd"]}
# one mistake each: (label, changes to BASE)
BAD = [
    ("empty axis", {"attack": []}),
    ("unknown names", {"attack": ["badnets", "nosuch"], "model": "nosuchnet"}),
    ("unknown method in an option table", {"defense_opts": {"nosuch": {"x": 1}}}),
    ("train option is a table", {"train": {"epochs": {"a": 1}}}),
    ("train option is an empty list", {"train": {"epochs": []}}),
    ("unknown train option", {"train": {"bogus": 1}}),
    ("attack's train is not a table", {"attack_opts": {"badnets": {"train": 3}}}),
    ("attack's unknown train option", {"attack_opts": {"badnets": {"train": {"bogus": 1}}}}),
    ("clean ratio out of range", {"clean_ratio": 1.5}),
    ("unknown defense option", {"defense_opts": {"tsbd": {"bogus": 1}}}),
    ("per-defense clean ratio out of range", {"defense_opts": {"tsbd": {"clean_ratio": 0.0}}}),
    ("unknown dataset option", {"dataset_opts": {"demo": {"size": 3}}}),
    ("unknown model option", {"model_opts": {"airbench": {"depth": 3}}}),
    ("unknown attack option", {"attack_opts": {"badnets": {"bogus": 1}}}),
    ("attack target outside the classes", {"attack_opts": {"target": 12}}),
    ("poison ratio out of range", {"poison_ratio": 2.0}),
    ("non-finite poison ratio", {"poison_ratio": float("nan")}),
    ("file under a missing data root", {"attack_opts": {"badnets": {"trigger_image": "{data_root}/none.png"}}}),
]


def stub_loader(ds_spec, **_):
    return SimpleNamespace(fingerprint=hashlib.sha256(grid.canonical_json(ds_spec).encode()).hexdigest()[:16],
                           num_classes=CLASSES.get(ds_spec["name"], 10),
                           train=SimpleNamespace(hflip=ds_spec["name"] not in UNFLIPPED))


def expansion(name: str) -> dict:
    """The cells of a preset or sweep grid: ``kind id`` in order, and the sha256 of their configs' JSON."""
    spec = copy.deepcopy(SWEEPS[name]) if name in SWEEPS else grid.load_spec(name)
    plan = grid.expand(spec, data_root=str(SHARED_DATA), dataset_loader=stub_loader)
    configs = "\n".join(json.dumps(c.config) for c in plan.cells)
    return {"cells": [f"{c.kind} {c.id}" for c in plan.cells],
            "configs_sha256": hashlib.sha256(configs.encode()).hexdigest()}


def error_of(changes: dict) -> str:
    try:
        grid.expand({**copy.deepcopy(BASE), **copy.deepcopy(changes)}, dataset_loader=stub_loader)
    except TsbdError as err:
        return str(err)
    return "no error"


def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture
def pinned_versions(monkeypatch):
    monkeypatch.setattr(grid, "relevant_versions", lambda: dict(VERSIONS))
    monkeypatch.delenv("TSBD_DATA_ROOT", raising=False)


@pytest.mark.skipif(not (SHARED_DATA / "backdoorbench-triggers").is_dir(),
                    reason=f"the BackdoorBench trigger files are not under {SHARED_DATA} (set TSBD_TEST_SHARED_DATA)")
@pytest.mark.parametrize("name", [*grid.PRESETS, *SWEEPS])
def test_grid_expands_to_the_recorded_cells(name, pinned_versions):
    want = golden()["grids"][name]
    got = expansion(name)
    assert got["cells"] == want["cells"]
    assert got["configs_sha256"] == want["configs_sha256"]


def test_every_preset_is_recorded():
    assert set(golden()["grids"]) == {*grid.PRESETS, *SWEEPS}


@pytest.mark.parametrize("label, changes", BAD, ids=[label for label, _ in BAD])
def test_bad_grid_fails_with_the_recorded_message(label, changes, pinned_versions):
    message = error_of(changes)
    assert message == golden()["errors"][label]
    assert "\n" not in message and message != "no error"


if __name__ == "__main__":
    grid.relevant_versions = lambda: dict(VERSIONS)
    record = {"grids": {name: expansion(name) for name in [*grid.PRESETS, *SWEEPS]},
              "errors": {label: error_of(changes) for label, changes in BAD}}
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {sum(len(g['cells']) for g in record['grids'].values())} cells, "
          f"{len(record['errors'])} errors")
