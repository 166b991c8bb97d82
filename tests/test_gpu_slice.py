"""benchmarks/gpu/grid_slice.sh, the prepared device run, on CPU with a tiny grid: it runs the
slice, sends back one rows-only results file, and that file merges into a local store."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import write_tiny_grid

from tsbd.bench.merge import merge_results
from tsbd.bench.store import Store

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: seconds to minutes per test

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_slice_runs_one_attack_row_and_comes_back_as_one_mergeable_file(tmp_path):
    grid = write_tiny_grid(tmp_path, name="tiny-slice", widths=(8, 16, 16))
    out, results = tmp_path / "out", tmp_path / "device-results"
    env = {**os.environ, "OUT": str(out), "RESULTS": str(results), "DATA_ROOT": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/grid_slice.sh"), str(grid), "badnets",
                           "--device", "cpu", "--threads", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["results.sqlite"]  # rows only
    assert not (out / "results" / "artifacts").exists()
    local = tmp_path / "local"
    summary = merge_results(out / "results", local)
    assert summary.added == 4
    with Store(local) as store:
        assert store.counts("tiny-slice") == {"pending": 2, "running": 0, "done": 2, "failed": 0}
        done = {c["config"].get("attack", {}).get("name") or c["config"]["defense"]["name"]: c
                for c in store.cells(status="done")}
        assert set(done) == {"badnets", "tsbd"}
        assert 0 <= done["tsbd"]["metrics"]["asr"] <= 1 and done["badnets"]["artifact"] is None


def test_slice_script_says_how_to_call_it(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/grid_slice.sh")], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode != 0 and "usage: OUT=DIR grid_slice.sh GRID ATTACK" in proc.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_first_columns_runs_a_grid_in_two_bench_runs_on_one_store_and_sends_back_its_rows(tmp_path):
    grid = write_tiny_grid(tmp_path, name="tiny-first", attacks=("badnets",), defenses=("none", "tsbd", "clp"),
                           widths=(8, 16, 16))
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "DATA_ROOT": str(tmp_path),
           "PYTHONPATH": str(ROOT), "W1": "1", "W2": "1", "STAGGER_SECONDS": "1", "END_SECONDS": "400"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/first_columns.sh"), f"a:{grid}:clp", "--",
                           "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "a" / "results.sqlite").is_file() and not (out / "a" / "artifacts").exists()
    log = (out / "env.txt").read_text()
    assert "a: every column stopped with 0" in log and "a: first columns stopped with 0" in log, log
    local = tmp_path / "local"
    merge_results(out / "a", local)
    with Store(local) as store:
        assert store.counts("tiny-first") == {"pending": 0, "running": 0, "done": 3, "failed": 0}  # model, TSBD, CLP


def test_first_columns_says_how_to_call_it(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/first_columns.sh"), "--", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 2 and "usage: OUT=DIR first_columns.sh NAME:GRID:RIVAL" in proc.stderr
