"""Round trips: what `tsbd attack`, `defend` and `purify` write is read back by `tsbd eval`, `defend`,
`inspect` and `analyze` -- a model purified from a file included, whose attack is unknown (ACC only,
or the attack named with --attack), and a folder written with the older `data` key."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import tsbd.pipeline  # noqa: F401 -- imported before the fixture narrows tsbd.data.load_dataset for `attack` alone
from tsbd.artifacts import load_model, load_state
from tsbd.cli import main

pytestmark = pytest.mark.slow  # trains a tiny model and runs TSBD: about a minute on 2 cores

RUNTIME = ["--device", "cpu", "--precision", "fp32", "--threads", "1", "--quiet"]
TSBD_FAST = ["--opt", "unlearn_lr=0.01", "--opt", "unlearn_max_epochs=2", "--opt", "finetune_epochs=1",
             "--opt", "batch_size=64", "--opt", "augment=false"]
WIDTHS = [8, 16, 16]


def _json(capsys, *argv) -> dict:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("tsbd: error:"), lines
    return lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, demo):
    """An attacked model (300 / 100 demo images, recorded in its meta.json), its TSBD-defended
    copy, and a purified copy of its weights handed over as a plain state dict (no attack known)."""
    root = tmp_path_factory.mktemp("roundtrip")
    limited = demo.limited(300, 100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tsbd.data.load_dataset", lambda *a, **k: limited)
        assert main(["attack", "--epochs", "2", "--model-opt", f"widths={WIDTHS}", "--train-opt", "batch_size=64",
                     "--out", str(root / "attacked"), *RUNTIME]) == 0
    assert main(["defend", str(root / "attacked"), "--clean-ratio", "0.5", *TSBD_FAST, "--out",
                 str(root / "defended"), *RUNTIME]) == 0
    model, meta = load_model(root / "attacked")
    torch.save(model.state_dict(), root / "weights.pt")  # a file from elsewhere: no data set, no attack
    mean, std = (",".join(map(str, meta["arch"][k])) for k in ("mean", "std"))
    assert main(["purify", str(root / "weights.pt"), "--arch", "airbench", "--model-opt", f"widths={WIDTHS}",
                 "--num-classes", "10", "--mean", mean, "--std", std, "--clean-data", "demo", "--clean-ratio", "0.03",
                 *TSBD_FAST, "--out", str(root / "purified"), *RUNTIME]) == 0
    return root


def _analyze(folder, out, *extra, ratio="0.5"):
    return ["analyze", "sweep-n", folder, "--values", "0.5", "--no-finetune", "--clean-ratio", ratio,
            "--opt", "unlearn_lr=0.01", "--opt", "unlearn_max_epochs=2", "--opt", "batch_size=64", *extra,
            "--out", out, *RUNTIME]


def _feeds_every_reader(capsys, folder, tmp_path, *setup, ratio="0.5") -> dict:
    """eval, defend, inspect and analyze on ``folder`` (clean sets: ``ratio`` of its data set's training
    images); the metrics eval gives."""
    metrics = _json(capsys, "eval", folder, *setup, "--json", *RUNTIME)
    assert 0 <= metrics["acc"] <= 1
    res = _json(capsys, "defend", folder, *setup, "--clean-ratio", ratio, *TSBD_FAST, "--json",
                "--out", tmp_path / "again", *RUNTIME)
    assert res["model"] == str(tmp_path / "again") and load_model(tmp_path / "again")[1]["kind"] == "defended"
    assert _json(capsys, "inspect", folder, "--json")["format"].startswith("tsbd model folder")
    assert _json(capsys, "inspect", tmp_path / "again", "--json")["kind"] == "defended"
    assert main([str(a) for a in _analyze(folder, tmp_path / "analysis", *setup, ratio=ratio)]) == 0
    capsys.readouterr()
    record = json.loads((tmp_path / "analysis" / "result.json").read_text())
    assert record["attack"]["name"] == "badnets" and len(record["result"]["rows"]) == 1
    return metrics


def test_attack_output_feeds_eval_defend_inspect_analyze(folders, tmp_path, capsys):
    recorded = load_model(folders / "attacked")[1]["metrics"]
    metrics = _feeds_every_reader(capsys, folders / "attacked", tmp_path)
    assert metrics["acc"] == pytest.approx(recorded["acc"]) and metrics["asr"] == pytest.approx(recorded["asr"])


def test_defend_output_feeds_eval_defend_inspect_analyze(folders, tmp_path, capsys):
    recorded = load_model(folders / "defended")[1]["metrics"]
    metrics = _feeds_every_reader(capsys, folders / "defended", tmp_path)
    assert metrics["acc"] == pytest.approx(recorded["acc"]) and metrics["asr"] == pytest.approx(recorded["asr"])


def test_purify_output_feeds_eval_defend_inspect_analyze(folders, tmp_path, capsys):
    purified = folders / "purified"
    meta = load_model(purified)[1]
    assert meta["dataset"]["name"] == "demo" and "data" not in meta and "attack" not in meta
    plain = _json(capsys, "eval", purified, "--json", *RUNTIME)  # no attack known: ACC only
    assert plain["acc"] == pytest.approx(meta["metrics"]["acc"]) and "asr" not in plain
    # the analyses measure an attack: without one, one line naming the option
    assert "pass --attack NAME" in _error(capsys, *_analyze(purified, tmp_path / "x"))
    metrics = _feeds_every_reader(capsys, purified, tmp_path, "--attack", "badnets", ratio="0.02")  # all of demo
    assert metrics["acc"] == pytest.approx(plain["acc"]) and 0 <= metrics["asr"] <= 1


def test_a_folder_with_the_older_data_key_is_read(folders, tmp_path, capsys, demo):
    """`tsbd purify` wrote the data set as meta["data"]; such folders are read as before."""
    old = tmp_path / "old"
    shutil.copytree(folders / "purified", old)
    meta = json.loads((old / "meta.json").read_text())
    meta["data"] = meta.pop("dataset")
    (old / "meta.json").write_text(json.dumps(meta))
    assert _json(capsys, "eval", old, "--json", *RUNTIME)["acc"] == pytest.approx(meta["metrics"]["acc"])
    assert _json(capsys, "inspect", old, "--json")["dataset"]["name"] == "demo"
    # ... and the purified model of a folder that names no data set takes it, or test images, from the user
    del meta["data"]
    (old / "meta.json").write_text(json.dumps(meta))
    assert "pass --dataset NAME" in _error(capsys, "eval", old, *RUNTIME)
    assert _json(capsys, "eval", old, "--dataset", "demo", "--json", *RUNTIME)["acc"] == pytest.approx(
        meta["metrics"]["acc"])
    test = demo.test
    np.savez(tmp_path / "test.npz", x=test.x.permute(0, 2, 3, 1).numpy(), y=test.y.numpy())
    res = _json(capsys, "eval", old, "--test-data", tmp_path / "test.npz", "--json", *RUNTIME)
    assert res["acc"] == pytest.approx(meta["metrics"]["acc"]) and "asr" not in res


def test_eval_option_errors_are_one_line(folders, capsys):
    purified, attacked = folders / "purified", folders / "attacked"
    assert "pass --attack NAME" in _error(capsys, "eval", purified, "--attack-opt", "target=3", *RUNTIME)
    assert "ACC only" in _error(capsys, "eval", purified, "--test-data", "x.npz", "--attack", "badnets", *RUNTIME)
    assert "unknown attack" in _error(capsys, "eval", attacked, "--attack", "nope", *RUNTIME)


def test_purify_of_a_tsbd_folder_keeps_its_attack(folders, tmp_path, capsys):
    _json(capsys, "purify", folders / "attacked", "--clean-data", "demo", "--clean-ratio", "0.03", *TSBD_FAST,
          "--json", "--out", tmp_path / "p", *RUNTIME)
    meta = load_model(tmp_path / "p")[1]
    assert meta["attack"]["name"] == "badnets" and meta["poison"]["seed"] == 0
    assert "asr" in _json(capsys, "eval", tmp_path / "p", "--json", *RUNTIME)
    assert set(load_state(tmp_path / "p" / "model.safetensors")) == set(load_state(folders / "attacked" /
                                                                                   "model.safetensors"))
