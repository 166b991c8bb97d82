"""Engine throughput, in one run, on one model and batch size:

* ``bare``: the model's forward/backward/SGD step on one fixed in-memory batch (the limit);
* ``ours``: tsbd's training loop (:func:`tsbd.train.fit`: uint8 data in memory, batched crop+flip
  with torch ops, channels_last, the runtime's precision);
* ``inference``: evaluation through :func:`tsbd.train.predict` (eval mode, no grad);
* ``backdoorbench``: a BackdoorBench-style loop -- a Dataset that builds a PIL image per sample,
  applies RandomCrop(32, pad 4) + RandomHorizontalFlip + ToTensor + Normalize per sample, batched
  by a DataLoader (num_workers 0: workers do not help on 2 cores), fp32, default memory format.

With ``--compile``, ``bare`` and ``ours`` are measured again with ``torch.compile`` (the first
warm-up step compiles), side by side with the eager numbers. Also measures the machine's matmul
peak at the training precision in the same run (best of three square sizes), so the numbers can
be read as a fraction of the hardware limit.

    python benchmarks/throughput.py --data-root DATA_ROOT --models airbench \\
        --out benchmarks/results/throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch
from PIL import Image

from tsbd.artifacts import provenance, write_json_atomic
from tsbd.config import parse_key_values
from tsbd.data import load_dataset
from tsbd.data.base import ImageSet
from tsbd.models import build_model
from tsbd.train import Runtime, TrainConfig, fit, predict


def matmul_peak(runtime: Runtime, n: int = 2048, reps: int = 10) -> float:
    """Measured dense matmul TFLOP/s at the runtime's precision (the machine's practical peak)."""
    dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=runtime.device, dtype=dtype)
    b = torch.randn(n, n, device=runtime.device, dtype=dtype)
    for _ in range(3):
        a @ b
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def model_flops_per_image(model: torch.nn.Module, shape=(3, 32, 32)) -> float:
    """Forward FLOPs per image (2 x MACs of conv and linear layers), counted with hooks."""
    flops = []

    def conv_hook(m, inp, out):
        k = m.weight[0].numel()  # C_in/groups * kh * kw
        flops.append(2 * k * out[0].numel())

    def lin_hook(m, inp, out):
        flops.append(2 * m.in_features * m.out_features)

    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return float(sum(flops))


class BackdoorBenchStyleDataset(torch.utils.data.Dataset):
    """Per-sample PIL pipeline as BackdoorBench's dataset + torchvision transforms do it."""

    def __init__(self, data: ImageSet, mean, std, seed: int = 0):
        self.x = data.x.permute(0, 2, 3, 1).numpy()  # HWC uint8 like the stored images
        self.y = data.y.numpy()
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        img = Image.fromarray(self.x[i])
        # RandomCrop(32, padding=4)
        padded = Image.new("RGB", (img.width + 8, img.height + 8))
        padded.paste(img, (4, 4))
        dx, dy = self.rng.integers(0, 9, size=2)
        img = padded.crop((dx, dy, dx + 32, dy + 32))
        if self.rng.random() < 0.5:  # RandomHorizontalFlip
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0  # ToTensor
        return torch.from_numpy((arr - self.mean) / self.std), int(self.y[i])  # Normalize


class Unnormalized(torch.nn.Module):
    """The model minus its built-in normalization (the BackdoorBench loop normalizes in the dataset)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.norm = model.normalize
        model.normalize = torch.nn.Identity()

    def forward(self, x):
        return self.model(x)


def bench_bare(model, runtime, batch_size, steps, warmup, timings: dict | None = None):
    """The bare step in images/s; ``timings["warmup_s"]`` gets the warm-up's seconds (with
    ``torch.compile``, the compile time plus ``warmup`` ordinary steps)."""
    t0 = time.perf_counter()
    model.to(runtime.device).to(memory_format=torch.channels_last).train()
    net = torch.compile(model) if runtime.compile == "on" else model  # compile is "on", "off" or "auto"
    x = torch.rand(batch_size, 3, 32, 32, device=runtime.device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=runtime.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for i in range(warmup + steps):
        if i == warmup:
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            if timings is not None:
                timings["warmup_s"] = t - t0
        with runtime.autocast():
            loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t)


def bench_ours(model, data, runtime, batch_size, steps, warmup):
    """tsbd's training loop in images/s, after ``warmup`` steps."""
    n = batch_size * (steps + warmup)
    sub = data.subset(torch.arange(n) % len(data))
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=0.01, schedule="constant")
    fit(model, sub.subset(torch.arange(batch_size * warmup)), cfg, runtime, progress=False)
    res = fit(model, sub.subset(torch.arange(batch_size * steps)), cfg, runtime, progress=False)
    return res.images_per_second


def bench_inference(model, data, runtime, batch_size, steps, warmup):
    """Evaluation images/s through :func:`tsbd.train.predict` (eval mode, no grad, uint8 in memory)."""
    n = batch_size * (steps + warmup)
    x = data.x[torch.arange(n) % len(data)]
    model.to(runtime.device).eval()
    predict(model, x[: batch_size * warmup], runtime, batch_size=batch_size)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    predict(model, x[batch_size * warmup :], runtime, batch_size=batch_size)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * steps / (time.perf_counter() - t)


def bench_backdoorbench(model, data, mean, std, runtime, batch_size, steps, warmup):
    ds = BackdoorBenchStyleDataset(data, mean, std)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
    net = Unnormalized(model).to(runtime.device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    it = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            t = time.perf_counter()
        x, y = next(it)
        x, y = x.to(runtime.device), y.to(runtime.device)
        loss = torch.nn.functional.cross_entropy(net(x), y)  # fp32, amp off (BackdoorBench attack default)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t)


def model_from_entry(entry: str, ds):
    """A fresh model from ``NAME`` or ``NAME@KEY=VALUE[@KEY=VALUE...]`` (architecture options, e.g.
    preact_resnet18@width=16), seeded 0, for ``ds``'s 10 classes and normalization."""
    name, *pairs = entry.split("@")
    opts = parse_key_values(pairs, f"--models {entry}")
    torch.manual_seed(0)
    return build_model(name, 10, mean=ds.mean, std=ds.std, **opts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="cifar10 location (default: the embedded demo data)")
    ap.add_argument("--models", default="airbench",
                    help="comma-separated NAME or NAME@KEY=VALUE (architecture options), e.g. preact_resnet18@width=16")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--skip-backdoorbench", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="also measure the bare step and tsbd fit with torch.compile, in the same run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rt = Runtime.create(args.device, args.precision, args.threads, compile="off")
    rt_compiled = dataclasses.replace(rt, compile="on")
    ds = load_dataset("cifar10", root=args.data_root) if args.data_root else load_dataset("demo")
    peaks = {n: matmul_peak(rt, n) for n in (1024, 2048, 4096)}  # the best square size is the peak
    peak = max(peaks.values())
    result = {"machine": rt.describe(), "matmul_peak_tflops": peak, "matmul_tflops_by_size": peaks,
              "args": vars(args), "provenance": provenance(), "models": {}}
    print(f"matmul peak at {rt.precision}: {peak:.2f} TFLOP/s on {rt.device}", flush=True)
    for entry in args.models.split(","):
        make = lambda entry=entry: model_from_entry(entry, ds)  # noqa: E731
        fwd_flops = model_flops_per_image(make())
        row = {"forward_gflops_per_image": fwd_flops / 1e9}
        row["bare"] = bench_bare(make(), rt, args.batch_size, args.steps, args.warmup)
        row["ours"] = bench_ours(make(), ds.train, rt, args.batch_size, args.steps, args.warmup)
        row["inference"] = bench_inference(make(), ds.test, rt, args.batch_size, args.steps, args.warmup)
        if not args.skip_backdoorbench:
            row["backdoorbench"] = bench_backdoorbench(make(), ds.train, ds.mean, ds.std, rt, args.batch_size,
                                                       args.steps, args.warmup)
            row["ours_over_backdoorbench"] = row["ours"] / row["backdoorbench"]
        if args.compile:  # the compiled model runs first through its warm-up steps (compiling)
            warm: dict = {}
            row["bare_compiled"] = bench_bare(make(), rt_compiled, args.batch_size, args.steps, args.warmup, warm)
            row["ours_compiled"] = bench_ours(make(), ds.train, rt_compiled, args.batch_size, args.steps, args.warmup)
            # the compile time: the first compiled warm-up minus the same steps at the compiled rate (the
            # second model reuses the compiled graph, so its warm-up tells nothing)
            row["compile_s"] = warm["warmup_s"] - args.warmup * args.batch_size / row["bare_compiled"]
            row["compiled_speedup"] = row["ours_compiled"] / row["ours"]
        row["ours_over_bare"] = row["ours"] / row["bare"]
        for suffix in ("", "_compiled") if args.compile else ("",):
            # training = forward + backward (about 3x the forward FLOPs)
            row[f"train_tflops_ours{suffix}"] = row[f"ours{suffix}"] * 3 * fwd_flops / 1e12
            row[f"fraction_of_matmul_peak{suffix}"] = row[f"train_tflops_ours{suffix}"] / peak
        result["models"][entry] = row
        print(entry, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if args.out:
            write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
