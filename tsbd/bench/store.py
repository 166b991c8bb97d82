"""The results store: one SQLite file (``RESULTS_DIR/results.sqlite``) shared by every bench
process and report.

Tables (schema version 1, in ``PRAGMA user_version``):

* ``cells`` -- one row per cell: ``id`` (content hash), ``kind`` (attack | defense), ``parent``
  (a defense cell's attack cell), ``config_json`` (what the id hashes), ``status`` (pending |
  running | done | failed), ``metrics_json``, ``timings_json``, ``error`` (one line),
  ``versions_json``, ``host``, ``started``, ``finished``, ``artifact`` (folder relative to the
  results folder), and for coordination ``attempts``, ``owner`` (host:pid:token of the process
  running it) and ``heartbeat`` (unix time, refreshed while it runs).
* ``runs`` -- one row per attempt at a cell: who, when, and how it ended (running | done |
  failed | abandoned | interrupted), with the error and its traceback.
* ``grids`` and ``grid_cells`` -- which cells each grid (by name) consists of.

Concurrency: WAL journal, a busy timeout, and every state change in one ``BEGIN IMMEDIATE``
transaction, so two processes never claim the same cell and never lose a row. A ``running`` row
whose owner is gone (same host: its pid no longer exists; any host: no heartbeat for
``stale_after`` seconds) is abandoned and may be claimed again.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tsbd.errors import TsbdError

SCHEMA_VERSION = 1
DB_NAME = "results.sqlite"
SNAPSHOT_ID = 0x74736264  # PRAGMA application_id of a copy made by Store.snapshot ("tsbd"); 0 in a live store
STATUSES = ("pending", "running", "done", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('attack', 'defense')),
    parent        TEXT REFERENCES cells(id),
    config_json   TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    metrics_json  TEXT,
    timings_json  TEXT,
    error         TEXT,
    versions_json TEXT,
    host          TEXT,
    started       TEXT,
    finished      TEXT,
    artifact      TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    owner         TEXT,
    heartbeat     REAL
);
CREATE INDEX IF NOT EXISTS cells_parent ON cells(parent);
CREATE INDEX IF NOT EXISTS cells_status ON cells(status);
CREATE TABLE IF NOT EXISTS runs (
    cell      TEXT NOT NULL REFERENCES cells(id),
    attempt   INTEGER NOT NULL,
    owner     TEXT NOT NULL,
    host      TEXT,
    started   TEXT NOT NULL,
    finished  TEXT,
    outcome   TEXT NOT NULL CHECK (outcome IN ('running', 'done', 'failed', 'abandoned', 'interrupted')),
    error     TEXT,
    detail    TEXT,
    PRIMARY KEY (cell, attempt)
);
CREATE TABLE IF NOT EXISTS grids (
    name      TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    created   TEXT NOT NULL,
    updated   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS grid_cells (
    grid     TEXT NOT NULL REFERENCES grids(name),
    cell     TEXT NOT NULL REFERENCES cells(id),
    position INTEGER NOT NULL,
    PRIMARY KEY (grid, cell)
);
"""


def _keep_grid(conn: sqlite3.Connection, grids: str | Sequence[str]) -> None:
    """Cut a copied index down to some grids: their membership, their cells and the cells' parents, their runs."""
    names = [grids] if isinstance(grids, str) else list(grids)
    marks = ", ".join("?" * len(names))
    with conn:
        conn.execute(f"DELETE FROM grid_cells WHERE grid NOT IN ({marks})", names)
        conn.execute(f"DELETE FROM grids WHERE name NOT IN ({marks})", names)
        keep = ("SELECT cell FROM grid_cells UNION SELECT c.parent FROM cells c JOIN grid_cells g ON g.cell = c.id "
                "WHERE c.parent IS NOT NULL")  # (a NULL in NOT IN's list would keep every row)
        conn.execute(f"DELETE FROM runs WHERE cell NOT IN ({keep})")
        conn.execute(f"DELETE FROM cells WHERE id NOT IN ({keep})")
    conn.execute("VACUUM")


def now_iso() -> str:
    """Now, in UTC, to the second (the timestamps of the store and of cell results)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def db_file(path: str | Path) -> Path:
    """The SQLite file of a results store given as its folder or as the ``.sqlite`` file itself."""
    path = Path(path)
    return path / DB_NAME if path.is_dir() or path.suffix != ".sqlite" else path


def is_snapshot(path: str | Path) -> bool:
    """Whether the SQLite file ``path`` is a copy made by :meth:`Store.snapshot` (not a live store)."""
    conn = sqlite3.connect(f"file:{Path(path).as_posix()}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA application_id").fetchone()[0] == SNAPSHOT_ID
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()


class Store:
    """A connection to the results store of one results folder (created on first use)."""

    def __init__(self, path: str | Path, *, owner: str | None = None, busy_timeout_s: float = 120.0,
                 stale_after_s: float = 600.0, create: bool = True):
        path = db_file(path)
        if not create and not path.is_file():
            raise TsbdError(f"no results store at {path}; run `tsbd bench` with --results {path.parent} first")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.host = socket.gethostname()
        self.owner = owner or f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stale_after_s = stale_after_s
        self.busy_timeout_s = busy_timeout_s
        self._conn = self._connect()
        self._init_schema()

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            self._set_wal(conn)
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as err:
            raise TsbdError(f"{self.path} is not a usable results store ({err}); "
                            "pass another --results folder") from None
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL. Two processes opening a new store at the same moment can get "database
        is locked" here at once -- when both hold a read lock SQLite returns busy without running
        the busy handler -- so retry until the busy timeout (measured: 1 in 40 simultaneous
        first opens failed before; 0 in 80 after)."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _init_schema(self) -> None:
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise TsbdError(f"{self.path} was written by a newer tsbd (schema {version}); upgrade tsbd to use it")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error): takes the write lock up front,
        so a read-then-write inside cannot race another process."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()

    def snapshot(self, dest: str | Path, grid: str | Sequence[str] | None = None) -> Path:
        """Copy the store's index -- every cell, its metrics, timings and run history, no
        artifacts -- into ``dest`` (a folder or a ``.sqlite`` file) as one self-contained SQLite
        file, consistent even while other processes write (SQLite's online backup). With ``grid``
        (one name or several) the copy keeps those grids alone: their cells, the attacked models
        they defend and their runs.
        Written to a temporary name and renamed, so ``dest`` is never half a store. ``tsbd report``
        and ``tsbd merge`` read the copy like any results folder."""
        dest = db_file(dest)
        if dest.resolve() == self.path.resolve():
            raise TsbdError(f"{dest} is this store itself; choose another folder for its copy")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            copy = sqlite3.connect(tmp)
            try:
                self._conn.backup(copy)
                if grid is not None:
                    _keep_grid(copy, grid)
                copy.execute("PRAGMA journal_mode = DELETE")  # one file, no -wal beside it
                copy.execute(f"PRAGMA application_id = {SNAPSHOT_ID}")
            finally:
                copy.close()
            tmp.replace(dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dest

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- planning --------------------------------------------------------------------------
    def register(self, plan) -> int:
        """Add the plan's cells (new ones as pending) and record the grid's membership.
        Returns the number of new cells."""
        now = now_iso()
        with self.transaction() as conn:
            conn.execute("PRAGMA application_id = 0")  # a copy that a grid runs on is a live store
            before = conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
            conn.executemany(
                "INSERT OR IGNORE INTO cells (id, kind, parent, config_json, status) VALUES (?, ?, ?, ?, 'pending')",
                [(c.id, c.kind, c.parent, json.dumps(c.config, sort_keys=True)) for c in plan.cells])
            after = conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
            conn.execute("INSERT INTO grids (name, spec_json, created, updated) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT(name) DO UPDATE SET spec_json = excluded.spec_json, updated = excluded.updated",
                         (plan.name, json.dumps(plan.spec, sort_keys=True, default=str), now, now))
            conn.execute("DELETE FROM grid_cells WHERE grid = ?", (plan.name,))
            conn.executemany("INSERT INTO grid_cells (grid, cell, position) VALUES (?, ?, ?)",
                             [(plan.name, c.id, i) for i, c in enumerate(plan.cells)])
        return after - before

    # -- state changes ---------------------------------------------------------------------
    def owner_alive(self, owner: str | None, heartbeat: float | None) -> bool:
        if not owner:
            return False
        if owner == self.owner:
            return True
        host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        if host == self.host and pid.isdigit() and not pid_alive(int(pid)):
            return False  # died on this host: no need to wait for its heartbeat to go stale
        # elsewhere (or a pid reused since): alive while its heartbeat thread keeps beating
        return heartbeat is not None and time.time() - heartbeat < self.stale_after_s

    def claim(self, cell_id: str, *, retry_failed: bool = False) -> str:
        """Try to take ``cell_id`` for this process. Returns ``claimed``, ``done``, ``failed``
        (and not retrying), ``busy`` (another live process runs it) or ``missing``."""
        now = now_iso()
        with self.transaction() as conn:
            row = conn.execute("SELECT status, owner, heartbeat, attempts FROM cells WHERE id = ?",
                               (cell_id,)).fetchone()
            if row is None:
                return "missing"
            status = row["status"]
            if status == "done":
                return "done"
            if status == "failed" and not retry_failed:
                return "failed"
            if status == "running":
                if row["owner"] != self.owner and self.owner_alive(row["owner"], row["heartbeat"]):
                    return "busy"
                conn.execute("UPDATE runs SET outcome = 'abandoned', finished = ? "
                             "WHERE cell = ? AND outcome = 'running'", (now, cell_id))
            attempt = row["attempts"] + 1
            conn.execute("UPDATE cells SET status = 'running', owner = ?, host = ?, started = ?, finished = NULL, "
                         "heartbeat = ?, attempts = ?, error = NULL WHERE id = ?",
                         (self.owner, self.host, now, time.time(), attempt, cell_id))
            conn.execute("INSERT INTO runs (cell, attempt, owner, host, started, outcome) "
                         "VALUES (?, ?, ?, ?, ?, 'running')", (cell_id, attempt, self.owner, self.host, now))
        return "claimed"

    def complete(self, cell_id: str, result) -> bool:
        """Mark a claimed cell done with its result (a :class:`~tsbd.bench.cells.CellResult`), in one
        transaction. False when this process no longer owns the cell (it was taken over)."""
        now = now_iso()
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE cells SET status = 'done', metrics_json = ?, timings_json = ?, versions_json = ?, host = ?, "
                "started = ?, finished = ?, artifact = ?, error = NULL, heartbeat = NULL "
                "WHERE id = ? AND owner = ? AND status = 'running'",
                (json.dumps(result.metrics), json.dumps(result.timings), json.dumps(result.versions), result.host,
                 result.started, result.finished or now, result.artifact, cell_id, self.owner))
            if cur.rowcount != 1:
                return False
            conn.execute("UPDATE runs SET outcome = 'done', finished = ?, host = ? WHERE cell = ? AND owner = ? "
                         "AND outcome = 'running'", (now, result.host, cell_id, self.owner))
        return True

    def fail(self, cell_id: str, error: str, detail: str = "", *, claim: bool = False) -> bool:
        """Mark a cell failed with a one-line ``error``. With ``claim=True`` a cell this process does
        not hold is failed directly (a defense whose attacked model failed)."""
        now = now_iso()
        error = " ".join(str(error).split())
        with self.transaction() as conn:
            if claim:
                row = conn.execute("SELECT status, owner, heartbeat FROM cells WHERE id = ?", (cell_id,)).fetchone()
                if row is None or row["status"] == "done":
                    return False
                if row["status"] == "running" and row["owner"] != self.owner and \
                        self.owner_alive(row["owner"], row["heartbeat"]):
                    return False
                conn.execute("UPDATE cells SET owner = ? WHERE id = ?", (self.owner, cell_id))
            cur = conn.execute("UPDATE cells SET status = 'failed', error = ?, finished = ?, heartbeat = NULL "
                               "WHERE id = ? AND owner = ?", (error, now, cell_id, self.owner))
            if cur.rowcount != 1:
                return False
            conn.execute("UPDATE runs SET outcome = 'failed', finished = ?, error = ?, detail = ? "
                         "WHERE cell = ? AND owner = ? AND outcome = 'running'",
                         (now, error, detail, cell_id, self.owner))
        return True

    def release(self, cell_id: str) -> None:
        """Give a claimed cell back (Ctrl-C): pending again, its attempt recorded as interrupted."""
        now = now_iso()
        with self.transaction() as conn:
            conn.execute("UPDATE cells SET status = 'pending', owner = NULL, heartbeat = NULL "
                         "WHERE id = ? AND owner = ? AND status = 'running'", (cell_id, self.owner))
            conn.execute("UPDATE runs SET outcome = 'interrupted', finished = ? WHERE cell = ? AND owner = ? "
                         "AND outcome = 'running'", (now, cell_id, self.owner))

    def reopen(self, cell_ids: list[str]) -> int:
        """Put finished (done or failed) cells back to pending, their metrics cleared, so the next run
        redoes them (e.g. after their method's code changed). Running cells are left alone; each
        cell's earlier attempts stay in its run history, a done one with its metrics (as JSON
        ``{"metrics": ...}`` in its ``detail``, read back by :meth:`previous_metrics`). Returns the
        number reopened."""
        with self.transaction() as conn:
            n = 0
            for cid in cell_ids:
                row = conn.execute("SELECT metrics_json FROM cells WHERE id = ? AND status = 'done'",
                                   (cid,)).fetchone()
                last = conn.execute("SELECT attempt, detail FROM runs WHERE cell = ? AND outcome = 'done' "
                                    "ORDER BY attempt DESC LIMIT 1", (cid,)).fetchone()
                if row is not None and row["metrics_json"] and last is not None:
                    kept = _json_dict(last["detail"])
                    if kept is not None:  # a done attempt's detail is empty or a note of ours
                        kept["metrics"] = json.loads(row["metrics_json"])
                        conn.execute("UPDATE runs SET detail = ? WHERE cell = ? AND attempt = ?",
                                     (json.dumps(kept), cid, last["attempt"]))
                n += conn.execute(
                    "UPDATE cells SET status = 'pending', metrics_json = NULL, timings_json = NULL, error = NULL, "
                    "owner = NULL, heartbeat = NULL WHERE id = ? AND status IN ('done', 'failed')", (cid,)).rowcount
            return n

    def previous_metrics(self, cell_id: str) -> dict | None:
        """The metrics of the cell's latest done attempt before it was reopened (:meth:`reopen`), or None."""
        rows = self._conn.execute("SELECT detail FROM runs WHERE cell = ? AND outcome = 'done' AND detail IS NOT NULL "
                                  "ORDER BY attempt DESC", (cell_id,)).fetchall()
        for row in rows:
            kept = _json_dict(row["detail"])
            if kept and isinstance(kept.get("metrics"), dict):
                return kept["metrics"]
        return None

    def done_attempt_detail(self, cell_id: str) -> dict:
        """The detail of the cell's latest done attempt as a JSON object ({} when it has none or
        holds other text)."""
        row = self._conn.execute("SELECT detail FROM runs WHERE cell = ? AND outcome = 'done' ORDER BY attempt DESC "
                                 "LIMIT 1", (cell_id,)).fetchone()
        return (_json_dict(row["detail"]) or {}) if row is not None else {}

    def note_attempt(self, cell_id: str, note: dict) -> None:
        """Add ``note``'s keys to the detail (a JSON object) of the cell's latest attempt."""
        with self.transaction() as conn:
            last = conn.execute("SELECT attempt, detail FROM runs WHERE cell = ? ORDER BY attempt DESC LIMIT 1",
                                (cell_id,)).fetchone()
            kept = _json_dict(last["detail"]) if last is not None else None
            if kept is not None:
                conn.execute("UPDATE runs SET detail = ? WHERE cell = ? AND attempt = ?",
                             (json.dumps({**kept, **note}), cell_id, last["attempt"]))

    def beat(self) -> None:
        """Refresh the heartbeat of every cell this process runs."""
        with self.transaction() as conn:
            conn.execute("UPDATE cells SET heartbeat = ? WHERE owner = ? AND status = 'running'",
                         (time.time(), self.owner))

    # -- reading ---------------------------------------------------------------------------
    def state(self, cell_id: str) -> dict | None:
        row = self._conn.execute("SELECT * FROM cells WHERE id = ?", (cell_id,)).fetchone()
        return _decode(row) if row else None

    def cells(self, grid: str | Sequence[str] | None = None, status: str | None = None) -> list[dict]:
        """Cells in the order their grids list them (each once), or the whole store's in insertion order."""
        if grid is not None and not isinstance(grid, str):
            seen: dict[str, dict] = {}
            for name in grid:
                for row in self.cells(name, status):
                    seen.setdefault(row["id"], row)
            return list(seen.values())
        sql = "SELECT c.* FROM cells c"
        args: list[Any] = []
        where = []
        if grid is not None:
            sql += " JOIN grid_cells g ON g.cell = c.id"
            where.append("g.grid = ?")
            args.append(grid)
        if status is not None:
            where.append("c.status = ?")
            args.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY g.position" if grid is not None else " ORDER BY c.rowid"
        return [_decode(r) for r in self._conn.execute(sql, args).fetchall()]

    def runs(self, cell_id: str | None = None) -> list[dict]:
        if cell_id is None:
            rows = self._conn.execute("SELECT * FROM runs ORDER BY cell, attempt").fetchall()
        else:
            rows = self._conn.execute("SELECT * FROM runs WHERE cell = ? ORDER BY attempt", (cell_id,)).fetchall()
        return [dict(r) for r in rows]

    def grids(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT name FROM grids ORDER BY created, name").fetchall()]

    def select_grids(self, name: str) -> list[str]:
        """The grids ``name`` means: itself when the store has a grid of that exact name (``NAME`` or
        ``NAME+TAG``), else every ``--set``/``--seed`` variant ``NAME+TAG`` of a plain ``NAME``."""
        have = self.grids()
        if name in have:
            return [name]
        variants = [g for g in have if "+" not in name and g.partition("+")[0] == name]
        if not variants:
            raise TsbdError(f"no grid {name!r} in {self.path.parent}; it has: {', '.join(have) or 'none'}")
        return variants

    def counts(self, grid: str | None = None) -> dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for row in self.cells(grid):
            out[row["status"]] += 1
        return out


def _decode(row: sqlite3.Row) -> dict:
    out = dict(row)
    for key in ("config_json", "metrics_json", "timings_json", "versions_json"):
        value = out.pop(key)
        out[key[: -len("_json")]] = json.loads(value) if value else None
    return out


class Heartbeat:
    """A daemon thread refreshing this process's running cells every ``interval_s`` seconds,
    through its own connection, so that other hosts see them alive."""

    def __init__(self, store: Store, interval_s: float = 30.0):
        self.store_path, self.owner, self.interval_s = store.path, store.owner, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tsbd-bench-heartbeat", daemon=True)

    def _run(self) -> None:
        store = None
        try:
            store = Store(self.store_path, owner=self.owner)
            while not self._stop.wait(self.interval_s):
                with contextlib.suppress(sqlite3.Error):  # a busy store: the next beat will do
                    store.beat()
        finally:
            if store is not None:
                store.close()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _json_dict(detail: str | None) -> dict | None:
    """A run's ``detail`` as a JSON object: {} when empty, None when it holds other text (a traceback)."""
    if not detail:
        return {}
    try:
        value = json.loads(detail)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
