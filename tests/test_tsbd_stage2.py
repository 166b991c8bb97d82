"""TSBD's stage 2 as the authors run it: BN statistics, epochs, batch order; the n picked on test data."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.conftest import TinyNet
from tsbd.defenses.tsbd import TSBD, TSBDConfig, activeness_aware_step, select_n_on_test
from tsbd.models.surgery import batchnorm_buffers, bn_recomputed_copy, recompute_bn_stats, subweight_change
from tsbd.train import TrainConfig, fit


def _batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _buffers(model):
    return [b.clone() for b in batchnorm_buffers(model)]


def _authors_step(model, x, y, optimizer, r, alpha):
    """linweiii/TSBD tsbd.py train_finetuning_reg, one batch, written as they wrote it."""
    temp = copy.deepcopy(model)
    loss1 = nn.functional.cross_entropy(temp(x), y)
    temp.zero_grad()
    loss1.backward()
    g1 = [p.grad.detach().clone() for p in temp.parameters()]
    with torch.no_grad():
        for p, g in zip(temp.parameters(), g1):
            p += r * g / g.norm()
    loss2 = nn.functional.cross_entropy(temp(x), y)
    temp.zero_grad()
    loss2.backward()
    g2 = [p.grad.detach().clone() for p in temp.parameters()]
    optimizer.zero_grad()
    for p, a, b in zip(model.parameters(), g1, g2):
        p.grad = (1 - alpha) * a + alpha * b
    optimizer.step()
    model(x)  # train mode: updates the running statistics at the new weights


def test_default_step_equals_the_authors_copy_based_step(runtime):
    torch.manual_seed(0)
    ours = TinyNet().train()
    theirs = copy.deepcopy(ours)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    step = activeness_aware_step(0.05, 0.7)
    for i in range(3):
        x, y = _batch(i)
        step(ours, x, y, opt_a, runtime)
        _authors_step(theirs, x, y, opt_b, 0.05, 0.7)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_the_two_gradient_passes_leave_bn_statistics_untouched(runtime):
    torch.manual_seed(0)
    model = TinyNet().train()
    before = _buffers(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _batch()
    activeness_aware_step(0.05, 0.7, post_step_bn=False)(model, x, y, opt, runtime)
    assert all(torch.equal(a, b) for a, b in zip(before, _buffers(model)))
    # yet the weights moved
    assert not torch.equal(model.conv1.weight, TinyNet().conv1.weight)


def test_post_step_forward_updates_bn_statistics_once_at_the_new_weights(runtime):
    torch.manual_seed(0)
    model = TinyNet().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _batch()
    activeness_aware_step(0.05, 0.7)(model, x, y, opt, runtime)
    assert int(model.bn1.num_batches_tracked) == 1
    # the same statistics as one train-mode forward of the stepped weights from the old statistics
    ref = copy.deepcopy(model)
    for m in (ref.bn1, ref.bn2):
        m.reset_running_stats()
    with torch.no_grad():
        ref(x)
    assert torch.allclose(model.bn2.running_mean, ref.bn2.running_mean, atol=1e-6)
    assert torch.allclose(model.bn2.running_var, ref.bn2.running_var, atol=1e-6)


def test_live_variant_updates_bn_statistics_in_both_passes(runtime):
    torch.manual_seed(0)
    model = TinyNet().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = _batch()
    activeness_aware_step(0.05, 0.7, passes_update_bn=True, post_step_bn=False)(model, x, y, opt, runtime)
    assert int(model.bn1.num_batches_tracked) == 2


def test_defaults_are_the_authors_stage_2():
    cfg = TSBDConfig()
    assert cfg.finetune_epochs == 21 and not cfg.finetune_shuffle and not cfg.unlearn_shuffle
    assert not cfg.passes_update_bn and cfg.post_step_bn
    assert cfg.finetune_lr == 0.01 and cfg.r == 0.05 and cfg.alpha == 0.7


def test_unshuffled_fit_visits_one_seeded_order_every_epoch(small, runtime):
    seen = []

    def record(model, x, y, optimizer, runtime):
        seen.append((x[:, 0, 0, 0].clone(), y.clone()))
        return torch.zeros(())

    # stored class by class, as tsbd's CIFAR-10 and GTSRB files are
    per_class = [torch.nonzero(small.train.y == c).flatten()[:10] for c in range(10)]
    data = small.train.subset(torch.cat(per_class))
    assert len(data) == 100 and torch.equal(data.y, torch.sort(data.y).values)
    cfg = TrainConfig(epochs=2, batch_size=32, augment=False, drop_last=False)
    fit(TinyNet(), data, cfg, runtime, step=record, progress=False, shuffle=False, seed=5)
    first = torch.cat([p for p, _ in seen[:4]])
    assert torch.equal(first, torch.cat([p for p, _ in seen[4:]]))  # the same order in both epochs
    order = torch.randperm(100, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, data.x[order, 0, 0, 0].float() / 255)  # drawn from the seed
    assert len(torch.unique(seen[0][1])) > 2  # batches mix classes, unlike dataset order
    seen.clear()
    fit(TinyNet(), data, cfg, runtime, step=record, progress=False, seed=5)
    assert not torch.equal(torch.cat([p for p, _ in seen[:4]]), torch.cat([p for p, _ in seen[4:]]))


def test_bn_recomputed_copy_leaves_the_model_alone_and_needs_batchnorm(small, runtime):
    torch.manual_seed(0)
    model = TinyNet()
    before = [b.clone() for b in batchnorm_buffers(model)]
    images = small.train.x[:200]
    fresh = bn_recomputed_copy(model, images, runtime, batch_size=50)
    assert all(torch.equal(a, b) for a, b in zip(before, batchnorm_buffers(model)))  # untouched
    expected = copy.deepcopy(model)
    recompute_bn_stats(expected, images, runtime, batch_size=50)
    assert all(torch.equal(a, b) for a, b in zip(batchnorm_buffers(fresh), batchnorm_buffers(expected)))
    assert not torch.equal(fresh.bn1.running_mean, model.bn1.running_mean)
    assert bn_recomputed_copy(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), images, runtime) is None


def test_recompute_bn_stats_matches_the_clean_set_statistics(small, runtime):
    torch.manual_seed(0)
    model = TinyNet()
    conv1_before = model.conv1.weight.clone()
    images = small.train.x[:200]
    recompute_bn_stats(model, images, runtime, batch_size=50)  # equal batches: the mean of batch means is the mean
    x = images.float() / 255
    with torch.no_grad():
        h = model.conv1(x)
    assert torch.allclose(model.bn1.running_mean, h.mean((0, 2, 3)), atol=1e-4)
    assert torch.equal(model.conv1.weight, conv1_before)
    assert model.bn1.momentum == 0.1  # restored


def test_select_n_on_test_picks_the_first_n_under_the_threshold(trained, small, runtime):
    clean = small.train.subset(range(256))
    unlearned = copy.deepcopy(trained)
    with torch.no_grad():
        for p in unlearned.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    change = subweight_change(trained, unlearned)
    asr = {"n=0.05": 0.5, "n=0.2": 0.0, "n=0.5": 0.0}
    cfg = TSBDConfig(test_selected_n=(0.5, 0.05, 0.2), finetune_epochs=1)
    picked = select_n_on_test(trained, change, clean, cfg, runtime, lambda name, m: {"acc": 0.5, "asr": asr[name]})
    assert picked["n"] == 0.2 and picked["reached_threshold"]
    assert [s["n"] for s in picked["sweep"]] == [0.05, 0.2, 0.5]
    none_under = select_n_on_test(trained, change, clean, TSBDConfig(test_selected_n=(0.05, 0.2), finetune_epochs=1),
                                  runtime, lambda name, m: {"acc": 0.5, "asr": {"n=0.05": 0.3, "n=0.2": 0.4}[name]})
    assert none_under["n"] == 0.05 and not none_under["reached_threshold"]


def test_tsbd_reports_reinit_both_ways_and_the_test_selected_n(trained, small, runtime):
    clean = small.train.subset(range(256))
    calls, seen = [], {}

    def monitor(stage, m):
        calls.append(stage)
        seen[stage] = copy.deepcopy(m.state_dict())
        return {"acc": 0.5, "asr": 0.0}

    original = copy.deepcopy(trained.state_dict())
    res = TSBD(unlearn_lr=0.05, unlearn_max_epochs=3, finetune_epochs=1, test_selected_n=(0.1, 0.3)).purify(
        trained, clean, runtime=runtime, monitor=monitor)
    assert {"after_reinit", "after_reinit_bn_recomputed", "backdoored_bn_recomputed", "after_finetune"} <= set(
        res.stages)
    # the control: the backdoored weights, with statistics recomputed like the reinit's
    control, reinit_bn = seen["backdoored_bn_recomputed"], seen["after_reinit_bn_recomputed"]
    weights = [k for k in original if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(control[k], original[k]) for k in weights)
    assert not all(torch.equal(reinit_bn[k], original[k]) for k in weights)
    expected = bn_recomputed_copy(trained, clean.x, runtime, batch_size=TSBDConfig().batch_size, seed=0).state_dict()
    stats = [k for k in original if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.allclose(control[k], expected[k]) for k in stats)
    assert not all(torch.equal(control[k], original[k]) for k in stats)
    assert res.stages["n_selected_on_test"]["n"] == 0.1
    assert calls.count("n=0.1") == 1 and calls.count("n=0.3") == 1
    # without a monitor (no test data) nothing is selected
    plain = TSBD(unlearn_lr=0.05, unlearn_max_epochs=3, finetune_epochs=1, test_selected_n=(0.1,)).purify(
        trained, clean, runtime=runtime)
    assert "n_selected_on_test" not in plain.stages


@pytest.mark.parametrize("name,flipped", [("cifar10", True), ("demo", True), ("gtsrb", False),
                                          ("tiny-imagenet", False), ("imagefolder", False)])
def test_only_cifar10_is_flipped_as_in_backdoorbench(small, name, flipped):
    from tsbd.attacks import build_attack
    from tsbd.data.base import Dataset

    ds = Dataset(name, small.train.subset(range(50)), small.test.subset(range(20)), small.classes, small.mean,
                 small.std, fingerprint="x")
    assert ds.train.hflip is flipped and ds.test.hflip is flipped and ds.describe()["hflip"] is flipped
    assert ds.limited(20, 10).train.hflip is flipped
    assert ds.train.subset([0, 1]).hflip is flipped
    assert build_attack("badnets").poison_train(ds.train, 0).data.hflip is flipped


def test_unflipped_sets_are_only_cropped(small, runtime):
    from tsbd.train.augment import random_crop
    from tsbd.train.engine import iterate_batches

    data = small.train.subset(range(64))
    data.hflip = False
    (xb, _), = iterate_batches(data, 64, runtime, generator=torch.Generator().manual_seed(3), shuffle=False,
                               augment=True)
    expected = random_crop(data.x, 4, torch.Generator().manual_seed(3)).float() / 255
    assert torch.allclose(xb, expected)
    data.hflip = True
    (xf, _), = iterate_batches(data, 64, runtime, generator=torch.Generator().manual_seed(3), shuffle=False,
                               augment=True)
    assert not torch.allclose(xf, expected)


@pytest.mark.parametrize("args, message", [
    (["--attacked", "no-such-folder"], "model 'no-such-folder' not found"),
    ([], "--trigger-dir is needed to train attacked models"),
    (["--attacked", "x", "--variants", "authors,nosuch"], "unknown variant(s) nosuch"),
])
def test_stage2_switches_refuses_bad_input_in_one_line(tmp_path, args, message):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "stage2_switches.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_the_sweep_takes_the_defenses_own_n_as_measured_and_it_is_the_same_model(trained, small, runtime):
    """The fixed n's reinit + fine-tune is the sweep's point at that n: reused, not run twice, and
    identical to what the sweep computes for it when n is not the defense's own."""
    clean = small.train.subset(range(256))

    def run(n):
        calls, seen = [], {}

        def monitor(stage, m):
            calls.append(stage)
            seen[stage] = copy.deepcopy(m.state_dict())
            return {"acc": 0.5, "asr": float(len(calls))}

        res = TSBD(unlearn_lr=0.05, unlearn_max_epochs=3, finetune_epochs=1, neuron_ratio=n,
                   test_selected_n=(0.15, 0.3)).purify(copy.deepcopy(trained), clean, runtime=runtime,
                                                       monitor=monitor)
        return calls, seen, res

    calls_a, seen_a, res_a = run(0.15)
    calls_b, seen_b, _ = run(0.3)
    assert "n=0.15" not in calls_a and calls_a.count("n=0.3") == 1
    assert "n=0.3" not in calls_b and calls_b.count("n=0.15") == 1
    sweep = {s["n"]: s for s in res_a.stages["n_selected_on_test"]["sweep"]}
    assert sweep[0.15]["asr"] == res_a.stages["after_finetune"]["asr"]
    for own, other in ((seen_a["after_finetune"], seen_b["n=0.15"]), (seen_b["after_finetune"], seen_a["n=0.3"])):
        assert all(torch.equal(own[k], other[k]) for k in own)


def test_an_interrupted_sweep_resumes_after_its_last_finished_point(trained, small, runtime, tmp_path):
    """Each finished point of the test-data sweep is kept beside the defense's checkpoints: a rerun
    after an interruption evaluates only the points not yet done and ends with the same sweep."""
    clean = small.train.subset(range(256))
    opts = dict(unlearn_lr=0.05, unlearn_max_epochs=3, finetune_epochs=1, test_selected_n=(0.05, 0.15, 0.3, 0.5))

    def run(checkpoint_dir, stop_at=None):
        calls = []

        def monitor(stage, m):
            if stage == stop_at:
                raise KeyboardInterrupt
            calls.append(stage)
            return {"acc": 0.5, "asr": float(sum(p.detach().abs().sum() for p in m.parameters()))}

        res = TSBD(**opts).purify(copy.deepcopy(trained), clean, runtime=runtime, monitor=monitor,
                                  checkpoint_dir=checkpoint_dir)
        return calls, res

    calls, whole = run(tmp_path / "whole")
    assert [c for c in calls if c.startswith("n=")] == ["n=0.05", "n=0.3", "n=0.5"]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop_at="n=0.5")  # 0.05 and 0.3 are finished when it stops
    calls, resumed = run(tmp_path / "cut")
    assert [c for c in calls if c.startswith("n=")] == ["n=0.5"]
    assert resumed.info["resumed"]["test_selected_n"] == 2 and resumed.timings["earlier_runs"] > 0
    assert resumed.stages["n_selected_on_test"]["sweep"] == whole.stages["n_selected_on_test"]["sweep"]
