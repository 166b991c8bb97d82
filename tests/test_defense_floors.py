"""benchmarks/defense_floors.py's counting and floor arithmetic, on a tiny net: every pass a defense
makes is counted once, split the way the floor charges it."""

from __future__ import annotations

import copy
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TinyNet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def floors():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("defense_floors", ROOT / "benchmarks" / "defense_floors.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_pass_counter_splits_weight_and_input_gradients_and_follows_deep_copies(floors):
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.manual_seed(0)
    model = TinyNet()
    counter = floors.PassCounter(model)
    x = torch.rand(6, 3, 8, 8)
    with torch.no_grad():
        model(x)  # inference: 6 images forward only
    model(x).sum().backward()  # training: 6 forward, 6 back-propagated with weight grads
    copy.deepcopy(model)(x[:4]).sum().backward()  # a defense's copy counts into the same counter
    for p in model.parameters():
        p.requires_grad_(p.dim() < 2)  # a mask-like 1-D parameter still trains (BN affine here)
    xi = x[:2].clone().requires_grad_(True)
    model(xi).sum().backward()  # trigger / mask optimization: 2 back-propagated without weight grads
    counter.remove()
    model(x)  # after remove: not counted
    assert counter.images() == {"forward": 18, "backward_weight_grads": 10, "backward_input_grads": 2,
                                "forward_only": 6}
    assert counter.raw()["backward"] == {"weights=True batch=6": 1, "weights=True batch=4": 1,
                                         "weights=False batch=2": 1}
    per_image = {6: {"inference": 1.0, "train_step": 10.0, "input_step": 5.0},
                 4: {"inference": 1.0, "train_step": 20.0, "input_step": 5.0},
                 2: {"inference": 3.0, "train_step": 10.0, "input_step": 7.0}}
    # batch 6: 6 trained x 10 + 6 forward-only x 1; batch 4: 4 x 20; batch 2: 2 input-grad x 7
    assert floors.floor_seconds(counter, per_image) == pytest.approx(60 + 6 + 80 + 14)
