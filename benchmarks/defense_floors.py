"""Each defense against its own floor: the passes it makes through the model, timed at the engine's speed.

Per defense, on one attacked model and one clean set: ``Defense.purify`` runs with hooks on the
model that count every image forwarded and every image back-propagated (split by whether any conv
or linear weight required a gradient, since trigger and mask optimizers need only the gradients of
activations: NC and ANP freeze the model's weights while they optimize). In the same
run and on the same model, three bare kernels are timed at every batch size the defenses used:
an inference forward, a training step (forward, backward with weight gradients, SGD step) and a
forward plus input-only backward. The floor is

    floor = images back-propagated with weight grads x (training step per image)
          + images back-propagated with input grads only x (input-grad step per image)
          + every other image forwarded x (inference forward per image)

and ``measured / floor`` is how much of a defense's time goes to anything but those passes (data
handling, Python, optimizer bookkeeping, a forward kept on the autograd graph for nothing). A
forward made with autograd on but never back-propagated is charged at inference cost, so such
waste shows in the ratio. ``backdoorbench_estimate`` charges the back-propagated images at the
speed of a BackdoorBench-style loop (per-sample PIL transforms, ``DataLoader``, fp32) measured in
the same run -- an estimate of what the same passes cost there, not a run of BackdoorBench's code.

Hooks sit on the model's top module (copies made with ``copy.deepcopy`` keep them); a defense that
rebuilds the network from scratch would show too few passes, and a floor near zero says so.

    python benchmarks/defense_floors.py --dataset demo --epochs 12 --out benchmarks/results/defense_floors.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import bench_backdoorbench  # noqa: E402  (a sibling script, not a package)

from tsbd.artifacts import provenance, write_json_atomic  # noqa: E402
from tsbd.attacks import build_attack  # noqa: E402
from tsbd.bench.grid import PAPER_DEFENSE_OPTS  # noqa: E402
from tsbd.config import parse_key_values  # noqa: E402
from tsbd.data import load_dataset  # noqa: E402
from tsbd.defenses import DEFENSES, build_defense  # noqa: E402
from tsbd.pipeline import cached_attacked_model, setup_attack, train_config  # noqa: E402
from tsbd.train.engine import to_model_input  # noqa: E402
from tsbd.train.runtime import Runtime  # noqa: E402


class PassCounter:
    """Counts images through ``model``'s top module: forwards by (autograd on?, batch size) and
    backwards by (weight grads?, batch size)."""

    def __init__(self, model: torch.nn.Module):
        forward, backward = collections.Counter(), collections.Counter()
        self.forward, self.backward = forward, backward

        # plain closures, not bound methods: copy.deepcopy shares a function but copies a bound
        # method's object, so a defense's deep copy of the model would count into a copy
        def on_forward(module, inputs, output) -> None:
            forward[(torch.is_grad_enabled(), int(inputs[0].shape[0]))] += 1

        def on_backward(module, grad_input, grad_output) -> None:
            # weight gradients are the expensive part: conv and linear weights (2-D and up);
            # 1-D parameters (BN affine, ANP/RNP channel masks) cost next to nothing
            weights = any(p.requires_grad and p.dim() >= 2 for p in module.parameters())
            backward[(weights, int(grad_output[0].shape[0]))] += 1

        self.handles = [model.register_forward_hook(on_forward), model.register_full_backward_hook(on_backward)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def raw(self) -> dict[str, dict[str, int]]:
        """The counts by batch size, as recorded (forward: autograd on?; backward: weight grads?)."""
        return {"forward": {f"grad={g} batch={bs}": n for (g, bs), n in sorted(self.forward.items())},
                "backward": {f"weights={w} batch={bs}": n for (w, bs), n in sorted(self.backward.items())}}

    def images(self) -> dict[str, int]:
        fwd = sum(n * bs for (_, bs), n in self.forward.items())
        bw = sum(n * bs for (w, bs), n in self.backward.items() if w)
        bx = sum(n * bs for (w, bs), n in self.backward.items() if not w)
        return {"forward": fwd, "backward_weight_grads": bw, "backward_input_grads": bx,
                "forward_only": max(0, fwd - bw - bx)}


def _timed(fn, steps: int, warmup: int) -> float:
    for i in range(warmup + steps):
        if i == warmup:
            t = time.perf_counter()
        fn()
    return (time.perf_counter() - t) / steps


def kernel_seconds_per_image(model: torch.nn.Module, runtime: Runtime, batch_size: int, num_classes: int,
                             steps: int, warmup: int) -> dict[str, float]:
    """Seconds per image of an inference forward, a training step and an input-grad step at ``batch_size``."""
    net = copy.deepcopy(model).to(runtime.device).to(memory_format=torch.channels_last)
    x = to_model_input(torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8), runtime)
    y = torch.randint(0, num_classes, (batch_size,), device=runtime.device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-6, momentum=0.9)

    def inference():
        net.eval()
        with torch.no_grad(), runtime.autocast():
            net(x)

    def train_step():
        net.train()
        with runtime.autocast():
            loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def input_step():
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        xi = x.detach().requires_grad_(True)
        with runtime.autocast():
            loss = torch.nn.functional.cross_entropy(net(xi), y)
        loss.backward()
        for p in net.parameters():
            p.requires_grad_(True)

    return {name: _timed(fn, steps, warmup) / batch_size
            for name, fn in (("inference", inference), ("train_step", train_step), ("input_step", input_step))}


def floor_seconds(counter: PassCounter, per_image: dict[int, dict[str, float]],
                  train_key: str = "train_step") -> float:
    """The floor of the docstring, each batch charged at the kernel time of its own batch size."""
    total = 0.0
    bw_by_bs: collections.Counter = collections.Counter()
    for (weights, bs), n in counter.backward.items():
        total += n * bs * per_image[bs][train_key if weights else "input_step"]
        bw_by_bs[bs] += n
    fwd_by_bs: collections.Counter = collections.Counter()
    for (_, bs), n in counter.forward.items():
        fwd_by_bs[bs] += n
    for bs, n in fwd_by_bs.items():
        total += max(0, n - bw_by_bs[bs]) * bs * per_image[bs]["inference"]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="demo", help="demo (embedded) or cifar10 (needs --data-root)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--model", default="airbench")
    ap.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--epochs", type=int, default=12, help="attacked model's training epochs (cpu preset)")
    ap.add_argument("--clean-ratio", type=float, default=0.05,
                    help="paper Sec. 3.1 / App. C; RNP takes 0.5%% (paper App. C) unless --defense-opt "
                         "rnp.clean_ratio=R says otherwise")
    ap.add_argument("--defenses", default=",".join(sorted(DEFENSES)))
    ap.add_argument("--defense-opt", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="e.g. tsbd.unlearn_lr=8e-4 (airbench's 1/8 logit scale, as the CPU grid runs it)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per kernel and batch size")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=None, help="where the attacked model is kept (default: tsbd's cache)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    # a full backward hook on a model whose inputs need no gradient still fires (on the outputs' gradients)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    runtime = Runtime.create("cpu", "auto", args.threads)
    ds = load_dataset(args.dataset, root=args.data_root)
    setup = setup_attack(ds, build_attack(args.attack), 0, runtime, arch=args.model)
    model_opts = parse_key_values(args.model_opt, "--model-opt")
    cfg = train_config("cpu", {"epochs": args.epochs})
    t0 = time.perf_counter()
    # trained once per configuration and kept under --cache-dir (a rerun measures the same model)
    model, meta, cached = cached_attacked_model(setup, args.model, cfg, runtime, arch_kwargs=model_opts,
                                                cache_dir=args.cache_dir)
    print(f"attacked model: {meta['metrics']} ({'cache' if cached else 'trained'}, "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    opts: dict[str, dict] = collections.defaultdict(dict)
    for name, table in PAPER_DEFENSE_OPTS.items():  # RNP's 0.5% clean data, as the paper grids run it
        opts[name].update(table)
    for key, value in parse_key_values(args.defense_opt, "--defense-opt").items():
        name, _, field = key.partition(".")
        opts[name][field] = value
    clean_sets: dict[float, tuple] = {}

    rows, per_image = {}, {}
    for name in args.defenses.split(","):
        defense_opts = dict(opts.get(name, {}))
        ratio = float(defense_opts.pop("clean_ratio", args.clean_ratio))  # a grid-level option, as in the grids
        if ratio not in clean_sets:
            clean_sets[ratio] = setup.clean_set(ratio)
        clean, clean_info = clean_sets[ratio]
        defense = build_defense(name, defense_opts)
        counter = PassCounter(model)
        t = time.perf_counter()
        result = defense.purify(model, clean, runtime=runtime, seed=0)
        seconds = time.perf_counter() - t
        counter.remove()
        result.model._forward_hooks.clear()
        result.model._backward_hooks.clear()
        for bs in {bs for _, bs in counter.forward} | {bs for _, bs in counter.backward}:
            if bs not in per_image:
                per_image[bs] = kernel_seconds_per_image(model, runtime, bs, ds.num_classes, args.steps, args.warmup)
        floor = floor_seconds(counter, per_image)
        rows[name] = {"seconds": seconds, "floor_seconds": floor, "clean": clean_info,
                      "measured_over_floor": seconds / floor if floor else None,
                      "images": counter.images(), "passes": counter.raw(), "config": result.config}
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "config"}), flush=True)

    # the BackdoorBench-style loop's training step per image (its default batch size 128), same run
    bb_batch = 128
    bb_ips = bench_backdoorbench(copy.deepcopy(model), ds.train, ds.mean, ds.std, runtime, bb_batch,
                                 args.steps, args.warmup)
    ours_step = kernel_seconds_per_image(model, runtime, bb_batch, ds.num_classes, args.steps,
                                         args.warmup)["train_step"]
    for row in rows.values():
        trained = row["images"]["backward_weight_grads"]
        row["backdoorbench_estimate_seconds"] = row["seconds"] + trained * (1.0 / bb_ips - ours_step)
        row["ours_over_backdoorbench_estimate"] = row["seconds"] / row["backdoorbench_estimate_seconds"]
    result = {"command": " ".join(sys.argv), "machine": {**runtime.describe(), "platform": platform.platform()},
              "attacked_model": {"metrics": meta["metrics"], "train_seconds": meta["timings"]["train"]},
              "per_image_seconds": {str(k): v for k, v in sorted(per_image.items())},
              "backdoorbench_style_train_images_per_second": bb_ips, "defenses": rows, "provenance": provenance()}
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
