"""``Runtime(compile=True)``: fit trains a torch.compile'd module that shares the model's
parameters, so the result is the eager result (up to fused-kernel rounding) under the same keys."""

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
    assert Runtime.create("cpu", "fp32", 1, compile=True).describe()["compile"] is True
