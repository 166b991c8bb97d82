"""One GPU run: a slice of the paper's CIFAR-10 / PreAct-ResNet18 table.

Trains the attacked PreAct-ResNet18 (the "gpu" preset unless --preset says otherwise), then runs
TSBD and the baseline defenses on it, writing every result row to --out as soon as it exists
(so a run cut short still returns what it finished). Defenses that would not fit in
--budget-seconds are skipped and listed as such.

On the device machine (data copied into an ignored folder of the checkout and carried):
    PYTHONPATH=. python3 benchmarks/gpu/paper_slice.py --data-root .device/data \
        --trigger-dir .device/triggers --attacks badnets --out $OUT/slice.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tsbd.artifacts import provenance, write_json_atomic
from tsbd.attacks import build_attack
from tsbd.config import parse_key_values
from tsbd.data import load_dataset
from tsbd.defenses import DEFENSES
from tsbd.errors import TsbdError
from tsbd.pipeline import defend_model, setup_attack, train_attacked_model, train_config
from tsbd.train.runtime import Runtime

PAPER_TRIGGERS = {"badnets": {"trigger_image": "trigger_image.png"},
                  "blended": {"trigger_image": "hello_kitty.jpeg", "blend_ratio": 0.2}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--trigger-dir", default=None)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--model", default="preact_resnet18")
    ap.add_argument("--arch-opt", action="append", default=[], help="KEY=VALUE model kwarg (tiny CPU checks)")
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--attacks", default="badnets")
    ap.add_argument("--defenses", default="tsbd,ft,fp,nad,clp,anp,nc,ibau,rnp")
    ap.add_argument("--defense-opt", action="append", default=[], help="NAME.KEY=VALUE (tiny CPU checks)")
    ap.add_argument("--clean-ratio", type=float, default=0.05)
    ap.add_argument("--limit-train", type=int, default=0, help="use only the first N training images (CPU checks)")
    ap.add_argument("--budget-seconds", type=float, default=1e9)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model for attack training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    t_start = time.perf_counter()
    rt = Runtime.create(args.device, args.precision, compile=args.compile)
    ds = load_dataset(args.dataset, root=args.data_root)
    if args.limit_train:
        ds = ds.limited(args.limit_train, max(100, args.limit_train // 5), args.seed)
    defense_opts: dict[str, dict] = {}
    try:
        arch_kwargs = parse_key_values(args.arch_opt, "--arch-opt")
        for key, value in parse_key_values(args.defense_opt, "--defense-opt", dash_to_underscore=False).items():
            name, dot, field = key.partition(".")
            if not dot:
                raise TsbdError(f"--defense-opt {key}={value} must look like NAME.KEY=VALUE, e.g. anp.nb_iter=200")
            defense_opts.setdefault(name, {})[field] = value
    except TsbdError as err:
        ap.error(str(err))
    out = {"machine": {"device": str(rt.device),
                       "gpu": torch.cuda.get_device_name() if rt.device.type == "cuda" else None,
                       **rt.describe()},
           "args": vars(args), "dataset": ds.describe(), "provenance": provenance(), "rows": [], "skipped": []}

    def save():
        out["elapsed_seconds"] = time.perf_counter() - t_start
        write_json_atomic(args.out, out)

    def run_defense(attack_name, setup, model, meta, name, per_defense):
        if name not in DEFENSES:
            out["skipped"].append({"attack": attack_name, "defense": name, "why": "not registered"})
            return
        left = args.budget_seconds - (time.perf_counter() - t_start)
        guess = max(per_defense) if per_defense else 0.0
        if left < guess * 1.2:
            out["skipped"].append({"attack": attack_name, "defense": name, "why": f"budget ({left:.0f}s left)"})
            save()
            return
        t0 = time.perf_counter()
        try:
            res, rec = defend_model(model, setup, name, defense_opts.get(name), args.clean_ratio, rt,
                                    seed=args.seed, metrics_before=meta["metrics"])
            row = {"attack": attack_name, "defense": name, "metrics": rec["metrics"], "timings": res.timings,
                   "info": res.info, "stages": rec["defense"]["stages"], "config": rec["defense"]["config"]}
        except Exception as err:  # record and go on: one failing defense must not lose the rest
            row = {"attack": attack_name, "defense": name, "error": f"{type(err).__name__}: {err}"}
        row["seconds"] = time.perf_counter() - t0
        per_defense.append(row["seconds"])
        out["rows"].append(row)
        print(attack_name, name, row.get("metrics", row.get("error")), round(row["seconds"], 1), flush=True)
        save()

    # phase 1: every attack model and TSBD on it; phase 2: the baselines, while the budget lasts
    trained = []
    per_attack: list[float] = []
    defenses = args.defenses.split(",")
    first, rest = defenses[:1], defenses[1:]
    for attack_name in args.attacks.split(","):
        left = args.budget_seconds - (time.perf_counter() - t_start)
        if per_attack and left < max(per_attack) * 1.2:
            out["skipped"].append({"attack": attack_name, "defense": "*", "why": f"budget ({left:.0f}s left)"})
            continue
        t_attack = time.perf_counter()
        opts = dict(PAPER_TRIGGERS.get(attack_name, {})) if args.trigger_dir else {}
        if "trigger_image" in opts:
            opts["trigger_image"] = str(Path(args.trigger_dir) / opts["trigger_image"])
        setup = setup_attack(ds, build_attack(attack_name, opts), args.seed, rt)
        cfg = train_config(args.preset, {"epochs": args.epochs} if args.epochs else None)
        model, meta = train_attacked_model(setup, args.model, cfg, rt, arch_kwargs=arch_kwargs, progress=False)
        out["rows"].append({"attack": attack_name, "defense": "none", "metrics": meta["metrics"],
                            "seconds": meta["timings"]["train"], "train": meta["train"],
                            "images_per_second": meta["train_images_per_second"]})
        print(attack_name, "none", meta["metrics"], round(meta["timings"]["train"], 1), flush=True)
        save()
        for name in first:
            run_defense(attack_name, setup, model, meta, name, [])
        per_attack.append(time.perf_counter() - t_attack)
        trained.append((attack_name, setup, model, meta))
    per_defense: list[float] = []
    for name in rest:
        for attack_name, setup, model, meta in trained:
            run_defense(attack_name, setup, model, meta, name, per_defense)
    save()


if __name__ == "__main__":
    main()
