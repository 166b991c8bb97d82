"""The attacks that generate resources (LF, SSBA, TrojanNN) and SIG: formulas, caching,
fingerprints, and the properties each generated trigger must have -- on tiny models and the
1,200 real training images of ``small``."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from tsbd.attacks import build_attack
from tsbd.attacks.resources import load_or_generate, resource_fingerprint
from tsbd.errors import TsbdError

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: seconds to minutes per test

BB_TRIGGERS = SHARED_DATA / "backdoorbench-triggers"
TINY_ARCH = {"arch": "airbench", "arch_kwargs": {"widths": [8, 16, 32]}}
VICTIM_EPOCHS = 8
TINY = {
    "lf": {"images": 300, "epochs": 2, "batch_size": 100, "clean_epochs": 2},
    "ssba": {"train_images": 512, "epochs": 6, "width": 8, "secret_bits": 16, "batch_size": 16, "l2_weight": 20},
    "trojan": {"mask_update_iters": 40, "clean_epochs": 2},
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("attack-cache")


def prepared(name, small, runtime, cache, seed=0, **overrides):
    attack = build_attack(name, {**TINY.get(name, {}), **overrides})
    attack.prepare(small, runtime=runtime, seed=seed, cache_dir=cache, **TINY_ARCH)
    return attack


# -- the resource cache -----------------------------------------------------------------------
def test_resource_cache_loads_instead_of_regenerating(tmp_path):
    calls = []

    def generate():
        calls.append(1)
        return {"t": torch.arange(6.0).view(2, 3)}, {"note": "made"}

    a = load_or_generate("demo", {"k": 1}, generate, tmp_path)
    b = load_or_generate("demo", {"k": 1}, generate, tmp_path)
    assert len(calls) == 1 and not a.from_cache and b.from_cache
    assert a.fingerprint == b.fingerprint == resource_fingerprint("demo", {"k": 1})
    assert torch.equal(a.tensors["t"], b.tensors["t"]) and a.describe() == b.describe()
    assert b.describe()["info"] == {"note": "made"} and b.describe()["generation_seconds"] >= 0
    assert load_or_generate("demo", {"k": 2}, generate, tmp_path).fingerprint != a.fingerprint
    assert len(calls) == 2
    # a damaged entry is regenerated, not trusted
    (a.path / "resource.safetensors").write_bytes(b"garbage")
    c = load_or_generate("demo", {"k": 1}, generate, tmp_path)
    assert len(calls) == 3 and not c.from_cache and torch.equal(c.tensors["t"], a.tensors["t"])
    assert not [p for p in a.path.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


# -- SIG ----------------------------------------------------------------------------------------
def test_sig_formula_on_a_hand_case(small):
    attack = build_attack("sig")
    x = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    x[1] = 250
    out = attack.apply(x)
    # pattern(j) = 40 sin(2 pi j 6 / 32): j=0 -> 0, j=1 -> 36.96, j=4 -> -40; cast truncates
    assert out[0, :, :, 0].unique().tolist() == [100]
    assert out[0, :, :, 1].unique().tolist() == [136]
    assert out[0, :, :, 4].unique().tolist() == [60]
    assert out[1, :, :, 1].unique().tolist() == [255]  # clipped
    assert torch.equal(out[:, :, :1], out[:, :, 5:6])  # the same on every row
    idx = attack.poison_indices(small.train.y, seed=0)
    assert attack.clean_label and torch.all(small.train.y[idx] == 0)
    assert len(idx) == int((small.train.y == 0).sum())  # round(0.1 * 1200) = 120 capped at the class size


# -- LF -----------------------------------------------------------------------------------------
def test_lf_is_low_frequency_bounded_cached_and_seeded(small, runtime, cache, monkeypatch):
    from tsbd.attacks.lf import LowFrequency, low_frequency_energy

    a = prepared("lf", small, runtime, cache)
    t = a.perturbation
    assert t.shape == (3, 32, 32) and t.abs().max() <= 0.2 * 255 + 1e-6 and t.abs().max() > 5
    assert low_frequency_energy(t, a.config.cutoff) > 0.95
    assert low_frequency_energy(torch.randn(3, 32, 32), a.config.cutoff) < 0.2  # what white noise gives
    x = small.test.x[:8]
    assert torch.equal(a.apply(x), (x.float() + t).clamp(0, 255).to(torch.uint8))
    info = a.describe()["resource"]
    assert info["fingerprint"] and info["generation_seconds"] > 0 and info["settings"]["seed"] == 0
    assert info["info"]["clean_model"]["arch"] == "airbench"
    # second prepare with the same inputs: loaded, nothing regenerated
    monkeypatch.setattr(LowFrequency, "_generate", lambda *a, **k: pytest.fail("regenerated a cached resource"))
    b = prepared("lf", small, runtime, cache)
    assert b.resource.from_cache and b.describe() == a.describe() and torch.equal(b.perturbation, t)
    monkeypatch.undo()
    c = prepared("lf", small, runtime, cache, seed=1)
    assert c.resource.fingerprint != a.resource.fingerprint and not torch.equal(c.perturbation, t)


def test_lf_pushes_the_clean_model_toward_the_target(small, runtime, cache):
    a = prepared("lf", small, runtime, cache)
    info = a.describe()["resource"]["info"]
    from tsbd.attacks.resources import CleanModelRecipe
    from tsbd.pipeline import clean_reference_model
    from tsbd.train.engine import predict

    recipe = CleanModelRecipe.from_context("", 2, {"seed": 0, **TINY_ARCH})
    model, _ = clean_reference_model(small, recipe.arch, runtime, seed=0, cfg=recipe.train_config(),
                                     arch_kwargs=recipe.arch_kwargs, cache_dir=cache)
    x = small.train.x[small.train.y != 0]
    before = float((predict(model, x, runtime) == 0).float().mean())
    assert info["target_rate_clean_model"] > before


def test_the_clean_reference_model_resumes_an_interrupted_training(small, runtime, tmp_path, monkeypatch):
    """The clean model LF and TrojanNN optimize against checkpoints every epoch beside its cache
    folder: killed after epoch 1, a rerun trains epoch 2 only, saves the same weights as an
    uninterrupted build, and removes the checkpoint."""
    import tsbd.train.engine as engine
    from tsbd.pipeline import clean_reference_model
    from tsbd.train import TrainConfig

    cfg = TrainConfig(epochs=2, batch_size=200, lr=0.2, augment=False)

    def build(cache):
        model, meta = clean_reference_model(small, "airbench", runtime, seed=0, cfg=cfg,
                                            arch_kwargs=TINY_ARCH["arch_kwargs"], cache_dir=cache)
        return model.state_dict(), meta

    whole, _ = build(tmp_path / "whole")
    real, epochs = engine.save_checkpoint, []

    def save_then_die(path, state):
        real(path, state)
        epochs.append(state["epoch"])
        if state["epoch"] == 1 and len(epochs) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "cut")
    assert len(list((tmp_path / "cut" / "clean_models").glob(".*.resume.pt"))) == 1
    resumed, _ = build(tmp_path / "cut")
    assert epochs == [1, 2]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not list((tmp_path / "cut" / "clean_models").glob(".*.resume.pt"))


# -- SSBA ---------------------------------------------------------------------------------------
def test_ssba_encoder_hides_bits_invisibly(small, runtime, cache):
    from tsbd.attacks._stegastamp import psnr

    a = prepared("ssba", small, runtime, cache)
    info = a.describe()["resource"]["info"]
    assert info["psnr_db"] > 25
    # the decoder reads the secret from stamped images, not from clean ones (chance: 0.5)
    assert info["bit_accuracy"] > 0.75 and info["bit_accuracy"] > info["bit_accuracy_clean_images"] + 0.15
    x = small.test.x[:16]
    out = a.apply(x)
    assert psnr(x, out) > 25
    assert torch.equal(out, a.apply(x))  # deterministic
    residual = out.int() - x.int()
    assert not torch.equal(residual[0], residual[1])  # sample-specific
    b = prepared("ssba", small, runtime, cache)
    assert b.resource.from_cache and torch.equal(b.apply(x), out)
    c = prepared("ssba", small, runtime, cache, seed=1, epochs=1)  # one epoch: only the seed's effect is checked
    assert c.resource.fingerprint != a.resource.fingerprint and not torch.equal(c.secret, a.secret)
    assert not torch.equal(c.apply(x), out)


# -- TrojanNN -----------------------------------------------------------------------------------
def test_trojan_trigger_excites_the_chosen_neurons_inside_the_mask(small, runtime, cache):
    from tsbd.attacks.resources import last_linear
    from tsbd.attacks.trojan import default_trojan_mask

    a = prepared("trojan", small, runtime, cache)
    res = a.resource
    info = res.describe()["info"]
    assert sum(info["activation_final"]) > sum(info["activation_initial"]) + 0.1
    mask = default_trojan_mask(32, 32)
    assert torch.equal(res.tensors["mask"].bool(), mask) and 90 <= int(mask.sum()) <= 110
    rows, cols = torch.nonzero(mask, as_tuple=True)
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (16, 29, 18, 28)
    trigger = a.trigger
    assert torch.all(trigger[:, ~mask] == 0) and trigger[:, mask].float().min() >= 255 * 0.7 - 1
    # the neurons: top-2 inputs of the trained clean model's last linear layer by sum |W|
    from tsbd.attacks.resources import CleanModelRecipe

    recipe = CleanModelRecipe.from_context("", a.config.clean_epochs, {"seed": 0, **TINY_ARCH})
    model, _ = recipe.build(small, runtime, cache, False)
    _, head = last_linear(model)
    expected = torch.topk(head.weight.abs().sum(0), 2).indices.sort().values
    assert info["neurons"] == expected.tolist()
    # x' = clip(x + t) without uint8 overflow
    x = torch.full((1, 3, 32, 32), 250, dtype=torch.uint8)
    out = a.apply(x)
    assert torch.all(out[:, :, mask] == 255) and torch.equal(out[:, :, ~mask], x[:, :, ~mask])
    b = prepared("trojan", small, runtime, cache)
    assert b.resource.from_cache and torch.equal(b.trigger, trigger)
    c = prepared("trojan", small, runtime, cache, seed=1)
    assert c.resource.fingerprint != res.fingerprint


# -- BackdoorBench's files ------------------------------------------------------------------------
needs_bb = pytest.mark.skipif(not BB_TRIGGERS.is_dir(), reason="backdoorbench-triggers not available")


@needs_bb
def test_lf_accepts_backdoorbench_files(small, caplog):
    x = small.test.x[:8]
    path = BB_TRIGGERS / "cifar10_preactresnet18_0_255.npy"
    a = build_attack("lf", {"trigger_file": str(path)})
    a.prepare(small)
    t = torch.from_numpy(np.load(path)).permute(2, 0, 1).int()
    assert torch.equal(a.apply(x), (x.int() + t).clamp(0, 255).to(torch.uint8))
    assert a.describe()["resource"]["sha256"]
    # the float VGG19-BN file: added on the 0-255 scale and truncated, as BackdoorBench does -> no change
    vgg = build_attack("lf", {"trigger_file": str(BB_TRIGGERS / "cifar10_vgg19_bn_0_255.npy")})
    with caplog.at_level(logging.WARNING):
        vgg.prepare(small)
    assert "scale" in caplog.text
    assert torch.equal(vgg.apply(x), x)
    scaled = build_attack("lf", {"trigger_file": str(BB_TRIGGERS / "cifar10_vgg19_bn_0_255.npy"), "trigger_scale": 255})
    scaled.prepare(small)
    assert scaled.perturbation.max() > 40 and not torch.equal(scaled.apply(x), x)
    with pytest.raises(TsbdError, match="not found"):
        build_attack("lf", {"trigger_file": str(BB_TRIGGERS / "missing.npy")}).prepare(small)


@needs_bb
def test_trojan_accepts_backdoorbench_apple_mask(small, runtime, cache):
    a = prepared("trojan", small, runtime, cache, mask_image=str(BB_TRIGGERS / "apple4.png"), mask_update_iters=3)
    mask = a.resource.tensors["mask"].bool()
    assert int(mask.sum()) == 117  # non-zero entries of apple4.png resized to 32 x 32
    assert torch.all(a.trigger[:, ~mask] == 0)
    initial = a.resource.tensors["initial"]
    assert (a.trigger.float() / 255 - initial).abs().max() <= 0.3 + 1 / 255


# -- a backdoor is learned ------------------------------------------------------------------------
def test_a_tiny_model_learns_the_trojan_backdoor(small, runtime, cache):
    from tsbd.config import override
    from tsbd.metrics import evaluate
    from tsbd.pipeline import TRAIN_PRESETS, AttackSetup, clean_reference_model, train_attacked_model

    attack = prepared("trojan", small, runtime, cache)
    setup = AttackSetup(small, attack, 0, attack.poison_train(small.train, 0), attack.poison_test(small.test))
    cfg = override(TRAIN_PRESETS["cpu"], {"epochs": VICTIM_EPOCHS})
    victim = {"widths": [16, 32, 64]}
    _, meta = train_attacked_model(setup, "airbench", cfg, runtime, arch_kwargs=victim)
    clean, _ = clean_reference_model(small, "airbench", runtime, seed=0, cfg=cfg, arch_kwargs=victim, cache_dir=cache)
    baseline = evaluate(clean, small.test, setup.poisoned_test, runtime)
    assert meta["metrics"]["asr"] > baseline["asr"] + 0.3, (meta["metrics"], baseline)
