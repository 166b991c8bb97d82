"""A clean (unpoisoned) model on full CIFAR-10 with the attacks' training schedule.

The reference for issue 3 (the CPU-scale model reaches >= 85% clean accuracy within 20 minutes on
2 cores) and issue 4 (each attack's clean ACC within 3 points of a clean model trained with the
same schedule). The model is the pipeline's cached clean reference (the one analyses reuse);
a rerun loads it and reports the recorded training time.

    python benchmarks/clean_model.py --data-root ../shared/data --out benchmarks/results/clean_model.json
"""

from __future__ import annotations

import argparse

from tsbd.artifacts import provenance, write_json_atomic
from tsbd.data import load_dataset
from tsbd.pipeline import clean_reference_model, train_config
from tsbd.train.runtime import Runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--model", default="airbench")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rt = Runtime.create(args.device, args.precision, args.threads)
    ds = load_dataset("cifar10", root=args.data_root)
    cfg = train_config(args.preset, {"epochs": args.epochs} if args.epochs else {})
    model, meta = clean_reference_model(ds, args.model, rt, seed=args.seed, cfg=cfg, progress=True)
    out = {"machine": rt.describe(), "dataset": ds.describe(), "args": vars(args),
           "train": meta["train"], "metrics": meta["metrics"], "train_seconds": meta["timings"]["train"],
           "train_images_per_second": len(ds.train) * cfg.epochs / meta["timings"]["train"],
           "runtime_recorded": meta["runtime"], "provenance": provenance()}
    print(f"{args.model} clean: ACC {meta['metrics']['acc']:.2%} after {meta['timings']['train'] / 60:.1f} min", flush=True)
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
