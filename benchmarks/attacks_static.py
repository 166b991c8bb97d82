"""The attacks with generated resources (SIG, LF, SSBA, TrojanNN) on full CIFAR-10.

For each attack: generate (or load from the cache) its resource -- LF's perturbation and
TrojanNN's trigger against a clean model of the victim's architecture, SSBA's encoder -- then
train the CPU-scale airbench model on the poisoned training set with the "cpu" preset, and
record the resource's generation time and record, the training time, clean ACC, ASR and RA as
JSON. With ``--trigger-dir`` it also runs LF with BackdoorBench's own PreAct-ResNet18 file.

    python benchmarks/attacks_static.py --data-root /work/shared/data \
        --trigger-dir /work/shared/data/backdoorbench-triggers --out benchmarks/results/attacks_static.json

``--tiny`` runs the whole path in about a minute on 2 cores (2,000 training images, tiny
resource settings, 2 training epochs): a check that everything runs, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tsbd.artifacts import provenance, write_json_atomic
from tsbd.attacks import build_attack
from tsbd.data import load_dataset
from tsbd.data.base import Dataset
from tsbd.pipeline import TRAIN_PRESETS, setup_attack, train_attacked_model, train_config
from tsbd.train.runtime import Runtime

ATTACKS = ("sig", "lf", "ssba", "trojan")
TINY_SETTINGS = {  # resource settings of --tiny (the full run uses each attack's defaults)
    "lf": {"images": 500, "epochs": 2, "clean_epochs": 2},
    "ssba": {"train_images": 500, "epochs": 2},
    "trojan": {"mask_update_iters": 50, "clean_epochs": 2},
}


def class_balanced_subset(ds: Dataset, train_per_class: int, test_per_class: int) -> Dataset:
    def take(split, per_class):
        idx = torch.cat([torch.nonzero(split.y == c).flatten()[:per_class] for c in range(ds.num_classes)])
        return split.subset(torch.sort(idx).values)

    train, test = take(ds.train, train_per_class), take(ds.test, test_per_class)
    return Dataset(f"{ds.name}-subset", train, test, ds.classes, ds.mean, ds.std,
                   fingerprint=train.fingerprint() + test.fingerprint(), source=f"subset of {ds.source}")


def run_attack(label: str, name: str, options: dict, ds: Dataset, args, runtime: Runtime) -> dict:
    attack = build_attack(name, options)
    t0 = time.perf_counter()
    setup = setup_attack(ds, attack, args.seed, runtime, arch=args.model, cache_dir=args.cache_dir,
                         progress=args.progress)
    prepare_seconds = time.perf_counter() - t0
    resource = getattr(attack, "resource", None)
    cfg = train_config(args.preset, {"epochs": args.epochs} if args.epochs else None)
    _, meta = train_attacked_model(setup, args.model, cfg, runtime, progress=args.progress)
    row = {
        "attack": name,
        "describe": attack.describe(),
        "resource_from_cache": None if resource is None else resource.from_cache,
        "resource_generation_seconds": None if resource is None else resource.meta.get("generation_seconds"),
        "prepare_and_poison_seconds": round(prepare_seconds, 2),
        "poisoned": len(setup.poisoned_train.poison_index),
        "train": meta["train"],
        "train_seconds": round(meta["timings"]["train"], 2),
        "train_images_per_second": meta.get("train_images_per_second"),
        "metrics": meta["metrics"],
    }
    m = meta["metrics"]
    print(f"{label}: ACC {m['acc']:.4f} ASR {m['asr']:.4f} RA {m['ra']:.4f}  prepare {prepare_seconds:.1f} s "
          f"train {meta['timings']['train']:.1f} s", file=sys.stderr, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="folder with cifar10.npz (else $TSBD_DATA_ROOT)")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--trigger-dir", default=None, help="BackdoorBench's trigger files: adds an LF run with its .npy")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--model", default="airbench")
    ap.add_argument("--preset", default="cpu", choices=sorted(TRAIN_PRESETS))
    ap.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None, help="resource and clean-model cache (else $TSBD_CACHE_DIR)")
    ap.add_argument("--tiny", action="store_true", help="2,000 training images, tiny settings, 2 epochs")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=None, help="write the JSON here (it is always printed)")
    args = ap.parse_args()

    runtime = Runtime.create(args.device, args.precision, args.threads)
    t0 = time.perf_counter()
    ds = load_dataset(args.dataset, root=args.data_root, cache_dir=args.cache_dir)
    load_seconds = time.perf_counter() - t0
    if args.tiny:
        ds = class_balanced_subset(ds, 200, 50)
        args.epochs = args.epochs or 2
    runs = [(name, name, dict(TINY_SETTINGS.get(name, {})) if args.tiny else {}) for name in args.attacks.split(",")]
    if args.trigger_dir and "lf" in args.attacks.split(","):
        bb_file = Path(args.trigger_dir) / f"{args.dataset}_preactresnet18_0_255.npy"
        if bb_file.is_file():
            runs.append(("lf-backdoorbench-file", "lf", {"trigger_file": str(bb_file)}))
    out = {"benchmark": "attacks_static", "machine": runtime.describe(),
           "dataset": ds.describe(), "data_load_seconds": round(load_seconds, 2), "args": vars(args),
           "provenance": provenance(), "results": {}}
    for label, name, options in runs:
        out["results"][label] = run_attack(label, name, options, ds, args, runtime)
        if args.out:
            write_json_atomic(args.out, out)
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
