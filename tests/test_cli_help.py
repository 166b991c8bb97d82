"""Help a newcomer can read: a short `tsbd list` and `tsbd list TOPIC` for the details, one method's
options under `--attack NAME --help`, the defaults a plain command really uses, the choices of
--model and --dataset, messages that cite only options that exist, artifacts with the user's
permissions, and no traceback when the reader of the output goes away."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tsbd.attacks import ATTACKS
from tsbd.bench.grid import AXES, SETTINGS, TABLES
from tsbd.cli import build_parser, main
from tsbd.defenses import DEFENSES
from tsbd.models import MODELS, build_model
from tsbd.train.engine import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def _out(capsys, *argv) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # --help
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_list_is_a_short_overview_with_one_line_per_name(capsys):
    code, out = _out(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    names = ATTACKS.names() + DEFENSES.names() + MODELS.names()
    assert len(lines) < len(names) + 20
    for name in names:
        assert sum(1 for line in lines if line.split()[:1] == [name]) == 1, name
    assert "= " not in out  # no option tables
    assert "tsbd list attacks" in out


@pytest.mark.parametrize("topic,needles", [
    ("attacks", ["attack wanet:", "k = 4 (>= 1)", "blend_ratio = 0.2 (in [0, 1])"]),
    ("defenses", ["defense tsbd:", "unlearn_lr = 0.0001 (> 0)", "reinit_scheme = v3 (one of v3, v2, v1)"]),
    ("models", ["model airbench:", "widths = [32, 64, 128]", "model preact_resnet18:", "width = 64"]),
    ("datasets", ["dataset cifar10:", "dataset imagefolder:", "size = 32"]),
    ("training", ["as the cpu preset sets them", "lr = 0.2 (> 0)", "backdoorbench:"]),
])
def test_list_topic_shows_options_and_defaults(topic, needles, capsys):
    code, out = _out(capsys, "list", topic)
    assert code == 0
    for needle in needles:
        assert needle in out, needle


def test_list_names_narrow_and_an_unknown_name_is_one_line(capsys):
    code, out = _out(capsys, "list", "attacks", "WaNet")
    assert code == 0 and "k = 4" in out and "blend_ratio" not in out
    code, out = _out(capsys, "list", "defenses", "nope")
    assert code == 2 and out.strip().splitlines() == [f"tsbd: error: unknown defense 'nope'; choose one of: "
                                                      f"{', '.join(DEFENSES.names())}"]


def test_attack_help_shows_only_the_named_attack(capsys):
    code, out = _out(capsys, "attack", "--attack", "wanet", "--help")
    assert code == 0
    assert "attack wanet:" in out and "k = 4" in out and "random_rotation = 10.0" in out
    assert "blend_ratio" not in out and "secret_bits" not in out  # no other attack's options
    code, plain = _out(capsys, "attack", "--help")
    assert code == 0 and "k = 4" not in plain and "blend_ratio" not in plain
    assert all(name in plain for name in ATTACKS.names())  # the attacks in short instead
    assert len(plain.splitlines()) < 110


def test_defend_help_shows_only_the_named_defense(capsys):
    code, out = _out(capsys, "defend", "--defense", "clp", "--help")
    assert code == 0 and "u = 3.0" in out and "unlearn_lr" not in out


def test_purify_help_shows_only_the_named_defense_after_its_own_text(capsys):
    code, out = _out(capsys, "purify", "--defense", "anp", "--help")
    assert code == 0 and "defense anp:" in out and "anp_eps = 0.4" in out
    assert "defense tsbd" not in out and "neuron_ratio" not in out
    assert out.index("MODEL_FILE is a BackdoorBench") < out.index("defense anp:")


def test_attack_help_shows_the_defaults_a_plain_command_uses(capsys):
    code, out = _out(capsys, "attack", "--help")
    cpu = {line.split()[0]: line for line in out.splitlines() if line.startswith("    ") and " = " in line}
    assert "lr = 0.2 (> 0)" in cpu["lr"] and "epochs = 30" in cpu["epochs"]
    assert "schedule = onecycle" in cpu["schedule"] and "default 100" in cpu["epochs"]
    assert "widths = [32, 64, 128]" in out  # the default model's options
    unwrapped = re.sub(r"-\n\s+", "-", out)  # argparse wraps "tiny-imagenet" at its hyphen
    for name in MODELS.names() + ["cifar10", "gtsrb", "tiny-imagenet", "imagefolder"]:
        assert name in unwrapped, name  # --model and --dataset list their choices
    code, bb = _out(capsys, "attack", "--preset", "backdoorbench", "--model", "preact_resnet18", "--help")
    assert "as the backdoorbench preset sets them" in bb and "epochs = 100 (>= 0)" in bb and "width = 64" in bb


def test_plain_attack_uses_the_cpu_preset_the_help_shows():
    from tsbd.cli.common import DEFAULT_PRESET

    parser = build_parser(["attack"])
    args = parser.parse_args(["attack", "--out", "x"])
    assert args.preset == DEFAULT_PRESET == "cpu"


# ------------------------------------------------------------------------------------------
# messages cite only options that exist
CITED = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)(?:[ =]([A-Za-z_][\w.-]*)=)?")


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    out = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _option_strings(sub)
    return out


def _citations():
    for path in sorted((REPO / "tsbd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for m in CITED.finditer(node.value):
                    yield f"{path.relative_to(REPO)}:{node.lineno}", m.group(1), m.group(2)


def _keys():
    """The KEY each KEY=VALUE flag takes."""
    fields = {cls: {f.name for f in dataclasses.fields(cls)} for cls in [TrainConfig]}
    attack = set().union(*({f.name for f in dataclasses.fields(ATTACKS.get(n).config_class)} for n in ATTACKS))
    defense = set().union(*({f.name for f in dataclasses.fields(DEFENSES.get(n).config_class)} for n in DEFENSES))
    model = set().union(*(set(build_model(n, 10).arch_spec) for n in ["airbench", "preact_resnet18"]))
    return {"train-opt": fields[TrainConfig], "attack-opt": attack, "opt": defense, "model-opt": model,
            "set": set(AXES) | set(TABLES) | set(SETTINGS)}


def test_every_option_a_message_cites_exists():
    known = _option_strings(build_parser())
    keys = _keys()
    wrong = []
    for where, flag, key in _citations():
        if f"--{flag}" not in known:
            wrong.append(f"{where}: --{flag} is no option of tsbd")
        elif key and flag in keys and not key.isupper() and key.split(".")[0] not in keys[flag]:
            wrong.append(f"{where}: --{flag} {key}=... names no {flag} key")
    assert not wrong, "\n".join(wrong)


def test_the_citation_check_sees_a_wrong_key():
    assert CITED.search("choose --set target=0..9").groups() == ("set", "target")
    assert "target" not in _keys()["set"]


# ------------------------------------------------------------------------------------------
# files and pipes
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifacts_get_the_permissions_of_any_new_file(umask, tmp_path):
    from tsbd.artifacts import save_model

    old = os.umask(umask)
    try:
        folder = save_model(tmp_path / "m", build_model("airbench", 10, widths=[4, 4, 4]), {})
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    want = os.stat(tmp_path / "plain").st_mode & 0o777
    assert want == 0o666 & ~umask
    for name in ("model.safetensors", "meta.json"):
        assert os.stat(folder / name).st_mode & 0o777 == want, name


def test_attack_resources_get_the_permissions_of_any_new_file(tmp_path):
    from tsbd.attacks.resources import _write_resource

    old = os.umask(0o022)
    try:
        _write_resource(tmp_path / "r", {"t": torch.zeros(2)}, {"fingerprint": "x"})
    finally:
        os.umask(old)
    assert {os.stat(f).st_mode & 0o777 for f in (tmp_path / "r").iterdir()} == {0o644}


def test_a_closed_pipe_ends_quietly():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "tsbd.cli", "list", "attacks"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before tsbd writes, as `tsbd list attacks | head -0`
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 141  # 128 + SIGPIPE, as a tool killed by the signal


@pytest.mark.parametrize("command, resumable", [("list", False), ("bench", True)])
def test_ctrl_c_says_whether_the_command_resumes(command, resumable, monkeypatch, capsys):
    import tsbd.cli.bench
    import tsbd.cli.methods

    def stop(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tsbd.cli.methods, "cmd_list", stop)
    monkeypatch.setattr(tsbd.cli.bench, "cmd_bench", stop)
    assert main([command, *(["demo"] if command == "bench" else [])]) == 130
    err = capsys.readouterr().err.strip()
    if resumable:
        assert err == "tsbd: interrupted; finished work is saved -- rerun the same command to resume"
    else:
        assert err == "tsbd: interrupted; no output was left half-written -- rerun the command to start again"
