"""How many training processes one device holds before they stop adding throughput.

For each N in ``--procs``, N processes each build the same model, warm up tsbd's training loop
(:func:`tsbd.train.fit`) and wait at a barrier; then all train together for ``--seconds`` and
count the images they trained. The result per N: the images/s of each process and their sum.
Small models (the CPU-scale presets' width-16 networks) leave a GPU mostly idle in one process,
and processes on one GPU share it by time-slicing, so the sum tells how many workers
(``tsbd bench --workers``) a grid on that GPU should use.

    python benchmarks/gpu/concurrency.py --data-root DATA_ROOT --model preact_resnet18@width=16 \\
        --procs 1,2,4,8,16 --seconds 20 --out $OUT/concurrency.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # throughput.py, and tsbd from this checkout


def _worker(rank: int, args: dict, barrier, results) -> None:
    try:
        import torch
        from throughput import model_from_entry

        from tsbd.data import load_dataset
        from tsbd.train import Runtime, TrainConfig, fit

        runtime = Runtime.create(args["device"], args["precision"], threads=1, compile="off")
        ds = load_dataset("cifar10", root=args["data_root"]) if args["data_root"] else load_dataset("demo")
        model = model_from_entry(args["model"], ds)
        bs, chunk = args["batch_size"], args["chunk_steps"]
        data = ds.train.subset(torch.arange(bs * chunk) % len(ds.train))
        cfg = TrainConfig(epochs=1, batch_size=bs, lr=0.01, schedule="constant")
        fit(model, data, cfg, runtime, progress=False)  # warm-up: allocations, cudnn autotuning
        barrier.wait(timeout=600)
        images, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args["seconds"]:
            fit(model, data, cfg, runtime, progress=False)
            images += bs * chunk
        results.put((rank, images, time.perf_counter() - t0, None))
    except Exception as err:  # reported, not raised: the parent must not wait forever
        barrier.abort()
        results.put((rank, 0, 0.0, f"{type(err).__name__}: {err}"))


def run(n: int, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args, barrier, results)) for r in range(n)]
    for p in procs:
        p.start()
    rows: list = []
    while len(rows) < n:
        try:
            rows.append(results.get(timeout=5))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:  # killed before it could report (out of memory, a crash)
                for p in procs:
                    p.kill()
                code = dead[0].exitcode
                raise SystemExit(f"concurrency: {n} processes: a process died with exit code {code}") from None
    for p in procs:
        p.join()
    rows.sort()
    errors = [e for *_, e in rows if e]
    if errors:
        raise SystemExit(f"concurrency: {n} processes: {errors[0]}")
    per = [images / secs for _, images, secs, _ in rows]
    return {"procs": n, "images_per_s_each": [round(v, 1) for v in per], "images_per_s_total": round(sum(per), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=None, help="folder with cifar10.npz (default: the embedded demo data)")
    ap.add_argument("--model", default="preact_resnet18@width=16", help="NAME[@KEY=VALUE...]")
    ap.add_argument("--procs", default="1,2,4,8,16", help="comma-separated process counts")
    ap.add_argument("--seconds", type=float, default=20.0, help="training time measured per process count")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--chunk-steps", type=int, default=20, help="steps per fit call (the timed unit)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    try:
        counts = [int(v) for v in a.procs.split(",")]
    except ValueError:
        ap.error(f"--procs {a.procs!r}: give comma-separated whole numbers, e.g. 1,2,4")
    if not counts or min(counts) < 1:
        ap.error("--procs: every count must be at least 1")
    args = {"device": a.device, "precision": a.precision, "model": a.model, "batch_size": a.batch_size,
            "chunk_steps": a.chunk_steps, "seconds": a.seconds, "data_root": a.data_root}
    rows = []
    for n in counts:
        rows.append(run(n, args))
        print(f"{n:3d} processes: {rows[-1]['images_per_s_total']:10.1f} images/s in all", flush=True)
    from tsbd.artifacts import provenance, write_json_atomic
    from tsbd.train.runtime import processor_name, resolve_device

    if a.out:
        write_json_atomic(a.out, {"args": args, "machine": processor_name(resolve_device(a.device)), "results": rows,
                                  "provenance": provenance()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
