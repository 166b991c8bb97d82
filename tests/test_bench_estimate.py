"""Estimates of the work a grid has left: read off the done cells most like each cell, basis said."""

from __future__ import annotations

import pytest

from tsbd.bench.estimate import Estimate, Estimator, machine_of, remaining, remaining_line
from tsbd.bench.grid import attack_cell, defense_cell


def _attack(name: str, epochs: int = 40, model: str = "preact_resnet18"):
    return attack_cell(dataset={"name": "cifar10", "options": {}, "limit_train": 0, "limit_test": 0},
                       model={"name": model, "options": {"width": 16}}, attack={"name": name, "config": {}},
                       train={"epochs": epochs}, seed=0)


def _defense(parent, name: str = "tsbd", clean: float = 0.05, seed: int = 0, **config):
    return defense_cell(parent, defense={"name": name, "config": config}, clean_ratio=clean, seed=seed)


def _row(cell, status: str = "done", seconds: float | None = None, key: str = "total") -> dict:
    return {"id": cell.id, "kind": cell.kind, "config": cell.config, "parent": cell.parent, "status": status,
            "timings": {key: seconds} if seconds is not None else None}


@pytest.fixture()
def store_rows():
    lf, trojan = _attack("lf"), _attack("trojan")
    cells = {"lf": lf, "trojan": trojan, "blended": _attack("blended"),
             "tsbd_lf_0": _defense(lf, seed=0), "tsbd_lf_1": _defense(lf, seed=1),
             "anp_lf": _defense(lf, "anp"), "anp_trojan": _defense(trojan, "anp")}
    rows = [_row(cells["lf"], seconds=6000.0), _row(cells["trojan"], seconds=8000.0),
            _row(cells["tsbd_lf_0"], seconds=800.0), _row(cells["tsbd_lf_1"], seconds=1000.0, key="cell"),
            _row(cells["anp_lf"], "failed"), _row(cells["blended"], "pending"), _row(cells["anp_trojan"], "running")]
    by_id = {c.id: c.config for c in cells.values()}
    return Estimator(rows, by_id.get), cells


def test_a_defense_cell_is_estimated_from_the_same_defense_on_any_attack_of_the_same_model(store_rows):
    estimate, cells = store_rows
    e = estimate("defense", _defense(cells["blended"], seed=2).config, cells["blended"].id)
    assert e == Estimate(900.0, "same", 2)  # mean of 800 s (total) and 1000 s (cell time)
    assert e.text() == "15"


def test_other_options_of_the_defense_give_a_marked_estimate_and_an_unrun_defense_none(store_rows):
    estimate, cells = store_rows
    variant = _defense(cells["trojan"], finetune_lr=0.08)
    assert estimate("defense", variant.config, cells["trojan"].id) == Estimate(900.0, "like", 2)
    assert estimate("defense", variant.config, cells["trojan"].id).text() == "15~"
    # a failed or running cell's time is no measurement: ANP has none
    assert estimate("defense", _defense(cells["blended"], "anp").config, cells["blended"].id) == Estimate(None, "")
    assert estimate("defense", _defense(cells["blended"], "nc").config, cells["blended"].id).text() == "-"
    # another clean ratio is another cost
    rnp = _defense(cells["lf"], clean=0.005)
    assert estimate("defense", rnp.config, cells["lf"].id).seconds is None
    # and without the attack cell's config the data set and model are unknown
    assert estimate("defense", _defense(cells["blended"]).config, "unknown-parent").seconds is None


def test_an_attack_cell_is_estimated_from_itself_else_from_other_attacks_with_the_same_training(store_rows):
    estimate, cells = store_rows
    assert estimate("attack", cells["trojan"].config) == Estimate(8000.0, "same", 1,  # no setup recorded
                                                                  uncounted="a clean model and its trigger")
    assert estimate("attack", cells["blended"].config) == Estimate(7000.0, "like", 2)
    assert estimate("attack", _attack("blended", epochs=20).config).seconds is None  # other training
    assert estimate("attack", _attack("lf", model="vgg19_bn").config).seconds is None  # other model


def test_an_attack_estimate_leaves_out_the_setup_of_attacks_that_train_something_first_and_names_it():
    badnets, trojan = _attack("badnets"), _attack("trojan")
    rows = [{**_row(badnets), "timings": {"setup": 2.0, "train": 2800.0, "total": 2820.0}},
            {**_row(trojan), "timings": {"setup": 1200.0, "train": 2900.0, "total": 4110.0}}]
    estimate = Estimator(rows, {c.id: c.config for c in (badnets, trojan)}.get)
    # the same attack: its own recorded time, setup included, nothing named
    assert estimate("attack", badnets.config) == Estimate(2820.0, "same", 1)
    # ... unless the attack trains something first, built or read from the cache by machine, not grid:
    # then its setup is left out and named, as from another attack
    assert estimate("attack", trojan.config) == Estimate(2910.0, "same", 1, uncounted="a clean model and its trigger")
    assert estimate("attack", trojan.config).text() == "48+"
    # another attack: the like cells' training and evaluation only (Trojan's clean model left out)
    blended = estimate("attack", _attack("blended").config)
    assert blended == Estimate((2818.0 + 2910.0) / 2, "like", 2)
    inputaware = estimate("attack", _attack("inputaware").config)
    assert inputaware.seconds == blended.seconds and inputaware.uncounted == "its trigger generator and mask"
    assert inputaware.text() == "48~+"
    # LF trains a clean model and its trigger, unless it reads BackdoorBench's trigger file
    assert estimate("attack", _attack("lf").config).uncounted == "a clean model and its trigger"
    lf_file = attack_cell(dataset={"name": "cifar10", "options": {}, "limit_train": 0, "limit_test": 0},
                          model={"name": "preact_resnet18", "options": {"width": 16}},
                          attack={"name": "lf", "config": {"trigger_file": "x.npy"}}, train={"epochs": 40}, seed=0)
    assert estimate("attack", lf_file.config).uncounted == ""
    # an attack this install lacks gets its estimate, with nothing named
    assert estimate("attack", _attack("nosuchattack").config).uncounted == ""
    line = remaining_line(remaining([inputaware, blended]))
    assert "1 not counting the generator, clean model or encoder its attack trains first (marked +)" in line
    # and workers claim it before attacks with the same estimate that train nothing first
    from tsbd.bench.estimate import longest_first

    cells = [_attack("blended"), _attack("inputaware"), _attack("sig")]
    assert [c.config["attack"]["name"] for c in longest_first(cells, estimate)] == ["inputaware", "blended", "sig"]


def test_the_remaining_work_sums_the_estimates_and_says_what_it_leaves_out():
    total = remaining([Estimate(3600.0, "same", 1), Estimate(1800.0, "like", 2), Estimate(None, "")])
    assert total == {"cells": 3, "seconds": 5400.0, "unknown": 1, "like": 1, "threads": None, "elsewhere": 0,
                     "uncounted": 0}
    line = remaining_line(total)
    assert line.startswith("Not done: 3 cells, about 1.5 h of compute")
    assert "1 estimated from a cell with another attack or other options" in line
    assert "1 with no done cell like it, not counted" in line
    assert remaining_line(remaining([Estimate(None, ""), Estimate(None, "")])) == (
        "Not done: 2 cells; no done cell like them, so no estimate.")
    assert remaining_line(remaining([Estimate(None, "")])) == "Not done: 1 cell; no done cell like it, so no estimate."
    assert remaining_line(remaining([])) == "Not done: none."


def test_cell_seconds_counts_the_epochs_of_runs_before_a_resume():
    from tsbd.bench.estimate import cell_seconds

    assert cell_seconds({"timings": {"cell": 90.0, "total": 80.0}}) == 90.0
    assert cell_seconds({"timings": {"total": 80.0, "train": 70.0}}) == 80.0
    # resumed at an epoch checkpoint: this run 30 s of training in a 40 s total; 300 s over all runs
    resumed = {"timings": {"total": 40.0, "train": 300.0, "train_this_run": 30.0, "resumed_at_epoch": 25}}
    assert cell_seconds(resumed) == 310.0
    assert cell_seconds({"timings": None}) is None


def test_estimates_for_a_thread_count_average_only_cells_run_at_it_where_there_are_any():
    lf, trojan, blended = _attack("lf"), _attack("trojan"), _attack("blended")
    by_id = {c.id: c.config for c in (lf, trojan, blended)}

    def at(cell, seconds, threads):
        return {**_row(cell, seconds=seconds, key="cell"), "versions": {"runtime": {"threads": threads}}}

    rows = [at(_defense(lf, "anp"), 4400.0, 1), at(_defense(trojan, "anp"), 2000.0, 2),
            at(_defense(lf), 900.0, 2), at(_defense(trojan), 700.0, 2)]
    anp, tsbd = _defense(blended, "anp"), _defense(blended)
    mixed = Estimator(rows, by_id.get)
    assert mixed("defense", anp.config, blended.id) == Estimate(3200.0, "same", 2, None)
    two = Estimator(rows, by_id.get, threads=2)
    assert two("defense", anp.config, blended.id) == Estimate(2000.0, "same", 1, 2)
    one = Estimator(rows, by_id.get, threads=1)
    assert one("defense", anp.config, blended.id) == Estimate(4400.0, "same", 1, 1)
    # no TSBD cell ran at 1 thread: the 2-thread ones are used, and the summary says the counts differ
    assert one("defense", tsbd.config, blended.id) == Estimate(800.0, "same", 2, 2)
    both = remaining([one("defense", anp.config, blended.id), one("defense", tsbd.config, blended.id)])
    assert "took (at different or unrecorded thread counts)." in remaining_line(both)
    same = remaining([two("defense", anp.config, blended.id), two("defense", tsbd.config, blended.id)])
    assert remaining_line(same).startswith("Not done: 2 cells, about 0.8 h of compute at the times the done cells "
                                           "like them took at 2 threads.")


def test_estimates_for_a_machine_prefer_cells_run_on_a_processor_of_that_name_in_that_precision():
    lf, blended = _attack("lf"), _attack("blended")
    by_id = {c.id: c.config for c in (lf, blended)}

    def on(cell, seconds, cpu, precision):
        return {**_row(cell, seconds=seconds, key="cell"),
                "versions": {"runtime": {"threads": 2, "cpu": cpu, "precision": precision}}}

    rows = [on(_defense(lf, "anp"), 1200.0, "AMD EPYC", "fp32"), on(_defense(lf, "anp"), 400.0, "AMD EPYC", "bf16"),
            on(_defense(lf), 300.0, "AMD EPYC", "fp32")]
    anp, tsbd = _defense(blended, "anp"), _defense(blended)
    bf16 = Estimator(rows, by_id.get, threads=2, machine=("AMD EPYC", "bf16"))
    assert bf16("defense", anp.config, blended.id) == Estimate(400.0, "same", 1, 2)
    # no TSBD cell ran in bf16: the fp32 one stands in, marked
    assert bf16("defense", tsbd.config, blended.id) == Estimate(300.0, "same", 1, 2, elsewhere=True)
    both = [bf16("defense", anp.config, blended.id), bf16("defense", tsbd.config, blended.id)]
    line = remaining_line(remaining(both))
    assert "(1 only from cells run on another processor or in another precision)" in line
    fp32 = Estimator(rows, by_id.get, threads=2, machine=("AMD EPYC", "fp32"))
    assert fp32("defense", anp.config, blended.id).seconds == 1200.0
    assert Estimator(rows, by_id.get, threads=2)("defense", anp.config, blended.id).seconds == 800.0  # no machine


def test_a_cell_run_on_a_gpu_is_not_taken_for_its_host_cpu():
    """A GPU machine's host CPU can share its name with a CPU machine (an Intel Xeon): the GPU's name is
    the machine, so a CPU run is not planned at the GPU's speed, and a GPU run is."""
    lf, blended = _attack("lf"), _attack("blended")
    by_id = {c.id: c.config for c in (lf, blended)}
    xeon = "Intel(R) Xeon(R) Processor"
    gpu_row = {**_row(_defense(lf, "anp"), seconds=60.0, key="cell"),
               "versions": {"runtime": {"threads": 1, "cpu": xeon, "gpu": "NVIDIA H200", "precision": "bf16",
                                        "device": "cuda"}}}
    cpu_row = {**_row(_defense(lf, "anp"), seconds=2400.0, key="cell"),
               "versions": {"runtime": {"threads": 1, "cpu": xeon, "precision": "bf16", "device": "cpu"}}}
    assert machine_of(gpu_row) == ("NVIDIA H200", "bf16") and machine_of(cpu_row) == (xeon, "bf16")
    anp = _defense(blended, "anp")
    on_cpu = Estimator([gpu_row, cpu_row], by_id.get, threads=1, machine=(xeon, "bf16"))
    assert on_cpu("defense", anp.config, blended.id) == Estimate(2400.0, "same", 1, 1)
    on_gpu = Estimator([gpu_row, cpu_row], by_id.get, threads=1, machine=("NVIDIA H200", "bf16"))
    assert on_gpu("defense", anp.config, blended.id) == Estimate(60.0, "same", 1, 1)
    only_gpu = Estimator([gpu_row], by_id.get, threads=1, machine=(xeon, "bf16"))
    assert only_gpu("defense", anp.config, blended.id).elsewhere


def test_a_tsbd_cell_sweeping_n_on_test_data_is_estimated_with_its_extra_stage_2s():
    """Each swept n other than the defense's own costs one more stage 2: from the like cell's stage-2
    time, or from its own sweep's time per point when it swept too."""
    lf = _attack("lf")
    plain, swept = _defense(lf, seed=0), _defense(lf, seed=1, test_selected_n=[0.05, 0.15, 0.3])
    rows = [_row(lf, seconds=6000.0),
            {**_row(plain), "timings": {"total": 500.0, "finetune": 200.0}},
            {**_row(swept), "timings": {"total": 1300.0, "finetune": 200.0, "test_selected_n": 800.0}}]
    by_id = {lf.id: lf.config}
    only_plain = Estimator(rows[:2], by_id.get)
    # 2 points beyond n = 0.15 at 200 s of stage 2 each
    assert only_plain("defense", _defense(lf, seed=2, test_selected_n=[0.05, 0.15, 0.3]).config,
                      lf.id) == Estimate(900.0, "like", 1)
    # from the swept cell: 400 s per point; four points beyond n = 0.15 -> 1300 + 2 * 400; the plain
    # cell's 500 s counts as is for a plain cell, and 500 + 4 * 200 for the four-point one
    both = Estimator(rows, by_id.get)
    four = _defense(lf, seed=2, test_selected_n=[0.01, 0.05, 0.15, 0.3, 0.5])
    assert both("defense", four.config, lf.id) == Estimate(((1300.0 + 2 * 400.0) + (500.0 + 4 * 200.0)) / 2,
                                                            "like", 2)
    assert both("defense", _defense(lf, seed=2).config, lf.id) == Estimate(500.0, "same", 1)
