"""`tsbd bench` end to end on a tiny grid: local executor, resume, failures, SIGKILL, two processes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_tiny_grid

from tsbd.bench.cells import CellContext, CellResult, artifact_path, checkpoint_dir, checkpoint_path, now_iso
from tsbd.bench.executors import run_grid
from tsbd.bench.grid import Plan, attack_cell, defense_cell, load_grid
from tsbd.bench.store import Store
from tsbd.cli import main
from tsbd.errors import TsbdError

REPO = Path(__file__).resolve().parents[1]

RUNTIME = ["--device", "cpu", "--precision", "fp32", "--threads", "1", "--quiet"]


def write_grid(tmp_path: Path, epochs: int = 1) -> Path:
    """2 attacks x (No Defense + TSBD), tiny airbench, a few hundred demo images: 4 cells, seconds each."""
    return write_tiny_grid(tmp_path, epochs=epochs)


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def running_cells(results: Path) -> list[str]:
    """Ids of the cells the store in ``results`` shows running (read-only; none while it is locked)."""
    db = results / "results.sqlite"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return [r[0] for r in conn.execute("SELECT id FROM cells WHERE status = 'running'").fetchall()]
    except sqlite3.OperationalError:
        return []


def bench_signalled_inside_a_cell(tmp_path: Path, sig: int, timeout_s: float = 120):
    """Start `tsbd bench` on a tiny 3-epoch grid, send ``sig`` a moment after the store shows a cell
    running, and wait for the process to end: (command, results folder, process, that cell's id or
    None if none ran before ``timeout_s``, its stderr)."""
    grid, results = write_grid(tmp_path, epochs=3), tmp_path / "results"
    cmd = [sys.executable, "-m", "tsbd.cli", "bench", str(grid), "--results", str(results), *RUNTIME]
    proc = subprocess.Popen(cmd, env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cell = None
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and proc.poll() is None:
            running = running_cells(results)
            if running:
                time.sleep(0.3)  # well inside the cell
                proc.send_signal(sig)
                cell = running[0]
                break
            time.sleep(0.05)
    finally:
        proc.wait(timeout=60)
    return cmd, results, proc, cell, proc.stderr.read().decode()


def runs_by_cell(store: Store) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in store.runs():
        out.setdefault(r["cell"], []).append(r["outcome"])
    return out


# ------------------------------------------------------------------------------------------
def test_tiny_grid_end_to_end_then_resume_runs_nothing(tmp_path, monkeypatch):
    import tsbd.pipeline

    grid, results = write_grid(tmp_path), tmp_path / "results"
    checkpoints = []
    real_train = tsbd.pipeline.train_attacked_model

    def recording_train(*args, **kwargs):
        checkpoints.append(kwargs.get("checkpoint"))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(tsbd.pipeline, "train_attacked_model", recording_train)
    assert main(["bench", str(grid), "--results", str(results), *RUNTIME]) == 0

    plan = load_grid(grid)
    with Store(results) as store:
        rows = {r["id"]: r for r in store.cells("tiny")}
        assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"done"}
        attacks = [r for r in rows.values() if r["kind"] == "attack"]
        defenses = [r for r in rows.values() if r["kind"] == "defense"]
        assert len(attacks) == 2 and len(defenses) == 2
        assert {d["parent"] for d in defenses} == {a["id"] for a in attacks}
        for r in rows.values():
            assert r["config"] == plan.by_id[r["id"]].config  # the stored config is what the id hashes
            assert 0 <= r["metrics"]["acc"] <= 1 and 0 <= r["metrics"]["asr"] <= 1
            assert (results / r["artifact"] / "meta.json").is_file()
            assert (results / r["artifact"] / "model.safetensors").is_file()
            assert r["versions"]["torch"] and r["host"] and r["started"] <= r["finished"]
            assert 50 < r["timings"]["peak_rss_mb"] < 64_000  # this process's high-water mark, MiB
        for d in defenses:
            assert 0 <= d["metrics"]["der"] <= 1
            meta = json.loads((results / d["artifact"] / "meta.json").read_text())
            assert meta["parent"] == d["parent"] and meta["kind"] == "defended"
        # attack training was checkpointed to the cell's resume file, removed once done
        assert sorted(map(str, checkpoints)) == sorted(str(checkpoint_path(results, a["id"])) for a in attacks)
        assert not any(Path(c).exists() for c in checkpoints)
        assert runs_by_cell(store) == {cid: ["done"] for cid in rows}

    # rerunning the same command redoes nothing
    with Store(results) as store:
        summary = run_grid(plan, store, CellContext(str(results), device="cpu", precision="fp32", threads=1))
        assert summary.ran == 0 and summary.done == 4
        assert runs_by_cell(store) == {cid: ["done"] for cid in rows}
    assert len(checkpoints) == 2

    # --redo tsbd reruns the TSBD cells from scratch: stage checkpoints an older attempt left are gone
    # before the defense starts, and the redone cells leave none behind
    stale = {d["id"]: checkpoint_dir(results, d["id"]) / "finetune.resume.pt" for d in defenses}
    for path in stale.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"from older code")
    seen = []
    real_defend = tsbd.pipeline.defend_model

    def recording_defend(*args, **kwargs):
        seen.append((kwargs["checkpoint_dir"], kwargs["checkpoint_dir"].exists()))
        return real_defend(*args, **kwargs)

    monkeypatch.setattr(tsbd.pipeline, "defend_model", recording_defend)
    assert main(["bench", str(grid), "--results", str(results), "--redo", "tsbd", *RUNTIME]) == 0
    assert sorted(seen) == sorted((path.parent, False) for path in stale.values())
    assert not any(path.parent.exists() for path in stale.values())
    with Store(results) as store:
        assert runs_by_cell(store) == {cid: ["done", "done"] if cid in stale else ["done"] for cid in rows}
    assert len(checkpoints) == 2  # the attacked models were kept


# ------------------------------------------------------------------------------------------
def fake_plan(n_attacks: int, n_defenses: int, name: str = "fake") -> Plan:
    cells = []
    for i in range(n_attacks):
        a = attack_cell(dataset={"name": "demo", "fingerprint": "x"}, model={"name": "m", "options": {}},
                        attack={"name": f"attack{i}", "config": {"poison_ratio": 0.1}}, train={"epochs": 1}, seed=0)
        cells.append(a)
        cells += [defense_cell(a, defense={"name": f"defense{j}", "config": {}}, clean_ratio=0.05, seed=0)
                  for j in range(n_defenses)]
    return Plan(name, {"name": name}, cells)


def fake_runner(fail_ids=(), sleep_s=0.0, log=None):
    """Writes a tiny artifact and returns made-up metrics; raises for ``fail_ids``."""

    def run(cell, parent, ctx, cache):
        if log is not None:
            log.append(cell.id)
        if cell.id in fail_ids:
            raise RuntimeError(f"boom in {cell.id}\nsecond line of the error")
        time.sleep(sleep_s)
        out = artifact_path(ctx.results_dir, cell.id)
        out.mkdir(parents=True, exist_ok=True)
        (out / "record.json").write_text("{}")
        return CellResult({"acc": 0.9, "asr": 0.1, "der": 0.9}, {"total": sleep_s}, {"tsbd": "0.1"},
                          f"artifacts/{cell.id}", "host", now_iso(), now_iso())

    return run


def test_failing_cell_is_recorded_the_grid_goes_on_and_retry_failed_reruns_it(tmp_path):
    plan = fake_plan(2, 2)
    bad_attack, bad_defense = plan.attack_cells[0], plan.defenses_of(plan.attack_cells[1].id)[0]
    ctx = CellContext(str(tmp_path))
    with Store(tmp_path) as store:
        s = run_grid(plan, store, ctx, runner=fake_runner({bad_attack.id, bad_defense.id}))
        assert (s.done, s.failed) == (2, 4)  # the failed attack takes its 2 defenses with it
        rows = {r["id"]: r for r in store.cells()}
        assert rows[bad_attack.id]["error"] == f"RuntimeError: boom in {bad_attack.id}"  # one line
        for d in plan.defenses_of(bad_attack.id):
            assert rows[d.id]["status"] == "failed" and bad_attack.id in rows[d.id]["error"]
        assert rows[bad_defense.id]["status"] == "failed"
        assert "second line" in store.runs(bad_attack.id)[0]["detail"]  # the traceback is kept

        ran = []
        s = run_grid(plan, store, ctx, runner=fake_runner(log=ran))  # failed cells stay failed
        assert ran == [] and s.failed == 4

        s = run_grid(plan, store, ctx, runner=fake_runner(log=ran), retry_failed=True)
        assert s.done == 6 and s.failed == 0
        assert sorted(ran) == sorted([bad_attack.id, bad_defense.id] + [d.id for d in plan.defenses_of(bad_attack.id)])
        assert ran.index(bad_attack.id) < min(ran.index(d.id) for d in plan.defenses_of(bad_attack.id))


def test_ctrl_c_hands_the_running_cell_back(tmp_path):
    plan = fake_plan(1, 1)

    def interrupted(cell, parent, ctx, cache):
        raise KeyboardInterrupt

    with Store(tmp_path) as store:
        with pytest.raises(KeyboardInterrupt):
            run_grid(plan, store, CellContext(str(tmp_path)), runner=interrupted)
        assert store.state(plan.cells[0].id)["status"] == "pending"
        assert store.runs(plan.cells[0].id)[0]["outcome"] == "interrupted"
        assert run_grid(plan, store, CellContext(str(tmp_path)), runner=fake_runner()).done == 2


# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_cell_then_restart_finishes_every_cell_once(tmp_path):
    cmd, results, proc, killed, err = bench_signalled_inside_a_cell(tmp_path, signal.SIGKILL)
    assert killed is not None, err[-2000:]
    assert proc.returncode == -signal.SIGKILL

    with Store(results) as store:
        assert store.state(killed)["status"] == "running"  # left behind by the dead process
        done_before = {r["id"] for r in store.cells() if r["status"] == "done"}

    rerun = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    with Store(results) as store:
        rows = store.cells("tiny")
        assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
        runs = runs_by_cell(store)
        for r in rows:
            assert runs[r["id"]].count("done") == 1, runs  # every cell done exactly once
            if r["id"] == killed:
                assert runs[r["id"]] == ["abandoned", "done"] and r["attempts"] == 2
            else:
                assert runs[r["id"]] == ["done"] and r["attempts"] == 1
        for cid in done_before:  # finished cells were not redone
            assert runs[cid] == ["done"]
        assert sum(len(v) for v in runs.values()) == 5
    assert not list((results / "checkpoints").glob("*.resume.pt"))
    assert sorted(p.name for p in (results / "artifacts").iterdir() if not p.name.startswith(".")) == \
        sorted(r["id"] for r in rows)


@pytest.mark.slow
def test_sigterm_hands_the_running_cell_back_like_ctrl_c(tmp_path):
    _, results, proc, stopped, err = bench_signalled_inside_a_cell(tmp_path, signal.SIGTERM)
    assert stopped is not None, err[-2000:]
    assert proc.returncode == 143, err[-2000:]
    assert "tsbd: terminated; finished work is saved -- rerun the same command to resume" in err
    assert "Traceback" not in err
    with Store(results) as store:
        assert store.state(stopped)["status"] == "pending"
        assert store.runs(stopped)[-1]["outcome"] == "interrupted"


# ------------------------------------------------------------------------------------------
TWO_PROCESS_SCRIPT = """
import json, sys, time
sys.path.insert(0, {tests!r})
from test_bench import fake_plan, fake_runner
from tsbd.bench.cells import CellContext
from tsbd.bench.executors import run_grid
from tsbd.bench.store import Store

ran = []
store = Store({results!r})
summary = run_grid(fake_plan(8, 4), store, CellContext({results!r}), runner=fake_runner(sleep_s=0.05, log=ran),
                   poll_s=0.05)
print(json.dumps({{"ran": ran, "done": summary.done}}))
"""


@pytest.mark.slow
def test_two_processes_on_one_store_share_the_work_and_lose_no_row(tmp_path):
    results = tmp_path / "results"
    script = TWO_PROCESS_SCRIPT.format(tests=str(Path(__file__).parent), results=str(results))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    plan = fake_plan(8, 4)
    ran = [set(o["ran"]) for o in outs]
    assert ran[0] | ran[1] == {c.id for c in plan.cells}
    assert not ran[0] & ran[1]  # no cell ran twice
    assert all(o["done"] == len(plan.cells) for o in outs)
    with Store(results) as store:
        rows = store.cells()
        assert len(rows) == len(plan.cells) and all(r["status"] == "done" for r in rows)
        assert all(r["metrics"] == {"acc": 0.9, "asr": 0.1, "der": 0.9} for r in rows)
        assert runs_by_cell(store) == {c.id: ["done"] for c in plan.cells}


def test_no_wait_stops_at_the_cells_another_live_process_holds_and_a_rerun_finishes_them(tmp_path):
    plan = fake_plan(2, 2)  # attack0 with its 2 defenses, then attack1 with its 2
    held = plan.cells[3]
    assert held.kind == "attack"
    # another process on this host, alive (this test's own pid), is training attack1's model
    with Store(tmp_path, owner=f"{socket.gethostname()}:{os.getpid()}:other") as other:
        other.register(plan)
        assert other.claim(held.id) == "claimed"
        ran = []
        with Store(tmp_path) as store:
            t0 = time.monotonic()
            s = run_grid(plan, store, CellContext(str(tmp_path)), runner=fake_runner(log=ran), poll_s=30,
                         no_wait=True)
            assert time.monotonic() - t0 < 20  # returned without a single 30 s poll
        assert ran == [c.id for c in plan.cells[:3]]
        assert (s.done, s.failed, s.left) == (3, 0, 3)  # attack1 and the two defenses waiting on it
        assert other.state(held.id)["status"] == "running" and other.state(held.id)["owner"] == other.owner
        other.release(held.id)  # that process stopped and handed its cell back
    ran = []
    with Store(tmp_path) as store:
        s = run_grid(plan, store, CellContext(str(tmp_path)), runner=fake_runner(log=ran), no_wait=True)
    assert ran == [c.id for c in plan.cells[3:]] and (s.done, s.left) == (6, 0)


def test_a_narrowed_run_shares_cells_but_keeps_the_grids_membership(tmp_path):
    from tsbd.cli.bench import narrowed

    grid, results = write_grid(tmp_path), tmp_path / "results"
    full_plan = load_grid(str(grid))
    part_plan = narrowed(load_grid(str(grid), overrides={"attack": ["badnets"]}), ['attack=["badnets"]'], None)
    assert narrowed(full_plan, [], None) is full_plan
    with Store(results) as store:
        store.register(full_plan)
        store.register(part_plan)
        full = {r["id"] for r in store.cells("tiny")}
        subsets = [g for g in store.grids() if g != "tiny"]
        assert len(full) == 4  # the subset did not replace the grid's membership
        assert subsets == [part_plan.name] and part_plan.name.startswith("tiny+")
        part = {r["id"] for r in store.cells(subsets[0])}
        assert len(part) == 2 and part < full  # the same cells, shared


def test_a_dry_run_creates_and_changes_nothing(tmp_path, capsys):
    grid, results = write_grid(tmp_path), tmp_path / "results"
    assert main(["bench", str(grid), "--results", str(results), "--dry-run", *RUNTIME]) == 0
    assert not results.exists()
    err = " ".join(capsys.readouterr().err.split())
    assert "4 pending; no store there yet" in err
    assert "Not done: 4 cells; no done cell like them, so no estimate." in err
    plan = load_grid(str(grid))
    with Store(results) as store:
        store.register(plan)
        store.claim(plan.cells[0].id)  # an attack cell, now running
    assert main(["bench", str(grid), "--results", str(results), "--dry-run", "--set", 'attack=["badnets"]',
                 *RUNTIME]) == 0
    with Store(results) as store:
        assert store.grids() == ["tiny"]  # the narrowed dry run registered nothing
    err = " ".join(capsys.readouterr().err.split())
    assert "dry run; 0 done, 0 failed, 1 running, 1 pending" in err


def test_register_only_records_the_cells_as_pending_and_runs_nothing(tmp_path):
    grid, results = write_grid(tmp_path), tmp_path / "results"
    assert main(["bench", str(grid), "--results", str(results), "--register-only", *RUNTIME]) == 0
    with Store(results) as store:
        assert store.counts("tiny") == {"pending": 4, "running": 0, "done": 0, "failed": 0}
        assert store.runs() == []
    assert not (results / "artifacts").exists()


def test_redo_reruns_the_named_defenses_cells_and_keeps_the_attacked_models(tmp_path):
    from tsbd.cli.bench import _redo_cells

    plan = fake_plan(2, 2)
    ctx = CellContext(str(tmp_path))
    with Store(tmp_path) as store:
        assert run_grid(plan, store, ctx, runner=fake_runner()).done == 6
        redo = _redo_cells(plan, ["defense1"])
        assert sorted(redo) == sorted(d.id for a in plan.attack_cells for d in plan.defenses_of(a.id)
                                      if d.config["defense"]["name"] == "defense1")
        assert store.reopen(redo) == 2
        assert all(store.state(c)["status"] == "pending" and store.state(c)["metrics"] is None for c in redo)
        ran = []
        s = run_grid(plan, store, ctx, runner=fake_runner(log=ran))
        assert sorted(ran) == sorted(redo) and s.done == 6  # nothing else ran again
        assert runs_by_cell(store)[redo[0]] == ["done", "done"]  # the earlier attempt stays in the history
        assert store.reopen([plan.attack_cells[0].id, "no-such-cell"]) == 1  # reopen itself takes any cell
    with pytest.raises(TsbdError, match="--redo nc: no such defense in this grid; it has defense0, defense1"):
        _redo_cells(plan, ["nc"])


def test_a_store_without_its_attacked_models_trains_them_again_only_where_a_defense_needs_one(tmp_path):
    import shutil

    plan = fake_plan(3, 1)
    first, second, third = plan.attack_cells
    failed = plan.defenses_of(third.id)[0]
    ctx = CellContext(str(tmp_path))
    with Store(tmp_path) as store:
        assert run_grid(plan, store, ctx, runner=fake_runner({failed.id})).done == 5
        # the models are gone (a store merged from a report folder); a new defense for the first attack
        shutil.rmtree(tmp_path / "artifacts")
        more = Plan("fake", {"name": "fake"}, [*plan.cells, defense_cell(first, defense={"name": "new", "config": {}},
                                                                          clean_ratio=0.05, seed=0)])
        ran = []
        s = run_grid(more, store, ctx, runner=fake_runner(log=ran))
        assert ran == [first.id, more.cells[-1].id] and s.done == 6  # the second attack's defenses are done
        assert store.state(second.id)["status"] == "done" and not artifact_path(tmp_path, second.id).exists()
        assert runs_by_cell(store)[first.id] == ["done", "done"]
        earlier, latest = store.runs(first.id)
        assert json.loads(earlier["detail"]) == {"metrics": {"acc": 0.9, "asr": 0.1, "der": 0.9}}
        assert json.loads(latest["detail"]) == {"retrained": {"same": True, "before": {"acc": 0.9, "asr": 0.1}}}
        # a failed defense is not rerun without --retry-failed, so its attacked model is not retrained for it
        assert store.state(third.id)["status"] == "done" and not artifact_path(tmp_path, third.id).exists()
        ran.clear()
        run_grid(more, store, ctx, runner=fake_runner(log=ran), retry_failed=True)
        assert ran == [third.id, failed.id]


def test_an_attacked_model_trained_again_to_other_metrics_is_a_warning_kept_in_its_history(tmp_path, caplog):
    import shutil

    plan = fake_plan(1, 1)
    attack = plan.attack_cells[0]
    defense = plan.defenses_of(attack.id)[0]
    ctx = CellContext(str(tmp_path))
    with Store(tmp_path) as store:
        run_grid(plan, store, ctx, runner=fake_runner())
        shutil.rmtree(tmp_path / "artifacts")
        store.reopen([defense.id])

        def other(cell, parent, c, cache):
            result = fake_runner()(cell, parent, c, cache)
            return dataclasses.replace(result, metrics={"acc": 0.85, "asr": 0.97})

        with caplog.at_level("WARNING", logger="tsbd.bench.executors"):
            assert run_grid(plan, store, ctx, runner=other).done == 2
        assert f"attack cell {attack.id} (attack0 m demo seed 0) trained again gives another model " \
               "(ACC 90.00 -> 85.00%, ASR 10.00 -> 97.00%)" in caplog.text
        note = json.loads(store.runs(attack.id)[-1]["detail"])
        assert note == {"retrained": {"same": False, "before": {"acc": 0.9, "asr": 0.1}}}
        from tsbd.bench.report import render_markdown, summarize

        md = render_markdown([], summarize(store, None))
        assert "## Attacked models trained again" in md
        assert f"| {attack.id} | attack0 on demo / m, seed 0 | 90.00 / 10.00 | 85.00 / 97.00 | no |" in md
        # reopened again, the history keeps both models' metrics, the note beside the latest
        store.reopen([attack.id])
        assert store.previous_metrics(attack.id) == {"acc": 0.85, "asr": 0.97}
        assert json.loads(store.runs(attack.id)[-1]["detail"])["retrained"]["same"] is False


def test_reopen_keeps_a_failed_attempts_traceback_and_previous_metrics_is_none_without_a_done_one(tmp_path):
    plan = fake_plan(1, 0)
    attack = plan.attack_cells[0]
    with Store(tmp_path) as store:
        run_grid(plan, store, CellContext(str(tmp_path)), runner=fake_runner({attack.id}))
        assert store.reopen([attack.id]) == 1
        assert "second line" in store.runs(attack.id)[0]["detail"]
        assert store.previous_metrics(attack.id) is None
        assert store.previous_metrics("no-such-cell") is None


def test_dry_run_counts_an_attacked_model_that_must_train_again(tmp_path):
    import shutil

    from rich.console import Console

    from tsbd.cli.bench import _print_plan

    plan = fake_plan(2, 1)
    first = plan.attack_cells[0]
    with Store(tmp_path) as store:
        run_grid(plan, store, CellContext(str(tmp_path)), runner=fake_runner())
        shutil.rmtree(tmp_path / "artifacts")
        store.reopen([plan.defenses_of(first.id)[0].id])  # only the first attack's defense is left to run
        console = Console(record=True, width=200)
        _print_plan(plan, store, console, tmp_path)
    out = console.export_text()
    assert out.count("model missing: trains again") == 1
    assert [first.id in line for line in out.splitlines() if "trains again" in line] == [True]
    assert "1 attacked model(s) not in" in out


def test_a_resumed_attack_cell_counts_only_the_epochs_it_has_left_in_dry_run_and_claim_order(tmp_path):
    from rich.console import Console

    from tsbd.bench.cells import checkpoint_path
    from tsbd.bench.estimate import Estimator, longest_first
    from tsbd.cli.bench import _print_plan
    from tsbd.train.engine import save_checkpoint

    cells = [attack_cell(dataset={"name": "demo", "fingerprint": "x"}, model={"name": "m", "options": {}},
                         attack={"name": name, "config": {}}, train={"epochs": 40}, seed=0) for name in "abc"]

    def forty_minutes(cell, parent, ctx, cache):  # the done cell's time: the other's estimate, by a like cell
        return dataclasses.replace(fake_runner()(cell, parent, ctx, cache), timings={"total": 2400.0})

    plan = Plan("fake", {"name": "fake"}, cells)
    with Store(tmp_path) as store:
        run_grid(Plan("fake", {"name": "fake"}, cells[:1]), store, CellContext(str(tmp_path)),
                 runner=forty_minutes)
        console = Console(record=True, width=200)
        _print_plan(plan, store, console, tmp_path)
        fresh = console.export_text()
        save_checkpoint(checkpoint_path(tmp_path, plan.cells[1].id), {"epoch": 30, "history": []})
        console = Console(record=True, width=200)
        _print_plan(plan, store, console, tmp_path)
        resumed = console.export_text()
    row = [line for line in fresh.splitlines() if plan.cells[1].id in line][0]
    assert "40~" in row and "checkpointed" not in row
    row = [line for line in resumed.splitlines() if plan.cells[1].id in line][0]
    assert "30/40 epochs checkpointed" in row and "10~" in row
    assert "about 0.8 h of compute" in resumed  # 10 + 40 min left, not 40 + 40 (1.3 h)
    # two workers claim the fresh cell c (40 min left) before the resumed b (10 min)
    with Store(tmp_path) as store:
        estimate = Estimator.for_cells(store.cells(), cells)
    assert [c.id for c in longest_first(cells[1:], estimate, tmp_path)] == [cells[2].id, cells[1].id]
    assert [c.id for c in longest_first(cells[1:], estimate)] == [cells[1].id, cells[2].id]  # no folder: plan order


def test_opening_a_new_store_retries_a_locked_switch_to_wal(tmp_path, monkeypatch):
    # two processes opening the same new store at the same moment: one can get "database is
    # locked" from PRAGMA journal_mode at once (SQLite skips the busy handler when both hold a
    # read lock; 1 in 40 simultaneous opens failed, the cause of a flake in the test above)
    import tsbd.bench.store as store_mod

    real_connect = store_mod.sqlite3.connect
    failures = {"left": 3}

    class FlakyConnection:
        def __init__(self, conn):
            object.__setattr__(self, "_conn", conn)

        def __getattr__(self, name):
            return getattr(self._conn, name)

        def __setattr__(self, name, value):
            setattr(self._conn, name, value)

        def execute(self, sql, *args):
            if "journal_mode" in sql and failures["left"]:
                failures["left"] -= 1
                raise sqlite3.OperationalError("database is locked")
            return self._conn.execute(sql, *args)

    monkeypatch.setattr(store_mod.sqlite3, "connect", lambda *a, **k: FlakyConnection(real_connect(*a, **k)))
    with Store(tmp_path, busy_timeout_s=5) as store:
        assert store.cells() == [] and failures["left"] == 0
    failures["left"] = 10**9  # a lock that never clears: the busy timeout still ends it
    with pytest.raises(TsbdError, match="database is locked"):
        Store(tmp_path / "other", busy_timeout_s=0.2)


# ------------------------------------------------------------------------------------------
class StampingRunner:
    """A picklable runner (for worker processes): writes ``<cell>.json`` with its pid and start
    time into ``log_dir``, then behaves like :func:`fake_runner`."""

    def __init__(self, log_dir: Path, sleep_s: float):
        self.log_dir, self.sleep_s = Path(log_dir), sleep_s

    def __call__(self, cell, parent, ctx, cache):
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.log_dir / f"{cell.id}.json").write_text(json.dumps({"pid": os.getpid(), "start": time.time()}))
        return fake_runner(sleep_s=self.sleep_s)(cell, parent, ctx, cache)


def test_attacks_first_claims_every_attack_cell_before_any_defense(tmp_path):
    plan, ran = fake_plan(3, 2), []
    with Store(tmp_path) as store:
        run_grid(plan, store, CellContext(str(tmp_path)), runner=fake_runner(log=ran), attacks_first=True)
    kinds = [plan.by_id[cid].kind for cid in ran]
    assert kinds == ["attack"] * 3 + ["defense"] * 6


def test_attacks_first_takes_the_longest_estimated_cells_first(tmp_path):
    # defense times recorded by a first attack's row: d0 1 s, d1 3 s, d2 2 s; d3 never ran
    def timed_runner(seconds, log):
        def run(cell, parent, ctx, cache):
            result = fake_runner(log=log)(cell, parent, ctx, cache)
            result.timings = {"total": seconds.get(cell.config.get("defense", {}).get("name"), 5.0)}
            return result
        return run

    first = fake_plan(1, 3, name="first")
    with Store(tmp_path) as store:
        run_grid(first, store, CellContext(str(tmp_path)),
                 runner=timed_runner({"defense0": 1.0, "defense1": 3.0, "defense2": 2.0}, []))
        # a second row: another attack, the same defenses (estimated from the first row), and d3
        a = attack_cell(dataset={"name": "demo", "fingerprint": "x"}, model={"name": "m", "options": {}},
                        attack={"name": "other", "config": {"poison_ratio": 0.1}}, train={"epochs": 1}, seed=0)
        defenses = [defense_cell(a, defense={"name": f"defense{j}", "config": {}}, clean_ratio=0.05, seed=0)
                    for j in range(4)]
        second, ran = Plan("second", {"name": "second"}, [a, *defenses]), []
        run_grid(second, store, CellContext(str(tmp_path)), runner=timed_runner({}, ran), attacks_first=True)
        names = [second.by_id[cid].config.get("defense", {}).get("name", "attack") for cid in ran]
        assert names == ["attack", "defense3", "defense1", "defense2", "defense0"]
        ran.clear()  # without attacks_first (one process): the grid's order
        store.reopen([d.id for d in defenses])
        run_grid(second, store, CellContext(str(tmp_path)), runner=timed_runner({}, ran))
        assert [second.by_id[cid].config["defense"]["name"] for cid in ran] == [f"defense{j}" for j in range(4)]


@pytest.mark.slow
def test_workers_share_one_store_run_every_cell_once_and_start_attacks_first(tmp_path):
    from tsbd.bench.executors import run_workers

    plan, log_dir = fake_plan(3, 2), tmp_path / "log"
    with Store(tmp_path / "results") as store:
        summary = run_workers(plan, store, CellContext(str(tmp_path / "results"), threads=2), 2,
                              runner=StampingRunner(log_dir, sleep_s=0.4), poll_s=0.05)
        assert summary.done == summary.total == 9 and summary.ran == 9 and summary.failed == 0
        assert runs_by_cell(store) == {c.id: ["done"] for c in plan.cells}  # each cell ran once
    stamps = {c.id: json.loads((log_dir / f"{c.id}.json").read_text()) for c in plan.cells}
    assert len({s["pid"] for s in stamps.values()} - {os.getpid()}) == 2  # two worker processes did the work
    attacks = [stamps[c.id]["start"] for c in plan.cells if c.kind == "attack"]
    defenses = [stamps[c.id]["start"] for c in plan.cells if c.kind != "attack"]
    assert max(attacks) <= min(defenses)


def _two_workers_inside_their_cells(tmp_path, sigint):
    """`tsbd bench --workers 2` in its own session with SIGINT set to ``sigint``, once both workers
    run a cell (cells long enough that both are surely inside one when the stop comes): (process,
    results folder, the running cell ids)."""
    grid, results = write_grid(tmp_path, epochs=500), tmp_path / "results"
    cmd = [sys.executable, "-m", "tsbd.cli", "bench", str(grid), "--results", str(results), "--workers", "2",
           *RUNTIME]
    proc = subprocess.Popen(cmd, env=env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    running: list[str] = []
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None and len(running) < 2:
            running = running_cells(results)
            time.sleep(0.05)
        assert len(running) == 2, proc.stderr.read().decode()[-2000:]  # both attack cells, one per worker
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc, results, running


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_hands_their_cells_back(tmp_path):
    # SIGINT as a terminal's foreground job has it, even when the tests run as a background job
    # (whose SIGINT is ignored, and that would be inherited)
    proc, results, running = _two_workers_inside_their_cells(tmp_path, signal.SIG_DFL)
    try:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    with Store(results) as store:
        rows = store.cells("tiny")
        assert not [r for r in rows if r["status"] == "running"]  # every claimed cell handed back
        outcomes = runs_by_cell(store)
        assert all(outcomes[cid] == ["interrupted"] for cid in running)


def test_workers_option_is_checked_before_any_work(tmp_path, capsys):
    grid = write_grid(tmp_path)
    assert main(["bench", str(grid), "--results", str(tmp_path / "r"), "--workers", "0", *RUNTIME]) == 2
    assert "--workers 0: must be >= 1" in capsys.readouterr().err
    assert main(["bench", str(grid), "--results", str(tmp_path / "r"), "--workers", "2", "--executor", "ray",
                 *RUNTIME]) == 2
    assert "--cpus-per-cell" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_sigterm_to_a_background_bench_stops_every_worker_and_hands_their_cells_back(tmp_path):
    # a background job: SIGINT ignored (and inherited by the workers), stopped with `kill` (SIGTERM)
    proc, results, running = _two_workers_inside_their_cells(tmp_path, signal.SIG_IGN)
    try:
        t0 = time.time()
        proc.terminate()  # SIGTERM to the bench process alone
        proc.wait(timeout=120)
        assert time.time() - t0 < 30  # the workers were told at once, not after the parent's 60 s grace
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    with Store(results) as store:
        assert not [r for r in store.cells("tiny") if r["status"] == "running"]
        outcomes = runs_by_cell(store)
        assert all(outcomes[cid] == ["interrupted"] for cid in running)


def test_an_attack_cell_trained_again_keeps_its_earlier_compile_choice(tmp_path, monkeypatch):
    # with --compile auto a timing race picks compiled or eager, and the two round differently:
    # a model trained again must not hang on a new race
    import shutil

    from tsbd import pipeline
    from tsbd.bench.cells import earlier_compile_choice

    grid, results = write_grid(tmp_path), tmp_path / "results"
    assert earlier_compile_choice(results, "no-store-yet") is None
    seen = []
    real = pipeline.train_attacked_model

    def spy(setup, arch, cfg, runtime, **kw):
        seen.append(runtime.compile)
        model, meta = real(setup, arch, cfg, runtime, **kw)
        return model, {**meta, "compile": {"mode": runtime.compile, "compiled": False}}  # as a run that chose eager

    monkeypatch.setattr(pipeline, "train_attacked_model", spy)
    args = ["bench", str(grid), "--results", str(results), "--set", 'attack=["badnets"]', "--set",
            'defense=["none"]', "--device", "cpu", "--precision", "fp32", "--threads", "1", "--quiet"]
    assert main([*args, "--no-compile"]) == 0
    with Store(results) as store:
        (attack,) = [r for r in store.cells() if r["kind"] == "attack"]
        assert attack["versions"]["runtime"]["compiled"] is False
        assert earlier_compile_choice(results, attack["id"]) is False
        store.reopen([attack["id"]])
    shutil.rmtree(results / "artifacts")
    seen.clear()
    monkeypatch.setattr("tsbd.train.runtime.compile_mode", lambda value: "auto")  # a run left to choose
    assert main(args) == 0
    assert seen == ["off"]  # the earlier choice, not a new race
    assert earlier_compile_choice(results, "no-such-cell") is None


def test_copy_index_is_refreshed_after_every_cell_and_refuses_the_store_or_a_live_one(tmp_path, capsys):
    from tsbd.bench.store import is_snapshot

    plan = fake_plan(2, 1)
    copy = tmp_path / "kept" / "results.sqlite"
    seen = []  # done cells the copy shows as each cell starts

    def runner(cell, parent, ctx, cache):
        with sqlite3.connect(copy) as conn:
            seen.append(conn.execute("SELECT COUNT(*) FROM cells WHERE status = 'done'").fetchone()[0])
        return fake_runner()(cell, parent, ctx, cache)

    with Store(tmp_path / "results") as store:
        run_grid(plan, store, CellContext(str(tmp_path / "results")), runner=runner, copy_index=copy.parent)
    assert seen == [0, 1, 2, 3]  # written at the start, then after each finished cell
    assert is_snapshot(copy)
    with Store(copy) as kept:
        assert kept.counts("fake") == {"pending": 0, "running": 0, "done": 4, "failed": 0}

    grid, results = write_grid(tmp_path), tmp_path / "results2"
    assert main(["bench", str(grid), "--results", str(results), "--copy-index", str(results), *RUNTIME]) == 2
    assert "is the results store itself" in capsys.readouterr().err
    assert main(["bench", str(grid), "--results", str(results), "--copy-index", str(tmp_path / "results"),
                 *RUNTIME]) == 2
    assert "is a live results store, not a copy of one" in capsys.readouterr().err
    with Store(results) as store:
        assert store.runs() == []  # refused before any work
    assert main(["bench", str(grid), "--results", str(results), "--set", 'attack=["badnets"]', "--set",
                 'defense=["none"]', "--copy-index", str(copy.parent), *RUNTIME]) == 0  # an earlier copy is replaced
    with Store(copy) as kept:
        assert [r["status"] for r in kept.cells() if r["kind"] == "attack"] == ["done"]
