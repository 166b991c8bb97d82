"""Every registered attack, parametrized over the registry."""

import pytest
import torch
from conftest import TINY_ARCH, TINY_ATTACKS

from tsbd.attacks import ATTACKS, build_attack
from tsbd.errors import TsbdError

pytestmark = pytest.mark.slow  # trains models or runs subprocesses: seconds to minutes per test

ALL = ATTACKS.names()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("attack-cache")


def _prepare(name, small, runtime, cache, seed):
    attack = build_attack(name, TINY_ATTACKS.get(name))
    attack.prepare(small, runtime=runtime, seed=seed, cache_dir=cache, **TINY_ARCH)
    return attack


@pytest.fixture(scope="module")
def prepared(small, runtime, cache):
    return {name: _prepare(name, small, runtime, cache, 0) for name in ALL}


@pytest.mark.parametrize("name", ALL)
def test_poisons_the_configured_fraction(name, prepared, small, runtime, cache):
    attack = prepared[name]
    if attack.poisons_per_batch:  # nothing stored (tests/test_attacks_dynamic.py checks the hook)
        pt = attack.poison_train(small.train, seed=0)
        assert len(pt.poison_index) == 0
        assert torch.equal(pt.data.x, small.train.x) and torch.equal(pt.data.y, small.train.y)
        attack = build_attack(name, {**TINY_ATTACKS.get(name, {}), "poisoning": "stored"})
        attack.prepare(small, runtime=runtime, seed=0, cache_dir=cache, **TINY_ARCH)
        assert not attack.poisons_per_batch
    pt = attack.poison_train(small.train, seed=0)
    n = len(small.train)
    idx = pt.poison_index
    if attack.clean_label:
        assert torch.all(small.train.y[idx] == attack.config.target)
        assert torch.equal(pt.data.y, small.train.y)  # labels kept
    else:
        assert len(idx) == round(attack.config.poison_ratio * n)
        assert torch.all(pt.data.y[idx] == attack.config.target)
    assert len(torch.unique(idx)) == len(idx)
    rest = torch.ones(n, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(pt.data.x[rest], small.train.x[rest])  # unpoisoned images untouched
    assert torch.equal(pt.data.y[rest], small.train.y[rest])
    assert not torch.equal(pt.data.x[idx], small.train.x[idx])  # the trigger changed the poisoned ones


@pytest.mark.parametrize("name", ALL)
def test_poisoned_test_set(name, prepared, small):
    attack = prepared[name]
    before = small.test.x.clone()
    pt = attack.poison_test(small.test)
    keep = small.test.y != attack.config.target
    assert len(pt) == int(keep.sum())
    assert pt.x.dtype == torch.uint8 and pt.x.shape[1:] == small.test.x.shape[1:]
    assert torch.all(pt.y_target == attack.config.target)
    assert torch.equal(pt.y_true, small.test.y[keep])
    assert torch.equal(small.test.x, before)  # the clean test set is untouched


@pytest.mark.parametrize("name", ALL)
def test_deterministic_for_a_seed(name, small, runtime, cache):
    a, b = _prepare(name, small, runtime, cache, 3), _prepare(name, small, runtime, cache, 3)
    pa, pb = a.poison_train(small.train, seed=3), b.poison_train(small.train, seed=3)
    assert torch.equal(pa.poison_index, pb.poison_index)
    assert torch.equal(pa.data.x, pb.data.x)
    if a.poisons_per_batch:  # nothing stored: the hook poisons the same batch the same way
        x, y = small.train.x[:64].float() / 255, small.train.y[:64]
        (xa, ya), (xb, yb) = (m.batch_hook(3)(x, y, torch.Generator().manual_seed(3)) for m in (a, b))
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, x)
    elif not a.clean_label:
        other = a.poison_train(small.train, seed=4).poison_index
        assert not torch.equal(other, pa.poison_index)


def test_badnets_patch_is_bottom_right_white_square(small):
    attack = build_attack("badnets")
    x = small.test.x[:4]
    out = attack.apply(x)
    assert torch.all(out[:, :, 29:, 29:] == 255)
    assert torch.equal(out[:, :, :29, :], x[:, :, :29, :])
    assert torch.equal(out[:, :, :, :29], x[:, :, :, :29])


def test_badnets_trigger_image_file(tmp_path, small):
    import numpy as np
    from PIL import Image

    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[0:2, 0:2] = 200
    Image.fromarray(img).save(tmp_path / "t.png")
    out = build_attack("badnets", {"trigger_image": str(tmp_path / "t.png")}).apply(small.test.x[:2])
    assert torch.all(out[:, :, :2, :2] == 200)
    assert torch.equal(out[:, :, 2:, :], small.test.x[:2, :, 2:, :])


def test_blended_formula_and_trigger_image(tmp_path, small):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((10, 20, 3), 100, dtype=np.uint8)).save(tmp_path / "k.jpg", quality=100)
    attack = build_attack("blended", {"trigger_image": str(tmp_path / "k.jpg"), "blend_ratio": 0.2})
    x = small.test.x[:3]
    out = attack.apply(x)
    t = attack.trigger(tuple(x.shape[1:])).float()
    expected = (0.8 * x.float() + 0.2 * t).to(torch.uint8)
    assert torch.equal(out, expected)
    # default trigger: fixed seeded noise, identical across instances
    assert torch.equal(build_attack("blended").trigger((3, 32, 32)), build_attack("blended").trigger((3, 32, 32)))


def test_bad_attack_input_is_one_line_error(small, tmp_path):
    with pytest.raises(TsbdError, match="unknown attack"):
        build_attack("nope")
    with pytest.raises(TsbdError, match=r"^poison_ratio=1.5: must be in \[0, 1\]$"):
        build_attack("badnets", {"poison_ratio": 1.5})
    with pytest.raises(TsbdError, match="target label"):
        build_attack("badnets", {"target": 10}).prepare(small)
    with pytest.raises(TsbdError, match="not found"):
        build_attack("blended", {"trigger_image": str(tmp_path / "missing.png")}).apply(small.test.x[:1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(TsbdError, match="cannot read"):
        build_attack("blended", {"trigger_image": str(tmp_path / "bad.png")}).apply(small.test.x[:1])
