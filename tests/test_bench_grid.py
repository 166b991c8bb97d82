"""Grid specs and cell identity: expansion, sweeps, validation, content hashes."""

from __future__ import annotations

import copy

import pytest
import torch

from tsbd.bench.grid import (
    PRESETS,
    attack_cell,
    cell_id,
    check_names,
    defense_cell,
    expand,
    load_spec,
    parse_set,
    relevant_versions,
)
from tsbd.errors import TsbdError
from tsbd.train.runtime import Runtime

TINY = {
    "name": "tiny", "dataset": "demo", "model": "airbench", "preset": "cpu", "attack": ["badnets", "blended"],
    "defense": ["none", "tsbd"], "poison_ratio": 0.1, "clean_ratio": 0.25, "seed": 0,
    "limit_train": 300, "limit_test": 100,
    "train": {"epochs": 1, "batch_size": 64},
    "model_opts": {"airbench": {"widths": [16, 32, 32]}},
    "defense_opts": {"tsbd": {"unlearn_lr": 0.01, "unlearn_max_epochs": 3, "finetune_epochs": 1}},
}


def spec(**changes):
    s = copy.deepcopy(TINY)
    s.update(changes)
    return s


def leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, path + (i,))
    else:
        yield path, obj


def mutate(obj, path):
    out = copy.deepcopy(obj)
    node = out
    for p in path[:-1]:
        node = node[p]
    v = node[path[-1]]
    if isinstance(v, bool):
        node[path[-1]] = not v
    elif isinstance(v, (int, float)):
        node[path[-1]] = v + 1
    elif v is None:
        node[path[-1]] = 0
    else:
        node[path[-1]] = f"{v}x"
    return out


@pytest.fixture(scope="module")
def plan():
    return expand(spec())


def test_cell_id_is_a_stable_content_hash():
    # a fixed config hashes to a fixed id: the scheme itself must not drift
    assert cell_id({"kind": "attack", "seed": 0, "x": [1, 2.5, "a"]}) == "04172646f87d9097"
    assert cell_id({"seed": 0, "x": [1, 2.5, "a"], "kind": "attack"}) == cell_id(
        {"kind": "attack", "seed": 0, "x": [1, 2.5, "a"]})  # key order is irrelevant


def test_expanding_twice_gives_the_same_cells(plan):
    again = expand(spec())
    assert [c.id for c in again.cells] == [c.id for c in plan.cells]
    assert all(c.id == cell_id(c.config) for c in plan.cells)


def test_attack_cell_id_changes_when_any_field_changes(plan):
    cell = plan.attack_cells[0]
    paths = list(leaves(cell.config))
    assert len(paths) > 25  # attack, train, model, dataset, seed, versions fields
    for path, _ in paths:
        changed = mutate(cell.config, path)
        assert cell_id(changed) != cell.id, path
    for part in ("dataset", "model", "attack", "train", "versions"):
        assert part in cell.config
    assert cell.config["versions"] == relevant_versions()
    assert cell.config["dataset"]["limit_train"] == 300 and cell.config["dataset"]["fingerprint"]


def test_defense_cell_id_changes_when_any_field_changes(plan):
    cell = next(c for c in plan.cells if c.kind == "defense")
    for path, _ in leaves(cell.config):
        assert cell_id(mutate(cell.config, path)) != cell.id, path
    assert cell.config["parent"] == cell.parent


def test_grid_axes_and_option_sweeps_expand():
    p = expand(spec(seed=[0, 1], defense_opts={"tsbd": {"neuron_ratio": [0.1, 0.15], "finetune_epochs": 1}}))
    attacks = p.attack_cells
    assert len(attacks) == 2 * 2  # 2 attacks x 2 seeds
    for a in attacks:
        ds = p.defenses_of(a.id)
        assert sorted(d.config["defense"]["config"]["neuron_ratio"] for d in ds) == [0.1, 0.15]
        assert all(d.parent == a.id for d in ds)  # one attacked model shared by both defense cells
    # each attack cell is followed by its own defense cells
    order = [c.parent or c.id for c in p.cells]
    assert order == sorted(order, key=order.index)


def test_sequence_field_list_is_one_value_and_list_of_lists_an_axis():
    one = expand(spec(defense=["none"]))
    assert len(one.cells) == 2
    assert one.cells[0].config["model"]["options"]["widths"] == [16, 32, 32]
    two = expand(spec(defense=["none"], attack="badnets",
                      model_opts={"airbench": {"widths": [[16, 32, 32], [8, 16, 16]]}}))
    assert sorted(c.config["model"]["options"]["widths"][0] for c in two.cells) == [8, 16]


def test_explicit_defaults_hash_like_omitted_ones():
    default = expand(spec(defense=["none"], attack="badnets", model_opts={}))
    explicit = expand(spec(defense=["none"], attack="badnets", model_opts={"airbench": {"widths": [32, 64, 128]}}))
    assert default.cells[0].id == explicit.cells[0].id


def test_poison_ratio_axis_and_per_defense_clean_ratio():
    p = expand(spec(attack="badnets", poison_ratio=[0.05, 0.1],
                    defense_opts={"tsbd": {"clean_ratio": [0.1, 0.2], "finetune_epochs": 1}}))
    assert sorted(a.config["attack"]["config"]["poison_ratio"] for a in p.attack_cells) == [0.05, 0.1]
    assert sorted({d.config["clean_ratio"] for d in p.cells if d.kind == "defense"}) == [0.1, 0.2]
    assert all("clean_ratio" not in d.config["defense"]["config"] for d in p.cells if d.kind == "defense")


def test_per_attack_training_overrides_touch_only_that_attack():
    base = expand(spec(defense=["none"]))
    own = expand(spec(defense=["none"], attack_opts={"blended": {"train": {"epochs": 3}, "blend_ratio": 0.2}}))
    by_name = {c.config["attack"]["name"]: c for c in own.cells}
    before = {c.config["attack"]["name"]: c for c in base.cells}
    assert by_name["blended"].config["train"]["epochs"] == 3
    assert by_name["blended"].config["train"]["batch_size"] == 64  # the grid's [train] still applies
    assert by_name["blended"].id != before["blended"].id
    assert by_name["badnets"].id == before["badnets"].id  # the other attack's cell is unchanged
    swept = expand(spec(defense=["none"], attack="blended", attack_opts={"blended": {"train": {"epochs": [2, 3]}}}))
    assert sorted(c.config["train"]["epochs"] for c in swept.cells) == [2, 3]
    with pytest.raises(TsbdError, match=r"\[attack_opts.blended\]: 'train' must be a table"):
        expand(spec(attack_opts={"blended": {"train": 3}}))
    with pytest.raises(TsbdError):
        expand(spec(attack_opts={"blended": {"train": {"bogus_field": 1}}}))


def test_unknown_names_are_listed_at_load_time():
    with pytest.raises(TsbdError) as err:
        expand(spec(attack=["badnets", "nosuchattack"], defense=["none", "nosuchdefense", "otherdefense"]))
    msg = str(err.value)
    assert "nosuchattack" in msg and "nosuchdefense" in msg and "otherdefense" in msg
    assert "\n" not in msg and "badnets" in msg  # one line, with the registered names


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_name_only_registered_methods_or_say_which_are_not(preset):
    from tsbd.attacks import ATTACKS
    from tsbd.defenses import DEFENSES

    s = load_spec(preset)
    missing = ([a for a in s["attack"] if a not in ATTACKS]
               + [d for d in s["defense"] if d != "none" and d not in DEFENSES])
    if not missing:
        check_names(s)
        return
    with pytest.raises(TsbdError) as err:
        check_names(s)
    for name in missing:
        assert name in str(err.value)


def test_bad_options_and_keys_are_one_line_errors(tmp_path):
    with pytest.raises(TsbdError, match="bogus"):
        expand(spec(defense_opts={"tsbd": {"bogus": 1}}))
    with pytest.raises(TsbdError, match="no option 'depth'"):
        expand(spec(model_opts={"airbench": {"depth": 3}}))
    with pytest.raises(TsbdError, match="unknown key"):
        load_spec_from(tmp_path, 'name = "x"\nattacks = ["badnets"]\n')
    with pytest.raises(TsbdError, match="not valid TOML"):
        load_spec_from(tmp_path, "attack = [\n")
    with pytest.raises(TsbdError, match="neither a preset"):
        load_spec(tmp_path / "missing.toml")


def load_spec_from(tmp_path, text):
    f = tmp_path / "g.toml"
    f.write_text(text)
    return load_spec(f)


def test_set_overrides_use_toml_values(tmp_path):
    f = tmp_path / "g.toml"
    f.write_text('attack = "badnets"\n[train]\nepochs = 3\n')
    s = load_spec(f, parse_set(["train.epochs=5", 'defense=["none"]', "limit_train=100", "dataset=demo"]))
    assert s["train"]["epochs"] == 5 and s["defense"] == ["none"] and s["limit_train"] == 100
    assert s["dataset"] == "demo" and s["name"] == "g"


def test_class_balanced_subset_is_deterministic_and_balanced(demo):
    a = demo.train.balanced_subset(300, 10)
    b = demo.train.balanced_subset(300, 10)
    assert len(a) == 300 and torch.equal(a.x, b.x)
    assert torch.bincount(a.y, minlength=10).tolist() == [30] * 10
    assert demo.train.balanced_subset(0, 10) is demo.train
    limited = demo.limited(300, 100)
    assert len(limited.train) == 300 and len(limited.test) == 100
    assert limited.describe()["limit_train"] == 300 and limited.fingerprint != demo.fingerprint


def test_synthetic_cells_for_other_tests():
    a = attack_cell(dataset={"name": "d"}, model={"name": "m"}, attack={"name": "a", "config": {}}, train={}, seed=0)
    d = defense_cell(a, defense={"name": "x", "config": {}}, clean_ratio=0.05, seed=0)
    assert d.parent == a.id and d.id != a.id


def test_defense_seed_adds_defense_cells_and_keeps_every_other_id():
    base = expand(spec(seed=[0, 1]))
    seeded = expand(spec(seed=[0, 1], defense_seed=[0, 1, 2]))
    assert [c.id for c in seeded.attack_cells] == [c.id for c in base.attack_cells]
    base_ids = {c.id for c in base.cells}
    for a in seeded.attack_cells:
        defs = seeded.defenses_of(a.id)
        assert sorted(d.config["seed"] for d in defs) == [0, 1, 2]
        own = [d for d in defs if d.config["seed"] == a.config["seed"]]
        assert len(own) == 1 and own[0].id in base_ids  # the default cell is the same cell
    assert len(seeded.cells) - len(base.cells) == 2 * len(base.attack_cells)  # two new defense cells per model
    with pytest.raises(TsbdError, match="'defense_seed' is an empty list"):
        expand(spec(defense_seed=[]))


def test_the_docs_example_grid_loads(tmp_path):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "bench.md").read_text()
    example = re.search(r"```toml\n(.*?)```", doc, re.S).group(1)
    f = tmp_path / "example.toml"
    f.write_text(example)
    # the example's data set needs a data root; its grid is checked on the embedded demo data
    plan = expand(load_spec(f, {"dataset": "demo", "limit_train": 200, "limit_test": 100}))
    assert len(plan.attack_cells) == 2 * 2  # 2 attacks x 2 seeds
    assert len(plan.cells) == 4 * (1 + 2 * 3)  # each with TSBD at two neuron ratios x three defense seeds
    blended = next(c for c in plan.attack_cells if c.config["attack"]["name"] == "blended")
    assert blended.config["attack"]["config"]["blend_ratio"] == 0.2 and blended.config["train"]["epochs"] == 20


def _trigger_root(tmp_path, name, content=b"\x00" * 3):
    """A data root holding the embedded demo set's stand-in: only the trigger folder matters here."""
    import numpy as np

    folder = tmp_path / name / "backdoorbench-triggers"
    folder.mkdir(parents=True)
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[..., 0] = content[0]
    np.save(folder / "lf.npy", arr)
    return tmp_path / name


def test_data_root_files_keep_the_placeholder_and_hash_the_content(tmp_path):
    from tsbd.bench.cells import CellContext, DataCache

    opts = {"attack_opts": {"lf": {"trigger_file": "{data_root}/backdoorbench-triggers/lf.npy"}},
            "attack": ["lf", "badnets"], "defense": ["none"]}
    a, b = _trigger_root(tmp_path, "a"), _trigger_root(tmp_path, "b")
    plan_a, plan_b = expand(spec(**opts), data_root=str(a)), expand(spec(**opts), data_root=str(b))
    lf_a = next(c for c in plan_a.attack_cells if c.config["attack"]["name"] == "lf")
    assert lf_a.config["attack"]["config"]["trigger_file"].startswith("{data_root}/")
    assert set(lf_a.config["files"]) == {"trigger_file"}
    assert [c.id for c in plan_a.cells] == [c.id for c in plan_b.cells]  # machine-independent ids
    badnets = next(c for c in plan_a.attack_cells if c.config["attack"]["name"] == "badnets")
    assert "files" not in badnets.config  # grids without files keep their ids
    other = _trigger_root(tmp_path, "c", content=b"\x07")
    lf_c = next(c for c in expand(spec(**opts), data_root=str(other)).attack_cells
                if c.config["attack"]["name"] == "lf")
    assert lf_c.id != lf_a.id  # another file is another cell
    # the worker resolves the placeholder against its own root and checks the content
    setup = DataCache().setup(lf_a, CellContext(results_dir=str(tmp_path / "r"), data_root=str(b)),
                              Runtime.create("cpu", "fp32"))
    assert setup.attack.config.trigger_file == str(b / "backdoorbench-triggers" / "lf.npy")
    with pytest.raises(TsbdError, match="sha256 differs"):
        DataCache().setup(lf_a, CellContext(results_dir=str(tmp_path / "r"), data_root=str(other)),
                          Runtime.create("cpu", "fp32"))


def test_data_root_files_need_a_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("TSBD_DATA_ROOT", raising=False)
    opts = {"attack_opts": {"lf": {"trigger_file": "{data_root}/backdoorbench-triggers/lf.npy"}}, "attack": "lf"}
    with pytest.raises(TsbdError, match="--data-root"):
        expand(spec(**opts))
    with pytest.raises(TsbdError, match="not found"):
        expand(spec(**opts), data_root=str(tmp_path))


@pytest.mark.parametrize("preset", ["paper-cifar10-cpu", "paper-cifar10-r18-cpu"])
def test_cpu_presets_use_backdoorbench_trigger_files(preset):
    s = load_spec(preset)
    files = {a: next(iter(o.values())) for a, o in s["attack_opts"].items()
             if a in ("badnets", "blended", "lf", "trojan")}
    assert files == {"badnets": "{data_root}/backdoorbench-triggers/trigger_image.png",
                     "blended": "{data_root}/backdoorbench-triggers/hello_kitty.jpeg",
                     "lf": "{data_root}/backdoorbench-triggers/cifar10_preactresnet18_0_255.npy",
                     "trojan": "{data_root}/backdoorbench-triggers/apple4.png"}
    if preset == "paper-cifar10-r18-cpu":
        assert s["model"] == "preact_resnet18" and "tsbd" not in s.get("defense_opts", {})  # paper lrs unchanged


def test_unflipped_data_sets_are_new_cells_and_flipped_ones_keep_their_ids():
    from tsbd.data.base import Dataset

    def loader(flipped):
        def load(ds_spec, **_):  # the demo images under a flipped or an unflipped data set's name
            from tsbd.data import load_dataset

            d = load_dataset("demo").limited(300, 100)
            return Dataset("demo" if flipped else "gtsrb", d.train, d.test, d.classes, d.mean, d.std,
                           fingerprint=d.fingerprint)
        return load

    flipped = expand(spec(), dataset_loader=loader(True))
    plain = expand(spec(), dataset_loader=loader(False))
    assert "hflip" not in flipped.attack_cells[0].config["dataset"]
    assert plain.attack_cells[0].config["dataset"]["hflip"] is False
    assert flipped.attack_cells[0].id != plain.attack_cells[0].id
