"""`tsbd merge`: results stores (e.g. slices run on a GPU machine) merged cell by cell."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest

from tsbd.bench.cells import CellResult
from tsbd.bench.grid import Plan, attack_cell, defense_cell
from tsbd.bench.merge import merge_results
from tsbd.bench.store import Store
from tsbd.cli import main
from tsbd.errors import TsbdError


def _cells(attack: str):
    a = attack_cell(dataset={"name": "d"}, model={"name": "m"}, attack={"name": attack, "config": {}}, train={},
                    seed=0)
    return [a] + [defense_cell(a, defense={"name": d, "config": {}}, clean_ratio=0.05, seed=0) for d in ("tsbd", "ft")]


def _finish(store: Store, cell, acc: float, results_dir) -> None:
    assert store.claim(cell.id) == "claimed"
    folder = results_dir / "artifacts" / cell.id
    folder.mkdir(parents=True)
    (folder / "record.json").write_text(json.dumps({"acc": acc}))
    store.complete(cell.id, CellResult({"acc": acc}, {"cell": 1.0}, {"tsbd": "0.1"}, f"artifacts/{cell.id}",
                                       "gpu-host", "2026-11-26T00:00:00+00:00", "2026-11-26T00:01:00+00:00"))


def _status(store: Store, cell) -> str:
    return store.state(cell.id)["status"]


def test_a_slice_merges_into_the_local_store_and_a_second_merge_changes_nothing(tmp_path):
    bad, blend = _cells("badnets"), _cells("blended")
    grid = Plan("g", {"name": "g"}, bad + blend)
    # the local store knows the whole grid, has BadNets' attack cell done, and a dead worker's
    # claim on BadNets' TSBD cell
    local = tmp_path / "local"
    with Store(local) as store:
        store.register(grid)
        _finish(store, bad[0], 0.5, local)
    with Store(local, owner=f"{socket.gethostname()}:999999999:dead") as dead:
        assert dead.claim(bad[1].id) == "claimed"
    # the device ran a slice: BadNets (attack again, with another result, and both defenses) and
    # Blended's attack cell; Blended's defense cells are still pending there
    device = tmp_path / "device"
    with Store(device) as store:
        store.register(Plan("g+slice", {"name": "g"}, bad + blend))
        for cell, acc in ((bad[0], 0.9), (bad[1], 0.8), (bad[2], 0.7), (blend[0], 0.6)):
            _finish(store, cell, acc, device)
        store.fail(blend[1].id, "boom", claim=True)
    os.chmod(device, stat.S_IRUSR | stat.S_IXUSR)  # fetched device files are read-only
    try:
        summary = merge_results(device, local)
    finally:
        os.chmod(device, stat.S_IRWXU)
    assert (summary.added, summary.updated, summary.kept, summary.busy) == (0, 4, 1, 0)
    assert summary.artifacts == 3 and summary.grids == 1
    with Store(local) as store:
        assert store.state(bad[0].id)["metrics"] == {"acc": 0.5}  # local result kept
        assert store.state(bad[1].id)["metrics"] == {"acc": 0.8}  # the dead worker's cell took the slice's
        assert store.state(bad[1].id)["owner"] is None
        assert [r["outcome"] for r in store.runs(bad[1].id)] == ["abandoned", "done"]
        assert store.state(blend[0].id)["host"] == "gpu-host"
        assert _status(store, blend[1]) == "failed" and store.state(blend[1].id)["error"] == "boom"
        assert _status(store, blend[2]) == "pending"
        assert json.loads((local / store.state(bad[2].id)["artifact"] / "record.json").read_text()) == {"acc": 0.7}
        assert len(store.cells("g")) == 6 and len(store.cells("g+slice")) == 6
        assert store.counts("g") == {"pending": 1, "running": 0, "done": 4, "failed": 1}
    with Store(local) as store:
        history = store.runs()
    again = merge_results(device, local)
    assert (again.added, again.updated, again.artifacts, again.grids) == (0, 0, 0, 0)
    assert again.kept == 5  # four done, and the failure already recorded
    assert not list((local / "artifacts").glob(".*"))  # no temporary copy left behind
    with Store(local) as store:
        assert store.runs() == history  # no attempt recorded twice


def test_rows_only_into_a_new_store_then_into_another(tmp_path):
    cells = _cells("badnets")
    device = tmp_path / "device"
    with Store(device) as store:
        store.register(Plan("g", {"name": "g"}, cells))
        _finish(store, cells[0], 0.9, device)
    out = tmp_path / "out"
    first = merge_results(device, out, artifacts=False)  # what a device run sends back: one small file
    assert first.added == 3 and first.artifacts == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.sqlite"]
    local = tmp_path / "local"
    rc = main(["merge", str(out / "results.sqlite"), "--into", str(local)])
    assert rc == 0
    with Store(local) as store:
        row = store.state(cells[0].id)
        assert row["status"] == "done" and row["metrics"] == {"acc": 0.9} and row["artifact"] is None
        assert store.counts("g") == {"pending": 2, "running": 0, "done": 1, "failed": 0}


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(TsbdError, match="no results store"):
        merge_results(tmp_path / "missing", tmp_path / "into")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TsbdError, match="has no results.sqlite"):
        merge_results(tmp_path / "empty", tmp_path / "into")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(TsbdError, match="not a usable results store"):
        merge_results(junk, tmp_path / "into")
    with Store(tmp_path / "same"):
        pass
    with pytest.raises(TsbdError, match="same results folder"):
        merge_results(tmp_path / "same", tmp_path / "same")
