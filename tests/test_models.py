"""Model zoo: every registered model builds, trains a step, round-trips through its spec;
the reference layouts (BackdoorBench PreActResNet18, torchvision vgg19_bn) hold exactly."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tsbd.errors import TsbdError
from tsbd.models import (
    MODELS,
    build_model,
    count_parameters,
    describe_model,
    init_from_data,
    model_from_spec,
)

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # BackdoorBench's CIFAR-10 normalization
CIFAR_STD = (0.247, 0.243, 0.261)
CIFAR_NPZ = Path(os.environ.get("TSBD_CIFAR10_NPZ", "/work/shared/data/cifar10.npz"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def images_uint8() -> torch.Tensor:
    """300 real CIFAR-10 training images (uint8 N x 3 x 32 x 32) where the archive exists,
    otherwise smooth synthetic images whose neighbouring pixels correlate like real ones."""
    if CIFAR_NPZ.exists():
        from PIL import Image

        with np.load(CIFAR_NPZ) as archive:
            jpeg, offsets = archive["train_jpeg"], archive["train_offsets"]
            imgs = [
                np.asarray(Image.open(io.BytesIO(jpeg[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
                for i in range(300)
            ]
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    low = torch.rand(300, 3, 8, 8, generator=g)
    smooth = F.interpolate(low, size=32, mode="bilinear", align_corners=False)
    noisy = smooth + 0.02 * torch.randn(smooth.shape, generator=g)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


def test_registry_lists_the_three_architectures():
    assert {"preact_resnet18", "vgg19_bn", "airbench"} <= set(MODELS.names())


@pytest.mark.parametrize("num_classes", [10, 43])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg19_bn" else n
                                  for n in MODELS.names()])
def test_build_train_step_and_rebuild_from_spec(name, num_classes):
    model = build_model(name, num_classes, mean=CIFAR_MEAN, std=CIFAR_STD)
    x = torch.rand(2, 3, 32, 32)

    logits = model(x)
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, num_classes - 1])).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    model.zero_grad(set_to_none=True)

    spec = model.arch_spec
    assert json.loads(json.dumps(spec)) == spec
    assert spec["name"] == name and spec["num_classes"] == num_classes
    assert spec["mean"] == pytest.approx(CIFAR_MEAN) and spec["std"] == pytest.approx(CIFAR_STD)

    state = model.state_dict()
    # Normalization statistics are buffers of the model but not part of its checkpoint.
    buffer_names = {n for n, _ in model.named_buffers()}
    assert {"normalize.mean", "normalize.std"} <= buffer_names
    assert not any(k.startswith("normalize") for k in state)

    rebuilt = model_from_spec(json.loads(json.dumps(spec)))
    assert rebuilt.arch_spec == spec
    rebuilt_state = rebuilt.state_dict()
    assert {k: v.shape for k, v in rebuilt_state.items()} == {k: v.shape for k, v in state.items()}
    rebuilt.load_state_dict(state, strict=True)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vgg19_bn" else n
                                  for n in MODELS.names()])
def test_models_normalize_their_input_inside(name):
    model = build_model(name, 10, mean=CIFAR_MEAN, std=CIFAR_STD).eval()
    plain = build_model(name, 10).eval()  # mean 0, std 1: normalization is the identity
    plain.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 32, 32)
    pre = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(pre), rtol=1e-4, atol=1e-5)


def test_preact_resnet18_has_backdoorbench_state_dict():
    model = build_model("preact_resnet18", 10)
    keys = set(model.state_dict())

    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = {"conv1.weight", "linear.weight", "linear.bias"}
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            expected |= {f"{p}.bn1.{b}" for b in bn} | {f"{p}.bn2.{b}" for b in bn}
            expected |= {f"{p}.conv1.weight", f"{p}.conv2.weight"}
        if layer > 1:
            expected.add(f"layer{layer}.0.shortcut.0.weight")
    assert keys == expected
    assert {"conv1.weight", "layer2.0.shortcut.0.weight", "layer4.1.bn2.running_var", "linear.bias"} <= keys

    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 1 + 16 + 3
    assert all(m.bias is None for m in convs.values())
    assert not any(k.endswith(".bias") and k.rsplit(".", 1)[0] in convs for k in keys)
    assert model.layer2[0].shortcut[0].kernel_size == (1, 1) and model.layer2[0].shortcut[0].stride == (2, 2)
    assert model.layer1[0].shortcut is None
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert (model.linear.in_features, model.linear.out_features) == (512, 10)
    assert count_parameters(model) == pytest.approx(11.17e6, abs=0.01e6)


def test_preact_resnet18_width_option_scales_every_stage():
    model = build_model("preact_resnet18", 10, width=16)
    assert [model.layer1[0].conv1.out_channels, model.layer4[1].conv2.out_channels] == [16, 128]
    assert model.linear.in_features == 128
    assert count_parameters(model) == pytest.approx(0.70e6, abs=0.01e6)
    assert model.arch_spec["width"] == 16


@pytest.mark.slow
def test_vgg19_bn_has_torchvision_layout_and_init():
    model = build_model("vgg19_bn", 43)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16
    assert convs[-1][0] == "features.49"
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5
    assert len(model.features) == 53
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 16
    assert model.avgpool.output_size == (7, 7)
    linears = [model.classifier[i] for i in (0, 3, 6)]
    assert [(m.in_features, m.out_features) for m in linears] == [(25088, 4096), (4096, 4096), (4096, 43)]
    assert [type(m) for m in model.classifier] == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    # torchvision init: BN 1/0, zero biases, N(0, 0.01) linear weights.
    bn = model.features[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(model.features[49].bias == 0) and torch.all(model.classifier[6].bias == 0)
    assert model.classifier[3].weight.std().item() == pytest.approx(0.01, rel=0.02)
    w = model.features[0].weight  # kaiming normal, fan_out = 64 * 9
    assert w.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.15)
    assert "classifier.6.weight" in model.state_dict()


def test_vgg19_bn_width_option_keeps_layout_and_names():
    model = build_model("vgg19_bn", 43, width=16)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16] * 2 + [32] * 2 + [64] * 4 + [128] * 8
    assert len(model.features) == 53 and isinstance(model.features[49], nn.Conv2d)
    linears = [model.classifier[i] for i in (0, 3, 6)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128 * 49, 1024), (1024, 1024), (1024, 43)]
    assert model.arch_spec["width"] == 16
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 43)
    with pytest.raises(TsbdError, match="vgg19_bn width must be a positive integer"):
        build_model("vgg19_bn", 10, width=0)


def test_airbench_size_and_frozen_whitening():
    model = build_model("airbench", 10)
    assert count_parameters(model) == pytest.approx(0.30e6, abs=0.01e6)
    assert model.whiten.weight.shape == (24, 3, 2, 2)
    assert not model.whiten.weight.requires_grad
    assert model.whiten.bias.requires_grad
    assert all(type(m) is nn.BatchNorm2d for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 7
    # The default whitening is deterministic: identical for two fresh models.
    torch.testing.assert_close(build_model("airbench", 10).whiten.weight, model.whiten.weight)
    wide = build_model("airbench", 10, widths=[64, 128, 256])
    assert count_parameters(wide) == pytest.approx(1.16e6, abs=0.01e6)


def test_airbench_init_from_data_whitens_patches(images_uint8):
    model = build_model("airbench", 10, mean=CIFAR_MEAN, std=CIFAR_STD)
    before = model.whiten.weight.clone()

    def patch_covariance(weight):
        x = model.normalize(images_uint8.float() / 255)
        z = F.conv2d(x, weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
        return z.T @ z / len(z)

    cov_before = patch_covariance(before)
    off_before = (cov_before - torch.diag(cov_before.diag())).abs().max()
    assert off_before > 0.3  # neighbouring pixels correlate strongly before whitening

    assert init_from_data(model, images_uint8) is True
    after = model.whiten.weight
    assert not torch.allclose(after, before)
    assert not after.requires_grad
    torch.testing.assert_close(after[12:], -after[:12])
    cov = patch_covariance(after)
    diag = cov.diag()
    # Whitened: uncorrelated, unit variance along the strong directions; eps=5e-4 damps the
    # weakest ones (variance l / (l + eps) < 1).
    assert (cov - torch.diag(diag)).abs().max() < 1e-3
    assert diag.max() <= 1.0 + 1e-6
    assert diag[:6].min() > 0.9
    assert diag.mean() > 0.6


def test_init_from_data_is_a_no_op_for_models_without_it(images_uint8):
    model = build_model("preact_resnet18", 10, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert init_from_data(model, images_uint8) is False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_airbench_init_from_data_rejects_float_images():
    model = build_model("airbench", 10)
    with pytest.raises(TsbdError, match="uint8"):
        model.init_from_data(torch.rand(4, 3, 32, 32))


def test_unknown_model_lists_valid_names():
    with pytest.raises(TsbdError) as err:
        build_model("resnet1000", 10)
    message = str(err.value)
    assert "resnet1000" in message and "\n" not in message
    assert all(n in message for n in MODELS.names())


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"num_classes": 10, "depth": 34}, "depth"),
        ({"num_classes": 10, "width": 0}, "width"),
        ({"num_classes": 10, "mean": (0.5, 0.5)}, "mean"),
        ({"num_classes": 10, "std": (0.2, 0.0, 0.2)}, "std"),
    ],
)
def test_bad_arguments_raise_tsbd_error(kwargs, fragment):
    with pytest.raises(TsbdError, match=fragment):
        build_model("preact_resnet18", **kwargs)


def test_bad_airbench_widths_and_spec_raise_tsbd_error():
    with pytest.raises(TsbdError, match="widths"):
        build_model("airbench", 10, widths=[32, 64])
    with pytest.raises(TsbdError, match="name"):
        model_from_spec({"num_classes": 10})
    with pytest.raises(TsbdError, match="option"):
        model_from_spec({"name": "vgg19_bn", "num_classes": 10, "depth": 8})


def test_describe_model_is_json_summary():
    model = build_model("airbench", 10, widths=(16, 32, 64))
    info = describe_model(model)
    assert json.loads(json.dumps(info)) == info
    assert info["name"] == "airbench"
    assert info["params"] == count_parameters(model)
    assert info["trainable_params"] == info["params"] - 24 * 3 * 2 * 2
    assert info["spec"]["widths"] == [16, 32, 64]


def test_non_default_options_give_one_spelling():
    from tsbd.models import non_default_options

    assert non_default_options("airbench", {"widths": [32, 64, 128]}) == {}
    assert non_default_options("airbench", {"widths": (32, 64, 128)}) == {}
    assert non_default_options("airbench", None) == {}
    assert non_default_options("airbench", {"widths": [8, 16, 16]}) == {"widths": [8, 16, 16]}
