"""TSBD and the baseline defenses on full CIFAR-10 with the CPU-scale model, BadNets and Blended.

For each attack (BadNets, Blended with the paper's triggers): train the airbench model on the
10%-poisoned training set, then run each variant on the same 5% clean set, recording
ACC / ASR / RA / DER and per-stage times. Variants: ``per-tensor`` / ``global`` (TSBD with
either perturbation norm), ``vanilla-ft`` (a plain 20-epoch fine-tune with TSBD's stage-2
optimizer), or any registered defense name (``ft``, ``fp``, ``nad``, ``nc``, ``anp``, ``clp``,
``ibau``, ``rnp``) at its default config. Attacked models are saved under --work and reused; a
rerun with the same --out skips the (attack, variant) rows already in it (resume). DATA_ROOT is the
folder with ``cifar10.npz`` and BackdoorBench's trigger files in ``backdoorbench-triggers/``.

    python benchmarks/cifar10_tsbd.py --data-root DATA_ROOT \
        --trigger-dir DATA_ROOT/backdoorbench-triggers --out benchmarks/results/cifar10_tsbd.json
    python benchmarks/cifar10_tsbd.py --data-root DATA_ROOT \
        --trigger-dir DATA_ROOT/backdoorbench-triggers --tsbd-opt unlearn_lr=0.01 \
        --variants per-tensor,ft,fp,nad,nc,anp,clp,ibau,rnp --out benchmarks/results/cifar10_defenses.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from tsbd.artifacts import load_model, provenance, save_model, write_json_atomic
from tsbd.attacks import build_attack
from tsbd.config import parse_key_values
from tsbd.data import load_dataset
from tsbd.errors import TsbdError
from tsbd.pipeline import defend_model, setup_attack, train_attacked_model, train_config
from tsbd.train.runtime import Runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--trigger-dir", required=True, help="folder with trigger_image.png and hello_kitty.jpeg")
    ap.add_argument("--attacks", default="badnets,blended")
    ap.add_argument("--epochs", type=int, default=30, help="attack training epochs (cpu preset)")
    ap.add_argument("--model", default="airbench")
    ap.add_argument("--clean-ratio", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--variants", default="per-tensor,global,vanilla-ft")
    ap.add_argument("--tsbd-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="TSBD option for every variant, e.g. unlearn_lr=0.01 for airbench")
    ap.add_argument("--defense-opt", action="append", default=[], metavar="NAME:KEY=VALUE",
                    help="option for one defense variant, e.g. rnp:unlearn_lr=0.01")
    ap.add_argument("--work", default="runs/bench_cifar10")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    rt = Runtime.create(args.device, args.precision, args.threads)
    trig = Path(args.trigger_dir)
    triggers = {"badnets": {"trigger_image": str(trig / "trigger_image.png")},
                "blended": {"trigger_image": str(trig / "hello_kitty.jpeg"), "blend_ratio": 0.2}}
    t0 = time.perf_counter()
    ds = load_dataset("cifar10", root=args.data_root)
    load_s = time.perf_counter() - t0
    out = {"machine": rt.describe(), "dataset": ds.describe(), "data_load_seconds": load_s,
           "args": vars(args), "provenance": provenance(), "attacks": {}}
    previous = json.loads(Path(args.out).read_text()).get("attacks", {}) if Path(args.out).exists() else {}
    defense_opts: dict[str, dict[str, Any]] = {}
    for item in args.defense_opt:
        name, _, kv = item.partition(":")
        if "=" not in kv:
            ap.error(f"--defense-opt {item!r}: expected NAME:KEY=VALUE, e.g. rnp:unlearn_lr=0.01")
        defense_opts.setdefault(name, {}).update(parse_key_values([kv], "--defense-opt"))
    try:
        tsbd_opts = parse_key_values(args.tsbd_opt, "--tsbd-opt")
    except TsbdError as err:
        ap.error(str(err))
    for name in args.attacks.split(","):
        attack = build_attack(name, triggers.get(name, {}))
        setup = setup_attack(ds, attack, args.seed, rt)
        folder = Path(args.work) / f"{name}-{args.model}-e{args.epochs}-s{args.seed}"
        if folder.exists():
            model, meta = load_model(folder, rt.device)
        else:
            cfg = train_config("cpu", {"epochs": args.epochs})
            model, meta = train_attacked_model(setup, args.model, cfg, rt, progress=True,
                                               checkpoint=folder.with_name(folder.name + ".resume.pt"))
            save_model(folder, model, meta)
        row = {"no_defense": meta["metrics"], "attack_train_seconds": meta["timings"]["train"],
               "train_images_per_second": meta.get("train_images_per_second"),
               "defenses": dict(previous.get(name, {}).get("defenses", {}))}
        out["attacks"][name] = row
        print(name, "no defense", meta["metrics"], flush=True)
        for variant in args.variants.split(","):
            if variant in row["defenses"]:
                print(name, variant, "already in", args.out, "- skipped", flush=True)
                continue
            if variant == "vanilla-ft":  # a plain 20-epoch fine-tune with TSBD's stage-2 optimizer settings,
                # the baseline TSBD's wall time is compared with (issue: at most 2.5x)
                opts = {"epochs": 20, "weight_decay": 0.0, "schedule": "constant"}
                dname = "ft"
            elif variant in ("per-tensor", "global"):
                opts = {"perturbation_norm": variant, **tsbd_opts}
                dname = "tsbd"
            else:
                opts, dname = dict(defense_opts.get(variant, {})), variant
            res, rec = defend_model(model, setup, dname, opts, args.clean_ratio, rt, seed=args.seed, progress=True,
                                    metrics_before=meta["metrics"])
            row["defenses"][variant] = {"metrics": rec["metrics"], "timings": res.timings, "info": res.info,
                                        "stages": rec["defense"]["stages"], "config": rec["defense"]["config"]}
            print(name, variant, rec["metrics"], {k: round(v, 1) for k, v in res.timings.items()}, flush=True)
            write_json_atomic(args.out, out)
    out["total_seconds"] = time.perf_counter() - t0
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
