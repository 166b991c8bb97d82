"""Benchmarks: ``tsbd bench GRID`` runs a grid of attack x defense cells into a resumable SQLite
results store (:mod:`tsbd.bench.store`), locally or on Ray (:mod:`tsbd.bench.executors`);
``tsbd report`` lays the results out like the paper's tables (:mod:`tsbd.bench.report`).

A grid (:mod:`tsbd.bench.grid`) expands into content-addressed cells: an attacked model is
trained once per distinct attack setting and shared by every defense cell that needs it.
"""

from tsbd.bench.cells import CellContext, CellResult, run_cell
from tsbd.bench.executors import Summary, run_grid
from tsbd.bench.grid import PRESETS, Cell, Plan, cell_id, load_grid, load_spec
from tsbd.bench.store import Store

__all__ = ["PRESETS", "Cell", "CellContext", "CellResult", "Plan", "Store", "Summary", "cell_id", "load_grid",
           "load_spec", "run_cell", "run_grid"]
