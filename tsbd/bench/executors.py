"""Executors: run a plan's cells into the store, sequentially in-process (``local``) or as Ray
tasks (``ray``).

Both follow the same protocol, which makes reruns resume and lets several bench processes share
one store: a cell is claimed in the store before it runs (``done`` cells are skipped, ``failed``
ones too unless retrying, cells another live process runs are waited for -- or, with ``no_wait``,
left to it), its artifact is
written, and only then is it marked done -- or failed with a one-line error, after which the grid
goes on. A defense cell runs once its attack cell is done; when that failed, the defense cell is
failed with the reason. Ctrl-C hands the running cells back (pending) before stopping.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import sqlite3
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from tsbd.bench.cells import CellContext, CellResult, DataCache, artifact_path, one_line_error, run_cell
from tsbd.bench.estimate import Estimator, longest_first
from tsbd.bench.grid import Cell, Plan
from tsbd.bench.store import Heartbeat, Store
from tsbd.errors import TsbdError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
CellRunner = Callable[[Cell, "Cell | None", CellContext, DataCache], CellResult]


@dataclasses.dataclass
class Summary:
    """What one ``run_grid`` call did."""

    total: int
    done: int = 0  # cells done at the end (this run or before)
    failed: int = 0  # cells failed at the end
    ran: int = 0  # cells this process ran to done
    errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (cell id, error) failed in this run
    seconds: float = 0.0
    crashed: list[str] = dataclasses.field(default_factory=list)  # worker processes that did not exit cleanly

    @property
    def left(self) -> int:
        """Cells neither done nor failed at the end: another live process runs them or their attack cell."""
        return self.total - self.done - self.failed


class _Progress:
    """The overall bar: cells finished (done or failed) out of the grid's total."""

    def __init__(self, plan: Plan, finished: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(plan.cells), initial=finished, desc=f"bench {plan.name}", unit="cell",
                        disable=not enabled, dynamic_ncols=True, position=0, leave=True)

    def step(self, label: str | None = None) -> None:
        self.bar.update(1)
        if label:
            self.bar.set_postfix_str(label, refresh=False)

    def show(self, label: str) -> None:
        self.bar.set_postfix_str(label)

    def close(self) -> None:
        self.bar.close()


class _Scheduler:
    """The claim protocol shared by the executors."""

    def __init__(self, plan: Plan, store: Store, retry_failed: bool, summary: Summary,
                 copy_index: str | Path | None = None):
        self.plan, self.store, self.retry_failed, self.summary = plan, store, retry_failed, summary
        self.copy_index = copy_index
        self.finished: set[str] = set()  # terminal for this run
        self.attempted: set[str] = set()  # claimed by this run (a failed cell is retried at most once)
        for cell in plan.cells:
            row = store.state(cell.id)
            if row and (row["status"] == "done" or (row["status"] == "failed" and not retry_failed)):
                self.finished.add(cell.id)

    def prepare(self, cell: Cell) -> str:
        """``finished`` (nothing to do, known before), ``skipped`` (nothing to do, found now: done by
        another process, or failed because its attack cell failed), ``wait`` (its parent or another
        process is not done) or ``claimed`` (this process must run it now)."""
        if cell.id in self.finished:
            return "finished"
        retry = self.retry_failed and cell.id not in self.attempted
        row = self.store.state(cell.id)
        if row["status"] == "done" or (row["status"] == "failed" and not retry):
            return self._finish(cell)
        if cell.parent is not None:
            parent = self.store.state(cell.parent)
            if parent["status"] == "failed" and (parent["id"] in self.finished or not self.retry_failed):
                error = f"not run: its attack cell {cell.parent} failed ({parent['error']})"
                if self.store.fail(cell.id, error, claim=True):
                    self.summary.errors.append((cell.id, error))
                return self._finish(cell)
            if parent["status"] != "done":
                return "wait"
        status = self.store.claim(cell.id, retry_failed=retry)
        if status == "claimed":
            self.attempted.add(cell.id)
            return "claimed"
        if status == "busy":
            return "wait"
        return self._finish(cell)

    def _finish(self, cell: Cell) -> str:
        self.finished.add(cell.id)
        return "skipped"

    def record(self, cell: Cell, result: CellResult | None, err: BaseException | None, detail: str = "") -> None:
        self.finished.add(cell.id)
        if err is None:
            if self.store.complete(cell.id, result):
                self.summary.ran += 1
                if cell.kind == "attack":
                    compare_retrained(self.store, cell, result.metrics)
                self.copy()
            else:
                log.warning("cell %s was taken over by another process; its result is not recorded", cell.id)
            return
        message = one_line_error(err)
        self.store.fail(cell.id, message, detail)
        self.summary.errors.append((cell.id, message))
        log.warning("cell %s (%s) failed: %s", cell.id, cell.label(), message)
        self.copy()

    def copy(self) -> None:
        """Refresh the copy of the store's index (--copy-index) after a cell finished; a copy that
        fails is a warning, never the grid's end."""
        if self.copy_index is None:
            return
        try:
            self.store.snapshot(self.copy_index)
        except (OSError, sqlite3.Error, TsbdError) as err:
            log.warning("could not copy the store's index to %s: %s", self.copy_index, err)

    def finalize(self, t0: float) -> Summary:
        self.summary.done, self.summary.failed, _ = _count(self.store, self.plan)
        self.summary.seconds = time.perf_counter() - t0
        return self.summary


def run_grid(plan: Plan, store: Store, ctx: CellContext, *, executor: str = "local", retry_failed: bool = False,
             progress: bool = False, runner: CellRunner = run_cell, address: str | None = None,
             cpus_per_cell: float = 1, gpus_per_cell: float = 0, poll_s: float = 2.0,
             heartbeat_s: float = 30.0, attacks_first: bool = False,
             copy_index: str | Path | None = None, no_wait: bool = False) -> Summary:
    """Run every cell of ``plan`` not yet done into ``store`` (registering the plan first).

    ``attacks_first`` (local executor): claim every attack cell before any defense cell, so that
    when several processes share the store the last attacked model starts training as early as
    possible and no process waits on it with nothing else to do; within each kind, the cells the
    store's done cells estimate the longest first (:func:`tsbd.bench.estimate.longest_first`), so
    that the grid does not end on one long cell while the other processes have nothing left.
    ``copy_index`` (a folder or a ``.sqlite`` file): a copy of the store's index
    (:meth:`Store.snapshot`, no models) is written there at the start and after every finished
    cell, so a results folder lost with its machine loses no finished cell's record.
    ``no_wait``: return as soon as every cell left is one another live process runs, or a defense
    of an attacked model it trains (``Summary.left`` counts them), instead of waiting to run what
    that process leaves or take over a cell if it dies; for chaining narrowed runs in a script."""
    if executor not in EXECUTORS:
        raise TsbdError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    store.register(plan)
    retrain_missing_models(plan, store, ctx.results_dir, retry_failed)
    t0 = time.perf_counter()
    summary = Summary(total=len(plan.cells))
    sched = _Scheduler(plan, store, retry_failed, summary, copy_index)
    sched.copy()
    bar = _Progress(plan, len(sched.finished), progress)
    try:
        with Heartbeat(store, heartbeat_s):
            if executor == "local":
                _run_local(plan, sched, ctx, bar, runner, poll_s, attacks_first, no_wait)
            else:
                _run_ray(plan, sched, ctx, bar, runner, address, cpus_per_cell, gpus_per_cell, poll_s, no_wait)
    finally:
        bar.close()
    return sched.finalize(t0)


def missing_models(plan: Plan, status: dict[str, str], results_dir: str | Path,
                   retry_failed: bool = False) -> list[str]:
    """The done attack cells (``status``: cell id -> status) whose model is not in ``results_dir``
    but that a defense cell of ``plan`` a run would run still needs."""
    will_run = ("pending", "running", "failed") if retry_failed else ("pending", "running")
    needed = {cell.parent for cell in plan.cells
              if cell.parent is not None and status.get(cell.id, "pending") in will_run}
    return [cid for cid in sorted(needed) if status.get(cid) == "done" and not artifact_path(results_dir, cid).is_dir()]


def retrain_missing_models(plan: Plan, store: Store, results_dir: str | Path, retry_failed: bool = False) -> list[str]:
    """Put back to pending every done attack cell whose model is not in ``results_dir`` but that a
    defense cell of ``plan`` this run will run still needs (a store merged from a report folder or
    from a slice sent back without artifacts), so it is trained again before its defenses run.
    Returns their ids."""
    missing = missing_models(plan, {row["id"]: row["status"] for row in store.cells()}, results_dir, retry_failed)
    if missing:
        store.reopen(missing)
        for cid in missing:
            log.warning("attack cell %s is done but its model is not in %s: training it again for the defense "
                        "cells that need it", cid, results_dir)
    return missing


def compare_retrained(store: Store, cell: Cell, metrics: dict) -> bool | None:
    """After an attack cell trained again (its model was missing, or --redo): whether the new model
    has the earlier one's clean ACC and ASR exactly (None: no earlier metrics kept). The answer is
    kept in the attempt's run history; a different model is a warning, because the defense cells
    done on the earlier model keep their metrics and DER against it."""
    before = store.previous_metrics(cell.id)
    if not before:
        return None
    keys = [k for k in ("acc", "asr") if isinstance(before.get(k), (int, float)) and k in metrics]
    same = all(before[k] == metrics[k] for k in keys)
    change = ", ".join(f"{k.upper()} {100 * before[k]:.2f} -> {100 * metrics[k]:.2f}%" for k in keys)
    store.note_attempt(cell.id, {"retrained": {"same": same, "before": {k: before[k] for k in keys}}})
    if same:
        log.info("attack cell %s (%s) trained again: the same clean ACC and ASR as its earlier model (%s)",
                 cell.id, cell.label(), change)
    else:
        log.warning("attack cell %s (%s) trained again gives another model (%s); its defense cells done on "
                    "the earlier model keep their metrics and DER against that one", cell.id, cell.label(), change)
    return same


# ------------------------------------------------------------------------------------------
def _run_local(plan: Plan, sched: _Scheduler, ctx: CellContext, bar: _Progress, runner: CellRunner,
               poll_s: float, attacks_first: bool = False, no_wait: bool = False) -> None:
    cache = DataCache()
    todo = list(plan.cells)
    if attacks_first:
        todo = longest_first(todo, Estimator.for_cells(sched.store.cells(), plan.cells, threads=ctx.threads),
                             ctx.results_dir)
    while todo:
        waiting = []
        for cell in todo:
            state = sched.prepare(cell)
            if state == "wait":
                waiting.append(cell)
                continue
            if state in ("finished", "skipped"):
                if state == "skipped":
                    bar.step()
                continue
            parent = plan.by_id.get(cell.parent) if cell.parent else None
            bar.show(cell.label())
            log.info("running %s cell %s (%s)", cell.kind, cell.id, cell.label())
            try:
                result = runner(cell, parent, ctx, cache)
            except Exception as err:  # the grid goes on; the error is recorded with the cell
                sched.record(cell, None, err, traceback.format_exc())
            except BaseException:  # Ctrl-C, SystemExit: hand the cell back, then stop
                sched.store.release(cell.id)
                raise
            else:
                sched.record(cell, result, None)
            bar.step()
        if waiting and len(waiting) == len(todo):
            if no_wait:
                _left_to_others(waiting)
                return
            time.sleep(poll_s)  # only cells another process is running, or their defenses
        todo = waiting


def _left_to_others(cells: list[Cell]) -> None:
    log.info("no-wait: stopping with %d cell(s) left to other processes: %s", len(cells),
             ", ".join(cell.label() for cell in cells))


# ------------------------------------------------------------------------------------------
_WORKER_CACHE: DataCache | None = None


def _ray_task(runner: CellRunner, cell: Cell, parent: Cell | None, ctx: CellContext) -> CellResult:
    """One cell in a Ray worker; the worker keeps the last dataset and attack setup it used."""
    global _WORKER_CACHE
    if _WORKER_CACHE is None:
        _WORKER_CACHE = DataCache()
    return runner(cell, parent, ctx, _WORKER_CACHE)


def import_ray():
    try:
        import ray
    except ImportError:
        raise TsbdError("the ray executor needs Ray: pip install 'tsbd[ray]' (or pip install ray)") from None
    return ray


def _ray_error(err: BaseException) -> BaseException:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def _run_ray(plan: Plan, sched: _Scheduler, ctx: CellContext, bar: _Progress, runner: CellRunner,
             address: str | None, cpus_per_cell: float, gpus_per_cell: float, poll_s: float,
             no_wait: bool = False) -> None:
    ray = import_ray()
    started_here = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        except ConnectionError as err:
            raise TsbdError(f"cannot connect to the Ray cluster at {address}: {err}") from None
        started_here = True
    task = ray.remote(_ray_task).options(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=0)
    # each worker gets as many threads as CPUs it reserved; workers draw no bars
    worker_ctx = dataclasses.replace(ctx, threads=max(1, int(cpus_per_cell)), progress=False)
    in_flight: dict = {}
    todo = list(plan.cells)
    try:
        while todo or in_flight:
            waiting = []
            for cell in todo:
                state = sched.prepare(cell)
                if state == "wait":
                    waiting.append(cell)
                elif state == "skipped":
                    bar.step()
                elif state == "claimed":
                    parent = plan.by_id.get(cell.parent) if cell.parent else None
                    in_flight[task.remote(runner, cell, parent, worker_ctx)] = cell
            todo = waiting
            if in_flight:
                bar.show(f"{len(in_flight)} running")
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=poll_s)
                for ref in ready:
                    cell = in_flight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as err:
                        cause = _ray_error(err)
                        sched.record(cell, None, cause, "".join(traceback.format_exception(cause))[-20000:])
                    else:
                        sched.record(cell, result, None)
                    bar.step(cell.label())
            elif todo:
                if no_wait:
                    _left_to_others(todo)
                    break
                time.sleep(poll_s)  # cells another process is running
    except BaseException:
        for ref, cell in in_flight.items():
            try:
                ray.cancel(ref, force=True)
            finally:
                sched.store.release(cell.id)
        raise
    finally:
        if started_here:
            ray.shutdown()


# ------------------------------------------------------------------------------------------
def _interrupt_once(signum, frame) -> None:
    """SIGINT or SIGTERM in a worker: stop (KeyboardInterrupt) and hand the cell back. A further
    SIGINT is ignored, so that a second one (the terminal's to the group, then the parent's) cannot
    cut that short; a further SIGTERM kills at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt


def _worker_main(plan: Plan, results_dir: str, ctx: CellContext, retry_failed: bool, poll_s: float,
                 runner: CellRunner, copy_index: str | Path | None = None, no_wait: bool = False) -> None:
    """One of ``run_workers``'s processes: the local executor on the shared store, attacks first."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job's ignored SIGINT stays ignored
        signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)  # `kill`, or the parent's stop when SIGINT is ignored
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with Store(results_dir) as store:
            run_grid(plan, store, ctx, retry_failed=retry_failed, progress=False, poll_s=poll_s,
                     runner=runner, attacks_first=True, copy_index=copy_index, no_wait=no_wait)
    except KeyboardInterrupt:  # the running cell was handed back by run_grid; exit quietly
        raise SystemExit(130) from None


def _count(store: Store, plan: Plan) -> tuple[int, int, dict[str, str]]:
    """(done, failed, {failed cell id: error}) over the plan's cells."""
    done, failed, errors = 0, 0, {}
    for cell in plan.cells:
        row = store.state(cell.id)
        if row["status"] == "done":
            done += 1
        elif row["status"] == "failed":
            failed += 1
            errors[cell.id] = row["error"] or ""
    return done, failed, errors


def run_workers(plan: Plan, store: Store, ctx: CellContext, workers: int, *, retry_failed: bool = False,
                progress: bool = False, runner: CellRunner = run_cell, poll_s: float = 2.0,
                stop_timeout_s: float = 60.0, copy_index: str | Path | None = None,
                no_wait: bool = False) -> Summary:
    """Run ``plan`` with ``workers`` processes on one store, each the local executor with
    ``ctx.threads // workers`` threads (at least one) and attack cells claimed first.

    The claim protocol keeps them from running a cell twice. Ctrl-C (SIGINT to the process group,
    as a terminal sends it, or to this process alone) stops every worker; each hands its running
    cell back, so a rerun resumes it from its last checkpoint (attack training, TSBD's stages and
    ANP's mask optimization after every epoch, NC after every label). ``no_wait`` as in
    :func:`run_grid`, for each worker."""
    if workers < 1:
        raise TsbdError(f"--workers {workers}: must be >= 1")
    store.register(plan)
    t0 = time.perf_counter()
    cores = ctx.threads or len(os.sched_getaffinity(0))
    worker_ctx = dataclasses.replace(ctx, threads=max(1, cores // workers), progress=False)
    done0, _, failed0 = _count(store, plan)
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    procs = [spawn.Process(target=_worker_main, name=f"tsbd-bench-worker-{i}", daemon=False,
                           args=(plan, str(Path(store.path).parent), worker_ctx, retry_failed, poll_s, runner,
                                 copy_index, no_wait))
             for i in range(workers)]
    bar = _Progress(plan, done0 + len(failed0), progress)
    # the workers inherit this process's SIGINT; where it is ignored (a background job) they are
    # stopped with SIGTERM instead, which they take the same way
    stop_signal = signal.SIGTERM if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else signal.SIGINT
    try:
        for proc in procs:
            proc.start()
        shown = done0 + len(failed0)
        while any(proc.is_alive() for proc in procs):
            for proc in procs:
                proc.join(timeout=poll_s / len(procs))
            done, failed, _ = _count(store, plan)
            if done + failed > shown:
                bar.bar.update(done + failed - shown)
                shown = done + failed
            bar.show(f"{sum(p.is_alive() for p in procs)} workers")
    except BaseException:
        # a terminal's Ctrl-C reached the workers too; give them a moment, then pass it on to those
        # still running (a SIGINT sent to this process alone), and terminate what does not stop
        grace = time.monotonic() + 5.0
        for proc in procs:
            proc.join(timeout=max(0.0, grace - time.monotonic()))
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, stop_signal)
        deadline = time.monotonic() + stop_timeout_s
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()  # its cell stays claimed by a dead process: the next run redoes it
                proc.join()
        raise
    finally:
        bar.close()
    done, failed, errors = _count(store, plan)
    summary = Summary(total=len(plan.cells), done=done, failed=failed, ran=done - done0,
                      errors=[(cid, err) for cid, err in errors.items() if cid not in failed0],
                      seconds=time.perf_counter() - t0)
    summary.crashed = [p.name for p in procs if p.exitcode not in (0, None)]
    if summary.crashed:
        log.warning("bench workers exited with an error: %s", ", ".join(summary.crashed))
    return summary
