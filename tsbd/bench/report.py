"""``tsbd report RESULTS_DIR``: the paper's table layout from a results store, as Markdown and as
one standalone HTML page, with plots as PNG and SVG.

One table per (dataset, model, training, poison ratio) found in the store: attacks as rows (seeds
averaged), defenses as column groups ACC / ASR / DER with the attacked model itself as
"No Defense", the best defense per row in bold, an average row. Where the paper has the same cell
(see :mod:`tsbd.bench.paper`) its number stands beside ours. Figures per table
(:mod:`tsbd.bench.figures`): a DER and an ASR heatmap (attack x defense) and ACC against ASR as one
panel per attack, the same files in both reports.

One walk over a table (:func:`table_grid`) yields a neutral grid of cells
(:mod:`tsbd.bench.layout`); the Markdown table, the HTML table and the figures are drawn from it.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tsbd.artifacts import pyplot, save_figure
from tsbd.attacks import ATTACKS
from tsbd.bench.estimate import Estimator, cell_seconds, machine_of, remaining, remaining_line
from tsbd.bench.figures import acc_asr_panels, heatmap, sweep_panels
from tsbd.bench.grid import NO_DEFENSE, canonical_json
from tsbd.bench.layout import Entry, GridColumn, GridRow, TableGrid
from tsbd.bench.paper import (
    ATTACK_NAMES,
    DATASET_NAMES,
    DEFENSE_NAMES,
    METRICS,
    MODEL_NAMES,
    VARIANT_NAMES,
    PaperIndex,
    attack_order,
    defense_order,
    display,
    non_default,
)
from tsbd.bench.store import DB_NAME, Store, is_snapshot
from tsbd.config import to_dict
from tsbd.defenses import DEFENSES
from tsbd.errors import TsbdError
from tsbd.metrics import der

log = logging.getLogger(__name__)

MD_NAME = "report.md"
HTML_NAME = "report.html"
PLOTS = "plots"
# figure kind -> its caption, in the Markdown and the HTML report alike
FIGURES = {"der-heatmap": "DER per attack and defense (%, higher is better; best per row boxed)",
           "asr-heatmap": "ASR per attack and defense (%, lower is better; best per row boxed)",
           "acc-asr": "ACC against ASR, one panel per attack (top left is best)",
           "n-sweep": "TSBD's test ASR and ACC against its neuron ratio n (selected on test data; picked n starred)"}
SWEEP_FIGURES = ("n-sweep",)  # drawn under the sweep table, not with the table's figures


# ------------------------------------------------------------------------------------------
# collecting
@dataclasses.dataclass
class Row:
    key: str
    attack: str
    config: dict  # resolved attack config without poison_ratio
    changed: dict  # options that differ from the attack's defaults
    label: str = ""


@dataclasses.dataclass
class Column:
    key: str
    defense: str
    clean_ratio: float | None
    config: dict
    changed: dict
    label: str = ""
    selected_on_test: bool = False  # TSBD's n picked by test ASR: reported, never ranked with the defenses


SELECTED_ON_TEST = "n_selected_on_test"  # the TSBD stage record of a test-selected n (tsbd.defenses.tsbd)


@dataclasses.dataclass
class ResultTable:
    key: dict  # dataset, model, train, poison_ratio, versions
    rows: list[Row]
    columns: list[Column]
    values: dict[tuple[str, str], dict]  # (row, column) -> mean metrics in %, "n" seeds, "cells"
    title: str = ""
    slug: str = ""
    paper: dict[tuple[str, str], tuple[list, str]] = dataclasses.field(default_factory=dict)
    paper_avg: dict[str, tuple[list, str]] = dataclasses.field(default_factory=dict)
    paper_tables: list[dict] = dataclasses.field(default_factory=list)
    plots: dict[str, dict[str, Path]] = dataclasses.field(default_factory=dict)  # kind -> {png, svg}
    # (row, column) -> {stage: {"acc", "asr" in %, "n" seeds}}: the model a defense observed after each stage
    stages: dict[tuple[str, str], dict[str, dict]] = dataclasses.field(default_factory=dict)
    # TSBD's n swept on test data, one entry per defense cell: label, seed, picked n, points (n, acc, asr) in %
    sweeps: list[dict] = dataclasses.field(default_factory=list)

    def value(self, row: str, col: str, metric: str) -> float | None:
        v = self.values.get((row, col))
        return None if v is None else v.get(metric)

    def spread(self, row: str, col: str, metric: str) -> float | None:
        """The sample standard deviation over the seeds of a cell (None for a single seed)."""
        v = self.values.get((row, col))
        return None if v is None else v.get(f"{metric}_sd")

    def average(self, col: str, metric: str) -> float | None:
        vals = [self.value(r.key, col, metric) for r in self.rows]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    def best(self, row: str | None, metric: str) -> set[str]:
        """The defense columns with the best ``metric`` in a row (None: the average row, where only the
        columns that have every attack compete); none where every defense has the same value (e.g. all
        leave ASR at 100%): nothing stands out."""
        cols = [c for c in self.columns if c.defense != NO_DEFENSE and not c.selected_on_test]
        if row is None:  # averages compare only over the same attacks: those of the columns that have them all
            covered = {c.key: frozenset(r.key for r in self.rows if (r.key, c.key) in self.values) for c in cols}
            every = frozenset().union(*covered.values()) if covered else frozenset()
            cols = [c for c in cols if covered[c.key] == every]
        vals = {c.key: (self.average(c.key, metric) if row is None else self.value(row, c.key, metric)) for c in cols}
        vals = {k: v for k, v in vals.items() if v is not None}
        if len(vals) < 2 or max(vals.values()) - min(vals.values()) < 1e-9:
            return set()
        target = min(vals.values()) if metric == "asr" else max(vals.values())
        return {k for k, v in vals.items() if abs(v - target) < 1e-9}


def _defaults(registry_name: str, name: str) -> dict | None:
    try:
        reg = ATTACKS if registry_name == "attack" else DEFENSES
        if name not in reg:
            return None
        return to_dict(reg.get(name).config_class())
    except Exception:  # a method that cannot be built any more: compare nothing
        return None


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(obj) if isinstance(obj, list) else obj}


def _varying(dicts: list[dict]) -> list[str]:
    flat = [_flatten(d) for d in dicts]
    keys = sorted({k for f in flat for k in f})
    return [k for k in keys if len({canonical_json(f.get(k)) for f in flat}) > 1]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _describe(d: dict) -> str:
    return ", ".join(f"{k}={_fmt_value(v)}" for k, v in d.items())


def collect(store: Store, grid: str | Sequence[str] | None = None,
            paper: PaperIndex | None = None) -> list[ResultTable]:
    """Group the store's done cells into paper-style tables."""
    paper = paper or PaperIndex()
    rows = store.cells(grid)
    by_id = {r["id"]: r for r in rows}
    if grid is not None:  # parents of the grid's defense cells are in the grid too, but be safe
        for r in rows:
            if r["parent"] and r["parent"] not in by_id:
                parent = store.state(r["parent"])
                if parent:
                    by_id[parent["id"]] = parent
    groups: dict[str, dict] = {}
    for r in by_id.values():
        if r["kind"] != "attack" or r["status"] != "done":
            continue
        c = r["config"]
        attack_cfg = dict(c["attack"]["config"])
        poison = attack_cfg.pop("poison_ratio", None)
        key = {"dataset": c["dataset"], "model": c["model"], "train": c["train"], "poison_ratio": poison,
               "versions": c["versions"]}
        g = groups.setdefault(canonical_json(key), {"key": key, "entries": []})
        g["entries"].append((r, None))
        for d in by_id.values():
            if d["kind"] == "defense" and d["parent"] == r["id"] and d["status"] == "done":
                g["entries"].append((r, d))

    tables = []
    for g in groups.values():
        rows_: dict[str, Row] = {}
        cols: dict[str, Column] = {}
        acc: dict[tuple[str, str], list[dict]] = {}
        sweeps: list[tuple[str, dict, dict]] = []  # (row key, defense cell, its test-data pick)
        observed: dict[tuple[str, str], list[dict]] = {}  # (row, column) -> each seed's stage records
        for a, d in g["entries"]:
            attack = a["config"]["attack"]
            cfg = {k: v for k, v in attack["config"].items() if k != "poison_ratio"}
            rkey = canonical_json({"name": attack["name"], "config": cfg})
            if rkey not in rows_:
                defaults = _defaults("attack", attack["name"])
                if defaults:
                    defaults.pop("poison_ratio", None)
                rows_[rkey] = Row(rkey, attack["name"], cfg, non_default(cfg, defaults))
            if d is None:
                ckey = NO_DEFENSE
                if ckey not in cols:
                    cols[ckey] = Column(ckey, NO_DEFENSE, None, {}, {})
            else:
                dd = d["config"]["defense"]
                config, plain = _model_config(dd["name"], dd["config"])
                ckey = canonical_json({"name": dd["name"], "config": config, "clean": d["config"]["clean_ratio"]})
                if ckey not in cols:
                    cols[ckey] = Column(ckey, dd["name"], d["config"]["clean_ratio"], config,
                                        non_default(config, _defaults("defense", dd["name"])))
            m = (d or a)["metrics"] or {}
            acc.setdefault((rkey, ckey), []).append({"acc": m.get("acc"), "asr": m.get("asr"),
                                                      "der": m.get("der") if d is not None else None,
                                                      "cell": (d or a)["id"], "seconds": cell_seconds(d or a),
                                                      "seed": (d or a)["config"].get("seed"),
                                                      "plain": d is None or plain})
            if d is not None and m.get("stages"):
                observed.setdefault((rkey, ckey), []).append({"seed": d["config"].get("seed"), "plain": plain,
                                                              "stages": m["stages"]})
            picked = (m.get("stages") or {}).get(SELECTED_ON_TEST) if d is not None else None
            if picked:
                skey = ckey + "|" + SELECTED_ON_TEST
                if skey not in cols:
                    base = cols[ckey]
                    cols[skey] = Column(skey, base.defense, base.clean_ratio, base.config, base.changed,
                                        selected_on_test=True)
                before = a["metrics"] or {}
                d_er = (der(before["acc"], before["asr"], picked["acc"], picked["asr"])
                        if {"acc", "asr"} <= set(before) and {"acc", "asr"} <= set(picked) else None)
                acc.setdefault((rkey, skey), []).append({"acc": picked.get("acc"), "asr": picked.get("asr"),
                                                         "der": d_er, "cell": d["id"], "n": picked.get("n"),
                                                         "seed": d["config"].get("seed")})
                if picked.get("sweep"):
                    sweeps.append((rkey, d, picked))
        values = {}
        for k, items in acc.items():
            items = _one_per_seed(items)
            entry: dict[str, Any] = {"n": len(items), "cells": [i["cell"] for i in items]}
            secs = [i["seconds"] for i in items if i.get("seconds") is not None]
            if secs:
                entry["seconds"] = sum(secs) / len(secs)
            if any("n" in i for i in items):  # the neuron ratios picked on test data, per seed
                entry["selected_n"] = [i.get("n") for i in items]
            for metric in METRICS:
                vals = [i[metric] for i in items if i[metric] is not None and not math.isnan(i[metric])]
                entry[metric] = 100 * sum(vals) / len(vals) if vals else None
                if len(vals) > 1:
                    entry[f"{metric}_sd"] = 100 * statistics.stdev(vals)
            values[k] = entry
        row_list = sorted(rows_.values(), key=lambda r: (attack_order(r.attack), r.key))
        col_list = sorted(cols.values(), key=lambda c: (defense_order(c.defense), c.selected_on_test,
                                                        c.clean_ratio or 0, c.key))
        _label_rows(row_list)
        _label_columns(col_list)
        tables.append(ResultTable(g["key"], row_list, col_list, values, stages=_stage_means(observed),
                                  sweeps=_sweep_entries(sweeps, rows_)))

    _title_tables(tables)
    for t in tables:
        _attach_paper(t, paper)
    return tables


def _model_config(defense: str, config: dict) -> tuple[dict, bool]:
    """A defense's config with its report-only options (those that add measurements but leave the
    returned model alone, e.g. TSBD's sweep of n on test data) at their defaults, so such a cell
    joins the column of the plain run; and whether they were at their defaults already."""
    only = DEFENSES.get(defense).report_only if defense in DEFENSES else ()
    defaults = _defaults("defense", defense) or {}
    if not only or not defaults:
        return config, True
    out = {**config, **{k: defaults[k] for k in only if k in defaults}}
    return out, canonical_json(out) == canonical_json(config)


def _one_per_seed(items: list[dict]) -> list[dict]:
    """One cell per seed in a column: where a plain run and a run with report-only options share a
    seed (the same model twice), the plain one counts. Cells that recorded no seed all count."""
    out: list[dict] = []
    at: dict[Any, int] = {}  # seed -> its place in out
    for i in items:
        seed = i.get("seed")
        if seed is None or seed not in at:
            if seed is not None:
                at[seed] = len(out)
            out.append(i)
        elif i.get("plain") and not out[at[seed]].get("plain"):
            out[at[seed]] = i
    return out


def _measured(stage: Any) -> bool:
    """Whether a defense's stage record holds a test ACC and ASR."""
    return (isinstance(stage, dict) and isinstance(stage.get("acc"), (int, float))
            and isinstance(stage.get("asr"), (int, float)))


def _stage_means(observed: dict[tuple[str, str], list[dict]]) -> dict[tuple[str, str], dict[str, dict]]:
    """Mean test ACC / ASR (in %) of each stage a defense observed, over the seeds that have it."""
    out = {}
    for key, cells in observed.items():
        records = [c["stages"] for c in _one_per_seed(cells)]
        names: list[str] = []
        for rec in records:
            names += [k for k, v in rec.items() if k not in names and k != SELECTED_ON_TEST and _measured(v)]
        means = {}
        for name in names:
            got = [rec[name] for rec in records if _measured(rec.get(name))]
            means[name] = {"acc": 100 * statistics.mean(g["acc"] for g in got),
                           "asr": 100 * statistics.mean(g["asr"] for g in got), "n": len(got)}
        out[key] = means
    return out


# how the report names the stages the defenses observe (others: their name with spaces)
STAGE_LABELS = {"after_reinit": "zero reinit", "after_reinit_bn_recomputed": "zero reinit, BN recomputed",
                "backdoored_bn_recomputed": "backdoored model, BN recomputed", "after_finetune": "fine-tuned",
                "after_prune": "pruned", "after_unlearn": "unlearned", "after_distill": "distilled"}
STAGES_NOTE = ("Test ACC / ASR in % of the model each defense observed after each of its stages (the mean over the "
               "seeds; the last stage is the defense's result). \"BN recomputed\": a copy whose BatchNorm statistics "
               "are recomputed on the clean set, no weight changed -- beside the backdoored model under the same "
               "recompute, it shows how much of the backdoor a stage removed rather than hid.")


def _stage_tables(t: ResultTable) -> list[tuple[str, list[str], list[list[str]]]]:
    """(defense label, header, rows) for every defense column that observed two stages or more."""
    out = []
    for c in t.columns:
        if c.defense == NO_DEFENSE or c.selected_on_test:
            continue
        per_row = {r.key: t.stages.get((r.key, c.key), {}) for r in t.rows}
        names: list[str] = []
        for means in per_row.values():
            names += [n for n in means if n not in names]
        if len(names) < 2:
            continue
        rows = [[r.label, *(f"{per_row[r.key][n]['acc']:.2f} / {per_row[r.key][n]['asr']:.2f}"
                            if n in per_row[r.key] else "-" for n in names)]
                for r in t.rows if per_row[r.key]]
        out.append((c.label, ["Attack", *(STAGE_LABELS.get(n, n.replace("_", " ")) for n in names)], rows))
    return out


def _sweep_entries(sweeps: list[tuple[str, dict, dict]], rows: dict[str, Row]) -> list[dict]:
    """TSBD's test-data sweeps of n as report entries, in the table's attack order then by seed."""
    out = []
    for rkey, d, picked in sweeps:
        points = [(float(p["n"]), 100 * p["acc"], 100 * p["asr"]) for p in picked["sweep"]
                  if p.get("acc") is not None and p.get("asr") is not None]
        out.append({"row": rkey, "cell": d["id"], "seed": d["config"].get("seed"), "picked": picked.get("n"),
                    "threshold": picked.get("threshold"),
                    "points": sorted(points)})
    order = {k: (attack_order(r.attack), k) for k, r in rows.items()}
    out.sort(key=lambda e: (order[e["row"]], e["seed"] or 0, e["cell"]))
    return out


def _sweep_label(t: ResultTable, entry: dict) -> str:
    label = next(r.label for r in t.rows if r.key == entry["row"])
    many = sum(e["row"] == entry["row"] for e in t.sweeps) > 1
    return label + (f" (seed {entry['seed']})" if many else "")


SWEEP_NOTE = ("TSBD at each neuron ratio n of the authors' sweep (one unlearning, one zero reinit and fine-tune per "
              "n), ACC / ASR in % on the TEST set. In bold the n the paper's protocol would pick: the first n whose "
              "test ASR is at or below {threshold}, else the lowest test ASR. Selected on test data: a defender "
              "cannot make this choice, so it is never a defense's result.")


def _sweep_table(t: ResultTable) -> tuple[list[str], list[list[tuple[str, bool]]]]:
    """Header and rows of the sweep table: each cell its text and whether it is the picked n."""
    ns = sorted({p[0] for e in t.sweeps for p in e["points"]})
    rows = []
    for e in t.sweeps:
        at = {p[0]: p for p in e["points"]}
        cells = [(_sweep_label(t, e), False)]
        for n in ns:
            p = at.get(n)
            cells.append(("-" if p is None else f"{p[1]:.2f} / {p[2]:.2f}",
                          p is not None and e["picked"] is not None and abs(n - e["picked"]) < 1e-12))
        rows.append(cells)
    return ["Attack", *(f"n={n:g}" for n in ns)], rows


def _sweep_threshold(t: ResultTable) -> str:
    values = {e["threshold"] for e in t.sweeps if e["threshold"] is not None}
    return "/".join(f"{100 * v:g}%" for v in sorted(values)) or "the threshold"


def _label_rows(rows: list[Row]) -> None:
    for name in {r.attack for r in rows}:
        same = [r for r in rows if r.attack == name]
        vary = _varying([r.config for r in same]) if len(same) > 1 else []
        for r in same:
            flat = _flatten(r.config)
            extra = _describe({k: flat.get(k) for k in vary})
            r.label = display(r.attack, ATTACK_NAMES) + (f" ({extra})" if extra else "")


def _label_columns(cols: list[Column]) -> None:
    for c in cols:
        if c.selected_on_test:
            c.label = ""
    for name in {c.defense for c in cols}:
        same = [c for c in cols if c.defense == name and not c.selected_on_test]
        vary = _varying([{"clean_ratio": c.clean_ratio, **c.config} for c in same]) if len(same) > 1 else []
        for c in same:
            flat = _flatten({"clean_ratio": c.clean_ratio, **c.config})
            settings = {("clean" if k == "clean_ratio" else k): flat.get(k) for k in vary}
            named = [VARIANT_NAMES[(name, k, v)] for k, v in settings.items()
                     if isinstance(v, (int, float, str)) and (name, k, v) in VARIANT_NAMES]
            extra = ", ".join([*named, _describe(settings)] if settings else [])
            c.label = display(c.defense, DEFENSE_NAMES) + (f" ({extra})" if extra else "")
    by_key = {c.key: c for c in cols}
    for c in cols:
        if c.selected_on_test:
            c.label = by_key[c.key.split("|")[0]].label + ", n selected on test data"


def _title_tables(tables: list[ResultTable]) -> None:
    vary = _varying([t.key for t in tables]) if len(tables) > 1 else []
    vary = [k for k in vary if k not in ("dataset.name", "model.name", "poison_ratio")]
    tables.sort(key=lambda t: (t.key["dataset"]["name"], t.key["model"]["name"], t.key["poison_ratio"] or 0,
                               canonical_json(t.key)))
    for i, t in enumerate(tables, 1):
        k = t.key
        flat = _flatten(k)
        title = (f"{display(k['dataset']['name'], DATASET_NAMES)} · {display(k['model']['name'], MODEL_NAMES)} · "
                 f"poison {100 * (k['poison_ratio'] or 0):g}%")
        extra = _describe({key: flat.get(key) for key in vary})
        t.title = title + (f" · {extra}" if extra else "")
        t.slug = f"t{i}-" + re.sub(r"[^a-z0-9]+", "-", f"{k['dataset']['name']}-{k['model']['name']}").strip("-")


def _attach_paper(t: ResultTable, paper: PaperIndex) -> None:
    k = t.key
    tables = paper.candidates(k["dataset"]["name"], k["model"]["name"], k["poison_ratio"] or 0)
    used: dict[str, dict] = {}
    for r in t.rows:
        for c in t.columns:
            if c.selected_on_test:  # the paper's numbers stand beside the defense's own column only
                continue
            hit = paper.lookup(tables, r.attack, r.changed, c.defense, c.clean_ratio, c.changed, c.config)
            if hit:
                t.paper[(r.key, c.key)] = (hit[0], hit[1]["id"])
                used[hit[1]["id"]] = hit[1]
    for c in t.columns:
        # the paper's average beside ours only over the same attacks: the mean of the paper's cells
        # for exactly our rows (its printed average when we have all its attacks), else none
        hits = [t.paper.get((r.key, c.key)) for r in t.rows]
        if t.rows and all(hits):
            means = []
            for i in range(len(METRICS)):
                vals = [h[0][i] for h in hits]
                means.append(None if any(v is None for v in vals) else sum(vals) / len(vals))
            t.paper_avg[c.key] = (means, hits[0][1])
    t.paper_tables = list(used.values())


# ------------------------------------------------------------------------------------------
# rendering
def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _metrics_of(col: Column) -> tuple[str, ...]:
    return ("acc", "asr") if col.defense == NO_DEFENSE else METRICS


def _paper_value(t: ResultTable, row: str | None, col: str, metric: str) -> float | None:
    hit = t.paper_avg.get(col) if row is None else t.paper.get((row, col))
    if not hit:
        return None
    return hit[0][METRICS.index(metric)]


def _paper_note(t: ResultTable) -> str:
    if not t.paper_tables:
        return "The paper has no cell matching this table's settings."
    names = []
    for p in t.paper_tables:
        names.append(f"{p['caption'].split(':')[0]} ({display(p['model'], MODEL_NAMES)}, "
                     f"{display(p['dataset'], DATASET_NAMES)})")
    notes = [p["note"] for p in t.paper_tables if p.get("note")]
    model_note = ""
    if t.key["model"]["name"] not in {p["model"] for p in t.paper_tables}:
        model_note = (f" The paper did not use {display(t.key['model']['name'], MODEL_NAMES)}; its numbers are for "
                      f"{', '.join(sorted({display(p['model'], MODEL_NAMES) for p in t.paper_tables}))}.")
    return ("In parentheses: the paper's value for the same attack and defense, from " + "; ".join(names) + "."
            + model_note + (" " + " ".join(notes) if notes else ""))


def _cost_line(t: ResultTable) -> str:
    """Minutes per cell, by column, averaged over the attacks (No Defense: training the attacked
    model), with the host's CPU time as the cells recorded it; "" when no cell recorded a time."""
    parts = []
    for c in t.columns:
        if c.selected_on_test:  # timed inside its defense cell
            continue
        secs = [t.values[(r.key, c.key)].get("seconds") for r in t.rows if (r.key, c.key) in t.values]
        secs = [x for x in secs if x is not None]
        if secs:
            what = "No Defense (training the attacked model)" if c.defense == NO_DEFENSE else c.label
            parts.append(f"{what} {sum(secs) / len(secs) / 60:.1f}")
    return ("Minutes per cell, mean over the attacks: " + ", ".join(parts) + ".") if parts else ""


def _settings_lines(t: ResultTable) -> list[str]:
    k = t.key
    ds = k["dataset"]
    subset = ""
    if ds.get("limit_train") or ds.get("limit_test"):
        subset = f", subset of {ds.get('limit_train') or 'all'} train / {ds.get('limit_test') or 'all'} test images"
    model_opts = _describe(k["model"]["options"])
    train = k["train"]
    lines = [f"Data: {ds['name']} (fingerprint {ds.get('fingerprint', '?')}{subset}).",
             f"Model: {k['model']['name']}" + (f" ({model_opts})" if model_opts else "") + ".",
             f"Attack training: {train.get('epochs')} epochs, batch {train.get('batch_size')}, lr {train.get('lr')}, "
             f"{train.get('schedule')} schedule; poison ratio {k['poison_ratio']}.",
             f"Versions: tsbd {k['versions'].get('tsbd')}, torch {k['versions'].get('torch')}."]
    seeds = {v["n"] for v in t.values.values()}
    if seeds != {1}:
        lines.append(f"Each value is the mean over {'/'.join(str(s) for s in sorted(seeds))} seeds, "
                     "± the sample standard deviation where there are several.")
    for c in t.columns:
        if c.defense == NO_DEFENSE:
            continue
        opts = _describe(c.changed)
        lines.append(f"{c.label}: clean ratio {c.clean_ratio:g}" + (f"; options {opts}" if opts else "; paper defaults")
                     + ".")
    for r in t.rows:
        if r.changed:
            lines.append(f"{r.label}: attack options {_describe(r.changed)}.")
    cost = _cost_line(t)
    if cost:
        lines.append(cost)
    have = {c.label: sum((r.key, c.key) in t.values for r in t.rows) for c in t.columns}
    if len(set(have.values())) > 1:  # a partial grid: the averages cover different attacks
        lines.append("Incomplete table: each Average is over the attacks its column has ("
                     + ", ".join(f"{label} {n}" for label, n in have.items()) + f" of {len(t.rows)}), "
                     "so columns with different counts are not comparable; the best Average is marked only among "
                     "the defenses that have every attack.")
    return lines


def table_grid(t: ResultTable, metrics: tuple[str, ...] = METRICS) -> TableGrid:
    """The one walk over a results table: every (defense column, metric) as a column, every attack
    and then the average as a row, each cell with our value, the paper's and the best-defense mark."""
    pairs = [(c, m) for c in t.columns for m in _metrics_of(c) if m in metrics]
    columns = tuple(GridColumn(c.label, m, reference=c.defense == NO_DEFENSE) for c, m in pairs)
    rows = []
    for r in [*t.rows, None]:
        row = None if r is None else r.key
        entries = []
        for c, m in pairs:
            v = t.average(c.key, m) if row is None else t.value(row, c.key, m)
            entries.append(Entry(v, _paper_value(t, row, c.key, m), v is not None and c.key in t.best(row, m),
                                 None if row is None else t.spread(row, c.key, m)))
        rows.append(GridRow("Average" if r is None else r.label, tuple(entries), average=r is None))
    return TableGrid(columns, tuple(rows))


def _markdown_table(grid: TableGrid) -> list[str]:
    def cell(e: Entry) -> str:
        text = f"**{_num(e.value)}**" if e.best else _num(e.value)
        return text + (f" ± {e.sd:.2f}" if e.sd is not None else "") + (f" ({e.paper:.2f})" if e.paper is not None
                                                                         else "")

    lines = ["| " + " | ".join(["Attack", *(f"{c.group} {c.metric.upper()}" for c in grid.columns)]) + " |",
             "| " + " | ".join(["---", *("---:" for _ in grid.columns)]) + " |"]
    for r in grid.rows:
        label = f"**{r.label}**" if r.average else r.label
        lines.append("| " + " | ".join([label, *(cell(e) for e in r.entries)]) + " |")
    return lines


def _figure_kinds(t: ResultTable, sweep: bool) -> list[str]:
    return [k for k in t.plots if (k in SWEEP_FIGURES) == sweep]


def _figure_lines(t: ResultTable, sweep: bool = False) -> list[str]:
    out = []
    for kind in _figure_kinds(t, sweep):
        files = t.plots[kind]
        out += ["", f"![{FIGURES[kind]}: {t.title}]({files['png'].as_posix()})", "",
                f"*{FIGURES[kind]}* ([PNG]({files['png'].as_posix()}), [SVG]({files['svg'].as_posix()}))"]
    return out


def render_markdown(tables: list[ResultTable], summary: dict) -> str:
    out = ["# tsbd benchmark report", ""]
    out += _summary_lines(summary, md=True)
    for t in tables:
        out += ["", f"## {t.title}", "",
                "ACC, ASR and DER in %; ours first" + (", the paper's in parentheses" if t.paper else "")
                + ". Best defense per row in bold.", ""]
        out += _markdown_table(table_grid(t))
        out += ["", _paper_note(t), ""]
        out += [f"- {line}" for line in _settings_lines(t)]
        out += _figure_lines(t)
        stage_tables = _stage_tables(t)
        if stage_tables:
            out += ["", "### ACC / ASR after each stage of a defense", "", STAGES_NOTE]
            for label, header, rows in stage_tables:
                out += ["", f"{label}:", "", *_plain_markdown_table(header, rows)]
        if t.sweeps:
            header, rows = _sweep_table(t)
            out += ["", "### TSBD's neuron ratio n, swept on test data", "",
                    SWEEP_NOTE.format(threshold=_sweep_threshold(t)), "",
                    *_plain_markdown_table(header, [[f"**{text}**" if best else text for text, best in r]
                                                    for r in rows])]
            out += _figure_lines(t, sweep=True)
    if summary.get("retrained"):
        header, rows = _retrained_table(summary)
        out += ["", "## Attacked models trained again", "", RETRAINED_NOTE, "", *_plain_markdown_table(header, rows)]
    if summary.get("failures"):
        header, rows = _failures_table(summary)
        out += ["", "## Failed cells", "", *_plain_markdown_table(header, rows)]
    if summary.get("not_done"):
        header, rows = _not_done_table(summary)
        out += ["", "## Cells not done", "", NOT_DONE_NOTE, "", *_plain_markdown_table(header, rows)]
    return "\n".join(out) + "\n"


def _plain_markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table of text cells ('|' in a cell becomes '/')."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def _plain_html_table(header: list[str], rows: list[list[str]] | list[list[tuple[str, bool]]]) -> str:
    """A simple HTML table; a cell is its text, or (text, bold)."""
    e = html.escape

    def cell(v: str | tuple[str, bool]) -> str:
        text, bold = (v, False) if isinstance(v, str) else v
        return f"<td><b>{e(text)}</b></td>" if bold else f"<td>{e(text)}</td>"

    return ("<table class=\"failures\"><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows) + "</table>")


def _failures_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[f["id"], f["kind"], f["what"], f["error"]] for f in summary["failures"]]
    return ["cell", "kind", "what", "error"], rows


NOT_DONE_NOTE = ("Estimated minutes: the mean time of the store's done cells of the same attack, or of the same "
                 "defense with the same options, on the same data set, model and training; ~ marks an estimate "
                 "from another attack or other options of the defense, + one whose attack first trains something "
                 "that estimate leaves out (a trigger generator, clean model or encoder, unless cached), - a cell "
                 "with no done cell like it. "
                 "Times are those of the hosts above.")


def _not_done_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[c["id"], c["kind"], c["what"], c["status"], c["estimate"].text()] for c in summary["not_done"]]
    return ["cell", "kind", "what", "status", "est. minutes"], rows


def grid_list(names: list[str]) -> str:
    """The store's grid names for a reader: ``NAME+TAG`` (``tsbd bench NAME --set ...`` or ``--seed``)
    counted under its NAME, e.g. "`paper-cifar10-r18-cpu` and 9 `--set`/`--seed` variants of it"."""
    variants: dict[str, int] = {}
    for name in names:
        base, sep, _ = name.partition("+")
        variants[base] = variants.get(base, 0) + bool(sep)
    parts = []
    for base, k in variants.items():
        own = base in names
        text = f"`{base}`" if own else ""
        if k:
            many = f"{k} `--set`/`--seed` variant{'s' * (k != 1)}"
            text = f"{text} and {many} of it" if own else f"{many} of `{base}`"
        parts.append(text)
    return ", ".join(parts)


def _summary_lines(summary: dict, md: bool) -> list[str]:
    counts = summary["counts"]
    where = ("a copy of the store's index beside this report (`results.sqlite`, without the models: "
             "`tsbd merge` this folder into a results folder to continue the grid)" if summary.get("copy") else
             "the store in this folder (`results.sqlite`, models under `artifacts/`)")
    lines = [f"Results: {where}" + (f", grid {grid_list(summary['selected'])}" if summary.get("grid") else
                                                   (f", grids {grid_list(summary['grids'])}"
                                                    if summary['grids'] else "")),
             "",
             f"Cells: {counts['done']} done, {counts['failed']} failed, {counts['running']} running, "
             f"{counts['pending']} pending. Compute time of done cells: {summary['compute_s'] / 60:.1f} min "
             f"on {', '.join(summary['hosts']) or '-'}."
             + (f" Peak memory of a process after a cell: {summary['peak_rss_mb']:,.0f} MiB."
                if summary.get("peak_rss_mb") else "")
             + (" " + remaining_line(summary["remaining"]) if summary.get("not_done") else "")]
    return lines


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1400px; padding: 0 1rem; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2.2rem; }
p.meta { color: #555; margin: .2rem 0; }
.wrap { overflow-x: auto; }
table.results { border-collapse: collapse; font-size: .86rem; font-variant-numeric: tabular-nums; margin: .6rem 0; }
table.results th, table.results td { padding: .25rem .5rem; text-align: right; white-space: nowrap; }
table.results th { background: #f3f4f6; font-weight: 600; }
table.results thead tr:first-child th { border-bottom: 1px solid #c9ccd1; text-align: center; }
table.results thead tr:last-child th { border-bottom: 2px solid #555; font-weight: 500; color: #333; }
table.results th.attack, table.results td.attack { text-align: left; }
table.results td.group-start, table.results th.group-start { border-left: 1px solid #d0d3d8; }
table.results tbody tr:nth-child(even) td { background: #fafafa; }
table.results tr.average td { border-top: 2px solid #555; font-weight: 600; background: #f3f4f6; }
table.results td b { color: #0b5cad; }
span.paper { display: block; color: #8a8f98; font-size: .74rem; }
span.sd { color: #555; font-size: .8rem; }
ul.settings { color: #444; font-size: .84rem; }
p.note { color: #555; font-size: .84rem; max-width: 1100px; }
.plots { display: flex; flex-wrap: wrap; gap: 1.2rem; align-items: flex-start; margin-top: 1rem; }
.plots figure { margin: 0; max-width: 100%; }
.plots img { display: block; max-width: 100%; height: auto; border: 1px solid #e5e7eb; }
.plots figcaption { font-size: .8rem; color: #555; margin-top: .2rem; }
table.failures { border-collapse: collapse; font-size: .84rem; }
table.failures td, table.failures th { border: 1px solid #ddd; padding: .2rem .5rem; text-align: left; }
"""


def _html_table(grid: TableGrid) -> str:
    e = html.escape

    def start(i: int) -> str:
        return ' class="group-start"' if grid.starts_group(i) else ""

    def cell(entry: Entry) -> str:
        text = f"<b>{_num(entry.value)}</b>" if entry.best else _num(entry.value)
        text += f'<span class="sd"> &plusmn; {entry.sd:.2f}</span>' if entry.sd is not None else ""
        return text + (f"<span class=\"paper\">{entry.paper:.2f}</span>" if entry.paper is not None else "")

    parts = ['<div class="wrap"><table class="results"><thead><tr><th class="attack" rowspan="2">Attack</th>']
    parts += [f'<th class="group-start" colspan="{span}">{e(label)}</th>' for label, span in grid.groups()]
    parts.append("</tr><tr>")
    parts += [f"<th{start(i)}>{c.metric.upper()} {'&darr;' if c.metric == 'asr' else '&uarr;'}</th>"
              for i, c in enumerate(grid.columns)]
    parts.append("</tr></thead><tbody>")
    for r in grid.rows:
        parts.append('<tr class="average">' if r.average else "<tr>")
        parts.append(f'<td class="attack">{e(r.label)}</td>')
        parts += [f"<td{start(i)}>{cell(entry)}</td>" for i, entry in enumerate(r.entries)]
        parts.append("</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _html_figures(t: ResultTable, out_dir: Path, sweep: bool = False) -> str:
    e = html.escape
    parts = ['<div class="plots">']
    for kind in _figure_kinds(t, sweep):
        files = t.plots[kind]
        data = base64.b64encode((out_dir / files["png"]).read_bytes()).decode()
        png, svg = e(files["png"].as_posix()), e(files["svg"].as_posix())
        parts.append(f'<figure><img alt="{e(FIGURES[kind])}: {e(t.title)}" src="data:image/png;base64,{data}">'
                     f'<figcaption>{e(FIGURES[kind])} (<a href="{png}">PNG</a>, <a href="{svg}">SVG</a>)'
                     "</figcaption></figure>")
    parts.append("</div>")
    return "".join(parts)


def render_html(tables: list[ResultTable], summary: dict, out_dir: Path) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
             "<title>tsbd benchmark report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>tsbd benchmark report</h1>"]
    for line in _summary_lines(summary, md=False):
        if line:
            parts.append(f"<p class=\"meta\">{e(line).replace('`', '')}</p>")
    for t in tables:
        parts.append(f"<h2 id=\"{e(t.slug)}\">{e(t.title)}</h2>")
        parts.append("<p class=\"meta\">ACC, ASR and DER in %; ours on top"
                     + (", the paper's below in grey" if t.paper else "") + ". Best defense per row in bold.</p>")
        parts.append(_html_table(table_grid(t)))
        parts.append(f"<p class=\"note\">{e(_paper_note(t))}</p>")
        parts.append("<ul class=\"settings\">" + "".join(f"<li>{e(s)}</li>" for s in _settings_lines(t)) + "</ul>")
        if t.plots:
            parts.append(_html_figures(t, out_dir))
        stage_tables = _stage_tables(t)
        if stage_tables:
            parts.append(f"<h3>ACC / ASR after each stage of a defense</h3><p class=\"note\">{e(STAGES_NOTE)}</p>")
            for label, header, rows in stage_tables:
                parts.append(f"<p class=\"meta\">{e(label)}:</p>" + _plain_html_table(header, rows))
        if t.sweeps:
            header, rows = _sweep_table(t)
            parts.append("<h3>TSBD's neuron ratio n, swept on test data</h3>"
                         f"<p class=\"note\">{e(SWEEP_NOTE.format(threshold=_sweep_threshold(t)))}</p>"
                         + _plain_html_table(header, rows))
            parts.append(_html_figures(t, out_dir, sweep=True))
    if summary.get("retrained"):
        parts.append(f"<h2>Attacked models trained again</h2><p class=\"note\">{e(RETRAINED_NOTE)}</p>"
                     + _plain_html_table(*_retrained_table(summary)))
    if summary.get("failures"):
        parts.append("<h2>Failed cells</h2>" + _plain_html_table(*_failures_table(summary)))
    if summary.get("not_done"):
        parts.append(f"<h2>Cells not done</h2><p class=\"note\">{e(NOT_DONE_NOTE)}</p>"
                     + _plain_html_table(*_not_done_table(summary)))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------
# plots
def _plot(t: ResultTable, out_dir: Path) -> None:
    plt = pyplot()
    folder = out_dir / PLOTS
    folder.mkdir(parents=True, exist_ok=True)
    grid = table_grid(t)
    figures = {}
    if any(c.metric == "der" for c in grid.columns):
        figures["der-heatmap"] = lambda: heatmap(grid, "der", t.title)
    figures["asr-heatmap"] = lambda: heatmap(grid, "asr", t.title)
    figures["acc-asr"] = lambda: acc_asr_panels(grid, t.title)
    if t.sweeps:
        figures["n-sweep"] = lambda: sweep_panels([(_sweep_label(t, e), e["points"], e["picked"]) for e in t.sweeps],
                                                  t.title)
    for kind, draw in figures.items():
        fig = draw()
        t.plots[kind] = _save(fig, folder, f"{t.slug}-{kind}")
        plt.close(fig)


def _save(fig, folder: Path, stem: str) -> dict[str, Path]:
    return {ext: Path(PLOTS) / path.name for ext, path in save_figure(fig, folder / stem).items()}


# ------------------------------------------------------------------------------------------
def summarize(store: Store, grid: str | Sequence[str] | None) -> dict:
    every = store.cells()  # the whole store: parents of this grid's cells, and the times estimates read
    rows = every if grid is None else store.cells(grid)
    configs = {r["id"]: r["config"] for r in every}
    counts = {s: 0 for s in ("pending", "running", "done", "failed")}
    compute = 0.0
    peak = 0.0  # the largest peak resident memory a process had after a cell, MiB
    hosts = set()
    failures = []

    def what(r: dict) -> str:
        c = r["config"]
        if r["kind"] == "attack":
            return f"{c['attack']['name']} on {c['dataset']['name']} / {c['model']['name']}, seed {c['seed']}"
        pa = (configs.get(r["parent"]) or {}).get("attack", {}).get("name", "?")
        return f"{c['defense']['name']} against {pa}, clean {c['clean_ratio']:g}, seed {c['seed']}"

    estimate = Estimator(every, configs.get)  # every done cell of the store, not only this grid's
    not_done, retrained = [], []
    for r in rows:
        counts[r["status"]] += 1
        if r["status"] == "done" and r["kind"] == "attack":
            note = _retrained_note(store, r)
            if note:
                retrained.append(note | {"what": what(r)})
        if r["status"] == "done":
            t = r["timings"] or {}
            compute += cell_seconds(r) or 0.0
            peak = max(peak, float(t.get("peak_rss_mb") or 0.0))
            if r["host"]:
                ran_on = machine_of(r)
                hosts.add(f"{r['host']} ({ran_on[0]}, {ran_on[1]})" if ran_on else r["host"])
            continue
        if r["status"] == "failed":
            failures.append({"id": r["id"], "kind": r["kind"], "what": what(r), "error": r["error"] or ""})
        not_done.append({"id": r["id"], "kind": r["kind"], "what": what(r), "status": r["status"],
                         "estimate": estimate(r["kind"], r["config"], r["parent"])})
    return {"grid": grid, "grids": store.grids(), "counts": counts, "compute_s": compute,
            "peak_rss_mb": peak or None, "hosts": sorted(hosts), "failures": failures, "not_done": not_done,
            "remaining": remaining(c["estimate"] for c in not_done), "retrained": retrained}


def _retrained_note(store: Store, row: dict) -> dict | None:
    """The done attack cell's model was trained again (its model was missing, or it was redone):
    its id, ACC/ASR before and now, and whether they are equal; None otherwise."""
    note = store.done_attempt_detail(row["id"]).get("retrained")
    if not isinstance(note, dict):
        return None
    now = row["metrics"] or {}
    return {"id": row["id"], "same": bool(note.get("same")), "before": note.get("before") or {},
            "now": {k: now.get(k) for k in ("acc", "asr")}}


RETRAINED_NOTE = ("These attacked models were trained again with the same configuration, because their "
                  "weights were missing from the store (a store index without its models) or the cell was "
                  "redone. Where the model differs, the defense cells done on the earlier model keep their "
                  "ACC, ASR and DER against that model; the No Defense column shows the present one.")


def _retrained_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    def pair(d: dict) -> str:
        return " / ".join("-" if d.get(k) is None else f"{100 * d[k]:.2f}" for k in ("acc", "asr"))

    rows = [[r["id"], r["what"], pair(r["before"]), pair(r["now"]), "yes" if r["same"] else "no"]
            for r in summary["retrained"]]
    return ["cell", "what", "earlier ACC / ASR", "present ACC / ASR", "same model"], rows


def write_report(results_dir: str | Path, *, out_dir: str | Path | None = None, grid: str | None = None,
                 plots: bool = True, paper_tables: str | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the plots for the store in ``results_dir``; with an
    ``out_dir`` elsewhere also a copy of the store's index (``results.sqlite``, no artifacts; with
    ``grid``, that grid's cells alone)."""
    results = Path(results_dir)
    out = Path(out_dir) if out_dir else results
    with Store(results, create=False) as store:
        grids = store.select_grids(grid) if grid is not None else None
        tables = collect(store, grids, PaperIndex(paper_tables))
        summary = summarize(store, grids)
        summary["grid"], summary["selected"] = grid, grids
        out.mkdir(parents=True, exist_ok=True)
        # a report away from its results folder carries the store's index, so it can be rebuilt, and
        # its grid continued (`tsbd merge OUT --into RESULTS`), after the results folder is gone
        snapshot = None
        if out.resolve() != store.path.parent.resolve():
            if (out / DB_NAME).exists() and not is_snapshot(out / DB_NAME):
                raise TsbdError(f"--out {out} holds a results store of its own ({DB_NAME}); choose another --out")
            snapshot = store.snapshot(out, grids)
        summary["copy"] = snapshot is not None or is_snapshot(store.path)
    if plots:
        for t in tables:
            _plot(t, out)
    files = {"md": out / MD_NAME, "html": out / HTML_NAME}
    _write_text(files["md"], render_markdown(tables, summary))
    _write_text(files["html"], render_html(tables, summary, out))
    for t in tables:
        for kind, f in t.plots.items():
            files[f"{t.slug}-{kind}"] = out / f["png"]
    if snapshot is not None:
        files["store"] = snapshot
    return files


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
