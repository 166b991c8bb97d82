"""Benchmark the training-controllable attacks (WaNet, Input-aware) on CIFAR-10 with the CPU model.

For each attack: prepare it (WaNet: the warp field; Input-aware: train the mask net, then the
generator jointly with a classifier -- the "resource" time), poison, then train the airbench
model with the ``cpu`` preset through the pipeline (the attack's batch hook adds the noise /
cross samples), and record clean ACC, ASR, RA, the resource and training times. For
Input-aware it also evaluates stage 2's classifier (the model BackdoorBench reports as IAD's
attacked model) on the same test sets. Results go to stdout and to ``--out`` as JSON.

    python benchmarks/attacks_dynamic.py --data-root DATA_ROOT --out benchmarks/results/attacks_dynamic.json
    python benchmarks/attacks_dynamic.py --tiny --out /tmp/attacks_dynamic_tiny.json   # ~1 minute check

Input-aware at BackdoorBench's full size (width 1, 25 + 75 epochs) takes hours on 2 CPU cores;
the defaults below (``--iad-opt``) scale G/M to half width and stage 2 to the victim's 30
epochs. Pass ``--iad-opt width=1 --iad-opt joint_epochs=75`` for BackdoorBench's sizes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from tsbd.artifacts import load_model, provenance, save_model, write_json_atomic
from tsbd.attacks import build_attack
from tsbd.config import parse_key_values
from tsbd.data import load_dataset
from tsbd.data.base import Dataset
from tsbd.errors import TsbdError
from tsbd.metrics import evaluate
from tsbd.pipeline import AttackSetup, train_attacked_model, train_config
from tsbd.train.runtime import Runtime

IAD_CPU = {"width": 0.5, "mask_epochs": 25, "joint_epochs": 30}  # see the module docstring
TINY = {
    "train_per_class": 200, "test_per_class": 100, "epochs": 10, "arch_kwargs": {"widths": [16, 32, 32]},
    "inputaware": {"width": 0.25, "mask_epochs": 2, "joint_epochs": 2, "batch_size": 64},
}


def parse_opts(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE config overrides, in tsbd's one syntax (VALUE in TOML, else the plain string)."""
    try:
        return parse_key_values(items, "option")
    except TsbdError as err:
        raise SystemExit(str(err)) from None


def balanced_subset(ds: Dataset, train_per_class: int, test_per_class: int) -> Dataset:
    """The first images of each class (deterministic), for the --tiny check."""
    def take(split, per_class):
        idx = torch.cat([torch.nonzero(split.y == c).flatten()[:per_class] for c in range(ds.num_classes)])
        return split.subset(torch.sort(idx).values)

    train, test = take(ds.train, train_per_class), take(ds.test, test_per_class)
    return Dataset(f"{ds.name}-tiny", train, test, ds.classes, ds.mean, ds.std,
                   fingerprint=train.fingerprint() + test.fingerprint(), source=f"subset of {ds.source or ds.name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", help="folder with cifar10.npz (required unless --tiny)")
    ap.add_argument("--tiny", action="store_true", help="a ~1 minute check: 2,000 images, tiny model and G/M")
    ap.add_argument("--attacks", default="wanet,inputaware")
    ap.add_argument("--epochs", type=int, default=30, help="victim training epochs (cpu preset)")
    ap.add_argument("--model", default="airbench")
    ap.add_argument("--wanet-opt", action="append", default=[], metavar="KEY=VALUE", help="WaNet config override")
    ap.add_argument("--iad-opt", action="append", default=[], metavar="KEY=VALUE",
                    help=f"Input-aware config override (defaults here: {IAD_CPU})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None, help="where G/M and decoded data are cached")
    ap.add_argument("--work", default=None, help="save attacked models here; an existing one is reused")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not args.tiny and not args.data_root:
        ap.error("--data-root is required unless --tiny")

    rt = Runtime.create(args.device, args.precision, args.threads)
    t0 = time.perf_counter()
    if args.data_root:
        ds = load_dataset("cifar10", root=args.data_root, cache_dir=args.cache_dir)
    else:
        ds = load_dataset("demo", cache_dir=args.cache_dir)
    if args.tiny:
        ds = balanced_subset(ds, TINY["train_per_class"], TINY["test_per_class"])
    epochs = TINY["epochs"] if args.tiny else args.epochs
    arch_kwargs = TINY["arch_kwargs"] if args.tiny else {}
    configs = {"wanet": parse_opts(args.wanet_opt),
               "inputaware": {**(TINY["inputaware"] if args.tiny else IAD_CPU), **parse_opts(args.iad_opt)}}
    out = {"machine": rt.describe(), "dataset": ds.describe(),
           "data_load_seconds": time.perf_counter() - t0, "args": vars(args), "model": args.model,
           "arch_kwargs": arch_kwargs, "provenance": provenance(), "attacks": {}}
    cfg = train_config("cpu", {"epochs": epochs})
    for name in [a.strip() for a in args.attacks.split(",") if a.strip()]:
        attack = build_attack(name, configs.get(name, {}))
        t = time.perf_counter()
        attack.prepare(ds, runtime=rt, seed=args.seed, arch=args.model, arch_kwargs=arch_kwargs,
                       cache_dir=args.cache_dir, progress=True)
        resource_s = time.perf_counter() - t
        t = time.perf_counter()
        setup = AttackSetup(ds, attack, args.seed, attack.poison_train(ds.train, args.seed),
                            attack.poison_test(ds.test))
        poison_s = time.perf_counter() - t
        folder = Path(args.work) / f"{name}-{args.model}-e{epochs}-s{args.seed}{'-tiny' if args.tiny else ''}" \
            if args.work else None
        if folder is not None and folder.exists():
            model, meta = load_model(folder, rt.device)
        else:
            model, meta = train_attacked_model(setup, args.model, cfg, rt, arch_kwargs=arch_kwargs, progress=True)
            if folder is not None:
                save_model(folder, model, meta)
        row = {"metrics": meta["metrics"], "resource_seconds": resource_s, "poison_seconds": poison_s,
               "train_seconds": meta["timings"]["train"],
               "train_images_per_second": meta.get("train_images_per_second"), "attack": attack.describe(),
               "train": meta["train"], "poisoned": len(setup.poisoned_train.poison_index)}
        if name == "inputaware":  # BackdoorBench's IAD attacked model is stage 2's classifier
            row["joint_classifier_metrics"] = evaluate(attack.joint_classifier(rt.device), ds.test,
                                                       setup.poisoned_test, rt)
        out["attacks"][name] = row
        print(name, {k: round(v, 4) for k, v in row["metrics"].items()},
              f"resource {resource_s:.1f} s, train {row['train_seconds']:.1f} s", flush=True)
        if "joint_classifier_metrics" in row:
            print(name, "stage-2 classifier", {k: round(v, 4) for k, v in row["joint_classifier_metrics"].items()},
                  flush=True)
        write_json_atomic(args.out, out)
    out["total_seconds"] = time.perf_counter() - t0
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
