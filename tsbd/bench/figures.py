"""The report's figures, drawn from a :class:`~tsbd.bench.layout.TableGrid`.

* a heatmap per metric (DER, ASR): attacks as rows (the average last), defenses as columns, our
  value printed in each cell with the paper's below it where the paper has the cell, colour by
  value (blue good, red bad, on a fixed 0-100 scale so reports compare), the best defense of each
  row boxed -- the attack x defense layout of BackdoorBench's leaderboard;
* ACC against ASR as small multiples, one panel per attack, every defense a marker (the paper's
  hollow), top left best.

Every figure is sized for a laptop screen: no side longer than :data:`MAX_ASPECT` times the other.
"""

from __future__ import annotations

import math

from tsbd.artifacts import pyplot
from tsbd.bench.layout import GridRow, TableGrid

MAX_ASPECT = 2.8  # the longer side at most this many times the shorter (bbox cropping adds a little)
# metric -> (colour map, what is better); blue is good in both
SCALES = {"der": ("RdYlBu", "higher is better"), "asr": ("RdYlBu_r", "lower is better"),
          "acc": ("RdYlBu", "higher is better")}
CELL_W, CELL_H = 0.82, 0.44  # inches per heatmap cell (one number); a paper value below adds 0.2
PANEL_W, PANEL_H = 2.7, 2.3  # inches per small-multiple panel
MARKERS = "osD^vP*h<>p"


def readable_size(width: float, height: float) -> tuple[float, float]:
    """(width, height) grown along the shorter side until neither is over MAX_ASPECT x the other."""
    return max(width, height / MAX_ASPECT), max(height, width / MAX_ASPECT)


def heatmap(grid: TableGrid, metric: str, title: str):
    """One metric of every attack (rows) x defense (columns), values printed, best per row boxed."""
    plt = pyplot()
    one = grid.select(metric)
    rows, cols = one.rows, one.columns
    data = [[math.nan if e.value is None else e.value for e in r.entries] for r in rows]
    with_paper = any(e.paper is not None for r in rows for e in r.entries)
    cell_h = CELL_H + (0.2 if with_paper else 0.0)
    label_w = 0.3 + 0.075 * max(len(r.label) for r in rows)
    col_h = 0.3 + 0.05 * max(len(c.group) for c in cols)  # the 30-degree column labels
    width, height = readable_size(label_w + CELL_W * len(cols) + 1.1, 0.9 + col_h + cell_h * len(rows))
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")

    cmap_name, better = SCALES[metric]
    cmap = plt.get_cmap(cmap_name).with_extremes(bad="#eeeeee")
    norm = plt.Normalize(0, 100)
    image = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto")
    for i, r in enumerate(rows):
        for j, e in enumerate(r.entries):
            if e.value is None:
                ax.text(j, i, "-", ha="center", va="center", fontsize=9, color="#666")
                continue
            red, green, blue, _ = cmap(norm(e.value))
            ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            weight = "bold" if e.best else "normal"
            lift = -0.13 if e.paper is not None else 0.0
            ax.text(j, i + lift, f"{e.value:.1f}", ha="center", va="center", fontsize=9, color=ink,
                    fontweight=weight)
            if e.paper is not None:
                ax.text(j, i + 0.22, f"({e.paper:.1f})", ha="center", va="center", fontsize=7, color=ink)
            if e.best:  # a black box with a white one inside: seen on dark and light cells alike
                ax.add_patch(plt.Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="black", lw=2.2))
                ax.add_patch(plt.Rectangle((j - 0.42, i - 0.42), 0.84, 0.84, fill=False, edgecolor="white", lw=1))
    for i in range(1, len(rows)):  # the average row apart from the attacks
        if rows[i].average:
            ax.axhline(i - 0.5, color="white", lw=4)
    for j in range(1, len(cols)):  # the attacked model apart from the defenses
        if cols[j - 1].reference and not cols[j].reference:
            ax.axvline(j - 0.5, color="white", lw=4)
    ax.set_xticks(range(len(cols)), [c.group for c in cols], rotation=30, ha="right", rotation_mode="anchor",
                  fontsize=8)
    ax.set_yticks(range(len(rows)), [r.label for r in rows], fontsize=8)
    for tick, r in zip(ax.get_yticklabels(), rows):
        if r.average:
            tick.set_fontweight("bold")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    note = "boxed: best defense per row" + ("; in parentheses: the paper's value" if with_paper else "")
    ax.set_title(f"{metric.upper()} (%), {better}\n{title}\n{note}", fontsize=8.5)
    bar = fig.colorbar(image, ax=ax, shrink=0.8, aspect=25, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    return fig


def _point(grid: TableGrid, row: GridRow, group: str, paper: bool) -> tuple[float, float] | None:
    acc, asr = grid.entry(row, group, "acc"), grid.entry(row, group, "asr")
    if acc is None or asr is None:
        return None
    x, y = (asr.paper, acc.paper) if paper else (asr.value, acc.value)
    return None if x is None or y is None else (x, y)


def acc_asr_panels(grid: TableGrid, title: str):
    """ACC against ASR, one panel per attack, the same marker for a defense in every panel."""
    plt = pyplot()
    attacks = [r for r in grid.rows if not r.average]
    groups = [label for label, _ in grid.groups()]
    reference = {c.group for c in grid.columns if c.reference}
    ncols = min(len(attacks), 4)
    nrows = math.ceil(len(attacks) / ncols)
    legend_rows = math.ceil((len(groups) + 1) / max(2, ncols + 1))
    width, height = readable_size(PANEL_W * ncols + 0.6, PANEL_H * nrows + 0.9 + 0.22 * legend_rows)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), sharex=True, sharey=True, squeeze=False,
                             layout="constrained")
    colors = plt.get_cmap("tab10").colors
    style = {}
    for k, g in enumerate([g for g in groups if g not in reference]):
        style[g] = {"color": colors[k % len(colors)], "marker": MARKERS[k % len(MARKERS)]}
    for g in reference:
        style[g] = {"color": "black", "marker": "X"}
    ys = []
    for ax, row in zip(axes.flat, attacks):
        for g in groups:
            ours, paper = _point(grid, row, g, paper=False), _point(grid, row, g, paper=True)
            if ours:  # a little transparent, the attacked model on top: two on one spot both show
                ax.scatter(*ours, s=44, zorder=4 if g in reference else 3, alpha=0.8, label=g, **style[g])
                ys.append(ours[1])
            if paper:
                ax.scatter(*paper, s=44, zorder=2, facecolors="none", edgecolors=[style[g]["color"]],
                           marker=style[g]["marker"])
                ys.append(paper[1])
        ax.set_title(row.label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for k, ax in enumerate(axes.flat):
        if k >= len(attacks):
            ax.set_visible(False)
        elif k + ncols >= len(attacks):  # nothing below it: the x axis is labelled here
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("ASR (%), lower is better", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("ACC (%), higher is better", fontsize=8)
    low = min(ys, default=0.0)
    axes[0][0].set_xlim(-4, 104)
    axes[0][0].set_ylim(max(0.0, low - 4), min(100.0, max(ys, default=100.0) + 3))
    fig.suptitle(f"ACC against ASR per attack (top left is best)\n{title}", fontsize=9)
    handles = [plt.Line2D([], [], ls="", markersize=7, label=g, **style[g])
               for g in groups]
    if any(_point(grid, r, g, paper=True) for r in attacks for g in groups):
        handles.append(plt.Line2D([], [], ls="", marker="o", markersize=7, markerfacecolor="none",
                                  markeredgecolor="#555", label="hollow: the paper's value"))
    fig.legend(handles=handles, loc="outside lower center", ncol=max(2, ncols + 1), fontsize=7.5, frameon=False)
    return fig


def sweep_panels(lines: list[tuple[str, list[tuple[float, float, float]], float | None]], title: str):
    """TSBD's n swept on test data: test ASR (left) and ACC (right) against n, one line per attack
    (and seed), the picked n starred. ``lines``: (label, [(n, acc, asr)], picked n)."""
    plt = pyplot()
    width, height = readable_size(2 * PANEL_W + 2.4, PANEL_H + 0.9)
    fig, (ax_asr, ax_acc) = plt.subplots(1, 2, figsize=(width, height), sharex=True, layout="constrained")
    colors = plt.get_cmap("tab10").colors
    for k, (label, points, picked) in enumerate(lines):
        if not points:
            continue
        ns, accs, asrs = zip(*points)
        style = {"color": colors[k % len(colors)], "marker": MARKERS[k % len(MARKERS)], "markersize": 4}
        ax_asr.plot(ns, asrs, label=label, **style)
        ax_acc.plot(ns, accs, **style)
        for n, acc, asr in points:
            if picked is not None and abs(n - picked) < 1e-12:
                ax_asr.scatter([n], [asr], s=130, marker="*", color=style["color"], zorder=5, edgecolors="black")
                ax_acc.scatter([n], [acc], s=130, marker="*", color=style["color"], zorder=5, edgecolors="black")
    ax_asr.set_ylim(-3, 103)
    ax_asr.set_ylabel("test ASR (%), lower is better", fontsize=8)
    ax_acc.set_ylabel("test ACC (%), higher is better", fontsize=8)
    for ax in (ax_asr, ax_acc):
        ax.set_xlabel("neuron ratio n", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.legend(loc="outside right center", fontsize=7, frameon=False)
    fig.suptitle(f"TSBD's neuron ratio n swept on test data (selected on test data)\n{title}", fontsize=9)
    return fig
