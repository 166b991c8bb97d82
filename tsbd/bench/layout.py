"""A results table as a neutral grid of cells: what the Markdown table, the HTML table and the
report's figures are drawn from (:func:`tsbd.bench.report.table_grid` builds it).

Each column is one metric (ACC, ASR or DER) of one defense column of the results table; each row
one attack, then the average row. Each cell carries our value, the paper's value for the same
cell where the paper has one, and whether it is the best defense of its row for that metric.
"""

from __future__ import annotations

import dataclasses
import itertools


@dataclasses.dataclass(frozen=True)
class Entry:
    value: float | None  # ours, in %; None where the cell was not run
    paper: float | None = None  # the paper's value for the same cell, in %
    best: bool = False  # the best defense of its row for this metric
    sd: float | None = None  # the sample standard deviation over the cell's seeds, in % points (n > 1)


@dataclasses.dataclass(frozen=True)
class GridColumn:
    group: str  # the defense column's label ("No Defense", "TSBD", "TSBD (neuron_ratio=0.3)", ...)
    metric: str  # acc | asr | der
    reference: bool = False  # No Defense: the attacked model itself, never ranked


@dataclasses.dataclass(frozen=True)
class GridRow:
    label: str  # the attack's label, or "Average"
    entries: tuple[Entry, ...]  # one per column
    average: bool = False


@dataclasses.dataclass(frozen=True)
class TableGrid:
    columns: tuple[GridColumn, ...]
    rows: tuple[GridRow, ...]

    def groups(self) -> list[tuple[str, int]]:
        """(defense label, number of metric columns) in column order."""
        return [(label, len(list(cols))) for label, cols in itertools.groupby(self.columns, key=lambda c: c.group)]

    def starts_group(self, i: int) -> bool:
        return i == 0 or self.columns[i - 1].group != self.columns[i].group

    def select(self, metric: str) -> TableGrid:
        """The columns of one metric."""
        keep = [i for i, c in enumerate(self.columns) if c.metric == metric]
        return TableGrid(tuple(self.columns[i] for i in keep),
                         tuple(dataclasses.replace(r, entries=tuple(r.entries[i] for i in keep)) for r in self.rows))

    def entry(self, row: GridRow, group: str, metric: str) -> Entry | None:
        for c, e in zip(self.columns, row.entries):
            if c.group == group and c.metric == metric:
                return e
        return None
