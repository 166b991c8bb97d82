"""Every option is checked once, in the config layer: each field of every registered attack, defense
and the training config declares the values it admits, and a bad value fails at construction -- so
in the Python API, on the command line and in a grid file, before any work -- in one line naming the
option, the value and what is valid."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from tsbd.attacks import ATTACKS
from tsbd.bench.grid import expand, load_spec
from tsbd.cli import main
from tsbd.config import UNCONSTRAINED, Range, Validated, override
from tsbd.defenses import DEFENSES, build_defense
from tsbd.errors import OptionError
from tsbd.train.engine import TrainConfig
from tsbd.train.presets import TRAIN_PRESETS, train_config

CONFIGS = ([ATTACKS.get(n).config_class for n in ATTACKS.names()]
           + [DEFENSES.get(n).config_class for n in DEFENSES.names()] + [TrainConfig])
FIELDS = sorted({(cls, f.name) for cls in CONFIGS for f in dataclasses.fields(cls)},
                key=lambda cf: (cf[0].__name__, cf[1]))


def _id(cf):
    return f"{cf[0].__name__}.{cf[1]}"


def _field(cls, name):
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _number_type(tp):
    """int or float for a numeric field or a sequence of numbers, else None."""
    if typing.get_origin(tp) in (tuple, list):
        tp = typing.get_args(tp)[0]
    return tp if tp in (int, float) else None


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_config_is_validated_and_its_defaults_pass(cls):
    assert issubclass(cls, Validated)
    cls()  # the defaults satisfy the declared constraints


@pytest.mark.parametrize("cf", FIELDS, ids=_id)
def test_every_field_declares_what_it_admits(cf):
    cls, name = cf
    tp = typing.get_type_hints(cls)[name]
    check = _field(cls, name).metadata.get("check")
    if tp is bool or typing.get_origin(tp) is typing.Literal:
        assert check is None, "a bool or Literal field is constrained by its type"
    elif _number_type(tp):
        assert isinstance(check, Range), f"{_id(cf)}: numbers need a Range (e.g. POSITIVE, FRACTION, AT_LEAST_ONE)"
    else:  # text: file paths, architecture and layer names
        assert check is UNCONSTRAINED, f"{_id(cf)}: declare check=UNCONSTRAINED for free text"


def _bad_values(check: Range, number_type) -> list:
    bad = []
    if check.low is not None:
        bad.append(check.low if check.low_open else check.low - 1)
    if check.high is not None:
        bad.append(check.high if check.high_open else check.high + 1)
    if number_type is float:
        bad += [math.nan, math.inf]
    return bad


BAD = [(cls, name, value) for cls, name in FIELDS
       if isinstance(_field(cls, name).metadata.get("check"), Range)
       for value in _bad_values(_field(cls, name).metadata["check"],
                                _number_type(typing.get_type_hints(cls)[name]))]


@pytest.mark.parametrize("cls,name,value", BAD, ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_a_value_outside_the_declared_range_fails_at_construction(cls, name, value):
    is_sequence = typing.get_origin(typing.get_type_hints(cls)[name]) in (tuple, list)
    given = (value,) if is_sequence else value
    with pytest.raises(OptionError) as err:
        cls(**{name: given})
    assert err.value.key == name and str(err.value).startswith(f"{name}=") and "must be" in str(err.value)
    with pytest.raises(OptionError):  # override and replace go through the same check
        override(cls(), {name: given})


@pytest.mark.parametrize("kwargs,message", [
    ({"unlearn_lr": -1}, "unlearn_lr=-1: must be > 0"),
    ({"neuron_ratio": 2}, "neuron_ratio=2: must be in [0, 1]"),
    ({"weight_ratio": -0.5}, "weight_ratio=-0.5: must be in [0, 1]"),
    ({"finetune_epochs": -5}, "finetune_epochs=-5: must be >= 0"),
    ({"reinit_scheme": "v4"}, "reinit_scheme=v4: must be one of v3, v2, v1"),
    ({"finetune_epochs": 2.5}, "finetune_epochs=2.5: must be an integer"),
    ({"finetune_epochs": True}, "finetune_epochs=true: must be an integer"),
    ({"unlearn_lr": "fast"}, "unlearn_lr=fast: must be a number"),
    ({"test_selected_n": [0.1, 2]}, "test_selected_n=[0.1, 2]: each value must be in [0, 1]"),
])
def test_the_python_api_refuses_bad_tsbd_options_in_one_line(kwargs, message):
    with pytest.raises(OptionError) as err:
        build_defense("tsbd", kwargs)
    assert str(err.value) == message


def test_values_are_converted_to_their_types():
    cfg = build_defense("tsbd", {"unlearn_lr": 1, "test_selected_n": [0.1], "finetune_epochs": "3"})
    assert cfg.config.unlearn_lr == 1.0 and isinstance(cfg.config.unlearn_lr, float)
    assert cfg.config.test_selected_n == (0.1,) and cfg.config.finetune_epochs == 3
    assert train_config("cpu", {"lr": "0.5"}).lr == 0.5
    assert all(isinstance(p, TrainConfig) for p in TRAIN_PRESETS.values())


def _one_error_line(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv,line", [
    (["defend", "/nonexistent/model", "--opt", "unlearn_lr=-1"], "--opt unlearn_lr=-1: must be > 0"),
    (["defend", "/nonexistent/model", "--opt", "neuron_ratio=2"], "--opt neuron_ratio=2: must be in [0, 1]"),
    (["defend", "/nonexistent/model", "--opt", "weight_ratio=-0.5"], "--opt weight_ratio=-0.5: must be in [0, 1]"),
    (["defend", "/nonexistent/model", "--opt", "finetune_epochs=-5"], "--opt finetune_epochs=-5: must be >= 0"),
    (["purify", "/nonexistent/model.pt", "--clean-data", "demo", "--opt", "unlearn_lr=-1"],
     "--opt unlearn_lr=-1: must be > 0"),
    (["attack", "--out", "x", "--train-opt", "lr=-1"], "--train-opt lr=-1: must be > 0"),
    (["attack", "--out", "x", "--epochs", "-3"], "--epochs -3: must be >= 0"),
    (["attack", "--out", "x", "--poison-ratio", "2"], "--poison-ratio 2.0: must be in [0, 1]"),
    (["attack", "--out", "x", "--attack", "wanet", "--attack-opt", "k=0"], "--attack-opt k=0: must be >= 1"),
    (["attack", "--out", "x", "--model-opt", "widths=[16,0,32]"], "airbench widths must be three positive integers"),
    (["demo", "--opt", "neuron_ratio=2"], "--opt neuron_ratio=2: must be in [0, 1]"),
    (["demo", "--unlearn-lr", "0"], "--unlearn-lr 0.0: must be > 0"),
    (["analyze", "sweep-n", "/nonexistent/model", "--opt", "unlearn_lr=-1", "--out", "x"],
     "--opt unlearn_lr=-1: must be > 0"),
    (["show-attack", "--attack", "badnets,wanet", "--attack-opt", "k=0", "--dataset", "cifar10", "--out", "x"],
     "--attack-opt k=0: must be >= 1"),
])
def test_the_cli_names_the_flag_and_fails_before_any_work(argv, line, capsys, tmp_path, monkeypatch):
    # data that does not exist: had any work started, the error would be about the data
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TSBD_DATA_ROOT", str(tmp_path / "no-data"))
    if argv[0] == "attack":
        argv = [*argv, "--dataset", "cifar10"]
    got = _one_error_line(capsys, argv)
    assert got.startswith("tsbd: error: ") and line in got
    assert not (tmp_path / "x").exists()


def test_a_config_file_value_names_the_file_and_table(capsys, tmp_path):
    cfg = tmp_path / "tsbd.toml"
    cfg.write_text("[defense]\nunlearn_lr = -1\n")
    got = _one_error_line(capsys, ["defend", "/nonexistent/model", "--config", str(cfg)])
    assert got == f"tsbd: error: --config {cfg} [defense] unlearn_lr=-1: must be > 0"
    # --opt wins over the file, and is the one named
    got = _one_error_line(capsys, ["defend", "/nonexistent/model", "--config", str(cfg), "--opt", "unlearn_lr=-2"])
    assert got == "tsbd: error: --opt unlearn_lr=-2: must be > 0"


def _no_data(*_args, **_kwargs):
    raise AssertionError("a data set was loaded before the options were checked")


def test_a_grid_with_a_bad_defense_option_fails_at_expansion():
    spec = load_spec("paper-cifar10-cpu", {"defense_opts.tsbd.neuron_ratio": 2})
    with pytest.raises(OptionError) as err:
        expand(spec, dataset_loader=_no_data)
    assert str(err.value) == "grid paper-cifar10-cpu [defense_opts.tsbd] neuron_ratio=2: must be in [0, 1]"


def test_a_grid_with_a_bad_attack_or_train_option_fails_at_expansion(demo):
    def loader(spec, **_):
        return demo

    with pytest.raises(OptionError, match=r"^grid g \[attack_opts.wanet\] k=0: must be >= 1$"):
        expand({"name": "g", "attack": "wanet", "attack_opts": {"wanet": {"k": 0}}}, dataset_loader=loader)
    with pytest.raises(OptionError, match=r"^grid g poison_ratio=1.5: must be in \[0, 1\]$"):
        expand({"name": "g", "poison_ratio": 1.5}, dataset_loader=loader)
    with pytest.raises(OptionError, match=r"^grid g \[train\] epochs=-1: must be >= 0$"):
        expand({"name": "g", "train": {"epochs": -1}}, dataset_loader=loader)


def test_bench_dry_run_refuses_a_bad_defense_option_in_one_line(capsys, tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text('dataset = "demo"\nattack = "badnets"\ndefense = ["none", "tsbd"]\n'
                    "[defense_opts.tsbd]\nweight_ratio = -0.5\n")
    got = _one_error_line(capsys, ["bench", str(grid), "--dry-run", "--results", str(tmp_path / "res")])
    assert got == "tsbd: error: grid g [defense_opts.tsbd] weight_ratio=-0.5: must be in [0, 1]"
    assert not (tmp_path / "res").exists()
