"""Per-neuron analyses: activation hooks, TAC, coverage of rankings, FP's NWC order and the
`tsbd analyze activations | tac | fp-nwc` commands."""

import csv
import json
import re

import pytest
import torch

from tsbd.analysis.neurons import (
    activation_points,
    coverage,
    neuron_activations,
    parse_defense_opts,
    parse_skip,
    ranking_scores,
    resolve_layer,
    selection_scores,
    trigger_activated_change,
)
from tsbd.analysis.registry import fractions
from tsbd.attacks import build_attack
from tsbd.cli import main
from tsbd.defenses import build_defense
from tsbd.defenses.fp import FPConfig
from tsbd.defenses.tsbd import TSBDConfig
from tsbd.errors import TsbdError
from tsbd.models import build_model
from tsbd.models.surgery import prunable_units
from tsbd.train.engine import to_model_input

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: seconds to minutes per test


@pytest.fixture(scope="module")
def attacked_folder(tmp_path_factory, runtime):
    """What `tsbd attack --attack badnets --epochs 2 --model-opt widths=[8,16,16]` writes, on a 2,000 / 500
    image subset of the demo data (recorded in the meta, so `tsbd analyze` rebuilds the same subset)."""
    from tsbd.artifacts import save_model
    from tsbd.data import load_dataset
    from tsbd.pipeline import setup_attack, train_attacked_model, train_config

    out = tmp_path_factory.mktemp("analyze_neurons") / "badnets"
    dataset = load_dataset("demo").limited(2000, 500)
    setup = setup_attack(dataset, build_attack("badnets"), 0, runtime, arch="airbench")
    model, meta = train_attacked_model(setup, "airbench", train_config("cpu", {"epochs": 2}), runtime,
                                       arch_kwargs={"widths": [8, 16, 16]})
    save_model(out, model, meta)
    return out



def test_activation_hook_equals_direct_computation(tiny_net, small, runtime):
    x = small.test.x[:40]
    tiny_net.train()
    acts = neuron_activations(tiny_net, x, runtime, batch_size=16)
    assert tiny_net.training  # mode restored
    assert activation_points(tiny_net) == {"conv1": "bn1", "conv2": "bn2"}  # the shortcut conv is no neuron
    assert {n: tuple(a.shape) for n, a in acts.items()} == {"conv1": (40, 8), "conv2": (40, 16)}
    tiny_net.eval()
    with torch.no_grad():
        h = torch.relu(tiny_net.bn1(tiny_net.conv1(to_model_input(x, runtime))))
        direct1 = h.mean((2, 3))
        direct2 = torch.relu(tiny_net.bn2(tiny_net.conv2(h))).mean((2, 3))  # BN2 before the residual sum
    torch.testing.assert_close(acts["conv1"], direct1)
    torch.testing.assert_close(acts["conv2"], direct2)


def test_activation_points_of_a_preact_resnet_read_convs_feeding_a_residual_sum_directly():
    model = build_model("preact_resnet18", 10, mean=(0.5,) * 3, std=(0.25,) * 3, width=2)
    points = activation_points(model)
    assert points["layer4.1.conv1"] == "layer4.1.bn2" and points["layer4.1.conv2"] == "layer4.1.conv2"
    assert points["conv1"] == "layer1.0.bn1"  # the stem conv alone feeds the first block's BN
    assert resolve_layer(model, None) == "layer4.1.conv2"  # the paper's "last conv layer"


def test_tac_is_zero_when_the_trigger_changes_nothing(trained, small, runtime):
    x = small.test.x[:64]
    tac = trigger_activated_change(trained, x, x.clone(), runtime, batch_size=32)
    assert {n: len(v) for n, v in tac.items()} == {n: c.out_channels for n, c in prunable_units(trained)}
    assert all(bool((v == 0).all()) for v in tac.values())
    nontarget = small.test.subset(torch.nonzero(small.test.y != 0).flatten()[:64])
    poisoned = build_attack("badnets").poison_test(nontarget).x  # row i: image i with the trigger
    tac = trigger_activated_change(trained, nontarget.x, poisoned, runtime)
    assert any(float(v.max()) > 0 for v in tac.values()) and all(float(v.min()) >= 0 for v in tac.values())
    with pytest.raises(TsbdError, match="pairs"):
        trigger_activated_change(trained, x, x[:10], runtime)


def test_coverage_of_identical_and_reversed_rankings():
    torch.manual_seed(0)
    truth = {"a": torch.rand(30), "b": torch.rand(70)}  # 100 neurons, no ties
    reverse = {n: -v for n, v in truth.items()}
    for r in (0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        assert coverage(truth, truth, r) == 1.0
        k = round(r * 100)
        assert coverage(reverse, truth, r) == pytest.approx(max(0, 2 * k - 100) / k)  # bottom-k vs top-k
    # a mask ranking (lowest first) that is the negated truth selects exactly TAC's order
    assert coverage(selection_scores("anp", reverse), selection_scores("tac", truth), 0.2) == 1.0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(TsbdError, match=r"outside \(0, 1\]"):
            coverage(truth, truth, bad)


def test_selection_scores_follow_each_methods_rule():
    nan = float("nan")
    raw = {"a": torch.tensor([3.0, 1.0, 2.0, 4.0]), "b": torch.tensor([10.0, 30.0]), "c": torch.tensor([nan, nan])}
    fp = selection_scores("fp", raw)  # least active first, in equal fractions per layer
    assert fp["a"].tolist() == [-0.5, 0.0, -0.25, -0.75] and fp["b"].tolist() == [0.0, -0.5]
    assert bool(torch.isinf(fp["c"]).all())  # no score: selected last
    clp = selection_scores("clp", raw)  # per-layer z-score
    torch.testing.assert_close(clp["b"], torch.tensor([-1.0, 1.0], dtype=torch.float64) / 2 ** 0.5)
    assert selection_scores("rnp", raw)["a"].tolist() == [-3.0, -1.0, -2.0, -4.0]
    truth = {"a": torch.tensor([0.0, 5.0, 1.0, 0.0]), "b": torch.tensor([4.0, 0.0]), "c": torch.tensor([0.0, 0.0])}
    assert coverage(fp, truth, 0.2) == 1.0  # k = 2: a[1] and b[0], each its layer's least active


def test_bad_inputs_name_the_fix(trained):
    with pytest.raises(TsbdError, match="--layer 'nope' is not a prunable conv.*choose one of groups"):
        resolve_layer(trained, "nope")
    with pytest.raises(TsbdError, match="--skip 'foo' is not a metric.*anp,rnp"):
        parse_skip("anp, foo")
    assert parse_skip("anp,rnp") == {"anp", "rnp"} and parse_skip(None) == set()
    with pytest.raises(TsbdError, match="outside"):
        fractions([1.01])
    with pytest.raises(TsbdError, match="DEFENSE.KEY=VALUE"):
        parse_defense_opts(["nb_iter=3"], ("anp",))
    with pytest.raises(TsbdError, match="runs anp"):
        parse_defense_opts(["fp.epochs=3"], ("anp",))
    assert parse_defense_opts(["anp.nb-iter=3", "anp.anp_eps=0.2"], ("anp",)) == {"anp": {"nb_iter": 3,
                                                                                          "anp_eps": 0.2}}
    with pytest.raises(TsbdError, match="unknown ranking metric"):
        ranking_scores(trained, None, TSBDConfig(), None, metrics=["tac2"])


def test_ranking_scores_of_every_metric(trained, small, runtime):
    clean = small.train.subset(torch.arange(160))
    cfg = TSBDConfig(unlearn_lr=0.05, unlearn_max_epochs=5)
    tiny = {"anp": {"nb_iter": 2, "batch_size": 64},
            "rnp": {"unlearn_epochs": 1, "recover_epochs": 1, "batch_size": 64}}
    scores, info = ranking_scores(trained, clean, cfg, runtime, defense_opts=tiny)
    shapes = {n: c.out_channels for n, c in prunable_units(trained)}
    assert set(scores) == {"nwc", "fp", "clp", "anp", "rnp"} and set(info) == set(scores)
    for metric, per_layer in scores.items():
        assert {n: len(v) for n, v in per_layer.items()} == shapes, metric
        assert not any(bool(v.isnan().any()) for v in per_layer.values()), metric  # airbench: every conv has a BN
    flat = {m: torch.cat(list(v.values())) for m, v in scores.items()}
    assert float(flat["nwc"].min()) >= 0 and float(flat["nwc"].max()) > 0
    assert float(flat["fp"].min()) >= 0 and float(flat["clp"].min()) > 0
    for m in ("anp", "rnp"):
        assert float(flat[m].min()) >= 0 and float(flat[m].max()) <= 1
    assert info["anp"]["iterations"] >= 2 and info["rnp"]["recover"]["epochs"] == 1

    # a conv feeding a residual sum has no BN channel of its own: CLP cannot score it
    preact = build_model("preact_resnet18", 10, mean=small.mean, std=small.std, width=2).to(runtime.device)
    clp, _ = ranking_scores(preact, clean, cfg, runtime, metrics=["clp"])
    assert bool(clp["clp"]["layer4.1.conv2"].isnan().all()) and not bool(clp["clp"]["layer4.1.conv1"].isnan().any())


def test_fp_nwc_order_prunes_the_largest_nwc_first(trained, small, runtime):
    assert FPConfig().order == "activation"
    fp = build_defense("fp", {"epochs": 1, "order": "nwc", "nwc_unlearn_lr": 0.05, "nwc_unlearn_max_epochs": 5})
    res = fp.purify(trained, small.train.subset(torch.arange(400)), runtime=runtime, seed=0)
    info = res.info
    assert res.config["order"] == "nwc" and info["unlearn"]["layer"] == prunable_units(trained)[-1][0]
    nwc = torch.tensor(info["nwc_pruned"])
    assert len(nwc) == info["pruned"] and bool((nwc[:-1] >= nwc[1:]).all())  # largest NWC first
    assert torch.all(res.model.head.weight[:, info["pruned_channels"]] == 0)
    with pytest.raises(TsbdError, match="order"):
        build_defense("fp", {"order": "random"})


TINY_OPTS = ["--opt", "unlearn_lr=0.05", "--opt", "unlearn_max_epochs=20", "--opt", "finetune_epochs=1",
             "--clean-ratio", "0.1", "--quiet", "--precision", "fp32"]


@pytest.mark.parametrize("name,extra,files,columns", [
    ("activations", ["--images", "200"], ["activations.csv", "activations.png", "activations.svg"],
     {"activations.csv": ["model", "neuron", "clean_act", "poison_act"]}),
    ("tac", ["--images", "200", "--skip", "anp,rnp", "--values", "0.1,0.5"],
     ["tac.csv", "tac_scores.csv", "tac.png", "tac.svg"],
     {"tac.csv": ["ratio", "metric", "coverage"],
      "tac_scores.csv": ["layer", "neuron", "tac", "nwc", "fp", "clp", "anp", "rnp"]}),
    ("fp-nwc", ["--defense-opt", "fp.epochs=1", "--defense-opt", "fp.once_prune_ratio=0.25"],
     ["fp_nwc.csv", "fp_nwc.png", "fp_nwc.svg"],
     {"fp_nwc.csv": ["order", "acc", "asr", "ra", "channels_pruned", "seconds"]}),
])
def test_analyze_commands_write_their_files(attacked_folder, tmp_path, monkeypatch, name, extra, files, columns):
    # the clean reference model (activations) trains with the attacked model's 2-epoch recipe, cached here
    monkeypatch.setenv("TSBD_CACHE_DIR", str(attacked_folder.parent / "cache"))
    out = tmp_path / name
    assert main(["analyze", name, str(attacked_folder), "--out", str(out)] + TINY_OPTS + extra) == 0
    for f in files + ["result.json", "section.md"]:
        assert (out / f).stat().st_size > 0, f
    tables = {}
    for f, cols in columns.items():
        with open(out / f) as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == cols
        tables[f] = rows
    record = json.loads((out / "result.json").read_text())
    result = record["result"]
    section = (out / "section.md").read_text()
    assert record["analysis"] == name and "tsbd analyze " + name in section
    if name == "activations":
        models = {r["model"] for r in tables["activations.csv"]}
        assert {"clean", "backdoored", "unlearn_epoch_1"} <= models
        assert len(models) == 2 + result["unlearn_epochs"] and result["layer"] == "groups.2.conv2"
        assert {"claim_A1", "claim_A2", "pearson_nwc_abs_delta_poison"} <= set(result) and "[A2]" in section
        assert "--images 200" in section
    elif name == "tac":
        assert {r["metric"] for r in tables["tac.csv"]} == {"nwc", "fp", "clp", "random"}
        assert len(tables["tac_scores.csv"]) == result["neurons"] == 8 + 8 + 16 + 16 + 16 + 16
        assert all(r["anp"] == "" and r["nwc"] != "" for r in tables["tac_scores.csv"])
        assert "--skip anp,rnp" in section
    else:
        assert [r["order"] for r in tables["fp_nwc.csv"]] == ["none", "activation", "nwc"]
        assert "--defense-opt fp.epochs=1" in section


@pytest.mark.parametrize("extra,message", [
    (["activations", "--layer", "groups.9.conv"], "--layer 'groups.9.conv' is not a prunable conv"),
    (["tac", "--values", "0.1,1.5"], r"outside \(0, 1\]"),
    (["tac", "--values", ""], "--values is empty"),
    (["sweep-n", "--values", ""], "--values is empty"),
    (["sweep-m", "--values", " , "], "--values is empty"),
    (["tac", "--skip", "anp,xyz"], "--skip 'xyz' is not a metric"),
])
def test_analyze_bad_input_is_one_line(attacked_folder, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setenv("TSBD_CACHE_DIR", str(attacked_folder.parent / "cache"))
    argv = ["analyze", extra[0], str(attacked_folder), "--out", str(tmp_path / "bad")] + TINY_OPTS + extra[1:]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and re.search(message, err), err
