"""Each analysis's options: a frozen dataclass with defaults, built once by `tsbd analyze` from its flags,
or constructed in Python; measuring takes the options and returns plain data, rendering writes the files."""

from __future__ import annotations

import csv
import dataclasses

import pytest

from tsbd.analysis.ablations import CleanModelOptions, FinetuneVariantsOptions, ReinitVariantsOptions
from tsbd.analysis.neurons import METRICS, TACOptions, measure_tac
from tsbd.analysis.paper import SweepMOptions, SweepNOptions, measure_sweep_m
from tsbd.analysis.registry import AnalysisContext, Measurement
from tsbd.cli import build_parser
from tsbd.cli.analyze import analyses, build_options
from tsbd.errors import TsbdError

ANALYSES = analyses()


def parse(*argv):
    return build_parser(["analyze"]).parse_args(["analyze", *argv])


@pytest.mark.parametrize("name", list(ANALYSES))
def test_options_are_frozen_defaults_and_the_cli_builds_them_unchanged_without_flags(name):
    analysis = ANALYSES[name]
    assert dataclasses.is_dataclass(analysis.options) and analysis.options.__dataclass_params__.frozen
    defaults = analysis.options()  # every field has a default
    for f in dataclasses.fields(defaults):
        assert f.metadata.get("help"), f"{name}: {f.name} has no help"
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(defaults, f.name, f.default)
    assert build_options(analysis, parse(name, "model", "--out", "x")) == defaults


def test_the_cli_reads_each_flag_into_its_typed_field():
    args = parse("tac", "model", "--out", "x", "--values", "0.1,0.5", "--skip", "anp,rnp", "--images", "50",
                 "--defense-opt", "clp.u=3", "--defense-opt", "anp.nb-iter=10")
    want = TACOptions(values=(0.1, 0.5), images=50, metrics=("nwc", "fp", "clp"),
                      defense_opts={"clp": {"u": 3}, "anp": {"nb_iter": 10}})
    assert build_options(ANALYSES["tac"], args) == want
    args = parse("sweep-n", "m", "--out", "x", "--no-finetune", "--max-acc-drop", "5")
    assert build_options(ANALYSES["sweep-n"], args) == SweepNOptions(finetune=False, max_acc_drop=5.0)
    assert build_options(ANALYSES["finetune-variants"], parse("finetune-variants", "m", "--out", "x", "--at-n",
                                                              "AUTO")).at_n == "auto"
    assert build_options(ANALYSES["clean-model"], parse("clean-model", "m", "--out", "x", "--defenses",
                                                        " TSBD, ft ")).defenses == ("tsbd", "ft")


@pytest.mark.parametrize("make, message", [
    (lambda: ReinitVariantsOptions(asr_threshold=2.0), "--asr-threshold must be a fraction"),
    (lambda: ReinitVariantsOptions(values=(0.1, 1.5)), r"outside \(0, 1\]"),
    (lambda: FinetuneVariantsOptions(at_n=0.0), "--at-n: n 0 is outside"),
    (lambda: TACOptions(metrics=("nwc", "xyz")), "unknown ranking metric 'xyz'"),
    (lambda: CleanModelOptions(defenses=()), "--defenses is empty"),
    (lambda: CleanModelOptions(defenses=("tsbd", "nosuch")), "nosuch"),
    (lambda: SweepNOptions(max_acc_drop=-1.0), "--max-acc-drop must be >= 0"),
])
def test_options_built_in_python_are_checked_like_the_flags(make, message):
    with pytest.raises(TsbdError, match=message):
        make()


@pytest.mark.slow
def test_measuring_runs_from_python_on_an_options_object_and_rendering_writes_the_files(runtime, tmp_path):
    from tsbd.attacks import build_attack
    from tsbd.data import load_dataset
    from tsbd.defenses.tsbd import TSBDConfig
    from tsbd.pipeline import setup_attack, train_attacked_model
    from tsbd.train.engine import TrainConfig

    arch = {"widths": [8, 16, 16]}
    setup = setup_attack(load_dataset("demo").limited(1000, 200), build_attack("badnets"), 0, runtime,
                         arch="airbench", arch_kwargs=arch)
    model, meta = train_attacked_model(setup, "airbench", TrainConfig(epochs=1, batch_size=256, lr=0.2), runtime,
                                       arch_kwargs=arch)
    clean, _ = setup.clean_set(0.1)
    ctx = AnalysisContext(model=model, setup=setup, clean=clean, runtime=runtime, meta=meta, clean_ratio=0.1,
                          cfg=TSBDConfig(unlearn_lr=0.05, unlearn_max_epochs=5))

    sweep = measure_sweep_m(ctx, SweepMOptions(values=(0.3, 0.6), finetune=False))
    assert isinstance(sweep, Measurement)
    assert [r["weight_ratio"] for r in sweep.result["rows"]] == [0.3, 0.6]
    assert all(0 <= r["reinit_acc"] <= 1 and "acc" not in r for r in sweep.result["rows"])  # no fine-tuning

    options = TACOptions(values=(0.1, 0.5), images=40, metrics=("fp", "clp"))
    tac = measure_tac(ctx, options)
    assert tac.result["metrics"] == ["fp", "clp"] and tac.result["images"] == 40
    assert set(tac.result["coverage"]) == {"fp", "clp", "random"}
    assert not list(tmp_path.iterdir())  # measuring writes nothing
    markdown = ANALYSES["tac"].render(ctx, options, tac, tmp_path)
    with open(tmp_path / "tac_scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == tac.result["neurons"] and list(rows[0]) == ["layer", "neuron", "tac", *METRICS]
    assert "Coverage of TAC" in markdown and (tmp_path / "tac.png").stat().st_size > 0


def test_sweep_without_finetuning_reads_the_reinit_with_bn_statistics_recomputed(tmp_path):
    """Stale statistics after the reinit read 0% ASR at every n; the summary and the suggested n
    must come from the recomputed columns (here n 0.3 keeps ACC under the stale reading only)."""
    import types

    from tsbd.analysis.paper import render_sweep, sweep_readout
    from tsbd.analysis.sweeps import largest_ratio_within_acc

    rows = [{"neuron_ratio": n, "neurons_selected": 10, "subweights_zeroed": 70, "reinit_acc": 0.86,
             "reinit_asr": 0.0, "reinit_ra": 0.1, "reinit_bn_acc": bn_acc, "reinit_bn_asr": bn_asr}
            for n, bn_acc, bn_asr in ((0.1, 0.85, 0.6), (0.3, 0.70, 0.3))]
    control = {"acc": 0.87, "asr": 0.99, "ra": 0.0}
    assert sweep_readout({"rows": rows, "bn_control": control}, finetune=False) == (
        "reinit_bn_acc", "reinit_bn_asr", "after the reinit, BN statistics recomputed")
    stale_only = [{k: v for k, v in r.items() if "_bn_" not in k} for r in rows]
    assert sweep_readout({"rows": stale_only, "bn_control": None}, False)[0] == "reinit_acc"
    # recomputed columns without their baseline are not read
    assert sweep_readout({"rows": rows}, False)[0] == "reinit_acc"
    assert sweep_readout({"rows": rows, "bn_control": control}, finetune=True)[:2] == ("acc", "asr")
    pick = largest_ratio_within_acc(rows, 0.87, 0.02, acc_key="reinit_bn_acc")
    assert pick["neuron_ratio"] == 0.1  # the stale column would have given 0.3
    result = {"parameter": "neuron_ratio", "rows": rows, "default": 0.15, "unlearn": {"epochs": 3},
              "bn_control": control,
              "suggestion": {"max_acc_drop": 2.0, "acc_before": 0.87, "acc_column": "reinit_bn_acc",
                             "neuron_ratio": 0.1}}
    ctx = types.SimpleNamespace(setup=types.SimpleNamespace(attack=types.SimpleNamespace(name="lf")))
    md = render_sweep(ctx, SweepNOptions(values=(0.1, 0.3), finetune=False), Measurement(result, {"pick": pick}),
                      tmp_path)
    assert "lowest ASR after the reinit, BN statistics recomputed comes at n = 0.3 (70.00% ACC, 30.00% ASR)" in md
    assert "**n = 0.1** (85.00% ACC, 60.00% ASR)" in md and (tmp_path / "sweep_n.csv").exists()
    assert "statistics recomputed the same way, reads 87.00% ACC / 99.00% ASR" in md
    assert "(87.00%, statistics recomputed likewise)" in md
