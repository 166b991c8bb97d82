"""TSBD's ablations and sweeps beyond n and m (paper Tables 3, 4, 7, 8; Appendices H, K).

``tsbd analyze`` subcommands, each on a saved attacked model (CSV, PNG/SVG figure, result.json and a
Markdown section whose table follows the paper's layout, with the paper's CIFAR-10 / PreAct-ResNet18
numbers beside ours when the paper's table has the attack):

- ``reinit-variants`` (Table 3): zero reinit schemes V1 / V2 / V3 at the n where ASR first drops to ~0;
- ``finetune-variants`` (Table 4): No-FT / Vanilla-FT / Aa-FT from one reinitialized model;
- ``sweep-clean-ratio`` (Table 7, App. I), ``sweep-ft-lr`` (Table 8, App. J);
- ``clean-model`` (App. K, Fig. 11): defenses applied to a clean model;
- ``sweep-poison-ratio`` (App. H, Fig. 10): the same model attacked at other poison ratios, then TSBD.

The computations are plain functions over an ``evaluate(model) -> metrics`` callback; the stages
themselves are TSBD's (:func:`clean_unlearn`, :func:`zero_reinit`, :func:`activeness_aware_finetune`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

from torch import nn

from tsbd.analysis.registry import (
    AnalysisContext,
    Measurement,
    cli_option,
    fractions,
    register,
    values_option,
    write_csv,
)
from tsbd.artifacts import pyplot, save_figure
from tsbd.attacks import build_attack
from tsbd.bench.paper import ATTACK_NAMES, load_tables
from tsbd.data.base import ImageSet
from tsbd.defenses import DEFENSES, build_defense
from tsbd.defenses.tsbd import TSBD, TSBDConfig, activeness_aware_finetune, clean_unlearn, zero_reinit
from tsbd.errors import TsbdError
from tsbd.metrics import der, evaluate
from tsbd.models import spec_options
from tsbd.models.surgery import subweight_change
from tsbd.pipeline import cached_attacked_model, setup_attack
from tsbd.train.engine import TrainConfig
from tsbd.train.runtime import Runtime

Evaluate = Callable[[nn.Module], dict]

DEFAULT_GRID = ",".join(f"{k / 100:g}" for k in range(5, 95, 5))  # coarse n grid, refined at --refine-step
DEFAULT_CLEAN = "0.1,0.05,0.01,0.005"  # paper Table 7
DEFAULT_LR = "0.1,0.01,0.001,0.0001"  # paper Table 8
DEFAULT_POISON = "0.1,0.05,0.01"  # paper App. H / Fig. 10
DEFAULT_DEFENSES = "tsbd,ft,clp"  # a subset of paper Fig. 11's defenses
SCHEMES = ("v1", "v2", "v3")
FINETUNE_VARIANTS = {"No-FT": "none", "Vanilla-FT": "vanilla", "Aa-FT": "activeness-aware"}  # paper Table 4
PAPER_SETTING = "paper, CIFAR-10 PreAct-R18"

# Paper Table 3 (CIFAR-10, PreAct-ResNet18, poison 10%, clean 5%): ACC, ASR (%) at the n where ASR first
# drops to <= 0.05%. Not in tsbd/bench/data/paper_tables.json (which has Tables 4, 7, 8), so kept here.
PAPER_TABLE3 = {
    "badnets": {"v1": (69.53, 0.00), "v2": (68.20, 0.00), "v3": (80.94, 0.00)},
    "blended": {"v1": (76.13, 0.00), "v2": (64.20, 0.05), "v3": (82.72, 0.00)},
    "lf": {"v1": (76.41, 0.00), "v2": (78.64, 0.02), "v3": (82.42, 0.00)},
    "ssba": {"v1": (74.55, 0.00), "v2": (75.43, 0.02), "v3": (83.10, 0.00)},
}


# ------------------------------------------------------------------------------------------
# computations
def unlearned_change(model: nn.Module, clean: ImageSet, cfg: TSBDConfig, runtime: Runtime, *, seed: int = 0,
                     progress: bool = False) -> tuple[dict, dict]:
    """TSBD stage 1a-b once: |theta_ul - theta_bd| per subweight, and the unlearning record."""
    unlearned, info = clean_unlearn(model, clean, cfg, runtime, seed=seed, progress=progress)
    return subweight_change(model, unlearned), info


def reinit_evaluator(model: nn.Module, change: dict, weight_ratio: float, scheme: str,
                     evaluate: Evaluate) -> Callable[[float], dict]:
    """n -> metrics of ``model`` after zero reinit of the top-n neurons with ``scheme`` (no fine-tuning)."""

    def at(n: float) -> dict:
        reinit, info = zero_reinit(model, change, n, weight_ratio, scheme)
        return {**evaluate(reinit), "neurons_selected": info["neurons_selected"],
                "subweights_zeroed": info["subweights_zeroed"]}

    return at


def first_ratio_below(evaluate_at: Callable[[float], dict], grid: Sequence[float], threshold: float,
                      step: float = 0.01) -> dict:
    """The smallest n, to ``step``, at which ``evaluate_at(n)["asr"] <= threshold`` (paper Table 3's rule).

    ASR falls monotonically with n (paper Sec. 4.3), so the coarse ``grid`` is evaluated in
    increasing order up to its first hit, then the ``step`` points strictly between the grid value
    before it (0 for the first) and the hit, up to their first hit. Returns {"n", "metrics" (at n),
    "points" (every evaluation, in order)}; n and metrics are None when no grid value meets it."""
    points: list[dict] = []

    def at(n: float) -> dict:
        metrics = evaluate_at(n)
        points.append({"n": n, **metrics})
        return metrics

    lo = 0.0
    for hi in sorted(set(grid)):
        found = at(hi)
        if found["asr"] <= threshold:
            break
        lo = hi
    else:
        return {"n": None, "metrics": None, "points": points}
    k = 1
    while (n := round(lo + k * step, 6)) < hi - 1e-9:
        metrics = at(n)
        if metrics["asr"] <= threshold:
            return {"n": n, "metrics": metrics, "points": points}
        k += 1
    return {"n": hi, "metrics": found, "points": points}


def finetuned_copy(reinit: nn.Module, clean: ImageSet, cfg: TSBDConfig, runtime: Runtime, *, seed: int = 0,
                   progress: bool = False) -> tuple[nn.Module, dict]:
    """TSBD stage 2 (``cfg.finetune_mode``, lr, epochs) on a copy of ``reinit``; the same seed gives
    every variant the same batches."""
    model = copy.deepcopy(reinit)
    return model, activeness_aware_finetune(model, clean, cfg, runtime, seed=seed, progress=progress)


def with_der(before: dict, after: dict) -> dict:
    """``after`` with DER against ``before`` (both with acc and asr)."""
    return {**after, "der": der(before["acc"], before["asr"], after["acc"], after["asr"])}


def paper_cell(table: str, attack: str, *, defense: str = "tsbd", clean_ratio: float | None = None,
               **config) -> dict | None:
    """The paper's ACC / ASR / DER (fractions) for ``attack`` in ``table`` of
    ``tsbd/bench/data/paper_tables.json``, at the ``defense`` column with this clean ratio and these
    defense options; None where the paper prints none."""
    tab = next((t for t in load_tables()["tables"] if t["id"] == table), None)
    row = (tab or {}).get("rows", {}).get(attack)
    if row is None:
        return None
    for col in tab["columns"]:
        if col["defense"] != defense or (clean_ratio is not None and col.get("clean_ratio") != clean_ratio):
            continue
        if all(col.get("defense_config", {}).get(k) == v for k, v in config.items()) and row.get(col["key"]):
            return {k: None if v is None else v / 100 for k, v in zip(("acc", "asr", "der"), row[col["key"]])}
    return None


# ------------------------------------------------------------------------------------------
# options
def _asr_threshold_option() -> float:
    return cli_option(0.0005, "ASR at or below which the backdoor counts as removed (default: 0.0005 = the paper's "
                              "0.05%%)", "paper Table 3", type=float)


def _refine_step_option() -> float:
    return cli_option(0.01, f"n resolution of the search: the coarse --values grid (default {DEFAULT_GRID}) is refined "
                            "at this step inside its first bracket (default: 0.01)", type=float)


def _check_threshold(threshold: float, step: float) -> None:
    if not 0 <= threshold < 1:
        raise TsbdError(f"--asr-threshold must be a fraction in [0, 1), got {threshold:g} (paper: 0.0005 = 0.05%)")
    if not 0 < step < 1:
        raise TsbdError(f"--refine-step must be in (0, 1), got {step:g} (default 0.01 = 1% of the neurons)")


def _at_n(text: str) -> float | str:
    """``--at-n``: 'auto' or a number."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise TsbdError(f"--at-n must be 'auto' or a fraction in (0, 1], got {text!r}") from None


def _defense_names(text: str) -> tuple[str, ...]:
    return tuple(d.strip().lower() for d in text.split(",") if d.strip())


@dataclasses.dataclass(frozen=True)
class ReinitVariantsOptions:
    values: tuple[float, ...] = values_option(DEFAULT_GRID, "the coarse n grid of the search")
    asr_threshold: float = _asr_threshold_option()
    refine_step: float = _refine_step_option()

    def __post_init__(self):
        _check_threshold(self.asr_threshold, self.refine_step)
        fractions(list(self.values))


@dataclasses.dataclass(frozen=True)
class FinetuneVariantsOptions:
    at_n: float | str | None = cli_option(
        None, "n of the reinit that is fine-tuned: a fraction, or 'auto' = the smallest n with ASR <= --asr-threshold "
              "after reinit (the paper's Table 4 fine-tunes Table 3's V3 model); default: the config's neuron_ratio "
              "(0.15)", "paper Table 4", parse=_at_n)
    values: tuple[float, ...] = values_option(DEFAULT_GRID, "the coarse n grid of the search (at_n 'auto')")
    asr_threshold: float = _asr_threshold_option()
    refine_step: float = _refine_step_option()

    def __post_init__(self):
        if self.at_n is not None and self.at_n != "auto":
            fractions([self.at_n], "--at-n", "n")
        _check_threshold(self.asr_threshold, self.refine_step)
        fractions(list(self.values))


@dataclasses.dataclass(frozen=True)
class SweepCleanRatioOptions:
    values: tuple[float, ...] = values_option(DEFAULT_CLEAN, "clean-data ratios", "paper Table 7")

    def __post_init__(self):
        fractions(list(self.values))


@dataclasses.dataclass(frozen=True)
class SweepFinetuneLROptions:
    values: tuple[float, ...] = values_option(DEFAULT_LR, "fine-tuning learning rates", "paper Table 8")

    def __post_init__(self):
        if any(v <= 0 for v in self.values):
            raise TsbdError(f"--values: learning rates must be > 0, got {min(self.values):g}; e.g. 0.1,0.01,0.001")


@dataclasses.dataclass(frozen=True)
class CleanModelOptions:
    defenses: tuple[str, ...] = cli_option(
        _defense_names(DEFAULT_DEFENSES), f"comma-separated defenses (default: {DEFAULT_DEFENSES}); --opt sets TSBD's "
                                          "options, the others run with their defaults", "paper Fig. 11 (a subset)",
        parse=_defense_names)

    def __post_init__(self):
        if not self.defenses:
            raise TsbdError(f"--defenses is empty; name one or more defenses, e.g. {DEFAULT_DEFENSES}")
        for name in self.defenses:
            DEFENSES.get(name)  # unknown names fail here, in one line, before the clean model is trained


@dataclasses.dataclass(frozen=True)
class SweepPoisonRatioOptions:
    values: tuple[float, ...] = values_option(DEFAULT_POISON, "poison ratios", "paper App. H / Fig. 10")

    def __post_init__(self):
        fractions(list(self.values))


# ------------------------------------------------------------------------------------------
# output helpers
def percent(ratio: float) -> str:
    return f"{100 * ratio:g}%"


def _pct(cell: dict | None, key: str) -> str:
    v = None if cell is None else cell.get(key)
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def paper_table(groups: list[tuple[str, tuple[str, ...]]], rows: list[tuple[str, list]]) -> list[str]:
    """Markdown in the paper's layout: a column group per setting (e.g. ACC ASR DER), a row per model
    (ours; the paper's, where it has one). Cells are metric dicts in fractions, printed as %."""
    lines = ["| |" + "".join(f" {g} {k.upper()} |" for g, keys in groups for k in keys),
             "|---|" + "---|" * sum(len(keys) for _, keys in groups)]
    for label, cells in rows:
        lines.append(f"| {label} |" + "".join(f" {_pct(c, k)} |" for (_, keys), c in zip(groups, cells) for k in keys))
    return lines


def _attack_label(ctx: AnalysisContext) -> str:
    return ATTACK_NAMES.get(ctx.setup.attack.name, ctx.setup.attack.name)


def _plot(out, stem: str, title: str, xlabel: str, xs: list, series: dict, *, logx: bool = False,
          hlines: dict | None = None, bars: bool = False) -> None:
    """``series``: label -> values in fractions, drawn in % as lines over ``xs`` (or grouped bars)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(len(series), 1)
    for i, (label, ys) in enumerate(series.items()):
        ys = [100 * y for y in ys]
        if bars:
            ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(xs))], ys, width, label=label)
        else:
            ax.plot(xs, ys, "o-" if "ASR" not in label else "s--", label=label)
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(100 * y, color="grey", lw=0.8, ls=(":", "-.")[i % 2], label=label)
    if bars:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    save_figure(fig, out / stem)
    plt.close(fig)


def _plot_tsbd_sweep(ctx: AnalysisContext, out, stem: str, what: str, values: Sequence[float], rows: list[dict],
                     before: dict) -> None:
    """ACC / ASR after TSBD over ``values`` of ``what`` (log x), the no-defense levels as lines."""
    _plot(out, stem, f"{ctx.setup.attack.name}: TSBD over the {what}", what, list(values),
          {"ACC after TSBD": [r["acc"] for r in rows], "ASR after TSBD": [r["asr"] for r in rows]}, logx=True,
          hlines={"ACC no defense": before["acc"], "ASR no defense": before["asr"]})


def _tsbd(ctx: AnalysisContext, model: nn.Module, clean: ImageSet) -> nn.Module:
    """TSBD, as ``tsbd defend`` runs it with the analysis's config, on a copy of ``model``."""
    return TSBD(ctx.cfg).purify(model, clean, runtime=ctx.runtime, seed=ctx.seed, progress=ctx.progress).model


# ------------------------------------------------------------------------------------------
def measure_reinit_variants(ctx: AnalysisContext, options: ReinitVariantsOptions) -> Measurement:
    cfg, grid = ctx.cfg, list(options.values)
    change, unlearn_info = unlearned_change(ctx.model, ctx.clean, cfg, ctx.runtime, seed=ctx.seed,
                                            progress=ctx.progress)
    found = {s: first_ratio_below(reinit_evaluator(ctx.model, change, cfg.weight_ratio, s, ctx.evaluate), grid,
                                  options.asr_threshold, options.refine_step) for s in SCHEMES}
    result = {"unlearn": unlearn_info, "threshold": options.asr_threshold, "refine_step": options.refine_step,
              "grid": grid, "schemes": {s: {"n": f["n"], "metrics": f["metrics"], "evaluations": len(f["points"])}
                                        for s, f in found.items()}}
    return Measurement(result, {"found": found})


def render_reinit_variants(ctx: AnalysisContext, options: ReinitVariantsOptions, measured: Measurement, out) -> str:
    cfg, found, result = ctx.cfg, measured.records["found"], measured.result
    threshold, step, grid, unlearn_info = (result[k] for k in ("threshold", "refine_step", "grid", "unlearn"))
    points = [{"scheme": s, **p} for s, f in found.items() for p in f["points"]]
    write_csv(out / "reinit_points.csv", points)
    summary = [{"scheme": s, "n": f["n"], **{k: (f["metrics"] or {}).get(k) for k in ("acc", "asr", "ra")},
                "reached": f["n"] is not None, "evaluations": len(f["points"])} for s, f in found.items()]
    write_csv(out / "reinit_variants.csv", summary)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, s in enumerate(SCHEMES):
        pts = sorted(found[s]["points"], key=lambda p: p["n"])
        xs = [100 * p["n"] for p in pts]
        ax.plot(xs, [100 * p["acc"] for p in pts], "o--", color=f"C{i}", ms=3, label=f"{s.upper()} ACC")
        ax.plot(xs, [100 * p["asr"] for p in pts], "s-", color=f"C{i}", ms=3, label=f"{s.upper()} ASR")
        if found[s]["n"] is not None:
            ax.axvline(100 * found[s]["n"], color=f"C{i}", lw=0.8, ls=":")
    ax.set_xlabel("neuron ratio n (%)")
    ax.set_ylabel("% (after zero reinit, no fine-tuning)")
    ax.set_title(f"{ctx.setup.attack.name}: reinit schemes, ASR <= {threshold:.2%} at the dotted n", fontsize=9)
    ax.legend(fontsize=7, frameon=False, ncol=2)
    fig.tight_layout()
    save_figure(fig, out / "reinit_variants")
    plt.close(fig)

    attack = ctx.setup.attack.name
    rows = [(f"{_attack_label(ctx)} (ours)", [found[s]["metrics"] for s in SCHEMES])]
    if attack in PAPER_TABLE3:
        rows.append((f"{_attack_label(ctx)} ({PAPER_SETTING})",
                     [dict(zip(("acc", "asr"), (v / 100 for v in PAPER_TABLE3[attack][s]))) for s in SCHEMES]))
    reached = {s: f["metrics"]["acc"] for s, f in found.items() if f["n"] is not None}
    where = "; ".join(f"{s.upper()} n = {f['n']:g} (RA {f['metrics']['ra']:.2%})" if f["n"] is not None
                      else f"{s.upper()} not reached up to n = {max(grid):g}" for s, f in found.items())
    best = max(reached, key=reached.get) if reached else None
    md = [f"### Reinitialization schemes ({_attack_label(ctx)})", "",
          f"Clean unlearning once ({unlearn_info['epochs']} epochs); for each scheme, zero reinit (m = "
          f"{cfg.weight_ratio:g}, no fine-tuning) at the smallest n (to {step:g}) where ASR first drops to <= "
          f"{threshold:.2%}: the coarse grid {min(grid):g}..{max(grid):g}, refined inside its first bracket. "
          "V1: whole neurons; V2: m% per neuron; V3 (TSBD): m% pooled over the selected neurons.", "",
          *paper_table([(s.upper(), ("acc", "asr")) for s in SCHEMES], rows), "", f"At: {where}.", "",
          "The paper finds V3 removes the backdoor at the highest ACC (80.9-83.1% against 64-79% for V1/V2): "
          "pooling the most-changed subweights across neurons clears strong backdoor neurons more thoroughly "
          "and spares weak ones. "
          + (f"Here {best.upper()} keeps the most ACC at its n: "
             + ", ".join(f"{s.upper()} {a:.2%}" for s, a in sorted(reached.items(), key=lambda kv: -kv[1]))
             + "".join(f"; {s.upper()} does not reach the threshold" for s in SCHEMES if s not in reached) + "."
             if best else "Here no scheme reached the threshold on the grid; extend --values."),
          "", "![reinit variants](reinit_variants.png)"]
    return "\n".join(md)


def measure_finetune_variants(ctx: AnalysisContext, options: FinetuneVariantsOptions) -> Measurement:
    cfg = ctx.cfg
    before = ctx.evaluate(ctx.model)
    change, unlearn_info = unlearned_change(ctx.model, ctx.clean, cfg, ctx.runtime, seed=ctx.seed,
                                            progress=ctx.progress)
    search = None
    if options.at_n == "auto":
        grid = list(options.values)
        search = first_ratio_below(reinit_evaluator(ctx.model, change, cfg.weight_ratio, cfg.reinit_scheme,
                                                    ctx.evaluate), grid, options.asr_threshold, options.refine_step)
        n = search["n"] if search["n"] is not None else max(grid)
    else:
        n = cfg.neuron_ratio if options.at_n is None else options.at_n
    reinit, reinit_info = zero_reinit(ctx.model, change, n, cfg.weight_ratio, cfg.reinit_scheme)
    rows = []
    for label, mode in FINETUNE_VARIANTS.items():
        t0 = time.perf_counter()
        model, ft_info = finetuned_copy(reinit, ctx.clean, dataclasses.replace(cfg, finetune_mode=mode), ctx.runtime,
                                        seed=ctx.seed, progress=ctx.progress)
        rows.append({"variant": label, "finetune_mode": mode, **with_der(before, ctx.evaluate(model)),
                     "epochs": ft_info["epochs"], "seconds": time.perf_counter() - t0})
    rule = "config" if options.at_n is None else str(options.at_n)
    result = {"before": before, "unlearn": unlearn_info, "at_n": n, "at_n_rule": rule, "reinit": reinit_info,
              "search": search and {k: search[k] for k in ("n", "metrics")}, "rows": rows}
    return Measurement(result)


def render_finetune_variants(ctx: AnalysisContext, options: FinetuneVariantsOptions, measured: Measurement,
                             out) -> str:
    cfg, result = ctx.cfg, measured.result
    before, rows, n, search = result["before"], result["rows"], result["at_n"], result["search"]
    unlearn_info, reinit_info = result["unlearn"], result["reinit"]
    write_csv(out / "finetune_variants.csv", rows)
    labels = list(FINETUNE_VARIANTS)
    _plot(out, "finetune_variants", f"{ctx.setup.attack.name}: fine-tuning schemes after zero reinit at n = {n:g}",
          "fine-tuning", labels, {k.upper(): [r[k] for r in rows] for k in ("acc", "asr", "ra")}, bars=True,
          hlines={"ACC before": before["acc"], "ASR before": before["asr"]})

    table = [(f"{_attack_label(ctx)} (ours)", rows)]
    paper = [paper_cell("table4", ctx.setup.attack.name, finetune_mode=m) for m in FINETUNE_VARIANTS.values()]
    if any(paper):
        table.append((f"{_attack_label(ctx)} ({PAPER_SETTING})", paper))
    by = {r["variant"]: r for r in rows}
    how = ("n = 'auto': the smallest n with ASR <= "
           f"{options.asr_threshold:.2%} after reinit" + ("" if search["n"] is not None else
                                                         ", not reached, so the largest grid value")
           if search else f"n = {n:g}" + (" (the config's neuron_ratio)" if options.at_n is None else ""))
    md = [f"### Fine-tuning schemes ({_attack_label(ctx)})", "",
          f"Clean unlearning once ({unlearn_info['epochs']} epochs), zero reinit ({cfg.reinit_scheme.upper()}, m = "
          f"{cfg.weight_ratio:g}) at {how}: {reinit_info['neurons_selected']} neurons. Each variant fine-tunes a "
          f"copy of that model (epochs {cfg.finetune_epochs}, lr {cfg.finetune_lr:g}, the same batches). No defense: "
          f"ACC {before['acc']:.2%}, ASR {before['asr']:.2%}.", "",
          *paper_table([(v, ("acc", "asr", "der")) for v in labels], table), "",
          "The paper finds fine-tuning recovers about 9 points of ACC and brings back some ASR, Aa-FT less of it "
          "than Vanilla-FT (1.4-2.6% against 1.7-7.6%). Here fine-tuning changes ACC by "
          f"{100 * (by['Aa-FT']['acc'] - by['No-FT']['acc']):+.2f} points (Aa-FT) and "
          f"{100 * (by['Vanilla-FT']['acc'] - by['No-FT']['acc']):+.2f} points (Vanilla-FT); ASR after Aa-FT "
          f"{by['Aa-FT']['asr']:.2%} against {by['Vanilla-FT']['asr']:.2%} after Vanilla-FT.", "",
          "![fine-tuning variants](finetune_variants.png)"]
    return "\n".join(md)


# ------------------------------------------------------------------------------------------
def measure_sweep_clean_ratio(ctx: AnalysisContext, options: SweepCleanRatioOptions) -> Measurement:
    before = ctx.evaluate(ctx.model)
    rows = []
    for ratio in options.values:
        t0 = time.perf_counter()
        # one seeded permutation of the unpoisoned images, cut at each size: smaller sets are inside larger ones
        clean, info = ctx.setup.clean_set(ratio)
        rows.append({"clean_ratio": ratio, "clean_images": info["count"],
                     **with_der(before, ctx.evaluate(_tsbd(ctx, ctx.model, clean))),
                     "seconds": time.perf_counter() - t0})
    return Measurement({"before": before, "rows": rows})


def render_sweep_clean_ratio(ctx: AnalysisContext, options: SweepCleanRatioOptions, measured: Measurement,
                             out) -> str:
    values, before, rows = options.values, measured.result["before"], measured.result["rows"]
    write_csv(out / "sweep_clean_ratio.csv", rows)
    _plot_tsbd_sweep(ctx, out, "sweep_clean_ratio", "clean-data ratio", values, rows, before)
    attack = ctx.setup.attack.name
    groups = [("No Defense", ("acc", "asr"))] + [(percent(r), ("acc", "asr", "der")) for r in values]
    table = [(f"{_attack_label(ctx)} (ours)", [before] + rows)]
    paper = [paper_cell("table7", attack, defense="none")] + [paper_cell("table7", attack, clean_ratio=r)
                                                              for r in values]
    if any(paper):
        table.append((f"{_attack_label(ctx)} ({PAPER_SETTING})", paper))
    accs = ", ".join(f"{r['acc']:.2%}" for r in sorted(rows, key=lambda r: -r["clean_ratio"]))
    md = [f"### TSBD over the clean-data ratio ({_attack_label(ctx)})", "",
          f"TSBD with its full schedule on each clean set (a seeded draw of the unpoisoned training images; the "
          f"smaller sets are subsets of the larger); sizes {', '.join(str(r['clean_images']) for r in rows)} images.",
          "", *paper_table(groups, table), "",
          "The paper finds more clean data always gives more ACC (92.18 > 91.70 > 89.63 > 86.42% on average from "
          f"10% to 0.5%) with ASR under 10% throughout. Here ACC from the largest to the smallest set: {accs}; "
          f"ASR at most {max(r['asr'] for r in rows):.2%}.", "", "![clean ratio](sweep_clean_ratio.png)"]
    return "\n".join(md)


def measure_sweep_ft_lr(ctx: AnalysisContext, options: SweepFinetuneLROptions) -> Measurement:
    cfg = ctx.cfg
    before = ctx.evaluate(ctx.model)
    change, unlearn_info = unlearned_change(ctx.model, ctx.clean, cfg, ctx.runtime, seed=ctx.seed,
                                            progress=ctx.progress)
    reinit, reinit_info = zero_reinit(ctx.model, change, cfg.neuron_ratio, cfg.weight_ratio, cfg.reinit_scheme)
    after_reinit = ctx.evaluate(reinit)
    rows = []
    for lr in options.values:
        t0 = time.perf_counter()
        model, _ = finetuned_copy(reinit, ctx.clean, dataclasses.replace(cfg, finetune_lr=lr), ctx.runtime,
                                  seed=ctx.seed, progress=ctx.progress)
        rows.append({"finetune_lr": lr, **with_der(before, ctx.evaluate(model)), "seconds": time.perf_counter() - t0})
    return Measurement({"before": before, "unlearn": unlearn_info, "reinit": reinit_info,
                        "after_reinit": after_reinit, "rows": rows})


def render_sweep_ft_lr(ctx: AnalysisContext, options: SweepFinetuneLROptions, measured: Measurement, out) -> str:
    cfg, values, result = ctx.cfg, options.values, measured.result
    before, rows, after_reinit = result["before"], result["rows"], result["after_reinit"]
    write_csv(out / "sweep_ft_lr.csv", rows)
    _plot_tsbd_sweep(ctx, out, "sweep_ft_lr", "fine-tuning learning rate", values, rows, before)
    attack = ctx.setup.attack.name
    groups = [("No Defense", ("acc", "asr"))] + [(f"lr {lr:g}", ("acc", "asr", "der")) for lr in values]
    table = [(f"{_attack_label(ctx)} (ours)", [before] + rows)]
    paper = [paper_cell("table8", attack, defense="none")] + [paper_cell("table8", attack, finetune_lr=lr)
                                                              for lr in values]
    if any(paper):
        table.append((f"{_attack_label(ctx)} ({PAPER_SETTING})", paper))
    best = max(rows, key=lambda r: r["der"])
    md = [f"### TSBD over the fine-tuning learning rate ({_attack_label(ctx)})", "",
          f"Clean unlearning ({result['unlearn']['epochs']} epochs) and zero reinit (n = {cfg.neuron_ratio:g}, m = "
          f"{cfg.weight_ratio:g}) once -- after it ACC {after_reinit['acc']:.2%}, ASR {after_reinit['asr']:.2%} -- "
          f"then {cfg.finetune_mode} fine-tuning ({cfg.finetune_epochs} epochs) of a copy at each lr.", "",
          *paper_table(groups, table), "",
          "The paper finds its default 0.01 best on DER: 0.1 costs about 12 points of ACC, while 0.001 and 0.0001 "
          f"leave ASR high on strong attacks (Blended, LF). Here the best DER ({best['der']:.2%}) is at lr "
          f"{best['finetune_lr']:g}.", "", "![fine-tuning lr](sweep_ft_lr.png)"]
    return "\n".join(md)


# ------------------------------------------------------------------------------------------
def measure_clean_model(ctx: AnalysisContext, options: CleanModelOptions) -> Measurement:
    clean_model, clean_meta = ctx.clean_reference_model()
    before = ctx.evaluate(clean_model)
    rows = []
    for name in options.defenses:
        defense = TSBD(ctx.cfg) if name == "tsbd" else build_defense(name)
        res = defense.purify(clean_model, ctx.clean, runtime=ctx.runtime, seed=ctx.seed, progress=ctx.progress)
        after = ctx.evaluate(res.model)
        rows.append({"defense": name, **{f"{k}_before": v for k, v in before.items()}, **after,
                     "seconds": res.timings.get("total")})
    return Measurement({"before": before, "clean_model_metrics": clean_meta.get("metrics"), "rows": rows})


def render_clean_model(ctx: AnalysisContext, options: CleanModelOptions, measured: Measurement, out) -> str:
    names, before, rows = list(options.defenses), measured.result["before"], measured.result["rows"]
    arch = ctx.meta.get("arch", {})
    write_csv(out / "clean_model.csv", rows)
    _plot(out, "clean_model", f"defenses on a clean {arch['name']} ({ctx.setup.attack.name} trigger)", "defense",
          names, {"ACC": [r["acc"] for r in rows], "trigger ASR": [r["asr"] for r in rows]}, bars=True,
          hlines={"ACC before": before["acc"], "trigger ASR before": before["asr"]})
    md = [f"### Defenses on a clean model ({ctx.setup.dataset.name}, {arch['name']})", "",
          f"A clean {arch['name']} trained with the attacked model's schedule and seed (cached), then each defense "
          f"on the same {len(ctx.clean)} clean images. ASR is the {_attack_label(ctx)} trigger's rate of sending "
          "non-target images to the target class, i.e. its effect without a backdoor.", "",
          *paper_table([("Before", ("acc", "asr"))] + [(n, ("acc", "asr")) for n in names],
                       [("clean model (ours)", [before] + rows)]), "",
          "The paper (Fig. 11) finds most defenses, TSBD included, barely change a clean model (only RNP on Tiny "
          "ImageNet hurts it). Here ACC changes by " + ", ".join(f"{r['defense']} {r['acc'] - before['acc']:+.2%}"
                                                                 for r in rows) + ".",
          "", "![clean model](clean_model.png)"]
    return "\n".join(md)


def measure_sweep_poison_ratio(ctx: AnalysisContext, options: SweepPoisonRatioOptions) -> Measurement:
    meta, runtime = ctx.meta, ctx.runtime
    attack_meta, arch = meta.get("attack") or {}, meta.get("arch", {})
    if not meta.get("train") or not attack_meta.get("name"):
        raise TsbdError("the model's meta.json lacks its attack or training config; use a model from `tsbd attack`")
    own = float(attack_meta.get("config", {}).get("poison_ratio", math.nan))
    train_cfg = TrainConfig(**meta["train"])
    rows = []
    for ratio in options.values:
        t0 = time.perf_counter()
        if math.isclose(ratio, own):
            model, setup, source = ctx.model, ctx.setup, "given model"
        else:  # the same dataset, architecture, attack options, schedule and seed; only the poison ratio differs
            attack = build_attack(attack_meta["name"], {**attack_meta.get("config", {}), "poison_ratio": ratio})
            setup = setup_attack(ctx.setup.dataset, attack, ctx.setup.seed, runtime, arch=arch.get("name"),
                                 arch_kwargs=spec_options(arch), cache_dir=ctx.cache_dir, progress=ctx.progress)
            model, _, cached = cached_attacked_model(setup, arch["name"], train_cfg, runtime,
                                                     arch_kwargs=spec_options(arch), cache_dir=ctx.cache_dir,
                                                     progress=ctx.progress)
            source = "cache" if cached else "trained"
        t_model = time.perf_counter() - t0

        def on_setup(m, setup=setup):
            return evaluate(m, setup.dataset.test, setup.poisoned_test, runtime)

        before = on_setup(model)
        after = with_der(before, on_setup(_tsbd(ctx, model, setup.clean_set(ctx.clean_ratio)[0])))
        count = "per batch" if setup.attack.poisons_per_batch else len(setup.poisoned_train.poison_index)
        rows.append({"poison_ratio": ratio, "model": source, "poisoned_images": count,
                     **{f"{k}_before": v for k, v in before.items()}, **after, "model_seconds": t_model,
                     "seconds": time.perf_counter() - t0})
    return Measurement({"rows": rows, "trained": sum(r["model"] == "trained" for r in rows),
                        "cache_hits": sum(r["model"] == "cache" for r in rows)})


def render_sweep_poison_ratio(ctx: AnalysisContext, options: SweepPoisonRatioOptions, measured: Measurement,
                              out) -> str:
    rows = measured.result["rows"]
    write_csv(out / "sweep_poison_ratio.csv", rows)
    labels = [percent(r) for r in options.values]
    _plot(out, "sweep_poison_ratio", f"{ctx.setup.attack.name}: TSBD over the poison ratio", "poison ratio",
          labels, {"ACC no defense": [r["acc_before"] for r in rows], "ASR no defense": [r["asr_before"] for r in rows],
                   "ACC TSBD": [r["acc"] for r in rows], "ASR TSBD": [r["asr"] for r in rows]}, bars=True)
    md = [f"### TSBD over the poison ratio ({_attack_label(ctx)})", "",
          "The attacked model retrained at each poison ratio with everything else as recorded in its meta.json "
          f"(cached under the cache folder's attacked_models/), then TSBD with {ctx.clean_ratio:g} clean data.",
          "", "| poison ratio | No Defense ACC | No Defense ASR | TSBD ACC | TSBD ASR | TSBD DER | model |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {lab} | {r['acc_before']:.2%} | {r['asr_before']:.2%} | {r['acc']:.2%} | {r['asr']:.2%} | "
           f"{r['der']:.2%} | {r['model']} |" for lab, r in zip(labels, rows)]
    md += ["", "The paper (Fig. 10) finds TSBD defends every attack at 10% and 5% poisoning but less well at 1%, "
           "where the unlearning weight changes of backdoor neurons stand out less. Here ASR after TSBD is "
           + ", ".join(f"{r['asr']:.2%} at {lab}" for lab, r in zip(labels, rows)) + ".",
           "", "![poison ratio](sweep_poison_ratio.png)"]
    return "\n".join(md)


register("reinit-variants", "Table 3: V1/V2/V3 zero reinit at the smallest n with ASR <= threshold (no FT)",
         ReinitVariantsOptions, measure_reinit_variants, render_reinit_variants)
register("finetune-variants", "Table 4: No-FT / Vanilla-FT / Aa-FT from one zero-reinitialized model",
         FinetuneVariantsOptions, measure_finetune_variants, render_finetune_variants)
register("sweep-clean-ratio", f"Table 7: TSBD with clean-data ratios --values (default {DEFAULT_CLEAN})",
         SweepCleanRatioOptions, measure_sweep_clean_ratio, render_sweep_clean_ratio)
register("sweep-ft-lr", f"Table 8: TSBD with fine-tuning learning rates --values (default {DEFAULT_LR})",
         SweepFinetuneLROptions, measure_sweep_ft_lr, render_sweep_ft_lr)
register("clean-model", "App. K / Fig. 11: defenses on a clean model of the same architecture (ACC, trigger ASR)",
         CleanModelOptions, measure_clean_model, render_clean_model)
register("sweep-poison-ratio", f"App. H / Fig. 10: TSBD on the model retrained (cached) at poison ratios --values "
         f"(default {DEFAULT_POISON})", SweepPoisonRatioOptions, measure_sweep_poison_ratio, render_sweep_poison_ratio)
