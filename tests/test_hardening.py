"""Hardening of `attack`, `defend` and `bench` on real (tiny) runs: a diverging learning rate, Ctrl-C
and SIGKILL part-way, a failing write, and identical metrics for one seed. Bench's own SIGKILL,
Ctrl-C and two-process tests are in test_bench.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_grid

from tsbd.artifacts import load_state
from tsbd.cli import main

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: seconds to minutes per test

REPO = Path(__file__).resolve().parents[1]
RUNTIME = ["--device", "cpu", "--precision", "fp32", "--threads", "1", "--quiet"]
TSBD_FAST = ["--opt", "unlearn_lr=0.01", "--opt", "unlearn_max_epochs=2", "--opt", "finetune_epochs=1",
             "--opt", "batch_size=64", "--opt", "augment=false"]


def attack_argv(out, epochs=2, *extra):
    return ["attack", "--attack", "badnets", "--dataset", "demo", "--model-opt", "widths=[8,16,16]",
            "--epochs", str(epochs), "--train-opt", "batch_size=64", *extra, "--out", str(out), *RUNTIME]


@pytest.fixture
def tiny_demo(demo, monkeypatch):
    """`tsbd attack --dataset demo` on a 300/100-image class-balanced subset (recorded in meta.json,
    so `tsbd defend` rebuilds the same subset)."""
    limited = demo.limited(300, 100)
    monkeypatch.setattr("tsbd.data.load_dataset", lambda *a, **k: limited)
    return limited


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_attack_with_a_diverging_learning_rate_stops_and_writes_no_model(tiny_demo, tmp_path, capsys):
    code = main(attack_argv(tmp_path / "bd", 2, "--train-opt", "lr=1e30"))
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("tsbd: error:") and "lower the learning rate" in line
    assert not (tmp_path / "bd").exists()


def test_same_seed_gives_identical_weights_and_metrics(tiny_demo, tmp_path, capsys):
    for name in ("a", "b"):
        assert main(attack_argv(tmp_path / name)) == 0
    capsys.readouterr()
    state_a, state_b = (load_state(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    meta = [json.loads((tmp_path / n / "meta.json").read_text()) for n in ("a", "b")]
    assert meta[0]["metrics"] == meta[1]["metrics"]
    results = []
    for name in ("a", "b"):
        assert main(["defend", str(tmp_path / name), "--clean-ratio", "0.5", *TSBD_FAST, "--json", *RUNTIME]) == 0
        results.append(json.loads(capsys.readouterr().out))
    for key in ("acc", "asr", "ra", "der", "before"):
        assert results[0][key] == results[1][key]


def _checkpoints(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.*.resume.pt"))


def test_attack_ctrl_c_then_rerun_resumes_without_losing_finished_epochs(tiny_demo, tmp_path, capsys, caplog,
                                                                         monkeypatch):
    import tsbd.train.engine as engine

    real_step = engine.cross_entropy_step
    calls = {"n": 0}

    def interrupted_step(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def run(*a):
            calls["n"] += 1
            if calls["n"] == 2 * 4 + 2:  # 4 steps per epoch: Ctrl-C inside the third epoch
                raise KeyboardInterrupt
            return step(*a)
        return run

    out = tmp_path / "bd"
    monkeypatch.setattr(engine, "cross_entropy_step", interrupted_step)
    assert main(attack_argv(out, 4)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists()
    (ckpt,) = _checkpoints(out)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2  # both finished epochs are kept

    monkeypatch.setattr(engine, "cross_entropy_step", real_step)
    with caplog.at_level(logging.INFO, logger="tsbd.train.engine"):
        assert main(attack_argv(out, 4)) == 0
    assert "at epoch 2" in caplog.text and not _checkpoints(out)
    timings = json.loads((out / "meta.json").read_text())["timings"]
    # the recorded training time is all four epochs', the two before the resume included
    assert timings["resumed_at_epoch"] == 2 and timings["train"] > timings["train_this_run"] > 0
    assert main(attack_argv(tmp_path / "ref", 4)) == 0  # never interrupted
    assert "resumed_at_epoch" not in json.loads((tmp_path / "ref" / "meta.json").read_text())["timings"]
    resumed, ref = load_state(out / "model.safetensors"), load_state(tmp_path / "ref" / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(resumed[k], ref[k])


KILLABLE_ATTACK = """
import sys
import tsbd.data
limited = tsbd.data.load_dataset("demo").limited(300, 100)
tsbd.data.load_dataset = lambda *a, **k: limited
from tsbd.cli import main
sys.exit(main({argv!r}))
"""


def _env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def test_attack_sigkill_then_rerun_resumes_from_the_last_finished_epoch(tiny_demo, tmp_path, caplog):
    out = tmp_path / "bd"
    argv = attack_argv(out, 8)
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_ATTACK.format(argv=argv)], env=_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None and not _checkpoints(out):
            time.sleep(0.02)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert killed, proc.stderr.read().decode()[-2000:]
    assert not out.exists() and _checkpoints(out)
    with caplog.at_level(logging.INFO, logger="tsbd.train.engine"):
        assert main(argv) == 0
    done = int(caplog.text.split("at epoch ")[1].split()[0])
    assert 1 <= done < 8  # finished epochs were not redone
    assert main(attack_argv(tmp_path / "ref", 8)) == 0
    resumed, ref = load_state(out / "model.safetensors"), load_state(tmp_path / "ref" / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(resumed[k], ref[k])


@pytest.fixture
def attacked(tiny_demo, tmp_path, capsys):
    out = tmp_path / "bd"
    assert main(attack_argv(out)) == 0
    capsys.readouterr()
    return out


def test_defend_ctrl_c_writes_nothing_and_rerun_finishes(attacked, tmp_path, capsys, monkeypatch):
    before = _files(attacked)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tsbd.defenses.tsbd.fit", interrupted)
    argv = ["defend", str(attacked), "--clean-ratio", "0.5", *TSBD_FAST, "--out", str(tmp_path / "pure"), *RUNTIME]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "pure").exists() and _files(attacked) == before
    monkeypatch.undo()
    assert main(argv) == 0 and (tmp_path / "pure" / "model.safetensors").is_file()


# `tsbd defend` that touches MARKER when TSBD's first training loop starts: the kill lands inside the defense
KILLABLE_DEFEND = """
import pathlib, sys
import tsbd.defenses.tsbd as stages
_fit = stages.fit
def marked(*args, **kwargs):
    pathlib.Path({marker!r}).touch()
    return _fit(*args, **kwargs)
stages.fit = marked
from tsbd.cli import main
sys.exit(main({argv!r}))
"""


def test_defend_sigkill_writes_nothing_and_rerun_finishes(attacked, tmp_path):
    out, marker = tmp_path / "pure", tmp_path / "inside-defense"
    slow = ["--opt", "unlearn_lr=1e-9", "--opt", "unlearn_max_epochs=100000", "--opt", "batch_size=64"]  # never ends
    argv = ["defend", str(attacked), "--clean-ratio", "0.5", *slow, "--out", str(out), *RUNTIME]
    before = _files(attacked)
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_DEFEND.format(marker=str(marker), argv=argv)], env=_env(),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None and not marker.exists():
            time.sleep(0.02)
        inside = proc.poll() is None and marker.exists()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert inside, proc.stderr.read().decode()[-2000:]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".pure")]
    assert _files(attacked) == before
    assert main(["defend", str(attacked), "--clean-ratio", "0.5", *TSBD_FAST, "--out", str(out), *RUNTIME]) == 0
    assert (out / "meta.json").is_file()




def test_bench_write_failing_half_way_leaves_no_artifact_and_no_result_row(tmp_path, monkeypatch, capsys):
    import tsbd.artifacts
    from tsbd.bench.store import Store

    def broken(file, tensors, metadata):
        with open(file, "wb") as fh:
            fh.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tsbd.artifacts, "write_safetensors", broken)
    grid = write_tiny_grid(tmp_path, name="tiny-write", attacks=["badnets"], defenses=["none"], widths=(8, 16, 16))
    results = tmp_path / "results"
    assert main(["bench", str(grid), "--results", str(results), *RUNTIME]) == 1
    assert "nothing was written" in capsys.readouterr().err
    with Store(results) as store:
        rows = store.cells()
        assert rows and not [r for r in rows if r["status"] == "done"]
        assert not [r for r in rows if r.get("metrics")]
    artifacts = results / "artifacts"
    assert not artifacts.exists() or not list(artifacts.iterdir())


@pytest.mark.parametrize("ratio,needle", [("0.001", "selects no image; raise --clean-ratio"),
                                          ("0.1", "has 30 images, fewer than one batch (256)")])
def test_defend_with_an_empty_or_too_small_clean_set_is_one_line(attacked, tmp_path, capsys, ratio, needle):
    code = main(["defend", str(attacked), "--clean-ratio", ratio, "--out", str(tmp_path / "pure"), *RUNTIME])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith("tsbd: error:") and needle in line
    assert not (tmp_path / "pure").exists()
