"""`tsbd report`: tables match the store, paper numbers beside ours, plots; the shipped paper data."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tsbd.bench.cells import CellResult, now_iso
from tsbd.bench.grid import Plan, attack_cell, defense_cell, relevant_versions
from tsbd.bench.paper import DATA, PaperIndex
from tsbd.bench.store import Store
from tsbd.cli import main
from tsbd.config import to_dict
from tsbd.errors import TsbdError

# made-up results: (attack, defense, clean ratio, tsbd options) -> (acc, asr, der)
NO_DEF = {"badnets": (0.85, 0.95), "blended": (0.80, 0.99)}
DEF = {
    ("badnets", "tsbd", ()): (0.84, 0.02, 0.96),
    ("badnets", "tsbd", (("neuron_ratio", 0.3),)): (0.80, 0.01, 0.95),
    ("badnets", "otherdef", ()): (0.86, 0.50, 0.72),
    ("blended", "tsbd", ()): (0.78, 0.05, 0.96),
    ("blended", "tsbd", (("neuron_ratio", 0.3),)): (0.79, 0.03, 0.97),
    ("blended", "otherdef", ()): (0.81, 0.90, 0.545),
}


def _defaults(kind, name):
    from tsbd.attacks import ATTACKS
    from tsbd.defenses import DEFENSES

    reg = ATTACKS if kind == "attack" else DEFENSES
    return to_dict(reg.get(name).config_class())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A store with 2 attacks x (No Defense, TSBD, TSBD variant, an unregistered defense), one failure."""
    folder = tmp_path_factory.mktemp("results")
    cells, metrics = [], {}
    for att, (acc, asr) in NO_DEF.items():
        a = _attack_cell(att)
        cells.append(a)
        metrics[a.id] = {"acc": acc, "asr": asr, "ra": 0.0}
        for (att2, name, opts), (dacc, dasr, dder) in DEF.items():
            if att2 != att:
                continue
            config = {**_defaults("defense", "tsbd"), **dict(opts)} if name == "tsbd" else {"batch_size": 256}
            d = defense_cell(a, defense={"name": name, "config": config}, clean_ratio=0.05, seed=0)
            cells.append(d)
            metrics[d.id] = {"acc": dacc, "asr": dasr, "der": dder}
    failed = defense_cell(cells[0], defense={"name": "otherdef", "config": {"batch_size": 1}}, clean_ratio=0.05, seed=0)
    cells.append(failed)
    _fill_store(folder, "fixture", cells, metrics, failed=failed.id)
    return folder


def _attack_cell(att):
    return attack_cell(dataset={"name": "cifar10", "options": {}, "limit_train": 0, "limit_test": 0,
                                "fingerprint": "f" * 16},
                       model={"name": "airbench", "options": {"widths": [32, 64, 128]}},
                       attack={"name": att, "config": _defaults("attack", att)},
                       train={"epochs": 30, "batch_size": 256, "lr": 0.2, "schedule": "onecycle"}, seed=0,
                       versions=relevant_versions())


def _fill_store(folder, grid, cells, metrics, failed=None, seconds=None):
    """Register ``cells`` as grid ``grid`` and finish each with its ``metrics`` (``failed``: that one fails;
    ``seconds``: {cell id: its recorded time}, else 1 s)."""
    with Store(folder) as store:
        store.register(Plan(grid, {"name": grid}, cells))
        for i, c in enumerate(cells):
            assert store.claim(c.id) == "claimed"
            if c.id == failed:
                store.fail(c.id, "RuntimeError: out of memory")
                continue
            timings = {"total": (seconds or {}).get(c.id, 1.0), "peak_rss_mb": 1000.0 + i}  # the largest is shown
            store.complete(c.id, CellResult(metrics[c.id], timings, {"tsbd": "0.1"}, f"artifacts/{c.id}",
                                            "testhost", now_iso(), now_iso()))


def md_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def ours(cell: str) -> float:
    return float(re.sub(r"\s*(±.*|\(.*\))$", "", cell).strip("*"))


def paper(cell: str) -> float | None:
    m = re.search(r"\(([\d.]+)\)", cell)
    return float(m.group(1)) if m else None


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    """`tsbd report` of the fixture store, with figures: the output folder."""
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(results), "--out", str(out)]) == 0
    return out


def test_report_tables_match_the_database(report):
    out = report
    md = (out / "report.md").read_text()
    rows = md_rows(md)
    header = rows["Attack"]
    assert header == ["No Defense ACC", "No Defense ASR",
                      "TSBD (neuron_ratio=0.15) ACC", "TSBD (neuron_ratio=0.15) ASR", "TSBD (neuron_ratio=0.15) DER",
                      "TSBD (neuron_ratio=0.3) ACC", "TSBD (neuron_ratio=0.3) ASR", "TSBD (neuron_ratio=0.3) DER",
                      "otherdef ACC", "otherdef ASR", "otherdef DER"]
    cols = {h: i for i, h in enumerate(header)}
    for att, label in (("badnets", "BadNets"), ("blended", "Blended")):
        row = rows[label]
        assert ours(row[cols["No Defense ACC"]]) == pytest.approx(100 * NO_DEF[att][0], abs=0.005)
        assert ours(row[cols["No Defense ASR"]]) == pytest.approx(100 * NO_DEF[att][1], abs=0.005)
        for (att2, name, opts), values in DEF.items():
            if att2 != att:
                continue
            prefix = ("otherdef" if name == "otherdef"
                      else f"TSBD (neuron_ratio={dict(opts).get('neuron_ratio', 0.15):g})")
            for metric, v in zip(("ACC", "ASR", "DER"), values):
                assert ours(row[cols[f"{prefix} {metric}"]]) == pytest.approx(100 * v, abs=0.005), (att, prefix, metric)
    # the average row is the mean over attacks
    avg = rows["**Average**"]
    assert ours(avg[cols["otherdef ASR"]]) == pytest.approx(70.0, abs=0.005)
    # best defense per row in bold: BadNets ASR is lowest for the neuron_ratio=0.3 variant, ACC highest for otherdef
    assert rows["BadNets"][cols["TSBD (neuron_ratio=0.3) ASR"]].startswith("**1.00**")
    assert rows["BadNets"][cols["otherdef ACC"]].startswith("**86.00**")
    assert not rows["BadNets"][cols["No Defense ACC"]].startswith("**")  # No Defense is not a defense
    # the paper's numbers beside ours where the paper has the cell (Table 1 via Tables 7/8), nowhere else
    assert paper(rows["BadNets"][cols["No Defense ACC"]]) == 91.32
    assert paper(rows["Blended"][cols["No Defense ASR"]]) == 99.92
    assert paper(rows["BadNets"][cols["TSBD (neuron_ratio=0.15) DER"]]) == 96.53
    assert paper(rows["Blended"][cols["TSBD (neuron_ratio=0.15) ACC"]]) == 91.61
    assert paper(rows["BadNets"][cols["TSBD (neuron_ratio=0.3) ASR"]]) is None  # not a setting of the paper
    assert paper(rows["BadNets"][cols["otherdef ACC"]]) is None
    # the paper's average over the same attacks as ours (BadNets 1.37, Blended 2.61), not its printed
    # 8-attack average (2.18), which would compare two different sets of attacks
    assert paper(avg[cols["TSBD (neuron_ratio=0.15) ASR"]]) == pytest.approx(1.99, abs=0.005)
    assert paper(avg[cols["otherdef ACC"]]) is None
    # failures are listed with their one-line error
    assert "RuntimeError: out of memory" in md and "1 failed" in md
    assert "Incomplete table" not in md  # every column has both attacks

    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 3 and "<style>" in html
    assert "<b>1.00</b>" in html and '<span class="paper">91.32</span>' in html
    # the HTML table has the Markdown table's cells: one group header per defense column, a row per attack
    assert html.count('<th class="group-start" colspan="3">') == 3 and 'colspan="2">No Defense</th>' in html
    assert html.count('<td class="attack">') == 3 and '<tr class="average">' in html


def test_report_names_each_cell_not_done_with_its_estimated_time(report, results):
    """The failed otherdef cell (batch 1) is estimated from the done otherdef cells (batch 256, 1 s
    each): another option, so marked; the summary line sums it."""
    md = (report / "report.md").read_text()
    assert "Not done: 1 cell, about 0.0 h of compute at the times the done cells like them took (at different or " \
           "unrecorded thread counts; 1 estimated " \
           "from a cell with another attack or other options)." in md
    rows = md_rows(md.split("## Cells not done", 1)[1])
    with Store(results) as store:
        (failed,) = store.cells(status="failed")
    assert rows[failed["id"]] == ["defense", "otherdef against badnets, clean 0.05, seed 0", "failed", "0~"]
    assert "<h2>Cells not done</h2>" in (report / "report.html").read_text()


def test_report_states_the_peak_memory_of_its_processes(report, results):
    with Store(results) as store:
        peaks = [r["timings"]["peak_rss_mb"] for r in store.cells() if r["status"] == "done"]
    assert f"Peak memory of a process after a cell: {max(peaks):,.0f} MiB." in (report / "report.md").read_text()


def test_report_figures_are_heatmaps_and_panels_readable_on_a_screen(report):
    out = report
    for kind in ("der-heatmap", "asr-heatmap", "acc-asr"):
        for ext in ("png", "svg"):
            f = out / "plots" / f"t1-cifar10-airbench-{kind}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f
        width, height = png_size(out / "plots" / f"t1-cifar10-airbench-{kind}.png")
        assert max(width, height) / min(width, height) <= 3, (kind, width, height)
    assert not (out / "plots" / "t1-cifar10-airbench-der.png").exists()  # the old 72-bar strip
    # the Markdown and the HTML show the same figure files, and every one exists
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    figures = set(re.findall(r"plots/[\w.-]+\.(?:png|svg)", md))
    assert figures == set(re.findall(r"plots/[\w.-]+\.(?:png|svg)", html))
    assert len(figures) == 6 and all((out / f).is_file() for f in figures)
    assert md.count("![") == 3


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="no `chromium` on PATH: the browser check needs Debian's chromium package")
def test_the_html_report_in_a_headless_browser_loads_every_image_and_table(report, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    shot = tmp_path / "report.png"
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / "report_browser_check.py"), str(report),
                           "--screenshot", str(shot)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 images, 1 results tables, 6 linked files" in done.stdout
    width, height = png_size(shot)
    assert width == 1280 and height > 900


@pytest.mark.slow
@pytest.mark.parametrize("attacks, defenses", [(1, 12), (12, 1)])
def test_heatmaps_and_panels_keep_a_screen_aspect_for_any_table_shape(tmp_path, attacks, defenses):
    from tsbd.artifacts import pyplot, save_figure
    from tsbd.bench.figures import acc_asr_panels, heatmap
    from tsbd.bench.layout import Entry, GridColumn, GridRow, TableGrid

    cols = [GridColumn("No Defense", m, reference=True) for m in ("acc", "asr")]
    cols += [GridColumn(f"Defense {j} (option={j})", m) for j in range(defenses) for m in ("acc", "asr", "der")]
    rows = [GridRow(f"Attack {i}" if i < attacks else "Average",
                    tuple(Entry(50.0 + (i * 7 + j * 3) % 50, 60.0 if i == 0 else None, j == 2)
                          for j in range(len(cols))), average=i == attacks)
            for i in range(attacks + 1)]
    grid = TableGrid(tuple(cols), tuple(rows))
    plt = pyplot()
    for name, fig in (("heatmap", heatmap(grid, "der", "title")), ("panels", acc_asr_panels(grid, "title"))):
        png = save_figure(fig, tmp_path / name, formats=("png",), dpi=40)["png"]  # the aspect does not need detail
        plt.close(fig)
        width, height = png_size(png)
        assert max(width, height) / min(width, height) <= 3, (name, width, height)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_report_of_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no results store" in capsys.readouterr().err


def test_a_report_elsewhere_carries_the_store_index_to_rebuild_and_continue_from(report, results, tmp_path, capsys):
    copy = report / "results.sqlite"
    assert copy.is_file() and not (report / "results.sqlite-wal").exists()  # one self-contained file
    with Store(results, create=False) as live, Store(copy, create=False) as snap:
        assert snap.cells() == live.cells() and snap.grids() == live.grids()
    # the results folder gone, the report folder alone rebuilds the same tables
    alone = tmp_path / "alone"
    shutil.copytree(report, alone)
    assert main(["report", str(alone), "--no-plots"]) == 0
    assert md_rows((alone / "report.md").read_text()) == md_rows((report / "report.md").read_text())
    for text in ((report / "report.md").read_text(), (alone / "report.md").read_text()):  # says what it has, no path
        assert "Results: a copy of the store's index beside this report" in text and str(results) not in text
    # and merges into a new results folder that a grid can continue from
    assert main(["merge", str(alone), "--into", str(tmp_path / "again")]) == 0
    with Store(tmp_path / "again", create=False) as again, Store(results, create=False) as live:
        assert {c["id"]: c["status"] for c in again.cells()} == {c["id"]: c["status"] for c in live.cells()}
    # a results folder with its own report is never overwritten by another store's copy
    assert main(["report", str(tmp_path / "again"), "--no-plots"]) == 0
    assert "Results: the store in this folder" in (tmp_path / "again" / "report.md").read_text()
    capsys.readouterr()
    assert main(["report", str(results), "--out", str(tmp_path / "again"), "--no-plots", "--overwrite"]) == 2
    assert "holds a results store of its own" in capsys.readouterr().err
    # nor is a report folder that results were merged into
    assert main(["merge", str(tmp_path / "again"), "--into", str(alone)]) == 0
    capsys.readouterr()
    assert main(["report", str(results), "--out", str(alone), "--no-plots", "--overwrite"]) == 2
    assert "holds a results store of its own" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# the shipped paper numbers
@pytest.fixture(scope="module")
def tables():
    return {t["id"]: t for t in json.loads(DATA.read_text())["tables"]}


def test_paper_tables_have_the_tables_the_bench_compares_with(tables):
    assert {"table1", "table2", "table5", "table6"} <= set(tables)
    for t in tables.values():
        keys = {c["key"] for c in t["columns"]}
        for attack, row in t["rows"].items():
            assert attack in PaperIndex().doc["attacks"]
            assert set(row) <= keys
            assert all(len(v) == 3 for v in row.values())
        assert set(t["average"]) <= keys


def test_paper_der_values_follow_from_their_acc_and_asr(tables):
    checked = 0
    for t in tables.values():
        for row in t["rows"].values():
            before = row.get("none")
            for key, (acc, asr, der) in row.items():
                if key == "none" or der is None or before is None or before[1] is None:
                    continue
                expect = (max(0.0, before[1] - asr) - max(0.0, before[0] - acc) + 100) / 2
                assert der == pytest.approx(expect, abs=0.011), (t["id"], key, row)
                checked += 1
    assert checked >= 8 * 5  # Tables 1, 7 and 8


def test_paper_averages_are_the_means_of_their_rows(tables):
    for t in tables.values():
        for key, avg in t["average"].items():
            for i, value in enumerate(avg):
                vals = [row[key][i] for row in t["rows"].values() if key in row]
                if value is not None:
                    assert sum(vals) / len(vals) == pytest.approx(value, abs=0.011), (t["id"], key, i)


def test_table1_columns_are_the_default_setting_of_tables_7_and_8(tables):
    t1, t7, t8 = tables["table1"], tables["table7"], tables["table8"]
    assert t1["average"]["tsbd"] == [91.70, 2.18, 97.09]  # quoted in Sec. 4.2
    assert t1["average"]["none"][0] == 91.34
    for attack, row in t1["rows"].items():
        assert row["none"] == t7["rows"][attack]["none"] == t8["rows"][attack]["none"]
        assert row["tsbd"] == t7["rows"][attack]["tsbd"] == t8["rows"][attack]["tsbd"]
    # Table 4's Aa-FT column is the same default TSBD run (ACC, ASR)
    for attack, row in tables["table4"]["rows"].items():
        assert row["tsbd"][:2] == t1["rows"][attack]["tsbd"][:2]


def test_a_partial_table_says_its_averages_cover_different_attacks(tmp_path):
    cells, metrics = [], {}
    for att, (acc, asr) in NO_DEF.items():
        a = _attack_cell(att)
        cells.append(a)
        metrics[a.id] = {"acc": acc, "asr": asr, "ra": 0.0}
        if att == "badnets":  # TSBD on one attack only
            d = defense_cell(a, defense={"name": "tsbd", "config": _defaults("defense", "tsbd")}, clean_ratio=0.05,
                             seed=0)
            cells.append(d)
            metrics[d.id] = {"acc": 0.84, "asr": 0.02, "der": 0.96}
    _fill_store(tmp_path / "res", "partial", cells, metrics)
    assert main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Incomplete table: each Average is over the attacks its column has (No Defense 2, TSBD 1 of 2)" in md


def test_defense_seeds_are_averaged_with_their_spread(tmp_path):
    import statistics

    a = _attack_cell("lf")
    cells, metrics = [a], {a.id: {"acc": 0.85, "asr": 0.95}}
    asrs = [0.02, 0.10, 0.30]
    for seed, asr in enumerate(asrs):  # TSBD three times on one attacked model
        d = defense_cell(a, defense={"name": "tsbd", "config": _defaults("defense", "tsbd")}, clean_ratio=0.05,
                         seed=seed)
        cells.append(d)
        metrics[d.id] = {"acc": 0.84, "asr": asr, "der": 0.5}
    seconds = {a.id: 5400.0, **{c.id: 60.0 * (2 + i) for i, c in enumerate(cells[1:])}}  # TSBD: 2, 3, 4 min
    _fill_store(tmp_path / "res", "seeds", cells, metrics, seconds=seconds)
    assert main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    row = md_rows(md)["LF"]
    header = md_rows(md)["Attack"]
    mean, sd = 100 * statistics.mean(asrs), 100 * statistics.stdev(asrs)
    assert row[header.index("TSBD ASR")].startswith(f"{mean:.2f} ± {sd:.2f}")
    assert row[header.index("TSBD ACC")].startswith("84.00 ± 0.00")
    assert row[header.index("No Defense ASR")].startswith("95.00") and "±" not in row[header.index("No Defense ASR")]
    assert "mean over 1/3 seeds, ± the sample standard deviation where there are several" in md
    assert "Minutes per cell, mean over the attacks: No Defense (training the attacked model) 90.0, TSBD 3.0." in md
    assert f"{mean:.2f}<span class=\"sd\"> &plusmn; {sd:.2f}</span>" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.parametrize("trigger, matched", [("cifar10_preactresnet18_0_255.npy", True), ("my_lf.npy", False)])
def test_backdoorbench_trigger_files_are_the_papers_attack(trigger, matched):
    from tsbd.bench.paper import PaperIndex

    paper = PaperIndex()
    tables = paper.candidates("cifar10", "preact_resnet18", 0.1)
    changed = {"trigger_file": "{data_root}/backdoorbench-triggers/" + trigger}
    hit = paper.lookup(tables, "lf", changed, "tsbd", 0.05, {}, _defaults("defense", "tsbd"))
    assert (hit is not None) == matched
    if matched:
        assert hit[0][:2] == [91.2, 2.64]  # Table 1's TSBD on LF
    assert paper.lookup(tables, "lf", {**changed, "trigger_scale": 255.0}, "tsbd", 0.05, {},
                        _defaults("defense", "tsbd")) is None  # a rescaled file is not the paper's


def test_n_selected_on_test_data_is_a_labelled_column_never_ranked(tmp_path):
    from tsbd.bench.report import collect
    from tsbd.metrics import der

    a = _attack_cell("badnets")
    d = defense_cell(a, defense={"name": "tsbd", "config": _defaults("defense", "tsbd")}, clean_ratio=0.05, seed=0)
    picked = {"n": 0.3, "acc": 0.84, "asr": 0.0, "sweep": []}
    _fill_store(tmp_path, "sel", [a, d], {a.id: {"acc": 0.85, "asr": 0.95},
                                          d.id: {"acc": 0.80, "asr": 0.40, "der": 0.5,
                                                 "stages": {"n_selected_on_test": picked}}})
    with Store(tmp_path, create=False) as store:
        (table,) = collect(store, "sel")
    sel = [c for c in table.columns if c.selected_on_test]
    assert len(sel) == 1 and sel[0].label == "TSBD, n selected on test data"
    row = table.rows[0].key
    v = table.values[(row, sel[0].key)]
    assert v["asr"] == pytest.approx(0.0) and v["acc"] == pytest.approx(84.0) and v["selected_n"] == [0.3]
    assert v["der"] == pytest.approx(100 * der(0.85, 0.95, 0.84, 0.0))
    # better on every metric than the fixed-n column, yet never marked best: it saw the test set
    assert table.best(row, "asr") == set() and table.best(None, "der") == set()


def test_no_defense_is_marked_best_where_every_defense_has_the_same_value(tmp_path):
    from tsbd.bench.report import collect

    a = _attack_cell("blended")
    cells, metrics = [a], {a.id: {"acc": 0.85, "asr": 1.0}}
    for name, acc in (("tsbd", 0.80), ("otherdef", 0.82)):  # neither removes the backdoor
        config = _defaults("defense", "tsbd") if name == "tsbd" else {"batch_size": 256}
        d = defense_cell(a, defense={"name": name, "config": config}, clean_ratio=0.05, seed=0)
        cells.append(d)
        metrics[d.id] = {"acc": acc, "asr": 1.0, "der": 0.5 - (0.85 - acc) / 2}
    _fill_store(tmp_path, "ties", cells, metrics)
    with Store(tmp_path, create=False) as store:
        (table,) = collect(store, "ties")
    row = table.rows[0].key
    assert table.best(row, "asr") == set() and table.best(None, "asr") == set()
    assert {c.defense for c in table.columns if c.key in table.best(row, "acc")} == {"otherdef"}


def test_grid_list_counts_set_variants_under_their_grid():
    from tsbd.bench.report import grid_list

    assert grid_list(["g"]) == "`g`"
    assert grid_list(["g", "g+1a2b3c4d", "g+5e6f7a8b", "h+00000000"]) == \
        "`g` and 2 `--set`/`--seed` variants of it, 1 `--set`/`--seed` variant of `h`"
    assert grid_list(["a", "b"]) == "`a`, `b`"


def test_a_report_of_one_grid_carries_that_grids_cells_alone(tmp_path):
    """`report --grid G --out` copies G's cells, the attacked models they defend and their runs; no other grid's."""
    folder = tmp_path / "results"
    attacks = {att: _attack_cell(att) for att in ("badnets", "blended")}
    tsbd_config = _defaults("defense", "tsbd")
    defended = {att: defense_cell(a, defense={"name": "tsbd", "config": tsbd_config}, clean_ratio=0.05, seed=0)
                for att, a in attacks.items()}
    metrics = {c.id: {"acc": 0.9, "asr": 0.9, "ra": 0.0} for c in attacks.values()}
    metrics.update({c.id: {"acc": 0.85, "asr": 0.02, "der": 0.9} for c in defended.values()})
    _fill_store(folder, "one", [attacks["badnets"], defended["badnets"]], metrics)
    _fill_store(folder, "two", [attacks["blended"], defended["blended"]], metrics)
    with Store(folder) as store:  # a third grid lists only a defense: its attacked model comes along
        store.register(Plan("three", {"name": "three"}, [defended["blended"]]))
    for grid, kept in (("one", {attacks["badnets"].id, defended["badnets"].id}),
                       ("three", {attacks["blended"].id, defended["blended"].id})):
        out = tmp_path / grid
        assert main(["report", str(folder), "--grid", grid, "--out", str(out), "--no-plots"]) == 0
        with Store(out / "results.sqlite", create=False) as snap:
            assert {c["id"] for c in snap.cells()} == kept and snap.grids() == [grid]
            assert {r["cell"] for r in snap.runs()} == kept
    with Store(tmp_path / "one" / "results.sqlite", create=False) as snap, Store(folder, create=False) as live:
        assert snap.cells("one") == live.cells("one")  # what it keeps, it keeps unchanged


def test_report_grid_by_plain_name_takes_every_variant_of_it(tmp_path):
    """`--grid NAME` without a tag means all of NAME's `--set` variants (NAME+TAG); an exact name
    means that grid alone, and a name the store lacks is a one-line error listing what it has."""
    folder = tmp_path / "results"
    attacks = {att: _attack_cell(att) for att in ("badnets", "blended", "sig")}
    metrics = {c.id: {"acc": 0.9, "asr": 0.9, "ra": 0.0} for c in attacks.values()}
    _fill_store(folder, "paper+aaaa", [attacks["badnets"]], metrics)
    _fill_store(folder, "paper+bbbb", [attacks["blended"]], metrics)
    _fill_store(folder, "paperish", [attacks["sig"]], metrics)
    with Store(folder, create=False) as store:  # a cell in two variants is listed once
        store.register(Plan("paper+bbbb", {"name": "paper+bbbb"}, [attacks["blended"], attacks["badnets"]]))
        assert store.select_grids("paper") == ["paper+aaaa", "paper+bbbb"]
        assert store.select_grids("paper+bbbb") == ["paper+bbbb"]
        assert [c["id"] for c in store.cells(["paper+aaaa", "paper+bbbb"])] == [attacks["badnets"].id,
                                                                                 attacks["blended"].id]
        with pytest.raises(TsbdError, match="no grid 'pape'.*paper[+]aaaa"):
            store.select_grids("pape")
    out = tmp_path / "report"
    assert main(["report", str(folder), "--grid", "paper", "--out", str(out), "--no-plots"]) == 0
    with Store(out / "results.sqlite", create=False) as snap:
        assert {c["id"] for c in snap.cells()} == {attacks["badnets"].id, attacks["blended"].id}
        assert snap.grids() == ["paper+aaaa", "paper+bbbb"]
    text = (out / "report.md").read_text()
    assert "2 `--set`/`--seed` variants of `paper`" in text and "paperish" not in text


def test_the_best_average_is_marked_only_among_defenses_that_have_every_attack(tmp_path):
    from tsbd.bench.report import collect

    cells, metrics = [], {}
    for att, (acc, asr) in NO_DEF.items():
        a = _attack_cell(att)
        cells.append(a)
        metrics[a.id] = {"acc": acc, "asr": asr}
        # tsbd and ft on both attacks; anp only on badnets, where it beats both of them
        for name, der in (("tsbd", 0.90), ("ft", 0.80), ("anp", 0.99)):
            if name == "anp" and att != "badnets":
                continue
            d = defense_cell(a, defense={"name": name, "config": _defaults("defense", name)}, clean_ratio=0.05,
                             seed=0)
            cells.append(d)
            metrics[d.id] = {"acc": 0.80, "asr": 1 - der, "der": der}
    _fill_store(tmp_path, "uneven", cells, metrics)
    with Store(tmp_path, create=False) as store:
        (table,) = collect(store, "uneven")
    by_key = {c.key: c.defense for c in table.columns}
    badnets = next(r.key for r in table.rows if r.label == "BadNets")
    assert {by_key[k] for k in table.best(badnets, "der")} == {"anp"}  # per attack every column competes
    assert table.average(next(k for k, d in by_key.items() if d == "anp"), "der") > 95  # its one attack
    assert {by_key[k] for k in table.best(None, "der")} == {"tsbd"}  # yet its average is not comparable
    assert {by_key[k] for k in table.best(None, "asr")} == {"tsbd"}


def test_the_sweep_of_n_on_test_data_is_tabled_and_plotted_per_attack_and_seed(tmp_path):
    sweeps = {  # (attack, seed) -> [(n, acc, asr)] of the test-data sweep; 0.0005 is the default threshold
        ("badnets", 0): [(0.05, 0.84, 0.20), (0.15, 0.83, 0.0004), (0.3, 0.80, 0.0)],
        ("badnets", 1): [(0.05, 0.85, 0.30), (0.15, 0.83, 0.01), (0.3, 0.79, 0.0002)],
        ("lf", 0): [(0.05, 0.84, 0.40), (0.15, 0.83, 0.12), (0.3, 0.81, 0.05)],  # never reaches it: lowest ASR
    }
    cells, metrics, attacks = [], {}, {}
    for (att, seed), points in sweeps.items():
        if att not in attacks:
            attacks[att] = _attack_cell(att)
            cells.append(attacks[att])
            metrics[attacks[att].id] = {"acc": 0.86, "asr": 0.97}
        d = defense_cell(attacks[att], defense={"name": "tsbd", "config": _defaults("defense", "tsbd")},
                         clean_ratio=0.05, seed=seed)
        sweep = [{"n": n, "acc": acc, "asr": asr} for n, acc, asr in points]
        hit = [p for p in sweep if p["asr"] <= 0.0005]
        pick = hit[0] if hit else min(sweep, key=lambda p: p["asr"])
        cells.append(d)
        metrics[d.id] = {"acc": 0.83, "asr": 0.05, "der": 0.9,
                         "stages": {"n_selected_on_test": {**pick, "reached_threshold": bool(hit),
                                                           "threshold": 0.0005, "sweep": sweep}}}
    _fill_store(tmp_path / "res", "sweep", cells, metrics)
    assert main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    section = md.split("### TSBD's neuron ratio n, swept on test data", 1)[1]
    rows = md_rows(section)
    assert rows["Attack"] == ["n=0.05", "n=0.15", "n=0.3"]
    assert rows["BadNets (seed 0)"] == ["84.00 / 20.00", "**83.00 / 0.04**", "80.00 / 0.00"]  # the first at 0.05%
    assert rows["BadNets (seed 1)"] == ["85.00 / 30.00", "83.00 / 1.00", "**79.00 / 0.02**"]
    assert rows["LF"] == ["84.00 / 40.00", "83.00 / 12.00", "**81.00 / 5.00**"]  # one seed: no seed in its label
    assert "test ASR is at or below 0.05%" in section and "never a defense's result" in section
    png = tmp_path / "out" / "plots" / "t1-cifar10-airbench-n-sweep.png"
    assert png.stat().st_size > 0 and f"]({png.relative_to(tmp_path / 'out').as_posix()})" in section
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<td><b>83.00 / 0.04</b></td>" in page and "<td>84.00 / 40.00</td>" in page


def test_each_stage_a_defense_observed_is_tabled_with_its_mean_over_seeds(tmp_path):
    a = _attack_cell("lf")
    cells, metrics = [a], {a.id: {"acc": 0.87, "asr": 0.96}}
    for seed, (reinit_asr, recomputed_asr) in enumerate([(0.01, 0.40), (0.03, 0.60)]):
        d = defense_cell(a, defense={"name": "tsbd", "config": _defaults("defense", "tsbd")}, clean_ratio=0.05,
                         seed=seed)
        cells.append(d)
        metrics[d.id] = {"acc": 0.85, "asr": 0.13, "der": 0.9,
                         "stages": {"after_reinit": {"acc": 0.77, "asr": reinit_asr, "ra": 0.5},
                                    "after_reinit_bn_recomputed": {"acc": 0.79, "asr": recomputed_asr},
                                    "backdoored_bn_recomputed": {"acc": 0.80, "asr": 0.99},
                                    "after_finetune": {"acc": 0.85, "asr": 0.13}}}
    ft = defense_cell(a, defense={"name": "ft", "config": _defaults("defense", "ft")}, clean_ratio=0.05, seed=0)
    cells.append(ft)
    metrics[ft.id] = {"acc": 0.86, "asr": 0.5, "der": 0.7, "stages": {"after_finetune": {"acc": 0.86, "asr": 0.5}}}
    _fill_store(tmp_path / "res", "stages", cells, metrics)
    assert main(["report", str(tmp_path / "res"), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    section = md.split("### ACC / ASR after each stage of a defense", 1)[1]
    rows = md_rows(section)
    assert rows["Attack"] == ["zero reinit", "zero reinit, BN recomputed", "backdoored model, BN recomputed",
                              "fine-tuned"]
    assert rows["LF"] == ["77.00 / 2.00", "79.00 / 50.00", "80.00 / 99.00", "85.00 / 13.00"]
    assert "TSBD:" in section and "FT:" not in section  # one stage is just the result: no table
    assert "<td>79.00 / 50.00</td>" in (tmp_path / "out" / "report.html").read_text()


def test_a_sweep_run_joins_the_plain_tsbd_column_and_a_seed_counts_once(tmp_path):
    from tsbd.bench.report import collect

    sweep_opts = {**_defaults("defense", "tsbd"), "test_selected_n": [0.15, 0.3]}
    picked = {"n": 0.3, "acc": 0.80, "asr": 0.0, "reached_threshold": True, "threshold": 0.0005,
              "sweep": [{"n": 0.15, "acc": 0.84, "asr": 0.02}, {"n": 0.3, "acc": 0.80, "asr": 0.0}]}
    cells, metrics = [], {}
    for att in ("badnets", "lf"):
        a = _attack_cell(att)
        cells.append(a)
        metrics[a.id] = {"acc": 0.86, "asr": 0.97}
        runs = [(0, sweep_opts, 0.02)] if att == "lf" else [(0, _defaults("defense", "tsbd"), 0.02),
                                                            (1, _defaults("defense", "tsbd"), 0.04),
                                                            (0, sweep_opts, 0.50)]  # seed 0 again, with the sweep
        for seed, config, asr in runs:
            d = defense_cell(a, defense={"name": "tsbd", "config": config}, clean_ratio=0.05, seed=seed)
            cells.append(d)
            metrics[d.id] = {"acc": 0.84, "asr": asr, "der": 0.9,
                             **({"stages": {"n_selected_on_test": picked}} if config is sweep_opts else {})}
    _fill_store(tmp_path, "joined", cells, metrics)
    with Store(tmp_path, create=False) as store:
        (table,) = collect(store, "joined")
    assert [c.label for c in table.columns] == ["No Defense", "TSBD", "TSBD, n selected on test data"]
    tsbd = table.columns[1].key
    rows = {r.attack: r.key for r in table.rows}
    assert table.values[(rows["badnets"], tsbd)]["n"] == 2  # seeds 0 and 1: the plain seed 0 counts, once
    assert table.values[(rows["badnets"], tsbd)]["asr"] == pytest.approx(3.0)
    assert table.values[(rows["lf"], tsbd)]["asr"] == pytest.approx(2.0)  # the sweep run's own n, in the column
    assert (rows["lf"], tsbd) in table.paper  # the paper's TSBD column: its numbers stand beside ours
    assert (rows["lf"], table.columns[2].key) not in table.paper  # ... and not beside the test-selected n
    assert "n_selected_on_test" not in table.stages[(rows["lf"], tsbd)]  # a pick, not a stage of the model


def test_one_cell_per_seed_keeps_the_plain_run_and_every_cell_without_a_seed():
    from tsbd.bench.report import _one_per_seed

    items = [{"cell": "sweep0", "seed": 0, "plain": False}, {"cell": "a", "seed": None},
             {"cell": "plain0", "seed": 0, "plain": True}, {"cell": "b", "seed": None},
             {"cell": "plain1", "seed": 1, "plain": True}, {"cell": "sweep1", "seed": 1, "plain": False}]
    assert [i["cell"] for i in _one_per_seed(items)] == ["plain0", "a", "b", "plain1"]


def test_a_named_variant_reads_in_words_beside_its_setting():
    from tsbd.bench.report import Column, _label_columns

    cols = [Column(f"tsbd|{n}", "tsbd", 0.05, {"neuron_ratio": n}, {}) for n in (0.0, 0.15)]
    cols.append(Column("anp", "anp", 0.05, {}, {}))
    _label_columns(cols)
    assert [c.label for c in cols] == ["TSBD (stage 2 alone, neuron_ratio=0)", "TSBD (neuron_ratio=0.15)", "ANP"]


def test_the_report_names_the_machine_each_host_ran_its_cells_on(tmp_path):
    """A GPU machine's cells are reported with the GPU's name, a CPU machine's with its processor."""
    gpu, cpu = _attack_cell("badnets"), _attack_cell("blended")
    runtimes = {gpu.id: ("device", {"device": "cuda", "precision": "bf16", "threads": 1,
                                    "cpu": "Intel(R) Xeon(R) Processor", "gpu": "NVIDIA H200"}),
                cpu.id: ("laptop", {"device": "cpu", "precision": "fp32", "threads": 2, "cpu": "AMD EPYC"})}
    with Store(tmp_path) as store:
        store.register(Plan("hosts", {"name": "hosts"}, [gpu, cpu]))
        for c in (gpu, cpu):
            assert store.claim(c.id) == "claimed"
            host, runtime = runtimes[c.id]
            store.complete(c.id, CellResult({"acc": 0.9, "asr": 0.9, "ra": 0.1}, {"total": 60.0},
                                            {"tsbd": "0.1", "runtime": runtime}, f"artifacts/{c.id}", host,
                                            now_iso(), now_iso()))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path), "--out", str(out), "--no-plots"]) == 0
    line = next(x for x in (out / "report.md").read_text().splitlines() if x.startswith("Cells:"))
    assert "on device (NVIDIA H200, bf16), laptop (AMD EPYC, fp32)." in line
