"""The CPU-scale presets of the paper's other tables run end to end on a tiny slice of real data:
`paper-gtsrb-cpu` (Table 5: GTSRB, 43 classes, no flip, BackdoorBench's GTSRB LF file, SIG capped
at the target class) and `paper-cifar10-vgg-cpu` (Table 6: VGG19-BN at width 16, the VGG LF file
scaled into range)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from tsbd.bench.grid import load_grid
from tsbd.bench.store import Store
from tsbd.cli import main

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "gtsrb.npz").is_file()
                                or not (SHARED_DATA / "backdoorbench-triggers").is_dir(),
                                reason=f"GTSRB and BackdoorBench's trigger files are not under {SHARED_DATA}")

RUNTIME = ["--device", "cpu", "--precision", "fp32", "--threads", "1", "--quiet"]
TINY = ["--set", "limit_train=430", "--set", "limit_test=215", "--set", "train.epochs=1",
        "--set", "train.batch_size=64"]


def run_tiny(preset: str, tmp_path: Path, attacks: list[str], defenses: list[str], *extra: str) -> dict[str, dict]:
    results = tmp_path / "results"
    args = ["bench", preset, "--data-root", str(SHARED_DATA), "--results", str(results),
            "--cache-dir", str(tmp_path / "cache"), *TINY, "--set", f"attack={json.dumps(attacks)}",
            "--set", f"defense={json.dumps(defenses)}", *extra, *RUNTIME]
    assert main(args) == 0
    with Store(results) as store:
        rows = store.cells()
    assert rows and {r["status"] for r in rows} == {"done"}
    return {r["id"]: {**r, "meta": json.loads((results / r["artifact"] / "meta.json").read_text())} for r in rows}


def test_gtsrb_preset_runs_with_43_classes_no_flip_and_backdoorbench_files(tmp_path, caplog):
    spec = load_grid("paper-gtsrb-cpu", data_root=str(SHARED_DATA)).spec
    assert spec["dataset"] == "gtsrb" and spec["model"] == "preact_resnet18"
    assert spec["attack_opts"]["lf"]["trigger_file"].endswith("gtsrb_preactresnet18_0_255.npy")
    rows = run_tiny("paper-gtsrb-cpu", tmp_path, ["lf", "sig"], ["none", "nc"],
                    "--set", "defense_opts.nc.nc_epoch=1", "--set", "defense_opts.nc.epochs=1")
    attacks = {r["meta"]["attack"]["name"]: r["meta"] for r in rows.values() if r["kind"] == "attack"}
    assert set(attacks) == {"lf", "sig"}
    for meta in attacks.values():
        assert meta["arch"]["name"] == "preact_resnet18" and meta["arch"]["width"] == 16
        assert meta["arch"]["num_classes"] == 43 and len(meta["classes"]) == 43
        assert meta["dataset"]["name"] == "gtsrb" and meta["dataset"]["hflip"] is False
        assert meta["attack"]["config"]["target"] == 0
    assert attacks["lf"]["attack"]["config"]["trigger_file"].endswith("gtsrb_preactresnet18_0_255.npy")
    # SIG asks for 10% of the set from class 0, which holds 10 of the 430 images: all 10 are poisoned
    sig = attacks["sig"]["poison"]
    assert sig["requested"] == 43 and sig["count"] == 10
    assert "the target class 0 has only 10 training images" in caplog.text
    nc = [r["meta"] for r in rows.values() if r["kind"] == "defense"]
    assert len(nc) == 2 and all(m["defense"]["defense"] == "nc" for m in nc)
    for m in nc:  # NC reverse-engineers a trigger for each of the 43 labels
        assert len(m["defense"]["info"]["mask_l1"]) == 43


def test_vgg_preset_runs_vgg19_bn_at_width_16_with_the_lf_file_in_range(tmp_path):
    spec = load_grid("paper-cifar10-vgg-cpu", data_root=str(SHARED_DATA)).spec
    lf_file = "{data_root}/backdoorbench-triggers/cifar10_vgg19_bn_0_255.npy"
    assert spec["attack_opts"]["lf"] == {"trigger_file": lf_file, "trigger_scale": 255.0}
    rows = run_tiny("paper-cifar10-vgg-cpu", tmp_path, ["lf"], ["none", "ft"], "--set", "defense_opts.ft.epochs=1")
    attack = next(r["meta"] for r in rows.values() if r["kind"] == "attack")
    assert attack["arch"]["name"] == "vgg19_bn" and attack["arch"]["width"] == 16
    assert attack["dataset"]["name"] == "cifar10" and attack["dataset"]["hflip"] is True
    assert attack["attack"]["config"]["trigger_scale"] == 255.0
    defended = next(r for r in rows.values() if r["kind"] == "defense")
    assert defended["meta"]["arch"] == attack["arch"]
    assert 0 <= defended["metrics"]["asr"] <= 1 and 0 <= defended["metrics"]["der"] <= 1

