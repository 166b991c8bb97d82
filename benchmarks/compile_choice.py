"""What ``--compile`` (auto) decides per model on this machine: a real 40-step run of each CPU-scale
model with the automatic choice forced on (``AUTO_COMPILE_MIN_STEPS = 1``), recording the compile
time and the eager and compiled step times it measured. Run with a fresh inductor cache
(``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)``) to time a first compile.

    python benchmarks/compile_choice.py --out benchmarks/results/compile_choice_avx2.json
"""

from __future__ import annotations

import argparse
import json

import torch

from tsbd.artifacts import provenance, write_json_atomic
from tsbd.data import load_dataset
from tsbd.models import build_model
from tsbd.train import engine, fit
from tsbd.train.engine import TrainConfig
from tsbd.train.runtime import Runtime

MODELS = [("preact_resnet18", {"width": 16}), ("vgg19_bn", {"width": 16}), ("airbench", {})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=40, help="training steps per model (batch 256)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    engine.AUTO_COMPILE_MIN_STEPS = 1
    rt = Runtime.create("cpu", "auto", args.threads, compile="auto")
    ds = load_dataset("demo")
    result = {"machine": rt.describe(), "args": vars(args), "provenance": provenance(), "models": {}}
    for name, kw in MODELS:
        torch.manual_seed(0)
        model = build_model(name, 10, mean=ds.mean, std=ds.std, **kw)
        res = fit(model, ds.train.subset(torch.arange(256 * args.steps) % len(ds.train)),
                  TrainConfig(epochs=1, batch_size=256, lr=0.05), rt, progress=False)
        result["models"][f"{name}{'@width=16' if kw else ''}"] = res.compile
        print(name, json.dumps(res.compile), flush=True)
        if args.out:
            write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
