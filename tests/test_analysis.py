"""The paper's analyses: NWC, Pearson, gradient norms, sweeps and the `tsbd analyze` commands."""

import csv
import json

import pytest
import torch

from tsbd.analysis import gradient_norms_during_unlearning, nwc_comparison, pearson, poison_unlearning_set, ratio_sweep
from tsbd.attacks import build_attack
from tsbd.cli import main
from tsbd.defenses.tsbd import TSBDConfig
from tsbd.errors import TsbdError
from tsbd.metrics import evaluate
from tsbd.models.surgery import neuron_weight_change, prunable_units

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: seconds to minutes per test


def test_pearson_hand_cases():
    a = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert pearson(a, a) == pytest.approx(1.0)
    assert pearson(a, -3 * a + 1) == pytest.approx(-1.0)
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    assert pearson(a, torch.ones(4)) != pearson(a, torch.ones(4))  # nan for a constant vector
    with pytest.raises(TsbdError):
        pearson(a, a[:3])


def test_nwc_of_a_layer_equals_direct_computation(trained):
    import copy

    other = copy.deepcopy(trained)
    name, conv = prunable_units(other)[1]
    with torch.no_grad():
        conv.weight.add_(torch.randn_like(conv.weight) * 0.01)
    nwc = neuron_weight_change(trained, other)
    before = dict(trained.named_modules())[name].weight
    direct = (conv.weight - before).abs().flatten(1).sum(1)
    assert torch.allclose(nwc[name], direct.detach().float(), rtol=1e-5)
    assert all(float(v.abs().sum()) == 0 for n, v in nwc.items() if n != name)


def test_gradient_norms_zero_when_the_loss_cannot_change(trained, small, runtime):
    import copy

    frozen = copy.deepcopy(trained)
    with torch.no_grad():
        for m in frozen.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.zero_()  # constant logits: no gradient reaches any conv neuron
    norms = gradient_norms_during_unlearning(frozen, small.train.subset(torch.arange(256)), 1e-3, runtime)
    assert all(float(v.abs().max()) == 0 for v in norms.values())
    live = gradient_norms_during_unlearning(trained, small.train.subset(torch.arange(256)), 1e-3, runtime)
    assert all(float(v.min()) >= 0 for v in live.values()) and any(float(v.max()) > 0 for v in live.values())
    assert {n: len(v) for n, v in live.items()} == {n: c.out_channels for n, c in prunable_units(trained)}


def test_nwc_comparison_and_ratio_sweep(trained, small, runtime):
    attack = build_attack("badnets")
    ptrain = attack.poison_train(small.train, seed=0)
    poisoned = poison_unlearning_set(ptrain.data, ptrain.poison_index, 0, 100, seed=0)
    assert len(poisoned) == 100 and bool((poisoned.y == 0).all())
    clean = small.train.subset(torch.arange(200))
    cfg = TSBDConfig(unlearn_lr=0.05, unlearn_max_epochs=30, finetune_epochs=1)
    comp = nwc_comparison(trained, clean, poisoned, cfg, runtime)
    assert comp.clean_info["reached_threshold"] and comp.poison_info["reached_threshold"]
    per_layer = comp.per_layer_correlation()
    assert set(per_layer) == {n for n, _ in prunable_units(trained)}
    assert all(-1 <= v <= 1 for v in per_layer.values())
    assert 0 <= comp.top_overlap(0.15) <= 1 and len(comp.rows()) == sum(len(v) for v in comp.clean.values())

    ptest = attack.poison_test(small.test)
    res = ratio_sweep(trained, clean, cfg, runtime, lambda m: evaluate(m, small.test, ptest, runtime),
                      values=[0.0, 0.5], finetune=False)
    zero, half = res["rows"]
    assert zero["subweights_zeroed"] == 0 and half["subweights_zeroed"] > 0
    assert half["neurons_selected"] == int(0.5 * sum(c.out_channels for _, c in prunable_units(trained)))
    assert {"reinit_acc", "reinit_asr", "reinit_ra"} <= set(zero) and "acc" not in zero
    # n = 0 changes no weight, and the model's statistics are its clean training set's: recomputing
    # them on clean images moves ACC a little, never to chance
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in trained.modules())
    assert ("reinit_bn_acc" in zero) == has_bn
    if has_bn:
        assert abs(zero["reinit_bn_acc"] - zero["reinit_acc"]) < 0.25 and 0 <= half["reinit_bn_asr"] <= 1
        # the control is the backdoored model under the same recompute: the n = 0 row exactly
        assert res["bn_control"] == {k[len("reinit_bn_"):]: v for k, v in zero.items() if k.startswith("reinit_bn_")}
    else:
        assert res["bn_control"] is None
    with pytest.raises(TsbdError, match="fractions"):
        ratio_sweep(trained, clean, cfg, runtime, lambda m: {}, values=[1.5])


@pytest.fixture(scope="module")
def attacked_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze") / "badnets"
    code = main(["attack", "--attack", "badnets", "--dataset", "demo", "--epochs", "1", "--precision", "fp32",
                 "--model-opt", "widths=[8,16,16]", "--out", str(out), "--quiet"])
    assert code == 0
    return out


@pytest.mark.parametrize("name,files,columns", [
    ("observation1", ["nwc.csv", "correlation.csv", "observation1.png", "observation1.svg"],
     {"nwc.csv": ["layer", "neuron", "nwc_clean", "nwc_poison"], "correlation.csv": ["layer", "pearson"]}),
    ("observation2", ["grad_norms.csv", "observation2.png", "observation2.svg"],
     {"grad_norms.csv": ["layer", "neuron", "grad_norm_backdoored", "grad_norm_clean"]}),
    ("sweep-n", ["sweep_n.csv", "sweep_n.png", "sweep_n.svg"],
     {"sweep_n.csv": ["neuron_ratio", "neurons_selected", "subweights_zeroed", "reinit_acc", "reinit_asr",
                      "reinit_ra", "reinit_bn_acc", "reinit_bn_asr", "reinit_bn_ra", "acc", "asr", "ra", "seconds"]}),
    ("sweep-m", ["sweep_m.csv", "sweep_m.png"], {"sweep_m.csv": ["weight_ratio", "neurons_selected"]}),
])
def test_analyze_commands_write_their_files(attacked_folder, tmp_path, name, files, columns, monkeypatch):
    monkeypatch.setenv("TSBD_CACHE_DIR", str(attacked_folder.parent / "cache"))
    out = tmp_path / name
    argv = ["analyze", name, str(attacked_folder), "--out", str(out), "--quiet", "--precision", "fp32",
            "--opt", "unlearn_lr=0.05", "--opt", "unlearn_max_epochs=20", "--opt", "finetune_epochs=1",
            "--clean-ratio", "0.02"]
    if name.startswith("sweep"):
        argv += ["--values", "0.1,0.5"]
    if name == "observation2":  # its clean reference model: keep it to one short epoch
        import dataclasses

        from tsbd.pipeline import TRAIN_PRESETS
        monkeypatch.setitem(TRAIN_PRESETS, "cpu", dataclasses.replace(TRAIN_PRESETS["cpu"], epochs=1))
    assert main(argv) == 0
    for f in files + ["result.json", "section.md"]:
        assert (out / f).stat().st_size > 0, f
    for f, cols in columns.items():
        with open(out / f) as fh:
            header = next(csv.reader(fh))
        assert header[: len(cols)] == cols
    record = json.loads((out / "result.json").read_text())
    assert record["analysis"] == name and record["dataset"]["fingerprint"] and record["seed"] == 0
    assert "tsbd analyze " + name in (out / "section.md").read_text()
    if name.startswith("sweep"):
        with open(out / files[0]) as fh:
            assert len(list(csv.DictReader(fh))) == 2
