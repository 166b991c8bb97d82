"""How long the cells a grid has not finished would take, read off the cells of the same kind it
has finished: a planning number for ``tsbd bench --dry-run`` and the report, never a result.

A cell's estimate is the mean recorded time (``timings.cell``, else ``timings.total``, as the report
counts compute) of the done cells most like it, with the basis said:

* ``same``: the same attack (or defense with the same options and clean ratio) on the same data set,
  model and training settings;
* ``like``: an attack cell with another attack but the same data set, model and training, counting
  that cell's training and evaluation but not its setup, or a defense cell of the same defense and
  clean ratio on the same data set and model but with other options;
* an attack that trains something of its own first (Input-aware's generator, Trojan's clean model
  and trigger: :meth:`Attack.builds_first`) is estimated without any cell's setup, ``same`` ones
  too, since whether that thing is built or read from the cache depends on the machine's cache, not
  on the grid; its estimate names what it leaves out;
* no estimate where the store has no done cell like it.

The times are those of the machines and thread counts the cells ran on (the report names the
hosts), so the estimate holds for the same kind of run there. Given the thread count of the run
planned, an estimate averages only the like cells that ran at it, where there are any, and the
summary line says which thread count its times are from. Given also the processor and precision
of the run planned, it prefers the like cells that ran at that thread count on a processor of the
same name in the same precision (an AVX2-only CPU in fp32 and one with AVX512-BF16 in bf16 differ
severalfold), and the summary counts the estimates that had to come from another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tsbd.bench.grid import canonical_json
from tsbd.defenses import DEFENSES
from tsbd.errors import TsbdError


@dataclasses.dataclass(frozen=True)
class Estimate:
    seconds: float | None  # None: no done cell like it
    basis: str  # "same" | "like" | ""
    n: int = 0  # done cells the mean is over
    threads: int | None = None  # the thread count those cells all ran at (None: mixed or unrecorded)
    elsewhere: bool = False  # a machine was planned for and none of those cells ran on one like it
    uncounted: str = ""  # what the cell builds first that ``seconds`` leaves out (:meth:`Attack.builds_first`)

    def text(self) -> str:
        if self.seconds is None:
            return "-"
        return f"{self.seconds / 60:.0f}" + ("" if self.basis == "same" else "~") + ("+" if self.uncounted else "")


def cell_seconds(row: dict) -> float | None:
    """The time a done cell recorded (what the report sums as compute), or None. An attacked model
    resumed from an epoch checkpoint records the run that finished it as ``total`` and its training
    over every run as ``train`` (``train_this_run``: the last run's); the earlier runs' epochs count.
    A defense cell resumed from its stage checkpoints records those epochs as ``earlier_runs``."""
    t = row.get("timings") or {}
    value = t.get("cell", t.get("total"))
    if value is not None and "train_this_run" in t and "train" in t:
        value = value - t["train_this_run"] + t["train"]
    if value is not None:
        value += t.get("earlier_runs", 0.0)
    return float(value) if value is not None else None


def _setting(config: dict) -> dict:
    """What of an attack cell's config sets the cost of its defenses too: data set, model, training."""
    ds = config.get("dataset", {})
    return {"dataset": [ds.get("name"), ds.get("options"), ds.get("limit_train"), ds.get("limit_test")],
            "model": config.get("model"), "train": config.get("train")}


def _keys(kind: str, config: dict, parent: dict | None) -> tuple[str, str] | None:
    """(same, like) keys of a cell; None for a defense cell whose attack cell is unknown."""
    if kind == "attack":
        setting = _setting(config)
        return (canonical_json(["attack", config["attack"], setting]), canonical_json(["attack", setting]))
    if parent is None:
        return None
    setting, d = _setting(parent), config["defense"]
    return (canonical_json(["defense", d["name"], d.get("config"), config.get("clean_ratio"), setting]),
            canonical_json(["defense", d["name"], config.get("clean_ratio"), setting]))


def machine_of(row: dict) -> tuple[str, str] | None:
    """(processor, precision) a store row's cell ran on, as its runtime recorded them: the GPU's name
    where it ran on one (its host CPU says nothing of its speed), else the CPU's; None if unrecorded."""
    runtime = (row.get("versions") or {}).get("runtime") or {}
    name = runtime.get("gpu") or runtime.get("cpu")
    return (name, runtime["precision"]) if name and "precision" in runtime else None


class Estimator:
    """Estimates from ``rows`` (store rows: kind, config, parent, status, timings); ``config_of(id)``
    gives the config of an attack cell, for the defense cells' data set and model."""

    def __init__(self, rows: Iterable[dict], config_of: Callable[[str], dict | None], threads: int | None = None,
                 machine: tuple[str, str] | None = None):
        """``threads``: the thread count the estimate is for; where done cells like a cell ran at
        that count, only those are averaged (a cell's time at 1 thread is not its time at 2).
        ``machine``: (processor name, precision) of the run planned -- the GPU's name for a run on
        one (:func:`machine_of`); among those, the cells that ran on such a machine are preferred
        where there are any."""
        self._config_of = config_of
        self._threads = threads
        self._machine = machine
        self._times: dict[str, list[tuple[float, int | None, tuple[str, str] | None, dict]]] = {}
        for row in rows:
            secs = cell_seconds(row) if row.get("status") == "done" else None
            keys = self._keys_of(row["kind"], row["config"], row.get("parent")) if secs is not None else None
            threads = ((row.get("versions") or {}).get("runtime") or {}).get("threads")
            for key in keys or ():
                self._times.setdefault(key, []).append((secs, threads, machine_of(row), row))

    @classmethod
    def for_cells(cls, rows: list[dict], cells: Iterable = (), threads: int | None = None,
                  machine: tuple[str, str] | None = None) -> Estimator:
        """An estimator from the store's ``rows`` for ``cells`` (grid cells, perhaps not yet stored):
        a defense cell's attack config is looked up among both."""
        configs = {r["id"]: r["config"] for r in rows} | {cell.id: cell.config for cell in cells}
        return cls(rows, configs.get, threads=threads, machine=machine)

    def _keys_of(self, kind: str, config: dict, parent_id: str | None) -> tuple[str, str] | None:
        parent = self._config_of(parent_id) if kind == "defense" and parent_id else None
        return _keys(kind, config, parent)

    def __call__(self, kind: str, config: dict, parent_id: str | None = None) -> Estimate:
        keys = self._keys_of(kind, config, parent_id)
        for key, basis in zip(keys or (), ("same", "like")):
            times = self._times.get(key)
            if times:
                matching = [t for t in times if t[1] == self._threads]
                times = matching if self._threads is not None and matching else times
                here = [t for t in times if t[2] == self._machine]
                times = here if self._machine is not None and here else times
                counts = {t[1] for t in times}
                builds = _builds_first(config) if kind == "attack" else ""
                seconds = [t[0] if basis == "same" and not builds else _seconds_like(kind, config, t[3], t[0])
                           for t in times]
                return Estimate(sum(seconds) / len(seconds), basis, len(times),
                                counts.pop() if len(counts) == 1 else None,
                                elsewhere=self._machine is not None and not here, uncounted=builds)
        return Estimate(None, "")


def _builds_first(config: dict) -> str:
    """What the attack of an attack cell's ``config`` trains before its model (:meth:`Attack.builds_first`)."""
    from tsbd.attacks import build_attack

    attack = config.get("attack") or {}
    try:
        return build_attack(attack["name"], attack.get("config")).builds_first()
    except (TsbdError, KeyError, TypeError):  # an attack this install does not have, or other options
        return ""


def _seconds_like(kind: str, config: dict, like: dict, like_seconds: float) -> float:
    """A like cell's time (or a same cell's, for an attack that trains something first): an attack
    cell's without its setup (the trigger, generator or clean model its own attack built), a defense
    cell's scaled by its defense for the options that differ
    (:meth:`Defense.seconds_like`)."""
    if kind == "attack":
        return max(like_seconds - float((like.get("timings") or {}).get("setup") or 0.0), 0.0)
    if kind != "defense":
        return like_seconds
    try:
        method = DEFENSES.get(config["defense"]["name"])
    except TsbdError:  # a defense this install does not have: its cells' times as they are
        return like_seconds
    return method.seconds_like(config["defense"].get("config") or {}, like["config"]["defense"].get("config") or {},
                               like.get("timings") or {}, like_seconds)


def left_to_run(e: Estimate, cell: Any, results_dir: str | Path | None) -> tuple[Estimate, str]:
    """The part of ``e``, the estimate of grid ``cell``, still to run, and a note saying why: an attack
    cell whose training checkpointed K of its N epochs in ``results_dir`` has (N-K)/N of it left
    ("K/N epochs checkpointed"); any other cell all of it ("")."""
    from tsbd.bench.cells import checkpointed_epochs

    epochs = int((cell.config.get("train") or {}).get("epochs") or 0)
    done = checkpointed_epochs(results_dir, cell.id) if results_dir and cell.kind == "attack" and epochs else 0
    if not done:
        return e, ""
    done = min(done, epochs)
    if e.seconds is not None:
        e = dataclasses.replace(e, seconds=e.seconds * (epochs - done) / epochs)
    return e, f"{done}/{epochs} epochs checkpointed"


def longest_first(cells: Iterable, estimate: Estimator, results_dir: str | Path | None = None) -> list:
    """``cells`` (grid cells: kind, config, parent) in the order several workers should claim them:
    attack cells before defense cells, and within each kind the longest estimated first (a cell with
    no estimate, or one whose attack trains something first that its estimate leaves out, counts as
    the longest, since it may be; an attack cell resumed from a checkpoint in
    ``results_dir`` by the epochs it has left), the grid's order among equals. Claiming the long
    cells first keeps the last cells to finish short, so no worker waits long on another."""
    cells = list(cells)

    def key(item: tuple[int, Any]) -> tuple[bool, float, int]:
        i, cell = item
        e = left_to_run(estimate(cell.kind, cell.config, cell.parent), cell, results_dir)[0]
        return cell.kind != "attack", -(float("inf") if e.seconds is None or e.uncounted else e.seconds), i

    return [cell for _, cell in sorted(enumerate(cells), key=key)]


def remaining(estimates: Iterable[Estimate]) -> dict[str, Any]:
    """Sum of the estimates: {"cells", "seconds", "unknown" (cells without one), "like" (by a like cell),
    "elsewhere" (only from another machine), "threads" (the one thread count they are all from, or None),
    "uncounted" (cells that build something first their estimate leaves out)}."""
    out = {"cells": 0, "seconds": 0.0, "unknown": 0, "like": 0, "threads": set(), "elsewhere": 0, "uncounted": 0}
    for e in estimates:
        out["cells"] += 1
        if e.seconds is None:
            out["unknown"] += 1
        else:
            out["seconds"] += e.seconds
            out["like"] += e.basis == "like"
            out["elsewhere"] += e.elsewhere
            out["uncounted"] += bool(e.uncounted)
            out["threads"].add(e.threads)
    out["threads"] = out["threads"].pop() if len(out["threads"]) == 1 else None
    return out


def remaining_line(total: dict[str, Any]) -> str:
    """One sentence on the work left, e.g. for 3 cells: 'Not done: 3 cells, about 2.5 h of compute at the
    times the done cells like them took (1 by a cell with other options or attack; 1 with no such cell).'"""
    if not total["cells"]:
        return "Not done: none."
    known = total["cells"] - total["unknown"]
    text = f"Not done: {total['cells']} cell{'s' * (total['cells'] != 1)}"
    if known:
        text += f", about {total['seconds'] / 3600:.1f} h of compute at the times the done cells like them took"
        threads = total.get("threads")
        notes = []
        if threads:
            text += f" at {threads} thread{'s' * (threads != 1)}"
        elif "threads" in total:
            notes.append("at different or unrecorded thread counts")
        if total.get("elsewhere"):
            notes.append(f"{total['elsewhere']} only from cells run on another processor or in another precision")
        if total["like"]:
            notes.append(f"{total['like']} estimated from a cell with another attack or other options")
        if total.get("uncounted"):
            notes.append(f"{total['uncounted']} not counting the generator, clean model or encoder its attack "
                         f"trains first (marked +)")
        if total["unknown"]:
            notes.append(f"{total['unknown']} with no done cell like {'it' if total['unknown'] == 1 else 'them'}, "
                         f"not counted")
        text += f" ({'; '.join(notes)})" if notes else ""
    else:
        text += f"; no done cell like {'it' if total['cells'] == 1 else 'them'}, so no estimate"
    return text + "."
