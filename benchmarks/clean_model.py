"""A clean (unpoisoned) model on full CIFAR-10 with the attacks' training schedule.

The reference for two aims: the CPU-scale model reaches >= 85% clean accuracy within 20 minutes on
2 cores, and each attack's clean ACC stays within 3 points of a clean model trained with the same
schedule. The model is the pipeline's cached clean reference (the one analyses reuse);
a rerun loads it and reports the recorded training time.

    python benchmarks/clean_model.py --data-root DATA_ROOT --out benchmarks/results/clean_model.json

``--compare DIR ...`` adds the per-class clean accuracy of other saved models (e.g. attacked
models from the grid) beside the clean model's, to see where an attack's accuracy loss sits.
"""

from __future__ import annotations

import argparse

from tsbd.artifacts import load_model, provenance, write_json_atomic
from tsbd.data import load_dataset
from tsbd.pipeline import clean_reference_model, train_config
from tsbd.train import predict
from tsbd.train.runtime import Runtime


def per_class_accuracy(model, test, runtime) -> list[float]:
    pred = predict(model, test.x, runtime)
    return [float((pred[test.y == c] == c).float().mean()) for c in range(int(test.y.max()) + 1)]


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
    ap.add_argument("--compare", nargs="*", default=[], help="saved model folders to compare per class")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rt = Runtime.create(args.device, args.precision, args.threads)
    ds = load_dataset("cifar10", root=args.data_root)
    cfg = train_config(args.preset, {"epochs": args.epochs} if args.epochs else {})
    model, meta = clean_reference_model(ds, args.model, rt, seed=args.seed, cfg=cfg, progress=True)
    out = {"machine": rt.describe(), "dataset": ds.describe(), "args": vars(args),
           "train": meta["train"], "metrics": meta["metrics"], "train_seconds": meta["timings"]["train"],
           "train_images_per_second": len(ds.train) * cfg.epochs / meta["timings"]["train"],
           "runtime_recorded": meta["runtime"], "provenance": provenance(),
           "per_class_acc": {"clean": per_class_accuracy(model, ds.test, rt)}}
    for folder in args.compare:
        other, other_meta = load_model(folder)
        out["per_class_acc"][folder] = per_class_accuracy(other, ds.test, rt)
        print(f"{folder} ({other_meta.get('attack', {}).get('name', '?')}):",
              " ".join(f"{a:.1%}" for a in out["per_class_acc"][folder]), flush=True)
    print("clean:", " ".join(f"{a:.1%}" for a in out["per_class_acc"]["clean"]), flush=True)
    print(f"{args.model} clean: ACC {meta['metrics']['acc']:.2%} after {meta['timings']['train'] / 60:.1f} min",
          flush=True)
    write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
