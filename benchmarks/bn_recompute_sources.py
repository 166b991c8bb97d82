"""How much of an attacked model's ACC and ASR its BatchNorm statistics carry, by where they come from.

TSBD's analyses read the reinitialized model twice: with the BN running statistics it kept from
training and with statistics recomputed on the defender's clean set
(:func:`tsbd.models.surgery.recompute_bn_stats`). This benchmark asks what the recompute does to
the attacked model itself, with no weight changed, for statistics drawn from:

* ``as_trained``: the running statistics training left;
* ``clean``: the defender's clean set (what the analyses use);
* ``clean_augmented``: the same images randomly cropped and flipped as in training;
* ``train_sample`` / ``train_sample_augmented``: a random sample of the attacker's training set,
  its poisoned images included (their share is recorded), plain and augmented.

If ``train_sample_augmented`` matches ``as_trained``, the recompute itself is exact and any gap of
``clean`` is the distribution shift between the defender's clean images and the poisoned,
augmented training set.

    python benchmarks/bn_recompute_sources.py RESULTS/artifacts/ID --data-root DATA_ROOT \
        --out benchmarks/results/bn_recompute_sources_r18_lf.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from tsbd.artifacts import load_model, provenance, write_json_atomic
from tsbd.errors import TsbdError
from tsbd.metrics import evaluate
from tsbd.models.surgery import bn_recomputed_copy
from tsbd.pipeline import load_setup_from_meta
from tsbd.train.augment import crop_flip
from tsbd.train.runtime import Runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an attacked model folder (tsbd attack / a grid's artifacts/ID)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--clean-ratio", type=float, default=0.05, help="paper Sec. 3.1 / App. C")
    ap.add_argument("--train-sample", type=int, default=10000, help="training images for the train_sample rows")
    ap.add_argument("--seed", type=int, default=0, help="clean-set draw is the model's; this seeds the rest")
    ap.add_argument("--batch-size", type=int, default=256, help="TSBD's batch size, as the analyses recompute")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="evaluation precision; the as_trained row matches the model's saved metrics only in the "
                         "precision they were measured in")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rt = Runtime.create("cpu", args.precision, args.threads)
    try:
        model, meta = load_model(args.model, rt.device)
        setup = load_setup_from_meta(meta, rt, data_root=args.data_root)
    except TsbdError as err:
        ap.error(str(err))
    if setup.poisoned_train is None:
        ap.error(f"{args.model} is not an attacked model (its meta.json names no attack)")
    ds = setup.dataset
    clean, clean_info = setup.clean_set(args.clean_ratio)
    # a generator of its own: the attack's poison draw used the model's seed, and a sample drawn
    # with that same sequence would over-represent the poisoned images
    g = torch.Generator().manual_seed(10_000 + args.seed)
    train = setup.poisoned_train
    idx = torch.randperm(len(train.data), generator=g)[: args.train_sample]
    share = float(torch.isin(idx, train.poison_index).float().mean())
    flip = ds.train.hflip
    sources = {"clean": clean.x, "clean_augmented": crop_flip(clean.x, g, flip=flip),
               "train_sample": train.data.x[idx], "train_sample_augmented": crop_flip(train.data.x[idx], g, flip=flip)}

    def measure(m):
        return evaluate(m, ds.test, setup.poisoned_test, rt)

    rows = {"as_trained": measure(model)}
    print("as_trained", rows["as_trained"], flush=True)
    t0 = time.perf_counter()
    for name, images in sources.items():
        fresh = bn_recomputed_copy(model, images, rt, batch_size=args.batch_size, seed=args.seed)
        if fresh is None:
            ap.error(f"{args.model} has no BatchNorm layer: there are no statistics to recompute")
        rows[name] = measure(fresh)
        print(name, rows[name], flush=True)
    write_json_atomic(args.out, {
        "command": "python benchmarks/bn_recompute_sources.py " + " ".join(sys.argv[1:]),
        "machine": {**rt.describe(), "platform": platform.platform()}, "model": args.model,
        "attack": meta["attack"]["name"], "clean": clean_info,
        "train_sample": {"images": len(idx), "poisoned_share": share}, "rows": rows,
        "seconds": time.perf_counter() - t0, "provenance": provenance()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
