"""benchmarks/throughput.py's bare step: eager unless the runtime's compile mode is "on" (the modes
are strings, so "off" must not read as true), and its warm-up time is reported when asked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tsbd.models import build_model
from tsbd.train import Runtime

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def _module():
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode,compiled", [("off", False), ("auto", False), ("on", True)])
def test_bare_step_compiles_only_when_the_mode_is_on(monkeypatch, mode, compiled):
    bench = _module()
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(model) or model)
    torch.manual_seed(0)
    model = build_model("airbench", 10, widths=(8, 8, 8))
    rt = Runtime.create("cpu", "fp32", threads=1, compile=mode)
    timings: dict = {}
    rate = bench.bench_bare(model, rt, 4, 1, 1, timings)
    assert rate > 0
    assert timings["warmup_s"] > 0
    assert (len(calls) == 1) is compiled
