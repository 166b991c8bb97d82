"""FT, FP, NAD and CLP checked against hand computations, and end to end on real images."""

import copy
import math

import pytest
import torch
from conftest import state_copy
from torch import nn

from tsbd.defenses import DEFENSES, build_defense
from tsbd.defenses.clp import channel_lipschitz, clp_prune
from tsbd.defenses.fp import prune_sweep, rank_feature_channels
from tsbd.defenses.nad import NADConfig, attention_distillation_step, attention_loss, attention_map, distillation_layers
from tsbd.models import build_model
from tsbd.models.surgery import bn_conv_pairs, capture_features, classifier_layout, layer_activations, stage_outputs
from tsbd.train.engine import to_model_input

FOUR = ["ft", "fp", "nad", "clp"]
TINY = {"ft": {"epochs": 1}, "fp": {"epochs": 1}, "nad": {"teacher_epochs": 1, "epochs": 1}, "clp": {}}




def _clean_loss(model, data, runtime):
    model.eval()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(to_model_input(data.x, runtime)), data.y))


# ------------------------------------------------------------------------------------------ all four
def test_registered():
    assert set(FOUR) <= set(DEFENSES.names())


@pytest.mark.parametrize("name", FOUR)
def test_runs_deterministic_and_leaves_input_alone(name, trained, small, runtime):
    before = state_copy(trained)
    r1 = build_defense(name, TINY[name]).purify(trained, small.train, runtime=runtime, seed=3)
    r2 = build_defense(name, TINY[name]).purify(trained, small.train, runtime=runtime, seed=3)
    after = state_copy(trained)
    assert all(torch.equal(before[k], after[k]) for k in before)
    s1, s2 = r1.model.state_dict(), r2.model.state_dict()
    assert s1.keys() == before.keys() and all(s1[k].shape == before[k].shape for k in s1)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert r1.info == r2.info
    if name != "clp" or r1.info["pruned"]:
        assert any(not torch.equal(s1[k], before[k]) for k in s1)


# ------------------------------------------------------------------------------------------ FT
def test_ft_lowers_clean_loss(trained, small, runtime):
    loss0 = _clean_loss(trained, small.train, runtime)
    res = build_defense("ft", {"epochs": 3, "lr": 0.05}).purify(trained, small.train, runtime=runtime, seed=0)
    assert _clean_loss(res.model, small.train, runtime) < loss0 - 0.02
    assert res.info["finetune"]["epochs"] == 3


# ------------------------------------------------------------------------------------------ FP
class KnownFeatures(nn.Module):
    """Features with known channel means: channel c is values[c] * w over a 2x2 map (mean(w) = 1),
    flattened without pooling, so each channel spans 4 classifier columns."""

    def __init__(self, values):
        super().__init__()
        self.register_buffer("values", torch.as_tensor(values, dtype=torch.float32))
        self.register_buffer("w", torch.tensor([[0.5, 1.5], [1.25, 0.75]]))

    def forward(self, x):
        return self.values.view(1, -1, 1, 1) * self.w * (1 + 0 * x.mean((1, 2, 3))).view(-1, 1, 1, 1)


class KnownNet(nn.Module):
    def __init__(self, values):
        super().__init__()
        self.features = KnownFeatures(values)
        self.classifier = nn.Linear(4 * len(values), 3)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def test_fp_ranks_least_active_channels_first(small, runtime):
    values = [0.7, -0.2, 3.0, 0.1, 1.5]
    model = KnownNet(values)
    layout = classifier_layout(model, (3, 32, 32))
    assert (layout.linear, layout.channels, layout.positions) == ("classifier", 5, 4)
    assert layout.columns([1, 3]).tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    order, means = rank_feature_channels(model, layout, small.train.x[:50], runtime, batch_size=16)
    torch.testing.assert_close(means, torch.tensor(values))
    assert order.tolist() == [1, 3, 0, 4, 2]


def test_prune_sweep_keeps_the_last_step_within_budget():
    order = torch.tensor([4, 0, 3, 1, 2, 5, 7, 6])
    acc_by_count = {0: 0.80, 2: 0.79, 4: 0.75, 6: 0.72, 8: 0.79}  # 6: exactly 10% lower -> violates
    seen = []

    def holdout_acc(channels):
        seen.append(channels.tolist())
        return acc_by_count[len(channels)]

    kept, history = prune_sweep(order, 2, holdout_acc, acc_ratio=0.1)
    assert kept == 4  # BackdoorBench would keep the violating 6
    assert [h["pruned"] for h in history] == [0, 2, 4, 6]  # stops at the first violation
    assert seen == [[], [4, 0], [4, 0, 3, 1], [4, 0, 3, 1, 2, 5]]  # least active first, nested

    kept, history = prune_sweep(torch.arange(5), 2, lambda ch: 0.5, acc_ratio=0.1)
    assert kept == 5 and [h["pruned"] for h in history] == [0, 2, 4, 5]
    kept, _ = prune_sweep(torch.arange(5), 2, lambda ch: 0.5 - 0.3 * len(ch), acc_ratio=0.1)
    assert kept == 0


def test_fp_end_to_end(trained, small, runtime):
    res = build_defense("fp", {"epochs": 1}).purify(trained, small.train, runtime=runtime, seed=0)
    info = res.info
    acc = {h["pruned"]: h["holdout_acc"] for h in info["sweep"]}
    acc0, kept = acc[0], info["pruned"]
    assert info["classifier"] == "head" and info["channels"] == 32 and info["step"] == 1
    assert info["holdout_images"] == 240
    assert acc0 - acc[kept] < 0.1 * acc0  # the kept step is within the budget
    last = info["sweep"][-1]["pruned"]
    assert last == kept or (last == kept + 1 and acc0 - acc[last] >= 0.1 * acc0)  # the next one is not
    w = res.model.head.weight.detach()
    pruned = torch.tensor(info["pruned_channels"], dtype=torch.long)
    assert len(pruned) == kept
    assert torch.all(w[:, pruned] == 0)  # still zero after fine-tuning
    rest = torch.ones(32, dtype=torch.bool)
    rest[pruned] = False
    assert torch.all(w[:, rest].abs().sum(0) > 0)
    # the least active channels of the input model, on the fit part of the clean set
    means = torch.tensor(info["mean_activation_pruned"])
    assert torch.all(means[:-1] <= means[1:])


# ------------------------------------------------------------------------------------------ NAD
def test_attention_map_hand_case():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, -1.0]]]])  # N=1, C=2, H=1, W=2
    # mean over channels of f^2: [(1 + 9) / 2, (4 + 1) / 2] = [5, 2.5]; L2-normalized: [2, 1] / sqrt(5)
    expected = torch.tensor([[2.0, 1.0]]) / math.sqrt(5)
    torch.testing.assert_close(attention_map(f, p=2), expected, rtol=1e-5, atol=1e-6)
    # p = 1: [(1 + 3) / 2, (2 + 1) / 2] = [2, 1.5] -> [4, 3] / 5
    torch.testing.assert_close(attention_map(f, p=1), torch.tensor([[0.8, 0.6]]), rtol=1e-5, atol=1e-6)
    # scale invariant, and the loss is the mean squared difference of the maps
    torch.testing.assert_close(attention_map(10 * f), attention_map(f), rtol=1e-5, atol=1e-6)
    g = torch.ones(1, 2, 1, 2)  # uniform map [1, 1] / sqrt(2)
    diff = expected - torch.tensor([[1.0, 1.0]]) / math.sqrt(2)
    torch.testing.assert_close(attention_loss(f, g), (diff**2).mean(), rtol=1e-5, atol=1e-7)


def test_nad_layers_are_the_last_stage_ends():
    preact = build_model("preact_resnet18", 10, width=4)
    assert stage_outputs(preact) == ["layer1", "layer2", "layer3", "layer4"]
    layers, betas = distillation_layers(preact, (3, 32, 32), NADConfig())
    assert layers == ["layer2", "layer3", "layer4"] and betas == [500.0, 1000.0, 1000.0]
    air = build_model("airbench", 10, widths=(16, 32, 32))
    assert distillation_layers(air, (3, 32, 32), NADConfig())[0] == ["groups.0", "groups.1", "groups.2"]
    # fewer stages than betas: the deepest betas; explicit layers are taken as given
    few, b = distillation_layers(air, (3, 32, 32), NADConfig(betas=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0)))
    assert len(few) == 5 and b == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert distillation_layers(air, (3, 32, 32), NADConfig(layers=("groups.2",), betas=(7.0,))) == (["groups.2"], [7.0])


def test_nad_step_is_cross_entropy_when_student_equals_teacher(tiny_net, runtime):
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5])
    layers, betas = ["bn1", "conv2:input"], [500.0, 1000.0]
    teacher = copy.deepcopy(tiny_net).eval().requires_grad_(False)
    teacher_state = state_copy(teacher)

    def stepped(student, step):
        student = copy.deepcopy(student).eval()  # eval: the maps of equal weights are equal
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        step(student, x, y, opt, runtime)
        return student

    def ce_step(model, x, y, opt, runtime):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    nad = attention_distillation_step(teacher, layers, betas)
    a, b = stepped(tiny_net, nad), stepped(tiny_net, ce_step)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # a student that differs from the teacher is pulled by the attention terms
    moved = copy.deepcopy(tiny_net)
    with torch.no_grad():
        moved.conv1.weight.mul_(torch.linspace(0.2, 3.0, 8).view(-1, 1, 1, 1))
    a, b = stepped(moved, nad), stepped(moved, ce_step)
    assert not torch.allclose(a.conv1.weight, b.conv1.weight)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_nad_end_to_end_reports_teacher(trained, small, runtime):
    res = build_defense("nad", TINY["nad"]).purify(trained, small.train, runtime=runtime, seed=0)
    assert res.info["layers"] == ["groups.0", "groups.1", "groups.2"]
    assert 0.0 <= res.info["teacher_clean_acc"] <= 1.0 and res.info["student"]["epochs"] == 1


# ------------------------------------------------------------------------------------------ CLP
def _conv_bn(seed=0, c_in=3, c_out=6):
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(c_in, c_out, 3, bias=False), nn.BatchNorm2d(c_out)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c_out))
        bn.bias.copy_(torch.randn(c_out))
        bn.running_var.copy_(torch.rand(c_out) + 0.1)
    return conv, bn


def test_channel_lipschitz_equals_direct_computation():
    conv, bn = _conv_bn()
    got = channel_lipschitz(conv, bn)
    for k in range(6):
        w = conv.weight[k].detach().reshape(3, 9)
        scale = bn.weight[k].detach().abs() / torch.sqrt(bn.running_var[k] + bn.eps)
        torch.testing.assert_close(got[k], torch.linalg.matrix_norm(w, ord=2) * scale, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[k], torch.linalg.svdvals(w)[0] * scale, rtol=1e-5, atol=1e-6)


class ConvBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = _conv_bn(1, 3, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(16, 10)

    def forward(self, x):
        return self.linear(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


def test_clp_prunes_exactly_the_channels_above_the_threshold(small, runtime):
    model = ConvBNNet()
    with torch.no_grad():
        model.conv.weight[5] *= 100  # an outlier channel (with 16 channels, z <= 15 / 4 at most)
        model.bn.weight[5] = 1.0
    uclc = channel_lipschitz(model.conv, model.bn)
    expected = uclc > uclc.mean() + 3 * uclc.std()
    assert expected[5]
    res = build_defense("clp").purify(model, small.train, runtime=runtime, seed=0)
    bn = res.model.bn
    assert torch.all(bn.weight[expected] == 0) and torch.all(bn.bias[expected] == 0)
    assert torch.equal(bn.weight[~expected], model.bn.weight[~expected])
    assert torch.equal(bn.bias[~expected], model.bn.bias[~expected])
    assert torch.equal(res.model.conv.weight, model.conv.weight)  # only BN gamma/beta change
    assert res.info["pruned_per_layer"] == {"bn": int(expected.sum())}
    assert res.info["pruned_channels"]["bn"] == torch.nonzero(expected).flatten().tolist()
    counts = list(res.info["pruned_by_u"].values())
    assert counts == sorted(counts, reverse=True) and res.info["pruned_by_u"]["3.0"] == int(expected.sum())
    # a lower u prunes more, directly through clp_prune
    lower = copy.deepcopy(model)
    info = clp_prune(lower, [("bn", "conv")], u=0.0)
    assert len(info["pruned_channels"]["bn"]) == int((uclc > uclc.mean()).sum())


def test_bn_conv_pairs_follow_the_data_flow():
    preact = build_model("preact_resnet18", 10, width=4)
    pairs = dict(bn_conv_pairs(preact))
    assert pairs["layer1.0.bn1"] == "conv1"  # the stem conv feeds the first block directly
    for layer in range(1, 5):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            assert pairs[f"{prefix}.bn2"] == f"{prefix}.conv1"
            if prefix != "layer1.0":
                assert pairs[f"{prefix}.bn1"] is None  # fed by a residual sum
    legacy = dict(bn_conv_pairs(preact, rule="module-order"))  # BackdoorBench's pairing
    assert legacy["layer2.1.bn1"] == "layer2.0.shortcut.0" and legacy["layer3.0.bn1"] == "layer2.1.conv2"
    air = dict(bn_conv_pairs(build_model("airbench", 10, widths=(16, 32, 32))))
    assert air["groups.1.norm1"] == "groups.1.conv1"  # through the max-pool
    assert air["groups.1.norm2"] == "groups.1.conv2"


# ------------------------------------------------------------------------------------------ surgery
def test_layer_activations_and_capture(tiny_net, small, runtime):
    images = small.train.x[:10]
    out = layer_activations(tiny_net, "bn1", images, runtime, batch_size=4)
    inp = layer_activations(tiny_net, "conv2:input", images, runtime, batch_size=4)
    assert out.shape == (10, 8, 32, 32)
    torch.testing.assert_close(inp, torch.relu(out))  # conv2 reads relu(bn1(.))
    pooled = layer_activations(tiny_net, "bn1", images, runtime, reduce=lambda a: a.mean((2, 3)))
    torch.testing.assert_close(pooled, out.mean((2, 3)), rtol=1e-5, atol=1e-5)
    with capture_features(tiny_net, ["bn2"]) as store:
        tiny_net(torch.rand(2, 3, 32, 32))
    assert store["bn2"].shape == (2, 16, 16, 16) and store["bn2"].requires_grad
    assert not tiny_net.bn2._forward_hooks  # hooks removed
