"""Merge one results store into another: ``tsbd merge SOURCE... --into DEST``.

The GPU machine gets only the checkout and sends back only files, so a slice of a grid run there
comes back as its results folder (or just its ``results.sqlite``); merging it into the local store
builds a table slice by slice. Cells are content-addressed, so the same cell from two stores is
the same row:

* a cell DEST lacks is added with its status, result, timings and attempt history;
* a cell DEST has but has not finished (pending, failed, or running with a dead owner) takes the
  SOURCE's result when SOURCE has it done (or its error when SOURCE has it failed);
* a cell DEST has done is kept as it is (reported as ``kept``), as is a failure DEST has recorded
  when SOURCE failed too, and a cell a live process runs;
* grid memberships are united (a grid DEST lacks is added; a grid both have gains SOURCE's cells).

Artifact folders are copied with their done cells when SOURCE is a folder that has them: first to
temporary names, before DEST's write lock is taken, then renamed into place inside the transaction
that records their rows; a done cell whose artifact did not come along is recorded with none. The
whole merge into DEST is one transaction: an interrupted
merge leaves DEST as it was (apart from whole artifact folders of cells it does not yet mark done).
SOURCE is only read (it is copied first, so a read-only folder fetched from a device is fine).
"""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import tempfile
from pathlib import Path

from tsbd.bench.cells import ARTIFACTS
from tsbd.bench.store import DB_NAME, SCHEMA_VERSION, Store
from tsbd.errors import TsbdError

RESULT_FIELDS = ("metrics_json", "timings_json", "versions_json", "host", "started", "finished", "error")


@dataclasses.dataclass
class MergeSummary:
    source: str
    added: int = 0  # cells DEST did not have
    updated: int = 0  # DEST's unfinished cells that took SOURCE's result
    kept: int = 0  # done (or failed in both) in DEST already: DEST's row kept
    busy: int = 0  # run by a live process in DEST: left alone
    artifacts: int = 0  # artifact folders copied
    grids: int = 0  # grids whose membership changed

    def line(self) -> str:
        return (f"{self.source}: {self.added} cells added, {self.updated} updated, {self.kept} kept (done already), "
                f"{self.busy} left to a running process; {self.artifacts} artifact folders copied; "
                f"{self.grids} grids updated")


def source_db(source: str | Path) -> tuple[Path, Path | None]:
    """(database file, results folder or None) of a SOURCE given as a folder or a .sqlite file."""
    path = Path(source)
    if path.is_dir():
        db = path / DB_NAME
        if not db.is_file():
            raise TsbdError(f"{path} has no {DB_NAME}; pass a results folder of `tsbd bench` or its .sqlite file")
        return db, path
    if path.is_file():
        return path, path.parent if path.name == DB_NAME else None
    raise TsbdError(f"no results store at {path}; pass a results folder of `tsbd bench` or its .sqlite file")


def _read_source(db: Path) -> dict:
    """Every row of SOURCE, read from a private copy (with its WAL, so unmerged writes count)."""
    with tempfile.TemporaryDirectory(prefix="tsbd-merge-") as tmp:
        copy = Path(tmp) / DB_NAME
        shutil.copyfile(db, copy)
        wal = db.with_name(db.name + "-wal")
        if wal.is_file():
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        try:
            conn = sqlite3.connect(copy)
            conn.row_factory = sqlite3.Row
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise TsbdError(f"{db} was written by a newer tsbd (schema {version}); upgrade tsbd to merge it")
            out = {
                "cells": [dict(r) for r in conn.execute(
                    "SELECT * FROM cells ORDER BY CASE kind WHEN 'attack' THEN 0 ELSE 1 END, rowid")],
                "runs": [dict(r) for r in conn.execute("SELECT * FROM runs ORDER BY cell, attempt")],
                "grids": [dict(r) for r in conn.execute("SELECT * FROM grids")],
                "grid_cells": [dict(r) for r in conn.execute("SELECT * FROM grid_cells ORDER BY grid, position")],
            }
            conn.close()
        except sqlite3.DatabaseError as err:
            raise TsbdError(f"{db} is not a usable results store ({err})") from None
    return out


def merge_results(source: str | Path, into: str | Path, *, artifacts: bool = True) -> MergeSummary:
    """Merge the results store at ``source`` into the one at ``into`` (created if missing)."""
    db, src_dir = source_db(source)
    dest_dir = Path(into)
    if dest_dir.exists() and not dest_dir.is_dir():
        raise TsbdError(f"--into {dest_dir} is a file; pass a results folder")
    if src_dir is not None and dest_dir.exists() and src_dir.resolve() == dest_dir.resolve():
        raise TsbdError(f"{source} and --into {into} are the same results folder; nothing to merge")
    rows = _read_source(db)
    summary = MergeSummary(str(source))
    runs_by_cell: dict[str, list[dict]] = {}
    for run in rows["runs"]:
        runs_by_cell.setdefault(run["cell"], []).append(run)

    with Store(dest_dir) as store:
        # artifact folders are copied before the write lock is taken (bench processes sharing DEST
        # keep writing meanwhile); the transaction only renames the copies it uses into place
        staged = _stage_artifacts(rows["cells"], store, src_dir, dest_dir) if artifacts else {}
        placed: list[Path] = []
        try:
            with store.transaction() as conn:
                # a report folder's copy of an index that results are merged into holds results of its own now:
                # a later `tsbd report --out` there must not replace it
                conn.execute("PRAGMA application_id = 0")
                for cell in rows["cells"]:
                    _merge_cell(conn, store, cell, runs_by_cell.get(cell["id"], []), staged, dest_dir, summary,
                                placed)
                for grid in rows["grids"]:
                    conn.execute("INSERT OR IGNORE INTO grids (name, spec_json, created, updated) VALUES (?, ?, ?, ?)",
                                 (grid["name"], grid["spec_json"], grid["created"], grid["updated"]))
                changed = set()
                for gc in rows["grid_cells"]:
                    cur = conn.execute("INSERT OR IGNORE INTO grid_cells (grid, cell, position) VALUES (?, ?, ?)",
                                       (gc["grid"], gc["cell"], gc["position"]))
                    if cur.rowcount:
                        changed.add(gc["grid"])
                summary.grids = len(changed)
        except BaseException:
            for path in placed:  # the rows that pointed at them were rolled back
                shutil.rmtree(path, ignore_errors=True)
            raise
        finally:
            for tmp in staged.values():  # copies not used (the cell was done in DEST by then)
                shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _merge_cell(conn, store: Store, cell: dict, runs: list[dict], staged: dict[str, Path], dest_dir: Path,
                summary: MergeSummary, placed: list[Path]) -> None:
    mine = conn.execute("SELECT status, owner, heartbeat, attempts FROM cells WHERE id = ?", (cell["id"],)).fetchone()
    finished = cell["status"] in ("done", "failed")
    if mine is not None:
        if mine["status"] == "done" or (mine["status"] == "failed" and cell["status"] == "failed"):
            summary.kept += finished
            return
        if mine["status"] == "running" and store.owner_alive(mine["owner"], mine["heartbeat"]):
            summary.busy += finished
            return
        if not finished:
            return  # neither has a result: nothing to take
    status = cell["status"] if finished else "pending"
    artifact = None
    if status == "done" and cell["id"] in staged:
        target = dest_dir / ARTIFACTS / cell["id"]
        if target.exists():  # a leftover of an unfinished local attempt: SOURCE's finished one replaces it
            shutil.rmtree(target)
        staged.pop(cell["id"]).rename(target)
        placed.append(target)
        artifact = str(Path(ARTIFACTS) / cell["id"])
        summary.artifacts += 1
    result = {k: cell[k] for k in RESULT_FIELDS} if finished else dict.fromkeys(RESULT_FIELDS)
    base = mine["attempts"] if mine is not None else 0
    attempts = base + (cell["attempts"] if finished else 0)
    if mine is None:
        conn.execute("INSERT INTO cells (id, kind, parent, config_json, status, attempts) VALUES (?, ?, ?, ?, ?, ?)",
                     (cell["id"], cell["kind"], cell["parent"], cell["config_json"], status, attempts))
        summary.added += 1
    else:
        summary.updated += 1
    conn.execute(f"UPDATE cells SET status = ?, artifact = ?, attempts = ?, owner = NULL, heartbeat = NULL, "
                 f"{', '.join(f'{k} = ?' for k in RESULT_FIELDS)} WHERE id = ?",
                 (status, artifact, attempts, *result.values(), cell["id"]))
    if mine is not None:  # a dead owner's attempt that SOURCE's result now supersedes
        conn.execute("UPDATE runs SET outcome = 'abandoned' WHERE cell = ? AND outcome = 'running'", (cell["id"],))
    for run in runs if finished else []:
        run = dict(run, attempt=base + run["attempt"])
        if run["outcome"] == "running":
            run["outcome"] = "abandoned"
        conn.execute(f"INSERT INTO runs ({', '.join(run)}) VALUES ({', '.join('?' * len(run))})", tuple(run.values()))


def _stage_artifacts(cells: list[dict], store: Store, src_dir: Path | None, dest_dir: Path) -> dict[str, Path]:
    """Copy the artifact folder of every SOURCE cell that is done there, not done in DEST, and whose
    folder came along, to a temporary name in DEST: {cell id: copy}."""
    staged: dict[str, Path] = {}
    if src_dir is None:
        return staged
    try:
        for cell in cells:
            if cell["status"] != "done" or not cell["artifact"]:
                continue
            src, mine = src_dir / cell["artifact"], store.state(cell["id"])
            if not src.is_dir() or (mine is not None and mine["status"] == "done"):
                continue
            tmp = dest_dir / ARTIFACTS / f".{cell['id']}.merging"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            staged[cell["id"]] = tmp
    except BaseException:
        for tmp in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return staged
