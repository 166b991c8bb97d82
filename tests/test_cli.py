"""The command line end to end on the embedded data, and its one-line errors."""

import json
import subprocess
import sys

import pytest

from tsbd import __version__
from tsbd.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def attacked(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bd"
    code = main(["attack", "--attack", "badnets", "--dataset", "demo", "--epochs", "1", "--precision", "fp32",
                 "--train-opt", "batch_size=512", "--attack-opt", "patch_size=4", "--out", str(out), "--quiet"])
    assert code == 0
    return out


@pytest.mark.slow
def test_attack_writes_artifact(attacked):
    meta = json.loads((attacked / "meta.json").read_text())
    assert meta["attack"]["name"] == "badnets" and meta["attack"]["config"]["patch_size"] == 4
    assert meta["train"]["epochs"] == 1 and meta["train"]["batch_size"] == 512
    assert meta["dataset"]["name"] == "demo" and len(meta["dataset"]["fingerprint"]) == 16
    assert meta["runtime"]["precision"] == "fp32" and meta["seed"] == 0
    assert 0 <= meta["metrics"]["acc"] <= 1 and 0 <= meta["metrics"]["asr"] <= 1
    assert not list(attacked.parent.glob("*.resume.pt"))  # resume checkpoint removed when done


@pytest.mark.slow
def test_eval_and_defend_json(attacked, tmp_path, capsys):
    code, out, _ = _run(capsys, "eval", str(attacked), "--json", "--precision", "fp32")
    assert code == 0
    metrics = json.loads(out)
    saved = json.loads((attacked / "meta.json").read_text())["metrics"]
    assert metrics["acc"] == pytest.approx(saved["acc"]) and metrics["asr"] == pytest.approx(saved["asr"])

    code, out, _ = _run(capsys, "defend", str(attacked), "--defense", "tsbd", "--opt", "finetune_epochs=1",
                        "--opt", "unlearn_lr=0.01", "--json", "--precision", "fp32", "--quiet",
                        "--out", str(tmp_path / "pure"))
    assert code == 0
    res = json.loads(out)
    assert {"acc", "asr", "ra", "der", "timings", "before"} <= set(res)
    assert 0 <= res["der"] <= 1 and res["timings"]["total"] > 0
    # TSBD's stages: metrics after the zero reinit, and after fine-tuning = the final ones
    assert set(res["stages"]) == {"after_reinit", "after_reinit_bn_recomputed", "backdoored_bn_recomputed",
                                  "after_finetune"}
    assert res["stages"]["after_finetune"]["acc"] == pytest.approx(res["acc"])
    meta = json.loads((tmp_path / "pure" / "meta.json").read_text())
    assert meta["kind"] == "defended" and meta["defense"]["config"]["finetune_epochs"] == 1
    assert meta["clean"]["count"] == 500  # 5% of the 10,000 embedded training images


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["eval", "/nonexistent/model"], "not found"),
        (["attack", "--attack", "nope", "--out", "x"], "unknown attack"),
        (["attack", "--dataset", "cifar10", "--data-root", "/nonexistent", "--out", "x"], "TSBD_DATA_ROOT"),
        (["attack", "--attack-opt", "bogus=1", "--out", "x"], "unknown option"),
        (["attack", "--train-opt", "lr=abc", "--out", "x"], "--train-opt lr=abc: must be a number"),
        (["defend", "/nonexistent", "--defense", "tsbd"], "not found"),
    ],
)
def test_bad_input_is_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TSBD_DATA_ROOT", raising=False)
    code, out, err = _run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tsbd: error:") and needle in lines[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_defend_with_mismatched_checkpoint(attacked, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(attacked, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["arch"]["num_classes"] = 43
    (bad / "meta.json").write_text(json.dumps(meta))
    code, _, err = _run(capsys, "defend", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and "does not fit" in err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_demo_json_reports_its_setting(capsys, tmp_path):
    code = main(["demo", "--epochs", "1", "--opt", "finetune_epochs=1", "--opt", "unlearn_max_epochs=3",
                 "--precision", "fp32", "--json", "--quiet", "--out", str(tmp_path / "demo")])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["poison_ratio"] == 0.2 and out["clean_ratio"] == 0.1
    for side in ("before", "after"):
        assert set(out[side]) >= {"acc", "asr", "ra"} and all(0 <= out[side][k] <= 1 for k in ("acc", "asr", "ra"))
    assert out["defense_info"]["reinit"]["neurons_selected"] > 0
    assert (tmp_path / "demo" / "backdoored" / "model.safetensors").exists()
    assert (tmp_path / "demo" / "purified" / "meta.json").exists()
    assert main(["demo", "--poison-ratio", "1.5"]) != 0
    assert "--poison-ratio must be in (0, 1)" in capsys.readouterr().err


NO_TORCH = """
import sys
from tsbd.cli import main
try:
    main([{flag!r}])
except SystemExit as exit:
    assert exit.code == 0, exit.code
assert "torch" not in sys.modules, "torch was imported"
"""


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(flag):
    res = subprocess.run([sys.executable, "-c", NO_TORCH.format(flag=flag)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    if flag == "--version":
        assert res.stdout.strip() == f"tsbd {__version__}"
    else:  # every subcommand is listed, with its help
        assert "show-attack" in res.stdout and "train a backdoored model" in res.stdout


def test_subcommand_help_has_its_options_and_python_m_works():
    res = subprocess.run([sys.executable, "-m", "tsbd.cli", "attack", "--attack", "badnets", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "attack badnets:" in res.stdout and "poison_ratio = 0.1" in res.stdout and "--attack-opt" in res.stdout
