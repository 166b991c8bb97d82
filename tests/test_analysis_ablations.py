"""TSBD's ablations (paper Tables 3, 4, 7, 8; Apps. H, K): the threshold search, the variants, the
clean sets, the paper lookups and every `tsbd analyze` ablation command end to end on a tiny model."""

import csv
import json
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import state_copy

from tsbd.analysis.ablations import finetuned_copy, first_ratio_below, paper_cell, with_der
from tsbd.analysis.sweeps import largest_ratio_within_acc
from tsbd.cli import main
from tsbd.defenses.tsbd import TSBDConfig, zero_reinit
from tsbd.models.surgery import prunable_units

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: seconds to minutes per test


# ------------------------------------------------------------------------------------------
# pure functions
def test_v3_zeroes_exactly_m_of_the_selected_neurons_subweights(tiny_net):
    """(V1 zeroing whole neurons is tested in test_tsbd.py.) Tie-free changes: V3 zeros exactly
    int(m x subweights of the selected neurons), all inside those neurons."""
    torch.manual_seed(1)
    change = {name: torch.rand(conv.out_channels, conv.weight[0].numel()) for name, conv in prunable_units(tiny_net)}
    for n, m in [(0.25, 0.7), (0.5, 0.4), (1.0, 0.55)]:
        model, info = zero_reinit(tiny_net, change, n, m, scheme="v3")
        ranked = sorted(((float(d[k].sum()), name, k) for name, d in change.items() for k in range(len(d))),
                        reverse=True)[: info["neurons_selected"]]
        selected = {(name, k) for _, name, k in ranked}
        pool = sum(change[name].shape[1] for name, _ in selected)
        zeros = {name: (dict(model.named_modules())[name].weight.detach().flatten(1) == 0) for name in change}
        assert info["subweights_zeroed"] == int(m * pool) == sum(int(z.sum()) for z in zeros.values())
        assert all(not zeros[name][k].any() for name in zeros for k in range(len(zeros[name]))
                   if (name, k) not in selected)


@pytest.mark.parametrize("crossing", [0.005, 0.03, 0.33, 0.5, 0.87])
def test_threshold_search_returns_the_smallest_n_on_the_step_grid(crossing):
    calls = []

    def fake(n):  # ASR falls linearly, reaching 0 at n = crossing; ACC falls too
        calls.append(n)
        return {"asr": max(0.0, crossing - n), "acc": 1 - n, "ra": 0.1}

    grid = [round(0.05 * k, 2) for k in range(1, 19)]
    res = first_ratio_below(fake, grid, threshold=0.0005, step=0.01)
    lattice = [k / 100 for k in range(1, 91)]
    assert res["n"] == pytest.approx(min(n for n in lattice if max(0.0, crossing - n) <= 0.0005))
    assert res["metrics"]["asr"] <= 0.0005 and res["metrics"]["acc"] == pytest.approx(1 - res["n"])
    assert [p["n"] for p in res["points"]] == calls and len(calls) < 25  # not a scan of all 90 points
    # nothing below the answer on the step lattice was skipped as a hit
    assert all(max(0.0, crossing - n) > 0.0005 for n in calls if n < res["n"])


def test_threshold_search_not_reached():
    res = first_ratio_below(lambda n: {"asr": 0.5, "acc": 0.9}, [0.1, 0.5, 0.9], threshold=0.0005)
    assert res["n"] is None and res["metrics"] is None and [p["n"] for p in res["points"]] == [0.1, 0.5, 0.9]


def test_largest_ratio_within_acc_and_der():
    rows = [{"neuron_ratio": 0.05, "acc": 0.90}, {"neuron_ratio": 0.3, "acc": 0.885}, {"neuron_ratio": 0.5, "acc": 0.8}]
    assert largest_ratio_within_acc(rows, 0.90, 0.02)["neuron_ratio"] == 0.3
    assert largest_ratio_within_acc(rows, 0.99, 0.02) is None
    assert with_der({"acc": 0.9, "asr": 1.0}, {"acc": 0.9, "asr": 0.0})["der"] == pytest.approx(1.0)


def test_paper_numbers_are_looked_up_by_setting():
    assert paper_cell("table7", "badnets", clean_ratio=0.05) == pytest.approx({"acc": 0.9072, "asr": 0.0137,
                                                                             "der": 0.9653})
    assert paper_cell("table7", "blended", defense="none")["asr"] == pytest.approx(0.9992)
    assert paper_cell("table8", "lf", finetune_lr=0.1)["acc"] == pytest.approx(0.7938)
    assert paper_cell("table4", "ssba", finetune_mode="vanilla")["asr"] == pytest.approx(0.076)
    assert paper_cell("table4", "wanet", finetune_mode="none") is None  # Table 4 has four attacks
    assert paper_cell("table7", "badnets", clean_ratio=0.02) is None


# ------------------------------------------------------------------------------------------
# model-level pieces
def test_no_ft_leaves_the_reinit_model_unchanged(attacked, small, runtime):
    from tsbd.artifacts import load_model

    model, _ = load_model(attacked)
    clean = small.train.subset(torch.arange(128))
    before = state_copy(model)
    same, info = finetuned_copy(model, clean, TSBDConfig(finetune_mode="none"), runtime)
    assert info["epochs"] == 0 and all(torch.equal(v, same.state_dict()[k]) for k, v in before.items())
    tuned, info = finetuned_copy(model, clean, TSBDConfig(finetune_epochs=1, finetune_lr=0.05), runtime)
    assert info["epochs"] == 1 and any(not torch.equal(v, tuned.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is untouched


def test_clean_sets_have_the_requested_sizes_and_nest(small):
    from tsbd.attacks import build_attack
    from tsbd.pipeline import AttackSetup

    ptrain = build_attack("badnets").poison_train(small.train, seed=0)
    setup = AttackSetup(small, build_attack("badnets"), 0, ptrain, None)
    sets = {r: setup.clean_set(r) for r in (0.1, 0.05, 0.01)}
    for r, (data, info) in sets.items():
        assert len(data) == info["count"] == round(r * len(small.train))
    fps = {r: {x.numpy().tobytes() for x in data.x} for r, (data, _) in sets.items()}
    assert fps[0.01] <= fps[0.05] <= fps[0.1]  # one seeded permutation cut at each size
    poisoned = {x.numpy().tobytes() for x in small.train.x[ptrain.poison_index]}
    assert not fps[0.1] & poisoned


# ------------------------------------------------------------------------------------------
# the commands
ARCH = {"widths": [8, 16, 16]}


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    """A tiny BadNets airbench on 2,000 demo images, saved as `tsbd attack` saves it (2 epochs, ~3 s)."""
    from tsbd.artifacts import save_model
    from tsbd.attacks import build_attack
    from tsbd.data import load_dataset
    from tsbd.pipeline import setup_attack, train_attacked_model
    from tsbd.train.engine import TrainConfig
    from tsbd.train.runtime import Runtime

    runtime = Runtime.create("cpu", "fp32", threads=1)
    ds = load_dataset("demo").limited(2000, 400)
    setup = setup_attack(ds, build_attack("badnets"), 0, runtime, arch="airbench", arch_kwargs=ARCH)
    cfg = TrainConfig(epochs=2, batch_size=256, lr=0.2, nesterov=True, schedule="onecycle", warmup=0.2)
    model, meta = train_attacked_model(setup, "airbench", cfg, runtime, arch_kwargs=ARCH)
    folder = tmp_path_factory.mktemp("ablations") / "badnets"
    save_model(folder, model, meta)
    return folder


def analyze(folder, name, out, *extra):
    return main(["analyze", name, str(folder), "--out", str(out), "--quiet", "--precision", "fp32", "--threads", "1",
                 "--cache-dir", str(folder.parent / "cache"), "--opt", "unlearn_lr=0.05",
                 "--opt", "unlearn_max_epochs=20", "--opt", "finetune_epochs=1", "--clean-ratio", "0.1", *extra])


def rows_of(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("name,extra,csvs", [
    ("reinit-variants", ["--values", "0.2,0.5,0.9", "--refine-step", "0.1"],
     {"reinit_points.csv": ["scheme", "n", "acc", "asr", "ra"], "reinit_variants.csv": ["scheme", "n", "acc", "asr",
                                                                                        "ra", "reached"]}),
    ("finetune-variants", ["--at-n", "auto", "--values", "0.3,0.9", "--asr-threshold", "0.05"],
     {"finetune_variants.csv": ["variant", "finetune_mode", "acc", "asr", "ra", "der"]}),
    ("sweep-clean-ratio", ["--values", "0.1,0.05"], {"sweep_clean_ratio.csv": ["clean_ratio", "clean_images", "acc",
                                                                               "asr", "ra", "der"]}),
    ("sweep-ft-lr", ["--values", "0.01,0.001"], {"sweep_ft_lr.csv": ["finetune_lr", "acc", "asr", "ra", "der"]}),
    ("clean-model", ["--defenses", "tsbd,clp"], {"clean_model.csv": ["defense", "acc_before", "asr_before", "ra_before",
                                                                     "acc", "asr", "ra"]}),
    ("sweep-n", ["--values", "0.05,0.5", "--max-acc-drop", "50"], {"sweep_n.csv": ["neuron_ratio"]}),
])
def test_ablation_commands_write_their_files(attacked, tmp_path, name, extra, csvs):
    out = tmp_path / name
    assert analyze(attacked, name, out, *extra) == 0
    stem = next(iter(csvs))[:-4] if name != "reinit-variants" else "reinit_variants"
    for f in [*csvs, f"{stem}.png", f"{stem}.svg", "result.json", "section.md"]:
        assert (out / f).stat().st_size > 0, f
    for f, cols in csvs.items():
        assert list(rows_of(out / f)[0])[: len(cols)] == cols
    record = json.loads((out / "result.json").read_text())
    section = (out / "section.md").read_text()
    assert record["analysis"] == name and "tsbd analyze " + name in section and "|---|" in section
    result = record["result"]
    if name == "reinit-variants":
        assert set(result["schemes"]) == {"v1", "v2", "v3"}
        for s, found in result["schemes"].items():
            points = [r for r in rows_of(out / "reinit_points.csv") if r["scheme"] == s]
            hits = [float(p["n"]) for p in points if float(p["asr"]) <= 0.0005]
            assert found["n"] == (min(hits) if hits else None)
        assert "BadNets (paper, CIFAR-10 PreAct-R18)" in section  # Table 3 has BadNets
    if name == "finetune-variants":
        rows = {r["variant"]: r for r in result["rows"]}
        assert set(rows) == {"No-FT", "Vanilla-FT", "Aa-FT"} and rows["No-FT"]["epochs"] == 0
        if result["search"]["n"] is not None:  # No-FT is the reinit model the search stopped at
            assert rows["No-FT"]["asr"] == pytest.approx(result["search"]["metrics"]["asr"])
    if name == "sweep-clean-ratio":
        assert [r["clean_images"] for r in result["rows"]] == [200, 100]
        assert "90.72" in section  # the paper's BadNets 5% row beside ours
    if name == "clean-model":
        assert [r["defense"] for r in result["rows"]] == ["tsbd", "clp"]
    if name == "sweep-n":
        assert result["suggestion"]["neuron_ratio"] in (0.05, 0.5) and "Choosing n for your model" in section
        assert "--max-acc-drop 50" in section


def test_sweep_poison_ratio_trains_once_then_reuses_the_cache(attacked, tmp_path):
    t0 = time.perf_counter()
    assert analyze(attacked, "sweep-poison-ratio", tmp_path / "a", "--values", "0.1,0.05") == 0
    first = time.perf_counter() - t0
    assert analyze(attacked, "sweep-poison-ratio", tmp_path / "b", "--values", "0.1,0.05") == 0
    a, b = (json.loads((tmp_path / d / "result.json").read_text())["result"] for d in "ab")
    assert [r["model"] for r in a["rows"]] == ["given model", "trained"] and a["trained"] == 1
    assert [r["model"] for r in b["rows"]] == ["given model", "cache"] and b["trained"] == 0 and b["cache_hits"] == 1
    assert b["rows"][1]["model_seconds"] < a["rows"][1]["model_seconds"] / 3 and first > 0
    assert b["rows"][1]["acc_before"] == a["rows"][1]["acc_before"]  # the same model
    assert [r["poisoned_images"] for r in a["rows"]] == [200, 100]
    cols = ["poison_ratio", "model", "poisoned_images", "acc_before", "asr_before", "ra_before", "acc", "asr", "ra",
            "der"]
    assert list(rows_of(tmp_path / "a" / "sweep_poison_ratio.csv")[0])[: len(cols)] == cols
    assert (tmp_path / "a" / "sweep_poison_ratio.png").stat().st_size > 0


@pytest.mark.parametrize("name,extra,message", [
    ("sweep-clean-ratio", ["--values", "0.1,1.5"], "(0, 1]"),
    ("sweep-poison-ratio", ["--values", "0"], "(0, 1]"),
    ("sweep-clean-ratio", ["--values", ","], "--values is empty"),
    ("sweep-ft-lr", ["--values", "0.01,-1"], "must be > 0"),
    ("clean-model", ["--defenses", "tsbd,nosuch"], "unknown defense 'nosuch'"),
    ("clean-model", ["--defenses", ","], "--defenses is empty"),
    ("finetune-variants", ["--at-n", "often"], "--at-n must be 'auto'"),
    ("reinit-variants", ["--asr-threshold", "2"], "--asr-threshold"),
])
def test_bad_input_is_one_line_naming_the_fix(attacked, tmp_path, capsys, name, extra, message):
    assert analyze(attacked, name, tmp_path / "x", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bn_recompute_sources_reads_the_model_under_each_source_of_statistics(attacked, tmp_path):
    """benchmarks/bn_recompute_sources.py: one row per source, the first the saved model's own metrics."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "sources.json"
    env = {**os.environ, "PYTHONPATH": str(root)}
    script = str(root / "benchmarks" / "bn_recompute_sources.py")
    proc = subprocess.run([sys.executable, script, str(attacked), "--train-sample", "1000", "--threads", "1",
                           "--precision", "fp32", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    meta = json.loads((attacked / "meta.json").read_text())
    rows = doc["rows"]
    assert list(rows) == ["as_trained", "clean", "clean_augmented", "train_sample", "train_sample_augmented"]
    assert rows["as_trained"]["acc"] == pytest.approx(meta["metrics"]["acc"])
    assert all(0 <= r["acc"] <= 1 and 0 <= r["asr"] <= 1 for r in rows.values())
    assert 0.04 <= doc["train_sample"]["poisoned_share"] <= 0.16  # BadNets at 10%, a sample of 1,000
    bad = subprocess.run([sys.executable, script, str(tmp_path / "missing"), "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "not found" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.json").exists()
