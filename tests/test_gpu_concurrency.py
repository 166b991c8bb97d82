"""benchmarks/gpu/concurrency.py on CPU with a tiny model: each process count runs that many
processes side by side, each reports the images it trained, and the sum is written atomically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts processes that import torch: seconds

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "concurrency.py"


def test_each_process_count_trains_side_by_side_and_reports_each_process_and_the_sum(tmp_path):
    out = tmp_path / "concurrency.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "airbench@widths=[8,16,16]", "--procs", "1,2",
                           "--seconds", "0.5", "--chunk-steps", "1", "--batch-size", "16", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["procs"] for r in result["results"]] == [1, 2]
    for row in result["results"]:
        assert len(row["images_per_s_each"]) == row["procs"]
        assert all(v > 0 for v in row["images_per_s_each"])
        assert row["images_per_s_total"] == pytest.approx(sum(row["images_per_s_each"]), abs=0.2)
    assert result["args"]["model"] == "airbench@widths=[8,16,16]" and "versions" in result["provenance"]
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temp file, nothing left over


@pytest.mark.parametrize("procs,message", [("0", "every count must be at least 1"),
                                           ("1,x", "give comma-separated whole numbers")])
def test_bad_process_counts_are_refused_with_one_line(procs, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--procs", procs], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
