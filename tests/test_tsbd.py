"""TSBD's stages checked against hand computations, and end to end on real images."""

import copy

import pytest
import torch
from torch import nn

from tsbd.defenses.tsbd import TSBDConfig, activeness_aware_step, clean_unlearn, zero_reinit
from tsbd.models.surgery import neuron_weight_change, prunable_units, rank_neurons, subweight_change


def _shifted(model, deltas):
    """A copy of ``model`` whose named conv weights are shifted by the given deltas."""
    other = copy.deepcopy(model)
    mods = dict(other.named_modules())
    with torch.no_grad():
        for name, d in deltas.items():
            mods[name].weight.add_(d.view_as(mods[name].weight))
    return other


def test_prunable_units_skip_shortcuts_and_linear(tiny_net):
    names = [n for n, _ in prunable_units(tiny_net)]
    assert names == ["conv1", "conv2"]


def test_nwc_equals_direct_l1(tiny_net):
    torch.manual_seed(1)
    deltas = {"conv1": torch.randn(8, 27), "conv2": torch.randn(16, 72)}
    other = _shifted(tiny_net, deltas)
    nwc = neuron_weight_change(tiny_net, other)
    for name, d in deltas.items():
        torch.testing.assert_close(nwc[name], d.abs().sum(1), rtol=1e-5, atol=1e-5)


def test_rank_is_global_across_layers():
    nwc = {"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([3.0, 0.5, 4.0])}
    assert rank_neurons(nwc) == [("a", 1), ("b", 2), ("b", 0), ("a", 0), ("b", 1)]


def _known_change(tiny_net):
    """Weight changes where conv2 channels 3 and 7 dominate NWC; within them, known magnitudes."""
    d1 = torch.full((8, 27), 0.001)
    d2 = torch.full((16, 72), 0.001)
    d2[3] = torch.linspace(0.1, 1.0, 72)  # NWC 39.6
    d2[7] = torch.linspace(0.05, 0.5, 72)  # NWC 19.8
    return _shifted(tiny_net, {"conv1": d1, "conv2": d2})


def test_zero_reinit_v3_zeroes_exactly_the_pooled_top_subweights(tiny_net):
    other = _known_change(tiny_net)
    change = subweight_change(tiny_net, other)
    # 24 neurons in total; 2/24 selects channels 3 and 7 of conv2
    model, info = zero_reinit(tiny_net, change, neuron_ratio=2 / 24 + 1e-9, weight_ratio=0.5)
    assert info["neurons_selected"] == 2
    pool = torch.cat([change["conv2"][3], change["conv2"][7]])
    threshold = torch.topk(pool, 72).values[-1]
    expected = torch.zeros(16, 72, dtype=torch.bool)
    expected[3] = change["conv2"][3] >= threshold
    expected[7] = change["conv2"][7] >= threshold
    w_new = model.conv2.weight.detach().view(16, -1)
    w_old = tiny_net.conv2.weight.detach().view(16, -1)
    assert torch.all(w_new[expected] == 0)
    assert torch.equal(w_new[~expected], w_old[~expected])
    assert info["subweights_zeroed"] == int(expected.sum()) >= 72
    # channel 3 changed more, so it loses more of its subweights than channel 7
    assert expected[3].sum() > expected[7].sum()
    # everything else is untouched, including the original (not the unlearned) weights
    assert torch.equal(model.conv1.weight, tiny_net.conv1.weight)
    assert torch.equal(model.shortcut[0].weight, tiny_net.shortcut[0].weight)
    assert torch.equal(model.linear.weight, tiny_net.linear.weight)
    # the input model is not modified
    assert not torch.all(tiny_net.conv2.weight.view(16, -1)[expected] == 0)


def test_zero_reinit_v1_and_v2(tiny_net):
    change = subweight_change(tiny_net, _known_change(tiny_net))
    v1, _ = zero_reinit(tiny_net, change, 2 / 24 + 1e-9, 0.5, scheme="v1")
    w = v1.conv2.weight.view(16, -1)
    assert torch.all(w[[3, 7]] == 0) and torch.all(w[[0, 1, 2]] != 0)
    v2, info = zero_reinit(tiny_net, change, 2 / 24 + 1e-9, 0.5, scheme="v2")
    w = v2.conv2.weight.view(16, -1)
    assert int((w[3] == 0).sum()) == 36 and int((w[7] == 0).sum()) == 36
    assert torch.all(w[3, 36:] == 0)  # linspace: the last half changed most


class TwoParam(nn.Module):
    """logits = [a * x, b * x]: two scalar parameters, gradients known in closed form."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3))
        self.b = nn.Parameter(torch.tensor(-0.2))

    def forward(self, x):
        return torch.stack([self.a * x, self.b * x], dim=1)


def _closed_form_grad(a, b, x, y):
    p = torch.softmax(torch.stack([a * x, b * x], 1), 1)
    onehot = nn.functional.one_hot(y, 2).float()
    g = ((p - onehot) * x[:, None]).mean(0)
    return g[0], g[1]


@pytest.mark.parametrize("norm", ["per-tensor", "global"])
def test_activeness_aware_step_matches_hand_computation(norm, runtime):
    x = torch.tensor([1.0, -2.0, 0.5, 3.0])
    y = torch.tensor([0, 1, 1, 0])
    model = TwoParam()
    a0, b0 = model.a.item(), model.b.item()
    r, alpha, lr = 0.05, 0.7, 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    activeness_aware_step(r, alpha, norm)(model, x, y, opt, runtime)

    ga, gb = _closed_form_grad(torch.tensor(a0), torch.tensor(b0), x, y)
    if norm == "per-tensor":  # each scalar tensor normalized by its own norm -> r * sign(g)
        ea, eb = r * torch.sign(ga), r * torch.sign(gb)
    else:
        n = torch.sqrt(ga**2 + gb**2)
        ea, eb = r * ga / n, r * gb / n
    ga2, gb2 = _closed_form_grad(a0 + ea, b0 + eb, x, y)
    exp_a = a0 - lr * ((1 - alpha) * ga + alpha * ga2)
    exp_b = b0 - lr * ((1 - alpha) * gb + alpha * gb2)
    assert model.a.item() == pytest.approx(float(exp_a), abs=1e-6)
    assert model.b.item() == pytest.approx(float(exp_b), abs=1e-6)
    # and it differs from a plain SGD step
    assert model.a.item() != pytest.approx(a0 - lr * float(ga), abs=1e-6)


@pytest.mark.slow
def test_clean_unlearning_stops_at_threshold(small, runtime):
    from tsbd.metrics import accuracy
    from tsbd.models import build_model
    from tsbd.train import TrainConfig, fit, predict

    torch.manual_seed(0)
    model = build_model("airbench", 10, mean=small.mean, std=small.std, widths=(16, 32, 32))
    fit(model, small.train, TrainConfig(epochs=4, batch_size=128, lr=0.2, nesterov=True, schedule="onecycle"),
        runtime, progress=False)
    acc0 = accuracy(predict(model, small.train.x, runtime), small.train.y)
    assert acc0 > 0.3
    cfg = TSBDConfig(unlearn_lr=1e-2, unlearn_acc_threshold=0.10, unlearn_max_epochs=50)
    unlearned, info = clean_unlearn(model, small.train, cfg, runtime)
    accs = info["clean_acc_per_epoch"]
    assert info["reached_threshold"]
    assert accs[-1] <= 0.10 and all(a > 0.10 for a in accs[:-1])
    assert info["epochs"] == len(accs)
    # the input model was not touched
    assert accuracy(predict(model, small.train.x, runtime), small.train.y) == pytest.approx(acc0)


def test_clean_unlearning_warns_once_when_accuracy_stops_falling(small, runtime, monkeypatch, caplog):
    import tsbd.defenses.tsbd as tsbd_mod
    from tsbd.models import build_model

    monkeypatch.setattr(tsbd_mod, "UNLEARN_STALL_EPOCHS", 2)
    seen = iter([0.6, 0.5, 0.55, 0.5, 0.52, 0.51])  # lowest at epoch 2, never lower again
    monkeypatch.setattr(tsbd_mod, "accuracy", lambda pred, y: next(seen))
    torch.manual_seed(0)
    model = build_model("airbench", 10, mean=small.mean, std=small.std, widths=(8, 8, 8))
    data = small.train.subset(torch.arange(128))
    cfg = TSBDConfig(unlearn_lr=1e-3, unlearn_max_epochs=6, batch_size=64)
    _, info = clean_unlearn(model, data, cfg, runtime)
    assert info["clean_acc_per_epoch"] == [0.6, 0.5, 0.55, 0.5, 0.52, 0.51] and not info["reached_threshold"]
    stalls = [r for r in caplog.records if "has not fallen for 2 epochs (lowest 0.500" in r.getMessage()]
    assert len(stalls) == 1  # at epoch 4, once; the end-of-run warning follows
    assert "did not reach clean accuracy <= 0.10 within 6 epochs" in caplog.text


def test_zero_reinit_on_channels_last_weights(tiny_net):
    """fit() leaves weights channels_last; zeroing must still hit exactly the chosen subweights."""
    other = _known_change(tiny_net)
    change = subweight_change(tiny_net, other)
    cl = copy.deepcopy(tiny_net).to(memory_format=torch.channels_last)
    assert not cl.conv2.weight.is_contiguous()
    model, info = zero_reinit(cl, change, 2 / 24 + 1e-9, 0.5)
    ref, _ = zero_reinit(tiny_net, change, 2 / 24 + 1e-9, 0.5)
    assert torch.equal(model.conv2.weight.contiguous(), ref.conv2.weight)
    assert info["subweights_zeroed"] >= 72
