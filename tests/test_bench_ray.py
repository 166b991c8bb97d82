"""The Ray executor on a local 2-CPU Ray instance (skipped where Ray is not installed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from conftest import write_tiny_grid  # noqa: E402

from tsbd.bench.cells import CellContext, run_cell  # noqa: E402
from tsbd.bench.executors import run_grid  # noqa: E402
from tsbd.bench.grid import load_grid  # noqa: E402
from tsbd.bench.report import write_report  # noqa: E402
from tsbd.bench.store import Store  # noqa: E402
from tsbd.errors import TsbdError  # noqa: E402

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: seconds to minutes per test

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def local_ray(monkeypatch):
    # workers inherit the driver's environment: make sure they can import this checkout
    # (and this test module, whose runner the workers unpickle)
    paths = [str(REPO), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


def failing_for_blended_defense(cell, parent, ctx, cache):
    """The real runner, except that the defense of the Blended model fails in the worker."""
    if cell.kind == "defense" and parent.config["attack"]["name"] == "blended":
        raise TsbdError("deliberate failure in a Ray worker")
    return run_cell(cell, parent, ctx, cache)


def test_ray_executor_runs_the_tiny_grid_attacks_before_their_defenses(tmp_path, local_ray):
    grid = write_tiny_grid(tmp_path, name="tiny-ray")
    plan = load_grid(grid)
    results = tmp_path / "results"
    ctx = CellContext(str(results), device="cpu", precision="fp32")
    with Store(results) as store:
        summary = run_grid(plan, store, ctx, executor="ray", cpus_per_cell=1, poll_s=0.2,
                           runner=failing_for_blended_defense)
        assert (summary.done, summary.failed, summary.ran) == (3, 1, 3), summary.errors
        failed = store.cells(plan.name, status="failed")
        assert len(failed) == 1 and failed[0]["error"] == "deliberate failure in a Ray worker"
        summary = run_grid(plan, store, ctx, executor="ray", retry_failed=True, poll_s=0.2)
        assert (summary.done, summary.failed, summary.ran) == (4, 0, 1), summary.errors
        rows = {r["id"]: r for r in store.cells(plan.name)}
        assert {r["status"] for r in rows.values()} == {"done"}
        for r in rows.values():
            assert (results / r["artifact"] / "model.safetensors").is_file()
            if r["kind"] == "defense":  # a defense started only after its attacked model was done
                assert rows[r["parent"]]["finished"] <= r["started"]
                assert 0 <= r["metrics"]["der"] <= 1
        runs = _runs(store)
        assert sorted(runs.values()) == [["done"]] * 3 + [["failed", "done"]]
        # a rerun on Ray finds nothing to do
        again = run_grid(plan, store, ctx, executor="ray", poll_s=0.2)
        assert again.ran == 0 and again.done == 4
    files = write_report(results, plots=False)
    assert "| BadNets |" in files["md"].read_text()


def _runs(store):
    out = {}
    for r in store.runs():
        out.setdefault(r["cell"], []).append(r["outcome"])
    return out
