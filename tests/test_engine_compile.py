"""``Runtime(compile=...)``: with "on", fit trains a torch.compile'd module that shares the model's
parameters, so the result is the eager result (up to fused-kernel rounding) under the same keys;
with "auto", a long run times both and keeps the faster, and a failing compile falls back to eager."""

import math

import pytest
import torch

from tsbd.models import build_model
from tsbd.train import fit
from tsbd.train.engine import TrainConfig
from tsbd.train.runtime import Runtime


def _train(small, compile_):
    torch.manual_seed(0)
    model = build_model("airbench", 10, mean=small.mean, std=small.std, widths=[8, 8, 8])
    rt = Runtime.create("cpu", "fp32", 1, compile=compile_)
    res = fit(model, small.train.subset(torch.arange(256)), TrainConfig(epochs=2, batch_size=64, lr=0.05), rt,
              seed=0, progress=False)
    return model, res


@pytest.mark.slow
def test_compiled_fit_matches_eager_and_keeps_the_state_dict(small):
    eager, r_eager = _train(small, False)
    compiled, r_comp = _train(small, True)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefixes
    assert abs(r_comp.history[0]["loss"] - r_eager.history[0]["loss"]) < 1e-3
    for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=2e-3, rtol=1e-2), k
    assert Runtime.create("cpu", "fp32", 1, compile=True).describe()["compile"] == "on"
    assert r_comp.compile == {"mode": "on", "compiled": True} and r_eager.compile is None


def _fit_auto(small, monkeypatch, compiled_module, min_steps=1):
    from tsbd.train import engine

    monkeypatch.setattr(engine, "AUTO_COMPILE_MIN_STEPS", min_steps)
    monkeypatch.setattr(engine, "CALIBRATION_STEPS", 2)
    calls = []

    def fake_compile(model):
        calls.append(model)
        return compiled_module(model)

    monkeypatch.setattr(torch, "compile", fake_compile)
    torch.manual_seed(0)
    model = build_model("airbench", 10, mean=small.mean, std=small.std, widths=[8, 8, 8])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fit(model, small.train.subset(torch.arange(512)), TrainConfig(epochs=1, batch_size=32, lr=0.05),
              Runtime.create("cpu", "fp32", 1, compile="auto"), seed=0, progress=False)
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if v.is_floating_point())
    return res, calls, changed


class _Slower(torch.nn.Module):
    """A stand-in for a compiled module: the same model, 20 ms slower per call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        import time

        time.sleep(0.02)
        return self.model(x)


class _Broken(torch.nn.Module):
    def __init__(self, model):
        super().__init__()

    def forward(self, x):
        raise RuntimeError("no C++ compiler found\nmore")


def test_auto_compile_keeps_eager_when_compiling_does_not_pay(small, monkeypatch):
    res, calls, changed = _fit_auto(small, monkeypatch, _Slower)
    assert len(calls) == 1 and changed and res.epochs == 1
    rec = res.compile
    assert rec["mode"] == "auto" and rec["compiled"] is False
    assert rec["compiled_step_s"] > rec["eager_step_s"] and rec["speedup"] < 1 and rec["compile_s"] > 0


def test_auto_compile_falls_back_to_eager_when_compiling_fails(small, monkeypatch, caplog):
    res, calls, changed = _fit_auto(small, monkeypatch, _Broken)
    assert len(calls) == 1 and changed and res.epochs == 1
    assert res.compile == {"mode": "auto", "compiled": False, "error": "RuntimeError"}
    assert "torch.compile failed (RuntimeError: no C++ compiler found); training eager" in caplog.text
    assert all(math.isfinite(h["loss"]) for h in res.history)


def test_auto_compile_leaves_short_runs_alone(small, monkeypatch):
    res, calls, _ = _fit_auto(small, monkeypatch, _Broken, min_steps=10_000)
    assert calls == [] and res.compile["compiled"] is False and "under 10000" in res.compile["reason"]


def test_compile_flags_map_to_modes():
    import argparse

    from tsbd.cli.common import add_runtime_args
    from tsbd.errors import TsbdError
    from tsbd.train.runtime import compile_mode

    p = argparse.ArgumentParser()
    add_runtime_args(p)
    modes = [compile_mode(p.parse_args(a).compile) for a in ([], ["--compile"], ["--no-compile"])]
    assert modes == ["auto", "on", "off"]
    with pytest.raises(TsbdError, match="compile mode 'fast' is not one of auto, on, off"):
        compile_mode("fast")
