"""``tsbd bench GRID``, ``tsbd report RESULTS_DIR`` and ``tsbd merge SOURCE... --into DEST``: run a
benchmark grid into a resumable results store, report on it, merge stores run elsewhere."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from tsbd.cli import common
from tsbd.errors import TsbdError

log = logging.getLogger(__name__)

DEFAULT_RESULTS = Path("runs") / "bench"

BENCH_EPILOG = """\
GRID is a TOML file or a preset:
{presets}

Grid keys (each axis a value or a list): dataset, model, preset, attack, defense, poison_ratio,
clean_ratio, seed, defense_seed, limit_train, limit_test; tables [train], [model_opts.NAME],
[attack_opts(.NAME)], [attack_opts.NAME.train] (one attack's training), [defense_opts(.NAME)],
[dataset_opts.NAME] whose list values are axes too. See docs/bench.md.

Rerunning the same command resumes: finished cells are never redone, a cell that was running
when the process died is redone from its last checkpoint (attack training, TSBD's stages and
ANP's mask optimization after every epoch, NC after every label), failed cells are kept failed
unless --retry-failed; --redo DEFENSE runs that defense's finished cells again.
Several bench processes may share one results folder; `tsbd merge` brings in results folders
run elsewhere (e.g. slices on a GPU machine).
"""


# ------------------------------------------------------------------------------------------
# commands (their imports are lazy: they keep `tsbd --help` fast and free of torch)
def cmd_bench(args) -> int:
    from rich.console import Console

    from tsbd.artifacts import check_output_folder
    from tsbd.bench.cells import CellContext, checkpoint_dir
    from tsbd.bench.executors import run_grid, run_workers
    from tsbd.bench.grid import load_grid, parse_set
    from tsbd.bench.store import DB_NAME, Store

    if args.workers < 1:
        raise TsbdError(f"--workers {args.workers}: must be >= 1")
    if args.workers > 1 and args.executor != "local":
        raise TsbdError("--workers runs local processes; with --executor ray set --cpus-per-cell instead")
    console = Console(stderr=True)
    plan = load_grid(args.grid, overrides=parse_set(args.set_values), data_root=args.data_root,
                     cache_dir=args.cache_dir, seeds=None if args.seed is None else [args.seed])
    results = Path(args.results) if args.results else DEFAULT_RESULTS / re.sub(r"[^A-Za-z0-9._-]+", "-", plan.name)
    plan = narrowed(plan, args.set_values, args.seed)
    redo = _redo_cells(plan, args.redo)
    if args.dry_run:  # reads the store where there is one; creates and changes nothing
        existing = Store(results, create=False) if (results / DB_NAME).is_file() else None
        try:
            cores = args.threads or len(os.sched_getaffinity(0))  # as Runtime.create and run_workers count
            _print_plan(plan, existing, console, results, threads=max(1, cores // args.workers),
                        machine=_machine(args.device, args.precision), retry_failed=args.retry_failed)
        finally:
            if existing is not None:
                existing.close()
        return 0
    # new, empty or a results store (resumed, never replaced); writable -- before any work
    check_output_folder(results, (DB_NAME,), overwrite=True, flag="--results")
    copy_index = _copy_index_target(args.copy_index, results)
    store = Store(results)
    try:
        new = store.register(plan)
        if redo:
            console.print(f"--redo: {store.reopen(redo)} finished cell(s) of {', '.join(args.redo)} put back to "
                          f"pending ({len(redo)} in the grid)")
            for cid in redo:  # stage checkpoints from the old code must not seed the redone cells
                if store.state(cid)["status"] == "pending":
                    shutil.rmtree(checkpoint_dir(results, cid), ignore_errors=True)
        counts = {"done": 0, "failed": 0, "running": 0, "pending": 0}
        for cell in plan.cells:
            counts[store.state(cell.id)["status"]] += 1
        console.print(f"[bold]{plan.describe()}[/] -> {results} ({new} new; {counts['done']} done, "
                      f"{counts['failed']} failed, {counts['running']} running, {counts['pending']} pending)")
        if args.register_only:
            return 0
        gpus = args.gpus_per_cell
        if gpus is None:
            import torch

            gpus = 1 if args.device != "cpu" and torch.cuda.is_available() else 0
        ctx = CellContext(str(results), device=args.device, precision=args.precision, threads=args.threads,
                          compile=args.compile, data_root=args.data_root, cache_dir=args.cache_dir,
                          progress=not args.quiet,
                          save_defended_models=bool(plan.spec.get("save_defended_models", True)))
        if args.workers > 1:
            summary = run_workers(plan, store, ctx, args.workers, retry_failed=args.retry_failed,
                                  progress=not args.quiet, copy_index=copy_index, no_wait=args.no_wait)
        else:
            summary = run_grid(plan, store, ctx, executor=args.executor, retry_failed=args.retry_failed,
                               progress=not args.quiet, address=args.address, cpus_per_cell=args.cpus_per_cell,
                               gpus_per_cell=gpus, copy_index=copy_index, no_wait=args.no_wait)
    finally:
        store.close()
    console.print(f"{summary.done}/{summary.total} cells done, {summary.failed} failed; this run: {summary.ran} "
                  f"cells in {summary.seconds / 60:.1f} min")
    for cell_id, error in summary.errors:
        console.print(f"  [red]failed[/] {cell_id}: {error}")
    if summary.left and not summary.crashed:
        console.print(f"{summary.left} cell(s) left to other live processes on {results}; a rerun "
                      f"after they stop runs whatever they did not finish")
    if args.report:
        from tsbd.bench.report import write_report

        files = write_report(results, grid=plan.name)
        console.print(f"report: {files['md']} and {files['html']}")
    if summary.crashed:
        console.print(f"[red]{len(summary.crashed)} worker(s) stopped before the grid was done[/] "
                      f"({', '.join(summary.crashed)}); rerun the same command: the cells they held are "
                      f"redone from their last checkpoint")
    if summary.failed:
        console.print("rerun with --retry-failed to try the failed cells again")
    return 1 if summary.failed or summary.crashed else 0


def _copy_index_target(path: str | None, results: Path) -> Path | None:
    """--copy-index PATH as the SQLite file to write, checked before any work: never the store
    itself nor another live store (only an earlier copy is replaced)."""
    from tsbd.bench.store import DB_NAME, db_file, is_snapshot

    if path is None:
        return None
    target = db_file(path)
    if target.resolve() == (results / DB_NAME).resolve():
        raise TsbdError(f"--copy-index {path} is the results store itself; name another folder, e.g. a report "
                        "folder kept under version control")
    if target.exists() and not is_snapshot(target):
        raise TsbdError(f"--copy-index {path}: {target} is a live results store, not a copy of one; name a new "
                        "folder or one that holds an earlier copy")
    if target.parent.exists() and not os.access(target.parent, os.W_OK):
        raise TsbdError(f"--copy-index {path}: {target.parent} is not writable; name a folder you can write")
    return target


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _redo_cells(plan, names: list[str] | None) -> list[str]:
    """The ids of ``plan``'s defense cells whose defense is one of ``names`` (--redo)."""
    if not names:
        return []
    in_grid = {c.config["defense"]["name"] for c in plan.cells if c.kind == "defense"}
    unknown = sorted(set(names) - in_grid)
    if unknown:
        raise TsbdError(f"--redo {', '.join(unknown)}: no such defense in this grid; it has "
                        f"{', '.join(sorted(in_grid)) or 'no defense cells'}")
    return [c.id for c in plan.cells if c.kind == "defense" and c.config["defense"]["name"] in names]


def narrowed(plan, set_values: list[str] | None, seed: int | None):
    """``plan`` renamed NAME+TAG when --set or --seed changed it: a narrowed or changed grid shares
    the results folder (and every cell it has in common) but records its membership under its own
    name, so the grid's own membership, which `tsbd report --grid NAME` shows, is not replaced."""
    if not set_values and seed is None:
        return plan
    tag = hashlib.sha256(json.dumps([list(set_values or []), seed]).encode()).hexdigest()[:8]
    return dataclasses.replace(plan, name=f"{plan.name}+{tag}")


def _machine(device: str, precision: str) -> tuple[str, str]:
    """(processor name, precision) a run here would record, as Runtime records them (the GPU's name
    on CUDA, as :func:`tsbd.bench.estimate.machine_of` reads them)."""
    from tsbd.train.runtime import processor_name, resolve_device, resolve_precision

    dev = resolve_device(device)
    return processor_name(dev), resolve_precision(precision, dev)


def _print_plan(plan, store, console, results: Path, threads: int | None = None,
                machine: tuple[str, str] | None = None, retry_failed: bool = False) -> None:
    """The cells of ``plan`` and their status in ``store`` (None: no store yet, all pending), with
    estimates for a run at ``threads`` threads per process on ``machine`` (processor, precision).
    A done attack cell whose model is missing but still needed shows as trained again, and counts; an
    attack cell whose training has a checkpoint counts only the share of its epochs still to train."""
    from rich.table import Table

    from tsbd.bench.estimate import Estimator, left_to_run, remaining, remaining_line
    from tsbd.bench.executors import missing_models

    states = {cell.id: (store.state(cell.id) if store is not None else None) or {} for cell in plan.cells}
    again = set(missing_models(plan, {cid: s.get("status", "pending") for cid, s in states.items()}, results,
                               retry_failed))
    counts = collections.Counter(s.get("status", "pending") for s in states.values())
    console.print(f"[bold]{plan.describe()}[/] -> {results} (dry run; {counts['done']} done, {counts['failed']} "
                  f"failed, {counts['running']} running, {counts['pending']} pending"
                  f"{'' if store is not None else '; no store there yet'})")
    stored = store.cells() if store is not None else []
    estimate = Estimator.for_cells(stored, plan.cells, threads=threads, machine=machine)
    table = Table(show_header=True, header_style="bold")
    for col in ("cell", "kind", "what", "status", "attempts", "est. min"):
        table.add_column(col)
    left = []
    for cell in plan.cells:
        row = states[cell.id]
        what = cell.label() if cell.kind == "attack" else f"  {cell.label()}"
        status = row.get("status", "pending")
        est = ""
        if cell.id in again:
            status = "done, model missing: trains again"
        if status != "done":
            e, note = left_to_run(estimate(cell.kind, cell.config, cell.parent), cell, results)
            status += f", {note}" if note else ""
            status += f", trains {e.uncounted} first unless cached (not in est.)" if e.uncounted else ""
            left.append(e)
            est = e.text()
        table.add_row(cell.id, cell.kind, what, status, str(row.get("attempts", 0)), est)
    console.print(table)
    if again:
        console.print(f"{len(again)} attacked model(s) not in {results / 'artifacts'} train again before the "
                      "defense cells that need them (counted below)")
    console.print(remaining_line(remaining(left)) + " est. min: from done cells of the same attack or defense "
                  "and options (~: another attack or other options; +: without what the attack trains first; "
                  "-: none)")


def cmd_report(args) -> int:
    from tsbd.artifacts import check_output_folder
    from tsbd.bench.report import HTML_NAME, MD_NAME, write_report

    own = not args.out or Path(args.out).resolve() == Path(args.results).resolve()
    # in the results folder the report is tsbd's own, rewritten on every report; elsewhere --out is
    # new, empty or an earlier report's folder, replaced only with --overwrite
    check_output_folder(args.results if own else args.out, (MD_NAME, HTML_NAME), overwrite=own or args.overwrite,
                        shared=own)
    files = write_report(args.results, out_dir=args.out, grid=args.grid, plots=not args.no_plots)
    print(files["md"])
    print(files["html"])
    return 0


def cmd_merge(args) -> int:
    from tsbd.artifacts import check_output_folder
    from tsbd.bench.merge import merge_results
    from tsbd.bench.store import DB_NAME

    check_output_folder(args.into, (DB_NAME,), overwrite=True, flag="--into")  # new, empty or a results store

    for source in args.sources:
        print(merge_results(source, args.into, artifacts=not args.no_artifacts).line())
    return 0


# ------------------------------------------------------------------------------------------
# parsers
def configure_bench(p: argparse.ArgumentParser) -> None:
    from tsbd.bench.executors import EXECUTORS  # lazy: only `tsbd bench` needs the grids and executors
    from tsbd.bench.grid import PRESETS

    presets = "\n".join(f"  {name}: {spec['description']}" for name, spec in PRESETS.items())
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = BENCH_EPILOG.format(presets=presets)
    p.add_argument("grid", help="TOML grid file or preset name (see below)")
    p.add_argument("--results", default=None,
                   help=f"results folder (default: {DEFAULT_RESULTS}/<grid name>)")
    p.add_argument("--set", action="append", dest="set_values", metavar="KEY=VALUE",
                   help="override a grid key, VALUE in TOML syntax (e.g. --set train.epochs=5 --set "
                        "'attack=[\"badnets\"]'); repeatable")
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: one cell after another in this process; ray: cells as Ray tasks (default: local)")
    p.add_argument("--workers", type=int, default=1,
                   help="local: run N processes on the results folder, each with threads/N CPU threads and the "
                        "attack cells first, so none waits on the last attacked model (default: 1)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: start a local Ray instance); needs a results folder all "
                        "nodes can reach")
    p.add_argument("--cpus-per-cell", type=float, default=1, help="Ray: CPUs reserved per cell (default: 1)")
    p.add_argument("--gpus-per-cell", type=float, default=None,
                   help="Ray: GPUs reserved per cell (default: 1 when the device is CUDA, else 0)")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells that failed before")
    p.add_argument("--no-wait", action="store_true",
                   help="stop once every cell left is run by another live process on the results folder (or is "
                        "a defense of a model one trains) instead of waiting to run it or take it over should "
                        "that process die; for chaining narrowed runs in a script")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their status; run and write nothing")
    p.add_argument("--register-only", action="store_true",
                   help="record the grid's cells in the results store (new ones as pending, creating the store) "
                        "and run nothing")
    p.add_argument("--redo", type=_names, default=None, metavar="DEFENSE[,DEFENSE...]",
                   help="first put this grid's finished cells of these defenses back to pending, so they run "
                        "again (after their code changed); attacked models are kept, earlier attempts stay in "
                        "each cell's run history (not with --dry-run)")
    p.add_argument("--report", action="store_true", help="write the report into the results folder at the end")
    p.add_argument("--copy-index", default=None, metavar="PATH",
                   help="after every finished cell, copy the store's index (every cell's record, no models) to "
                        "PATH, a folder or .sqlite file, e.g. a report folder under version control: a results "
                        "folder lost with its machine then loses no finished cell (`tsbd merge PATH` brings "
                        "them back)")
    common.add_data_root(p)
    common.add_runtime_args(p)
    p.set_defaults(func=cmd_bench, seed=None)
    for action in p._actions:  # the runtime group's --seed: here it overrides the grid's seed axis
        if action.dest == "seed":
            action.help = "run only this seed (default: the grid's seed axis)"


def configure_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results folder of `tsbd bench`")
    p.add_argument("--out", default=None, help="folder for report.md, report.html and plots/ (default: RESULTS; "
                                              "elsewhere a new or empty folder, or an earlier report's, which also "
                                              "gets a copy of the store's index, results.sqlite: with --grid, "
                                              "that grid's cells alone)")
    common.add_overwrite_arg(p, "an earlier report")
    p.add_argument("--grid", default=None,
                   help="only this grid's cells: NAME+TAG for one `--set`/`--seed` variant, a plain NAME for the "
                        "grid and all its variants (default: every cell in the folder)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.set_defaults(func=cmd_report)


def configure_merge(p: argparse.ArgumentParser) -> None:
    p.description = ("Merge results stores into --into, cell by cell: a cell --into lacks is added, one it has "
                     "unfinished takes the source's result, one it has done is kept. Grid memberships are united; "
                     "artifact folders are copied with their cells. One transaction per source.")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="results folder of `tsbd bench` or its results.sqlite")
    p.add_argument("--into", required=True, help="results folder to merge into (created if missing)")
    p.add_argument("--no-artifacts", action="store_true",
                   help="merge the rows only (e.g. to send back a small results file from a device)")
    p.set_defaults(func=cmd_merge)


COMMANDS = [
    common.Command("bench", "run a benchmark grid into a resumable results store", configure_bench),
    common.Command("report", "tables and plots (Markdown + HTML) from a bench results folder", configure_report),
    common.Command("merge", "merge bench results folders (e.g. slices run on a GPU machine) into one",
                   configure_merge),
]
