"""The training-controllable attacks: WaNet's warp field and batch hook, Input-aware's mask and
generator training, and that a tiny model trained through the pipeline learns each backdoor.

Everything runs on the 1,200-image ``small`` set with tiny widths and a few epochs. To get a
clear signal that cheaply, the learning test poisons 20% (not 10%) and uses a stronger WaNet
warp (s = 4, a shift of up to ~4 px) than the paper's s = 0.5, which needs far more data and
epochs to be learned; Input-aware's G and M are a quarter of BackdoorBench's width, trained for
6 + 4 epochs instead of 25 + 75.
"""

import pytest
import torch

from tsbd.attacks import build_attack
from tsbd.attacks.inputaware import mask_density
from tsbd.attacks.wanet import identity_grid
from tsbd.metrics import evaluate
from tsbd.models import build_model, init_from_data
from tsbd.pipeline import AttackSetup, train_attacked_model, train_config
from tsbd.train import fit

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: seconds to minutes per test

TINY_NET = {"widths": [16, 32, 32]}
EPOCHS = 8
# G/M at 1/4 width, batch 32 so a few epochs give enough steps, mask lr drop after epoch 4;
# 20% poisoned so that 8 epochs on 1,200 images show the backdoor clearly
TINY_IAD = {"width": 0.25, "batch_size": 32, "mask_epochs": 6, "mask_milestones": [4], "joint_epochs": 4,
            "poison_ratio": 0.2}


def _train_cfg():
    return train_config("cpu", {"epochs": EPOCHS, "batch_size": 64})


def _shuffled_batch(small, size=128):
    """A batch as the engine hands it to a hook: shuffled, float in [0, 1]."""
    idx = torch.randperm(len(small.train), generator=torch.Generator().manual_seed(0))[:size]
    return small.train.x[idx].float() / 255, small.train.y[idx]


# -- WaNet -----------------------------------------------------------------------------------
def test_wanet_warp_field_is_smooth_and_bounded(small):
    attack = build_attack("wanet")
    attack.prepare(small, seed=0)
    noise, grid = attack.noise, attack.grid
    assert grid.shape == (1, 32, 32, 2) and grid.abs().max() <= 1
    shift_px = (grid - identity_grid(32, 32)) * (32 - 1) / 2  # grid units -> pixels
    s = attack.config.s
    assert 0 < shift_px.abs().max() <= s * noise.abs().max() / 2 + 1e-5  # s = 0.5: under a pixel or so
    # smooth: k = 4 control points over 32 px, so neighbouring pixels move almost alike
    step = max((noise[:, 1:] - noise[:, :-1]).abs().max(), (noise[:, :, 1:] - noise[:, :, :-1]).abs().max())
    assert step <= 0.4 * noise.abs().max()


def test_wanet_is_identity_at_zero_strength(small):
    attack = build_attack("wanet", {"s": 0.0})
    attack.prepare(small, seed=0)
    assert torch.equal(attack.apply(small.test.x), small.test.x)


def test_wanet_apply_is_seeded_and_deterministic(small, tmp_path):
    a, b, c = build_attack("wanet"), build_attack("wanet"), build_attack("wanet")
    a.prepare(small, seed=1, cache_dir=tmp_path)
    b.prepare(small, seed=1, cache_dir=tmp_path / "other")  # made afresh, not read back
    c.prepare(small, seed=2, cache_dir=tmp_path)
    x = small.test.x[:50]
    out = a.apply(x)
    assert out.dtype == torch.uint8 and not torch.equal(out, x)
    assert torch.equal(out, a.apply(x)) and torch.equal(out, b.apply(x))
    field = a.describe()["warp_field"]
    assert field["content_sha256"] == b.describe()["warp_field"]["content_sha256"]
    assert field["content_sha256"] != c.describe()["warp_field"]["content_sha256"]
    assert 0 < field["info"]["max_shift_px"] < 2


def test_wanet_hook_noise_mode_keeps_labels(small):
    # no crop or rotation: each output is its input, flipped or not, unless noise-warped
    attack = build_attack("wanet", {"random_crop": 0, "random_rotation": 0, "s": 2.0, "poisoning": "stored"})
    attack.prepare(small, seed=0)
    assert attack.train_overrides() == {"augment": False}  # the hook augments instead of the engine
    x, y = _shuffled_batch(small)
    out, y_out = attack.batch_hook(0)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(y_out, y)
    kept = torch.tensor([torch.allclose(o, i, atol=1e-6) or torch.allclose(o, i.flip(2), atol=1e-6)
                         for o, i in zip(out, x)])
    changed = torch.nonzero(~kept).flatten()
    assert len(changed) == attack.cross_count(128) == 24  # int(int(0.1 * 128) * 2), as BackdoorBench
    assert torch.all(y[changed] != attack.config.target)  # stored poisoned images are never re-warped


def _flip_match(out, ref):
    """Per sample: is ``out`` equal to ``ref`` or to ``ref`` flipped (the hook's random flip)?"""
    return torch.tensor([torch.allclose(o, r, atol=1e-5) or torch.allclose(o, r.flip(2), atol=1e-5)
                         for o, r in zip(out, ref)])


def test_wanet_batch_mode_warps_the_head_of_every_batch(small):
    from tsbd.attacks.wanet import warp

    assert not build_attack("wanet").poisons_per_batch  # stored is WaNet's default (module doc)
    attack = build_attack("wanet", {"random_crop": 0, "random_rotation": 0, "s": 2.0, "poisoning": "batch"})
    attack.prepare(small, seed=0)
    assert attack.poisons_per_batch
    x, y = _shuffled_batch(small)
    out, y_out = attack.batch_hook(0)(x, y, torch.Generator().manual_seed(0))
    head = int(0.1 * 128)
    assert torch.all(y_out[:head] == attack.config.target) and torch.equal(y_out[head:], y[head:])
    assert torch.all(_flip_match(out[:head], warp(x[:head], attack.grid)))  # the trigger, no noise
    kept = _flip_match(out[head:], x[head:])
    noised = torch.nonzero(~kept).flatten() + head
    assert len(noised) == attack.cross_count(128) == 24
    assert torch.all(y[noised] != attack.config.target)
    # a fresh draw of the batch gets the trigger on other images: nothing is stored
    assert len(attack.poison_train(small.train, 0).poison_index) == 0


# -- Input-aware -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def iad(small, runtime, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    attack = build_attack("inputaware", TINY_IAD)
    attack.prepare(small, seed=0, runtime=runtime, arch="airbench", arch_kwargs=TINY_NET, cache_dir=cache)
    return attack, cache


def test_inputaware_resource_key_ignores_spelled_out_default_options(small, monkeypatch):
    # the grid records airbench's default widths, the CLI passes none: one cached G/M for both
    import tsbd.attacks.inputaware as ia

    seen = []

    def capture(name, settings, generate, cache_dir):
        seen.append(settings)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(ia, "load_or_generate", capture)
    for kwargs in ({}, {"widths": [32, 64, 128]}, {"widths": [16, 32, 32]}):
        with pytest.raises(KeyboardInterrupt):
            build_attack("inputaware", TINY_IAD).prepare(small, seed=0, arch="airbench", arch_kwargs=kwargs)
    # how the victim is poisoned (batch or stored) does not change G and M: same key
    with pytest.raises(KeyboardInterrupt):
        build_attack("inputaware", {**TINY_IAD, "poisoning": "stored"}).prepare(small, seed=0, arch="airbench")
    assert seen[0] == seen[1] == seen[3] and seen[2] != seen[0]


def test_inputaware_mask_density_near_target(iad, small, runtime):
    attack, _ = iad
    density = mask_density(attack.trigger, small.test.x, runtime)
    # an untrained mask covers about half the image; stage 1 pulls it to ~mask_density (0.032)
    # while the diversity term keeps it from vanishing
    assert 0.01 < density < 0.1
    assert attack.describe()["trigger"]["info"]["mask_density"] == pytest.approx(
        mask_density(attack.trigger, small.test.x[:2000], runtime), abs=1e-6)


def test_diversity_loss_gradient_is_finite_when_masks_coincide():
    # a mask net saturated to all-0 gives identical masks; sqrt'(0) = inf once made the mask
    # stage's gradient NaN (seen on a 10k-image subset of CIFAR-10)
    from tsbd.attacks._generators import diversity_loss

    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g)
    m = torch.zeros(4, 1, 8, 8, requires_grad=True)
    loss = diversity_loss(x1, x2, m, m.roll(1, 0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(m.grad).all()
    # away from the floor, the loss is the plain RMS ratio
    p = torch.rand(4, 1, 8, 8, generator=g)
    q = torch.rand(4, 1, 8, 8, generator=g)
    want = ((x1 - x2).pow(2).mean((1, 2, 3)).sqrt() / ((p - q).pow(2).mean((1, 2, 3)).sqrt() + 1e-7)).mean()
    assert torch.allclose(diversity_loss(x1, x2, p, q), want, rtol=1e-4)


def test_inputaware_apply_is_the_trigger_formula_and_cached(iad, small, runtime):
    attack, cache = iad
    x = small.test.x[:40]
    out = attack.apply(x)
    with torch.no_grad():
        xf = x.float() / 255
        g, m = attack.trigger.patterns(xf), attack.trigger.masks(xf)
        expected = ((xf + (g - xf) * m) * 255).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(out, expected) and torch.equal(out, attack.apply(x))
    assert m.shape == (40, 1, 32, 32) and g.shape == (40, 3, 32, 32)
    # a second prepare finds G and M in the cache and poisons identically
    again = build_attack("inputaware", TINY_IAD)
    again.prepare(small, seed=0, runtime=runtime, arch="airbench", arch_kwargs=TINY_NET, cache_dir=cache)
    assert again.resource.from_cache and torch.equal(again.apply(x), out)
    assert again.describe()["trigger"]["fingerprint"] == attack.describe()["trigger"]["fingerprint"]
    clf = again.joint_classifier()
    assert clf(xf[:2]).shape == (2, 10)


def test_inputaware_cross_mode_keeps_labels(iad, small, runtime):
    _, cache = iad
    attack = build_attack("inputaware", {**TINY_IAD, "poisoning": "stored"})
    attack.prepare(small, seed=0, runtime=runtime, arch="airbench", arch_kwargs=TINY_NET, cache_dir=cache)
    assert attack.resource.from_cache  # the same G and M as the batch-mode attack
    x, y = _shuffled_batch(small)
    out, y_out = attack.batch_hook(0)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(y_out, y)
    changed = torch.nonzero((out - x).abs().flatten(1).amax(1) > 0).flatten()
    assert 0 < len(changed) <= attack.cross_count(128) == 25  # int(int(0.2 * 128) * 1)
    assert torch.all(y[changed] != attack.config.target)


def test_inputaware_batch_mode_triggers_the_head_and_crosses_the_rest(iad, small):
    attack, _ = iad
    assert attack.poisons_per_batch  # Input-aware's default
    x, y = _shuffled_batch(small)
    out, y_out = attack.batch_hook(0)(x, y, torch.Generator().manual_seed(0))
    head = int(0.2 * 128)
    assert torch.all(y_out[:head] == attack.config.target) and torch.equal(y_out[head:], y[head:])
    with torch.no_grad():
        assert torch.allclose(out[:head], attack.trigger(x[:head]), atol=1e-6)  # each image's own trigger
    changed = torch.nonzero((out[head:] - x[head:]).abs().flatten(1).amax(1) > 0).flatten() + head
    assert 0 < len(changed) <= attack.cross_count(128) == 25
    assert torch.all(y[changed] != attack.config.target)
    # cross triggers come from clean images, not from the poisoned head
    from tsbd.attacks.inputaware import cross_source

    with torch.no_grad():
        want = attack.trigger(x[changed], x[cross_source(128, changed)])
    assert torch.allclose(out[changed], want, atol=1e-6)


# -- both: the backdoor is learned -----------------------------------------------------------
@pytest.fixture(scope="module")
def clean_model(small, runtime):
    torch.manual_seed(0)
    model = build_model("airbench", 10, mean=small.mean, std=small.std, **TINY_NET)
    init_from_data(model, small.train.x)
    fit(model, small.train, _train_cfg(), runtime, seed=0, progress=False)
    return model.eval()


@pytest.mark.parametrize("name", ["wanet", "inputaware"])
def test_a_poisoned_tiny_model_learns_the_backdoor(name, small, runtime, clean_model, iad):
    if name == "wanet":
        attack = build_attack("wanet", {"s": 4.0, "poison_ratio": 0.2})
        attack.prepare(small, seed=0)
    else:
        attack = iad[0]
    setup = AttackSetup(small, attack, 0, attack.poison_train(small.train, 0), attack.poison_test(small.test))
    model, meta = train_attacked_model(setup, "airbench", _train_cfg(), runtime, arch_kwargs=TINY_NET)
    clean = evaluate(clean_model, small.test, setup.poisoned_test, runtime)
    assert meta["metrics"]["asr"] > clean["asr"] + 0.2, (meta["metrics"], clean)
    assert meta["train"]["augment"] is (name != "wanet")  # WaNet's hook augments instead


def test_inputaware_interrupted_mid_training_resumes_to_the_same_trigger(small, runtime, tmp_path, monkeypatch):
    """G and M's training checkpoints every epoch (stage 2 with G and its optimizer): a generation
    killed in stage 2 resumes there and caches the very tensors an uninterrupted one does."""
    import tsbd.train.engine as engine

    opts = {**TINY_IAD, "width": 0.125, "batch_size": 128, "mask_epochs": 2, "mask_milestones": [1], "joint_epochs": 2}

    def prepare(cache):
        attack = build_attack("inputaware", opts)
        attack.prepare(small, seed=0, runtime=runtime, arch="airbench", arch_kwargs=TINY_NET, cache_dir=cache)
        return attack.resource

    whole = prepare(tmp_path / "whole")
    real, saved = engine.save_checkpoint, []

    def save_then_die(path, state):  # killed right after stage 2's first epoch is saved
        real(path, state)
        saved.append(path.name)
        if path.name == "joint.resume.pt" and state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path / "cut")
    assert saved == ["mask-0.resume.pt", "mask-1.resume.pt", "joint.resume.pt"]
    partial = list((tmp_path / "cut" / "attack_resources").glob(".inputaware-*.partial"))
    assert len(partial) == 1 and (partial[0] / "joint.resume.pt").exists()
    saved.clear()
    resumed = prepare(tmp_path / "cut")
    assert saved == ["joint.resume.pt"]  # only stage 2's last epoch ran again
    assert resumed.meta["content_sha256"] == whole.meta["content_sha256"]
    assert not partial[0].exists()  # removed once the resource is stored
