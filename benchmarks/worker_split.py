"""One process with T threads, or T one-thread processes side by side: which trains more images per
second on this machine? (``tsbd bench --workers N`` gives each worker ``--threads / N``.)

Alternates the two layouts for ``--rounds`` rounds (A B A B ...), so a slow spell of a shared machine
does not fall on one layout only. Each measurement is tsbd's training loop (:func:`tsbd.train.fit`,
as ``benchmarks/throughput.py`` measures ``ours``) on CIFAR-10 images, in fresh processes: one at
``--threads T``; or T at ``--threads 1``, each pinned to its own core (``os.sched_setaffinity``), that
load and warm up first and then start their timed steps together. The layout's rate is the sum of its
processes' images per second. Prints each round and the median ratio (split / one).

    python benchmarks/worker_split.py --data-root DATA_ROOT --models preact_resnet18@width=16 \\
        --out benchmarks/results/worker_split.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INTERNAL = ("child", "model", "core", "ready", "go")  # the measuring processes' own options


def child(args) -> None:
    """One measuring process: warm up, say ready, wait for go, time ``--steps`` steps, print img/s."""
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    sys.path.insert(0, str(HERE))
    from throughput import bench_ours, model_from_entry  # noqa: E402 -- throughput.py's "ours" measurement

    from tsbd.data import load_dataset
    from tsbd.train import Runtime

    rt = Runtime.create("cpu", args.precision, args.threads, compile="off")
    ds = load_dataset("cifar10", root=args.data_root) if args.data_root else load_dataset("demo")
    model = model_from_entry(args.model, ds)
    bench_ours(model, ds.train, rt, args.batch_size, 1, args.warmup)  # warm-up (data, kernels, allocator)
    Path(args.ready).touch()
    while not Path(args.go).exists():
        time.sleep(0.01)
    rate = bench_ours(model, ds.train, rt, args.batch_size, args.steps, 1)
    print(json.dumps({"images_per_second": rate}), flush=True)


def layout(args, model: str, threads: list[int], cores: list[int | None]) -> list[float]:
    """Run one process per entry of ``threads`` at once; their images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        go = os.path.join(tmp, "go")
        procs, ready = [], []
        for i, (t, core) in enumerate(zip(threads, cores)):
            r = os.path.join(tmp, f"ready{i}")
            ready.append(r)
            cmd = [sys.executable, __file__, "--child", "--model", model, "--threads", str(t),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--precision", args.precision, "--ready", r, "--go", go]
            cmd += ["--data-root", args.data_root] if args.data_root else []
            cmd += ["--core", str(core)] if core is not None else []
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        while not all(os.path.exists(r) for r in ready):
            if any(p.poll() not in (None, 0) for p in procs):
                raise SystemExit("a measuring process failed; run it alone to see why")
            time.sleep(0.05)
        Path(go).touch()
        rates = []
        for p in procs:
            out, _ = p.communicate()
            if p.returncode:
                raise SystemExit(f"a measuring process exited with {p.returncode}")
            rates.append(json.loads(out.strip().splitlines()[-1])["images_per_second"])
        return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="cifar10 location (default: the embedded demo data)")
    ap.add_argument("--models", default="preact_resnet18@width=16",
                    help="comma-separated NAME or NAME@KEY=VALUE (architecture options)")
    ap.add_argument("--threads", type=int, default=None, help="T (default: the cores this process may use)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default=None)
    # child mode (internal)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--core", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    ap.add_argument("--go", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from tsbd.artifacts import provenance, write_json_atomic
    from tsbd.train import Runtime

    cores = sorted(os.sched_getaffinity(0))
    t = args.threads or len(cores)
    if t < 2 or t > len(cores):
        raise SystemExit(f"--threads {t}: need 2..{len(cores)} (the cores this process may use: {cores})")
    result = {"machine": Runtime.create("cpu", args.precision, t, compile="off").describe(),
              "args": {k: v for k, v in vars(args).items() if k not in INTERNAL},
              "cores": cores[:t], "provenance": provenance(), "models": {}}
    for model in args.models.split(","):
        rounds = []
        for i in range(args.rounds):
            one = layout(args, model, [t], [None])
            split = layout(args, model, [1] * t, cores[:t])
            rounds.append({"one": sum(one), "split": split, "split_sum": sum(split), "ratio": sum(split) / sum(one)})
            print(f"{model} round {i + 1}: one process x {t} threads {sum(one):.1f} img/s; "
                  f"{t} x 1 thread {' + '.join(f'{r:.1f}' for r in split)} = {sum(split):.1f} img/s; "
                  f"ratio {rounds[-1]['ratio']:.2f}", flush=True)
        result["models"][model] = {"rounds": rounds, "median_ratio": statistics.median(r["ratio"] for r in rounds)}
        print(f"{model}: median ratio (split / one) {result['models'][model]['median_ratio']:.2f}", flush=True)
        if args.out:
            write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
