"""NC, ANP, i-BAU and RNP: hand computations, behaviour on a tiny BadNets model, and the contract
each keeps (input untouched, same architecture, deterministic for a seed)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tsbd.attacks import build_attack
from tsbd.defenses import build_defense
from tsbd.defenses.anp import ANPConfig, select_threshold
from tsbd.defenses.ibau import IBAUConfig, fixed_point_hypergradient
from tsbd.defenses.masking import MaskedBatchNorm2d, masked_batchnorm, prune_bn_channels, thresholds
from tsbd.defenses.nc import (
    CostSchedule,
    NCConfig,
    RecoveredTrigger,
    anomaly_index,
    flag_outliers,
    reverse_engineer_trigger,
    unlearning_set,
)
from tsbd.metrics import accuracy, attack_success_rate
from tsbd.models import build_model
from tsbd.train import TrainConfig, fit, predict

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: seconds to minutes per test

MINE = ["nc", "anp", "ibau", "rnp"]
TINY = {  # seconds-scale settings for the contract tests
    "nc": {"nc_epoch": 1, "epochs": 1, "batch_size": 32},
    "anp": {"nb_iter": 2, "batch_size": 32},
    "ibau": {"n_rounds": 1, "K": 2, "batch_size": 32},
    "rnp": {"unlearn_epochs": 1, "recover_epochs": 1, "batch_size": 32},
}


@pytest.fixture(scope="module")
def backdoored(small, runtime):
    """A tiny airbench net with a strong BadNets backdoor (3x3 white patch, bottom-right, target 0),
    and the clean (never poisoned) training images as the defender's data.

    Trained without augmentation so that it learns the patch in a few epochs, and with airbench's
    whitening left at its data-free (orthonormal) init: whitened from 1,200 images, the net is so
    sensitive to single pixels that a one-pixel trigger sends 98% of images to ANY class, and
    Neural Cleanse has no outlier to find."""
    attack = build_attack("badnets", {"poison_ratio": 0.2})
    attack.prepare(small, seed=0)
    poisoned = attack.poison_train(small.train, seed=0)
    torch.manual_seed(0)
    model = build_model("airbench", 10, mean=small.mean, std=small.std, widths=(16, 32, 32))
    # lr 0.05: at 0.1 the backdoor is learnt on some CPUs and not on others (ASR 0.57 on an AVX2-only EPYC)
    fit(model, poisoned.data, TrainConfig(epochs=10, batch_size=64, lr=0.05, nesterov=True, schedule="onecycle",
                                          augment=False), runtime, progress=False)
    test = attack.poison_test(small.test)
    asr = attack_success_rate(predict(model, test.x, runtime), test.y_target)
    assert asr > 0.8, f"the tiny BadNets model did not learn the backdoor (ASR {asr:.2f})"
    keep = torch.ones(len(small.train), dtype=torch.bool)
    keep[poisoned.poison_index] = False
    clean = small.train.subset(torch.nonzero(keep).flatten())
    return model.eval(), clean, attack


def _subset(data, n, seed=0):
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return data.subset(torch.sort(idx).values)


# ------------------------------------------------------------------------------------------
# masking (ANP / RNP)
def test_masked_batchnorm_scales_gamma_and_restores_the_model(tiny_net):
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for bn in (tiny_net.bn1, tiny_net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    tiny_net.eval()
    x = torch.rand(4, 3, 8, 8)
    before = tiny_net(x)
    keys = list(tiny_net.state_dict())
    with masked_batchnorm(tiny_net, perturbable=True) as bn:
        assert set(bn.layers) == {"bn1", "bn2"}
        assert isinstance(tiny_net.bn1, MaskedBatchNorm2d)
        trained = {id(p) for p in bn.masks() + bn.noises()}
        assert not any(p.requires_grad for p in tiny_net.parameters() if id(p) not in trained)
        torch.testing.assert_close(tiny_net(x), before)  # masks start at 1
        with torch.no_grad():
            bn.layers["bn2"].neuron_mask[[3, 5]] = 0
        masked = tiny_net(x)
    reference = copy.deepcopy(tiny_net)
    with torch.no_grad():
        reference.bn2.weight[[3, 5]] = 0
    torch.testing.assert_close(masked, reference(x))
    # back to a plain model: modules, keys, trainability
    assert type(tiny_net.bn1) is nn.BatchNorm2d and type(tiny_net.bn2) is nn.BatchNorm2d
    assert list(tiny_net.state_dict()) == keys
    assert all(p.requires_grad for p in tiny_net.parameters())
    torch.testing.assert_close(tiny_net(x), before)


def test_perturbed_batchnorm_matches_anp_formula(tiny_net):
    tiny_net.eval()
    x = torch.rand(2, 3, 8, 8)
    with masked_batchnorm(tiny_net, perturbable=True) as bn:
        bn.reset_noise(0.4, torch.Generator().manual_seed(0))
        layer = bn.layers["bn1"]
        mask, d_w, d_b = (torch.rand(8) for _ in range(3))
        with torch.no_grad():
            layer.neuron_mask.copy_(mask)
        assert layer.neuron_noise.abs().max() <= 0.4 and layer.neuron_noise.abs().min() > 0
        bn.perturb(True)
        with torch.no_grad():
            layer.neuron_noise.copy_(d_w)
            layer.neuron_noise_bias.copy_(d_b)
            h = tiny_net.conv1(x)
            got = layer(h)
        plain = layer.bn
        want = F.batch_norm(h, plain.running_mean, plain.running_var, plain.weight * (mask + d_w),
                            plain.bias * (1 + d_b), False, 0.0, plain.eps)
        torch.testing.assert_close(got, want)


def test_prune_follows_the_threshold_exactly(tiny_net):
    before = copy.deepcopy(tiny_net)
    masks = {"bn1": torch.tensor([0.0, 0.3, 0.7, 0.7001, 1.0, 0.69, 0.9, 0.05]), "bn2": torch.ones(16)}
    masks["bn2"][[2, 11]] = 0.2
    pruned = prune_bn_channels(tiny_net, masks, 0.7)
    assert pruned == {"bn1": [0, 1, 2, 5, 7], "bn2": [2, 11]}
    for name in ("bn1", "bn2"):
        cut = masks[name] <= 0.7
        new, old = getattr(tiny_net, name), getattr(before, name)
        assert torch.all(new.weight[cut] == 0)
        assert torch.equal(new.weight[~cut], old.weight[~cut])
        assert torch.equal(new.bias, old.bias)  # BackdoorBench/ANP/RNP prune gamma only
    assert torch.equal(tiny_net.conv1.weight, before.conv1.weight)
    assert thresholds(0.9, 0.05) == [round(0.05 * k, 10) for k in range(19)]


def _assert_pruned_exactly(original, purified, masks, threshold):
    """Every BN channel with mask <= threshold has gamma 0; nothing else changed."""
    mods_in, mods_out = dict(original.named_modules()), dict(purified.named_modules())
    n_pruned = 0
    for name, values in masks.items():
        values = torch.tensor(values)
        assert values.min() >= 0 and values.max() <= 1
        cut = values <= threshold if threshold is not None else torch.zeros_like(values, dtype=torch.bool)
        w_in, w_out = mods_in[name].weight.detach(), mods_out[name].weight.detach()
        assert torch.all(w_out[cut] == 0)
        assert torch.equal(w_out[~cut], w_in[~cut])
        n_pruned += int(cut.sum())
    bn_weights = {f"{name}.weight" for name in masks}
    sd_in, sd_out = original.state_dict(), purified.state_dict()
    for key in sd_in:
        if key not in bn_weights:
            assert torch.equal(sd_in[key], sd_out[key]), key
    return n_pruned


def test_anp_masks_and_pruning_on_backdoored_model(backdoored, runtime):
    model, clean, _ = backdoored
    data = _subset(clean, 320)
    cfg = {"nb_iter": 6, "batch_size": 64, "mask_lr": 0.2}  # the paper's lr: masks move within few steps
    result = build_defense("anp", cfg).purify(model, data, runtime=runtime, seed=0)
    info = result.info
    assert info["mask_optimization"]["iterations"] >= 6
    assert info["heldout_size"] == 64  # 20% of 320, never used for the masks
    chosen = info["threshold"]
    eligible = [row["threshold"] for row in info["sweep"] if row["eligible"]]
    assert chosen == (max(eligible) if eligible else None)
    assert _assert_pruned_exactly(model, result.model, info["mask_values"], chosen) == info["pruned_total"]
    assert info["mask_stats"]["min"] < 1.0  # the masks did train


def test_anp_threshold_is_the_most_pruning_the_heldout_accuracy_allows(backdoored, runtime):
    model, clean, _ = backdoored
    heldout = _subset(clean, 200)
    acc0 = accuracy(predict(model, heldout.x, runtime), heldout.y)
    assert acc0 > 0.2
    # every channel of the last BN layer sits at 0.5: thresholds >= 0.5 switch the features off
    masks = {name: torch.ones(m.num_features) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    last = list(masks)[-1]
    masks[last][:] = 0.5
    chosen, sweep = select_threshold(model, masks, heldout, ANPConfig(), runtime)
    assert chosen == 0.45
    by_t = {row["threshold"]: row for row in sweep}
    assert by_t[0.45]["pruned"] == 0 and by_t[0.5]["pruned"] == len(masks[last])
    assert not by_t[0.5]["eligible"] and by_t[0.5]["relative_drop"] >= 0.1


def test_rnp_masks_in_unit_interval_and_pruning_exact(backdoored, runtime):
    model, clean, _ = backdoored
    data = _subset(clean, 256)
    # a threshold just under 1 prunes every channel whose mask moved, so pruning is non-trivial
    cfg = {"unlearn_epochs": 3, "recover_epochs": 2, "batch_size": 64, "pruning_threshold": 0.999}
    result = build_defense("rnp", cfg).purify(model, data, runtime=runtime, seed=0)
    info = result.info
    accs = info["unlearn"]["train_acc_per_epoch"]
    assert info["unlearn"]["epochs"] == len(accs) <= 3
    assert info["unlearn"]["reached_threshold"] == (accs[-1] <= 0.2)
    n = _assert_pruned_exactly(model, result.model, info["mask_values"], 0.999)
    assert n == info["pruned_total"] > 0
    assert n < info["mask_stats"]["channels"]


# ------------------------------------------------------------------------------------------
# NC
def test_mad_anomaly_index_hand_case():
    l1 = torch.tensor([10.0, 10, 11, 9, 10, 20, 10, 9, 11, 2])
    index, median, mad = anomaly_index(l1)
    assert median == 10.0  # mean of the two middle values (torch.median would also give 10 here)
    assert mad == pytest.approx(1.4826)  # median |l1 - 10| = 1
    assert float(index[9]) == pytest.approx(8 / 1.4826)
    assert float(index[5]) == pytest.approx(10 / 1.4826)
    # label 5 is as anomalous but LARGER than the median: not a backdoor target
    assert flag_outliers(l1) == [9]
    assert anomaly_index(torch.tensor([1.0, 2, 3, 4]))[1] == 2.5  # even count: not the lower middle
    assert flag_outliers(torch.tensor([5.0, 5, 5, 1])) == [3]  # MAD 0: any deviation is an outlier
    assert flag_outliers(torch.tensor([5.0, 5, 5, 5])) == []


def test_cost_schedule_up_down():
    cfg = NCConfig(patience=2, init_cost=1e-3, early_stop=False)
    sched = CostSchedule(cfg)
    m, p = torch.full((1, 4, 4), 0.5), torch.zeros(3, 4, 4)
    sched.end_epoch(0.5, 8.0, m, p)
    assert sched.best is not None and not sched.reached  # kept the latest as fallback
    sched.end_epoch(0.5, 8.0, m, p)
    assert sched.cost == pytest.approx(1e-3 / 2**1.5)
    sched.end_epoch(0.99, 7.0, m * 0.9, p)
    sched.end_epoch(0.99, 6.0, m * 0.8, p)
    assert sched.cost == pytest.approx(1e-3 / 2**1.5 * 2)
    assert sched.reached and sched.best_l1 == 6.0
    torch.testing.assert_close(sched.best[0], m * 0.8)


def test_unlearning_set_stamps_recovered_triggers_with_true_labels(small):
    data = small.train.subset(torch.arange(50))
    mask = torch.zeros(1, 32, 32)
    mask[:, :4, :4] = 1.0
    trig = [RecoveredTrigger(k, mask, torch.full((3, 32, 32), v), 16.0, True, 1) for k, v in ((0, 1.0), (3, 0.0))]
    out = unlearning_set(data, trig, 0.2, seed=0)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    keep, rest = perm[:40], perm[40:]
    assert len(out) == 40 + 2 * 10
    assert torch.equal(out.x[:40], data.x[keep])
    assert torch.equal(out.y, torch.cat([data.y[keep], data.y[rest], data.y[rest]]))  # true labels
    assert torch.all(out.x[40:50, :, :4, :4] == 255) and torch.all(out.x[50:, :, :4, :4] == 0)
    assert torch.equal(out.x[40:50, :, 4:, 4:], out.x[50:, :, 4:, 4:])  # outside the mask: the image


def test_nc_recovers_the_badnets_patch_location(backdoored, runtime):
    model, clean, attack = backdoored
    cfg = NCConfig(nc_epoch=20, batch_size=16)  # 160 Adam steps; BackdoorBench runs up to 800
    trig = reverse_engineer_trigger(model, _subset(clean, 128), attack.config.target, cfg, runtime, seed=0)
    mask = trig.mask[0]
    corner = float(mask[-6:, -6:].sum() / mask.sum())  # the 3x3 patch sits at rows/cols 29-31
    assert corner > 0.2, f"only {corner:.2f} of the mask mass in the bottom-right 6x6 (its area share: 0.035)"
    assert trig.reached


def test_nc_optimizes_the_trigger_through_frozen_weights_and_restores_their_flags(backdoored, runtime):
    model, clean, attack = backdoored
    flags = [p.requires_grad for p in model.parameters()]
    seen = []
    handle = model.register_forward_hook(lambda m, i, o: seen.append(any(p.requires_grad for p in m.parameters())))
    try:
        reverse_engineer_trigger(model, _subset(clean, 32), attack.config.target, NCConfig(nc_epoch=1, batch_size=16),
                                 runtime, seed=0)
    finally:
        handle.remove()
    assert seen and not any(seen)  # no weight gradient is ever asked for
    assert [p.requires_grad for p in model.parameters()] == flags


def _planted_triggers(l1_by_label):
    """A stand-in for the reverse engineering: the true BadNets patch for label 0, given L1s."""

    def reverse(model, data, label, cfg, runtime, *, seed=0, progress=False):
        mask = torch.zeros(1, 32, 32)
        mask[:, -3:, -3:] = 1.0
        return RecoveredTrigger(label, mask, torch.ones(3, 32, 32), l1_by_label[label], True, 1)

    return reverse


def test_nc_unlearns_flagged_trigger_and_returns_the_fine_tuned_model(backdoored, small, runtime, monkeypatch):
    import tsbd.defenses.nc as nc

    model, clean, attack = backdoored
    monkeypatch.setattr(nc, "reverse_engineer_trigger", _planted_triggers([9.0] + [100.0 + k for k in range(9)]))
    data = _subset(clean, 320)
    result = build_defense("nc", {"epochs": 5, "lr": 0.05, "batch_size": 32}).purify(model, data, runtime=runtime,
                                                                                    seed=0)
    info = result.info
    assert info["flagged"] == [0]
    assert info["finetune"]["epochs"] == 5 and info["finetune"]["images"] == 256 + 64
    test = attack.poison_test(small.test)
    asr_before = attack_success_rate(predict(model, test.x, runtime), test.y_target)
    asr_after = attack_success_rate(predict(result.model, test.x, runtime), test.y_target)
    # the returned model is the fine-tuned one (BackdoorBench returned the original)
    assert asr_after < asr_before - 0.3


def test_nc_returns_the_model_unchanged_when_nothing_is_flagged(tiny_net, small, runtime, monkeypatch):
    import tsbd.defenses.nc as nc

    monkeypatch.setattr(nc, "reverse_engineer_trigger", _planted_triggers([50.0 + (k % 2) for k in range(10)]))
    result = build_defense("nc").purify(tiny_net, small.train.subset(torch.arange(32)), runtime=runtime, seed=0)
    assert result.info["flagged"] == [] and result.info["finetune"] == {"epochs": 0}
    for key, value in tiny_net.state_dict().items():
        assert torch.equal(value, result.model.state_dict()[key])


# ------------------------------------------------------------------------------------------
# i-BAU
def test_fixed_point_hypergradient_matches_explicit_series(runtime):
    from torch.func import functional_call, grad, jacrev

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    params = list(model.parameters())
    x, y = torch.rand(6, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    x0, y0 = torch.rand(4, 3, 2, 2), torch.tensor([2, 0, 1, 1])
    delta = 0.1 * torch.randn(1, 3, 2, 2)
    carriers = torch.tensor([True, False, True, False, False, False])
    cfg = IBAUConfig(K=3)
    got, _ = fixed_point_hypergradient(model, params, delta, (x, y), (x0, y0), carriers, cfg, 1.0, runtime)

    p0 = {n: p.detach() for n, p in model.named_parameters()}

    def inner(w, p):
        return -F.cross_entropy(functional_call(model, p, (x0 + w,)), y0) + 0.001 * (w**2).sum()

    def phi(w, p):
        return w - 0.1 * grad(inner)(w, p)

    def outer(w, p):
        return F.cross_entropy(functional_call(model, p, (x + carriers.view(-1, 1, 1, 1) * w,)), y)

    g_w, g_p = grad(outer, argnums=(0, 1))(delta, p0)
    j_w, j_p = jacrev(phi, argnums=(0, 1))(delta, p0)
    jw = j_w.reshape(12, 12)
    v = torch.zeros(12)
    for _ in range(3):  # v_K = sum_{k<K} (J^T)^k dL/dw
        v = jw.T @ v + g_w.reshape(12)
    for (name, p), g in zip(model.named_parameters(), got):
        want = g_p[name] + (j_p[name].reshape(12, -1).T @ v).reshape(p.shape)
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6)


def test_ibau_changes_weights_but_not_bn_statistics(backdoored, runtime):
    model, clean, _ = backdoored
    result = build_defense("ibau", {"n_rounds": 1, "K": 2, "batch_size": 64}).purify(
        model, _subset(clean, 128), runtime=runtime, seed=0)
    sd_in, sd_out = model.state_dict(), result.model.state_dict()
    assert not torch.equal(sd_in["head.weight"], sd_out["head.weight"])
    for key in sd_in:
        if "running_" in key or "num_batches" in key:  # eval mode throughout, as BackdoorBench
            assert torch.equal(sd_in[key], sd_out[key]), key
    assert len(result.info["rounds"]) == 1 and result.info["rounds"][0]["perturbation_norm"] > 0


# ------------------------------------------------------------------------------------------
# the contract every defense keeps
@pytest.mark.parametrize("name", MINE)
def test_contract_input_untouched_same_architecture_deterministic(name, tiny_net, small, runtime):
    data = small.train.subset(torch.arange(64))
    reference = copy.deepcopy(tiny_net.state_dict())
    types = [type(m) for m in tiny_net.modules()]
    runs = [build_defense(name, TINY[name]).purify(tiny_net, data, runtime=runtime, seed=3) for _ in range(2)]
    for key, value in tiny_net.state_dict().items():
        assert torch.equal(value, reference[key]), f"{name} modified the input model at {key}"
    out = runs[0].model
    assert [type(m) for m in out.modules()] == types  # no wrapper modules left
    sd = out.state_dict()
    assert list(sd) == list(reference)
    assert all(sd[k].shape == reference[k].shape for k in sd)
    assert all(p.requires_grad for p in out.parameters())
    for key, value in runs[1].model.state_dict().items():
        assert torch.equal(value, sd[key]), f"{name} is not deterministic for a seed at {key}"
    assert runs[0].info.keys() == runs[1].info.keys()
