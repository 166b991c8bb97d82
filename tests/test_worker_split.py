"""benchmarks/worker_split.py end to end on the embedded demo data: both layouts measured in fresh
processes each round, the ratio their sums, and a bad thread count refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "worker_split.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to split")
def test_worker_split_measures_both_layouts_and_records_the_ratio(tmp_path):
    out = tmp_path / "split.json"
    res = _run("--models", "airbench", "--threads", "2", "--rounds", "1", "--steps", "1", "--warmup", "1",
               "--batch-size", "8", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["machine"]["threads"] == 2 and len(data["cores"]) == 2
    assert "child" not in data["args"] and data["args"]["rounds"] == 1
    (r,) = data["models"]["airbench"]["rounds"]
    assert r["one"] > 0 and len(r["split"]) == 2 and all(v > 0 for v in r["split"])
    assert r["split_sum"] == pytest.approx(sum(r["split"]))
    assert r["ratio"] == pytest.approx(r["split_sum"] / r["one"])
    assert data["models"]["airbench"]["median_ratio"] == pytest.approx(r["ratio"])
    assert "ratio" in res.stdout


def test_worker_split_refuses_a_thread_count_it_cannot_split():
    res = _run("--threads", "1")
    assert res.returncode != 0
    assert "--threads 1: need 2.." in res.stderr and "Traceback" not in res.stderr
