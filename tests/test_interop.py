"""Bring your own model and data: BackdoorBench files, state dicts, safetensors, user architectures,
clean data from folders and arrays, `tsbd inspect` / `tsbd purify`, and their one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import TinyNet, state_copy
from PIL import Image
from torch import nn

import tsbd
from tsbd.artifacts import load_model, save_model
from tsbd.cli import main
from tsbd.data.base import ImageSet
from tsbd.errors import TsbdError
from tsbd.interop import (
    check_prunable,
    classify_layers,
    describe_path,
    load_images,
    load_model_file,
    read_torch_file,
    save_backdoorbench,
)
from tsbd.models import build_model

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
# TSBD kept tiny: two unlearning epochs, one fine-tuning epoch, batches of 64, no augmentation
FAST = {"unlearn_lr": 0.01, "unlearn_max_epochs": 2, "finetune_epochs": 1, "batch_size": 64, "augment": False}
FAST_OPTS = [arg for k, v in FAST.items() for arg in ("--opt", f"{k}={v}")]
RUNTIME = ["--device", "cpu", "--precision", "fp32", "--threads", "1", "--quiet"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, needle):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("tsbd: error:"), err
    assert needle in lines[0], lines[0]


def _take(split: ImageSet, per_class: int) -> ImageSet:
    idx = torch.cat([torch.nonzero(split.y == c).flatten()[:per_class] for c in range(10)])
    return split.subset(torch.sort(idx).values)


def _stamp(x: torch.Tensor) -> torch.Tensor:
    """BadNets' trigger: a white 3x3 square in the bottom-right corner."""
    x = x.clone()
    x[:, :, -3:, -3:] = 255
    return x


@pytest.fixture(scope="module")
def data(small):
    """300 clean training and 100 test images (real CIFAR-10), and a poisoned test set."""
    train, test = _take(small.train, 30), _take(small.test, 10)
    keep = test.y != 0
    return {"train": train, "test": test, "bd_x": _stamp(test.x[keep]), "bd_y_true": test.y[keep]}


@pytest.fixture(scope="module")
def clean_npz(tmp_path_factory, data):
    """The clean set as BackdoorBench users keep it: uint8 N x H x W x C arrays, with a test split."""
    path = tmp_path_factory.mktemp("npz") / "clean.npz"
    np.savez(path, x=data["train"].x.permute(0, 2, 3, 1).numpy(), y=data["train"].y.numpy(),
             x_test=data["test"].x.permute(0, 2, 3, 1).numpy(), y_test=data["test"].y.numpy())
    return path


@pytest.fixture(scope="module")
def bb_net():
    """BackdoorBench's PreActResNet18 (narrowed to width 8 for speed): it takes NORMALIZED input."""
    torch.manual_seed(0)
    return build_model("preact_resnet18", 10, width=8).eval()


def _bd_test_v2(root, data) -> dict:
    """BackdoorBench v2's bd_test: a dataset state whose poisoned images are PNG files on disk."""
    entries = {}
    for i, (img, label) in enumerate(zip(data["bd_x"], data["bd_y_true"])):
        rel = f"./record/demo_attack/bd_test_dataset/{int(label)}/{i}.png"
        file = root / "bd_test_dataset" / str(int(label)) / f"{i}.png"
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(file)
        entries[i] = {"path": rel, "other_info": [0, int(label)]}
    n = len(entries)
    return {"bd_data_container": {"save_folder_path": "./record/demo_attack/bd_test_dataset", "data_dict": entries,
                                  "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False, "original_index_array": np.arange(n),
            "poison_indicator": np.ones(n), "save_folder_path": "./record/demo_attack/bd_test_dataset"}


def _bb_dict(net, **extra) -> dict:
    return {"model_name": "preactresnet18", "num_classes": 10,
            "model": {f"module.{k}": v for k, v in net.state_dict().items()},  # trained with DataParallel
            "data_path": "./data/cifar10", "img_size": [32, 32, 3], "clean_data": "cifar10",
            "bd_train": {"original_index_array": np.arange(5), "poison_indicator": np.zeros(5)}, **extra}


@pytest.fixture(scope="module")
def bb_file(tmp_path_factory, bb_net, data):
    """An attack_result.pt in BackdoorBench's (v2) format, built the way its save_attack_result writes it."""
    root = tmp_path_factory.mktemp("record")
    path = root / "attack_result.pt"
    torch.save(_bb_dict(bb_net, bd_test=_bd_test_v2(root, data)), path)
    return path


# ------------------------------------------------------------------------------------------
# BackdoorBench
def test_backdoorbench_file_loads_strictly_with_its_normalization(bb_file, bb_net, data):
    imported = load_model_file(bb_file)
    assert (imported.format, imported.arch, imported.num_classes) == ("backdoorbench", "preact_resnet18", 10)
    assert imported.image_shape == (3, 32, 32) and imported.stats_source == "backdoorbench"
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():  # ours takes [0, 1]; BackdoorBench's saw (x - mean) / std
        torch.testing.assert_close(imported.model(x), bb_net((x - mean) / std), rtol=1e-4, atol=1e-5)
    poisoned = imported.poisoned_test  # v2: read back from the PNG files next to the file
    assert torch.equal(poisoned.x, data["bd_x"]) and torch.equal(poisoned.y_true, data["bd_y_true"])
    assert bool((poisoned.y_target == 0).all())


def test_save_backdoorbench_round_trips_in_the_v1_layout(tmp_path, bb_net, data):
    from tsbd.data.poison import PoisonedTest

    pt = PoisonedTest(data["bd_x"], torch.zeros(len(data["bd_x"]), dtype=torch.long), data["bd_y_true"])
    path = save_backdoorbench(tmp_path / "attack_result.pt", bb_net, model_name="preactresnet18", num_classes=10,
                              clean_data="gtsrb", img_size=[32, 32, 3], poisoned_test=pt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attack_result.pt"]  # no temp file left
    imported = load_model_file(path)
    assert imported.stats_source == "backdoorbench" and imported.dataset == "gtsrb"
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # GTSRB in BackdoorBench is not normalized
        torch.testing.assert_close(imported.model(x), bb_net(x))
    assert torch.equal(imported.poisoned_test.x, data["bd_x"])


class _Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Open:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_Shell, _Open])
@pytest.mark.parametrize("where", ["bd_test", "model", "state_dict"])
def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, bb_net, payload, where, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "attack_result.pt"
    if where == "state_dict":
        torch.save({**bb_net.state_dict(), "extra": payload(marker)}, path)
    else:
        obj = _bb_dict(bb_net, bd_test={"x": payload(marker), "y": [0]})
        if where == "model":
            obj["model"]["linear.bias"] = payload(marker)
        torch.save(obj, path)
    with pytest.raises(TsbdError, match="could run code") as err:
        load_model_file(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    code, _, err_text = _run(capsys, "inspect", path)
    _one_line_error(code, err_text, "could run code")
    assert not marker.exists()


def test_unknown_backdoorbench_model_is_named(tmp_path, bb_net):
    path = tmp_path / "attack_result.pt"
    torch.save({**_bb_dict(bb_net), "model_name": "convnext_tiny"}, path)
    with pytest.raises(TsbdError, match="convnext_tiny.*--arch package.module:factory"):
        load_model_file(path)


# ------------------------------------------------------------------------------------------
# state dicts and safetensors
@pytest.fixture
def airbench():
    torch.manual_seed(0)
    return build_model("airbench", 10, mean=CIFAR_MEAN, std=CIFAR_STD, widths=(8, 16, 16)).eval()


@pytest.mark.parametrize("form", ["pt", "pth_module_prefix", "pth_nested", "safetensors"])
def test_state_dict_files_of_a_registered_architecture(tmp_path, airbench, form):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in airbench.state_dict().items()}
    if form == "pt":
        path = tmp_path / "w.pt"
        torch.save(state, path)
    elif form == "pth_module_prefix":
        path = tmp_path / "w.pth"
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif form == "pth_nested":
        path = tmp_path / "w.pth"
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    imported = load_model_file(path, arch="airbench", options={"widths": [8, 16, 16]}, mean=CIFAR_MEAN, std=CIFAR_STD)
    assert imported.num_classes == 10  # read from the classifier's shape
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(imported.model(x), airbench(x))


def test_state_dict_without_arch_asks_for_it(tmp_path, airbench):
    torch.save(airbench.state_dict(), tmp_path / "w.pt")
    with pytest.raises(TsbdError, match="pass --arch NAME"):
        load_model_file(tmp_path / "w.pt")


@pytest.mark.parametrize("case,needle", [
    ("other_arch", "does not fit this architecture"),
    ("other_classes", "does not fit this architecture"),
    ("flag_disagrees", "holds a 10-class model but --num-classes is 43"),
])
def test_checkpoint_for_another_architecture_or_class_count(tmp_path, bb_file, airbench, case, needle, capsys):
    if case == "other_arch":
        torch.save(airbench.state_dict(), tmp_path / "w.pt")
        argv = ["--arch", "preact_resnet18", "--num-classes", "10"]
        path = tmp_path / "w.pt"
    elif case == "other_classes":
        torch.save(airbench.state_dict(), tmp_path / "w.pt")
        argv = ["--arch", "airbench", "--model-opt", "widths=[8,16,16]", "--num-classes", "43"]
        path = tmp_path / "w.pt"
    else:
        path, argv = bb_file, ["--num-classes", "43"]
    code, _, err = _run(capsys, "purify", path, *argv, "--clean-data", "demo", "--out", tmp_path / "o", *RUNTIME)
    _one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize("kind", ["safetensors_truncated", "safetensors_garbage", "pt_truncated", "pt_garbage"])
def test_corrupt_or_truncated_model_files(tmp_path, airbench, kind, capsys):
    from safetensors.torch import save_file

    if kind.startswith("safetensors"):
        path = tmp_path / "w.safetensors"
        save_file(airbench.state_dict(), str(path))
    else:
        path = tmp_path / "w.pt"
        torch.save(airbench.state_dict(), path)
    if kind.endswith("truncated"):
        _truncate(path)
    else:
        path.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(TsbdError, match="corrupt or truncated") as err:
        load_model_file(path, arch="airbench")
    assert "\n" not in str(err.value)
    code, _, err_text = _run(capsys, "purify", path, "--arch", "airbench", "--clean-data", "demo",
                             "--out", tmp_path / "o", *RUNTIME)
    _one_line_error(code, err_text, "corrupt or truncated")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_nan_or_inf_weights_are_refused(tmp_path, airbench, value, suffix):
    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in airbench.state_dict().items()}
    state["head.weight"][0, 0] = value
    path = tmp_path / f"w{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    with pytest.raises(TsbdError, match="NaN or infinite weights"):
        load_model_file(path, arch="airbench", options={"widths": [8, 16, 16]})
    with torch.no_grad():
        airbench.head.weight[0, 0] = value
    with pytest.raises(TsbdError, match="NaN or infinite weights"):
        tsbd.purify(airbench, (np.zeros((64, 32, 32, 3), np.uint8), np.zeros(64, np.int64)))


# ------------------------------------------------------------------------------------------
# a user's own architecture, from Python and from the CLI
def test_python_purify_of_a_user_model(tiny_net, data, runtime):
    before = state_copy(tiny_net)
    x, y = data["train"].x[:128].permute(0, 2, 3, 1).numpy(), data["train"].y[:128].numpy()  # uint8 N x H x W x C
    result = tsbd.purify(tiny_net, (x, y), runtime=runtime, **FAST)
    assert type(result.model) is TinyNet and result.defense == "tsbd"
    assert all(torch.equal(v, tiny_net.state_dict()[k]) for k, v in before.items())  # input untouched
    reinit = result.info["reinit"]
    assert reinit["subweights_zeroed"] > 0 and reinit["neurons_selected"] > 0
    assert set(result.timings) >= {"clean_unlearn", "finetune", "total"}


def test_python_purify_with_normalization_returns_the_users_module(tiny_net, data, runtime):
    result = tsbd.purify(tiny_net, data["train"].subset(range(128)), mean=CIFAR_MEAN, std=CIFAR_STD,
                         runtime=runtime, **FAST)
    assert type(result.model) is TinyNet
    assert set(result.model.state_dict()) == set(tiny_net.state_dict())


class _WithConv1d(TinyNet):
    def __init__(self):
        super().__init__()
        self.mixer = nn.Conv1d(16, 16, 1)


class _WithTransposed(TinyNet):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(16, 16, 2)


def test_prunable_units_are_found_or_unclassified_layers_are_named(tiny_net):
    layers = classify_layers(tiny_net)
    assert layers["prunable"] == ["conv1 (Conv2d)", "conv2 (Conv2d)"]
    assert layers["shortcut"] == ["shortcut.0 (Conv2d)"] and layers["unclassified"] == []
    check_prunable(tiny_net)
    for net, name in ((_WithConv1d(), "mixer (Conv1d)"), (_WithTransposed(), "up (ConvTranspose2d)")):
        with pytest.raises(TsbdError, match=r"could not classify 1 layer\(s\).*" + name.replace("(", r"\(")
                           .replace(")", r"\)")):
            check_prunable(net)
        net.requires_grad_(True)
        next(m for m in net.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose2d))).requires_grad_(False)
        check_prunable(net)  # the fix the message names: freeze it
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(TsbdError, match="no trainable nn.Conv2d"):
        tsbd.purify(mlp, (np.zeros((64, 32, 32, 3), np.uint8), np.zeros(64, np.int64)))


USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=10, width=8):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    def make(num_classes, width=8):
        return Net(num_classes, width)

    NOT_CALLABLE = 3

    def not_a_model(num_classes):
        return "model"
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_arch_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)  # found from the current directory, as `python -m` would
    yield name
    sys.modules.pop(name, None)
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def test_cli_purify_a_user_architecture(user_module, tmp_path, clean_npz, capsys):
    from tsbd.interop import import_factory

    torch.manual_seed(0)
    net = import_factory(f"{user_module}:make")(10, width=8)  # imported from the current directory
    torch.save(net.state_dict(), tmp_path / "mine.pth")
    code, out, err = _run(capsys, "purify", tmp_path / "mine.pth", "--arch", f"{user_module}:make", "--num-classes",
                          10, "--model-opt", "width=8", "--clean-data", clean_npz, *FAST_OPTS, "--json",
                          "--out", tmp_path / "pure", *RUNTIME)
    assert code == 0, err
    res = json.loads(out)
    assert 0 <= res["acc"] <= 1 and 0 <= res["before"]["acc"] <= 1  # ACC from the npz's x_test / y_test
    meta = json.loads((tmp_path / "pure" / "meta.json").read_text())
    assert meta["arch"]["name"] == f"{user_module}:make" and meta["arch"]["factory"] is True
    from tsbd.artifacts import load_state

    assert set(load_state(tmp_path / "pure" / "model.safetensors")) == set(net.state_dict())  # the user's keys
    with pytest.raises(TsbdError, match="never imports code named in a file"):
        load_model(tmp_path / "pure")  # a saved file cannot make tsbd import anything
    again = load_model_file(tmp_path / "pure", arch=f"{user_module}:make", options={"width": 8})
    assert again.num_classes == 10


@pytest.mark.parametrize("flag, flips", [([], True), (["--no-flip"], False)])
def test_cli_purify_mirrors_clean_images_unless_told_not_to(flag, flips, user_module, tmp_path, clean_npz, capsys,
                                                            monkeypatch):
    import tsbd.train.engine as engine
    from tsbd.interop import import_factory

    seen = []
    real = engine.crop_flip
    monkeypatch.setattr(engine, "crop_flip", lambda x, g, flip=True: seen.append(flip) or real(x, g, flip=flip))
    torch.manual_seed(0)
    torch.save(import_factory(f"{user_module}:make")(10, width=8).state_dict(), tmp_path / "mine.pth")
    code, _, err = _run(capsys, "purify", tmp_path / "mine.pth", "--arch", f"{user_module}:make", "--num-classes",
                        10, "--model-opt", "width=8", "--clean-data", clean_npz, *FAST_OPTS, "--opt", "augment=true",
                        *flag,
                        "--out", tmp_path / "pure", *RUNTIME)
    assert code == 0, err
    assert seen and set(seen) == {flips}  # every augmented batch of the defense
    assert json.loads((tmp_path / "pure" / "meta.json").read_text())["clean"]["hflip"] is flips


@pytest.mark.parametrize("spec,needle", [
    ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
    ("{mod}:missing", "has no 'missing'"),
    ("{mod}:NOT_CALLABLE", "not a function or class"),
    ("{mod}:not_a_model", "returned a str, not a torch.nn.Module"),
])
def test_arch_factory_errors_are_one_line(user_module, tmp_path, airbench, spec, needle, capsys):
    torch.save(airbench.state_dict(), tmp_path / "w.pt")
    code, _, err = _run(capsys, "purify", tmp_path / "w.pt", "--arch", spec.format(mod=user_module),
                        "--num-classes", 10, "--clean-data", "demo", *RUNTIME)
    _one_line_error(code, err, needle)


# ------------------------------------------------------------------------------------------
# clean data
def test_clean_data_sources(tmp_path, data, clean_npz):
    train = data["train"]
    loaded = load_images(clean_npz)
    assert torch.equal(loaded.images.x, train.x) and torch.equal(loaded.test.y, data["test"].y)

    np.savez(tmp_path / "f.npz", images=train.x.numpy().astype(np.float32) / 255, labels=train.y.numpy())
    assert torch.equal(load_images(tmp_path / "f.npz").images.x, train.x)  # float N x C x H x W in [0, 1]

    np.save(tmp_path / "x.npy", train.x.permute(0, 2, 3, 1).numpy())
    np.save(tmp_path / "y.npy", train.y.numpy())
    assert torch.equal(load_images(tmp_path / "x.npy", labels=tmp_path / "y.npy").images.x, train.x)

    for i in range(6):  # class-per-folder images (PNG keeps pixels exact)
        label = int(train.y[i])
        (tmp_path / "imgs" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(train.x[i].permute(1, 2, 0).numpy()).save(tmp_path / "imgs" / f"c{label}" / f"{i}.png")
    folder = load_images(tmp_path / "imgs")
    assert len(folder.images) == 6 and folder.images.image_shape == (3, 32, 32)
    assert folder.classes == sorted({f"c{int(v)}" for v in train.y[:6]})

    demo = load_images("demo", ratio=0.03, seed=1)
    assert len(demo.images) == 300 and len(demo.test) == 2000 and demo.mean == pytest.approx(CIFAR_MEAN)
    assert torch.equal(load_images("demo", ratio=0.03, seed=1).images.x, demo.images.x)  # seeded


def _bad_clean(tmp_path, kind, data):
    x, y = data["train"].x.permute(0, 2, 3, 1).numpy(), data["train"].y.numpy()
    path = tmp_path / "bad.npz"
    if kind == "wrong_size":
        np.savez(path, x=x[:, :16, :16], y=y)
    elif kind == "grayscale":
        np.savez(path, x=x[..., 0], y=y)
    elif kind == "empty":
        np.savez(path, x=x[:0], y=y[:0])
    elif kind == "smaller_than_a_batch":
        np.savez(path, x=x[:40], y=y[:40])
    elif kind == "pickled_objects":
        np.savez(path, x=np.array([object()] * 3, dtype=object), y=y[:3])
    elif kind == "label_count":
        np.savez(path, x=x, y=y[:10])
    elif kind == "npy_without_labels":
        path = tmp_path / "bad.npy"
        np.save(path, x)
    return path


@pytest.mark.parametrize("kind,needle", [
    ("wrong_size", "are 16x16 pixels but the model was trained on 32x32"),
    ("grayscale", "have 1 channel(s) but the model takes 3 (RGB)"),
    ("empty", "holds no images"),
    ("smaller_than_a_batch", "has 40 images, fewer than one batch (64)"),
    ("pickled_objects", "pickled Python objects"),
    ("label_count", "10 labels for 300 images"),
    ("npy_without_labels", "holds images only; pass the labels"),
])
def test_bad_clean_data_is_one_line_and_writes_nothing(tmp_path, bb_file, data, kind, needle, capsys):
    path = _bad_clean(tmp_path, kind, data)
    code, _, err = _run(capsys, "purify", bb_file, "--clean-data", path, *FAST_OPTS, "--out", tmp_path / "o",
                        *RUNTIME)
    _one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------
# the CLI end to end, inspect, and failures part-way
def test_cli_purify_backdoorbench_end_to_end(bb_file, clean_npz, tmp_path, capsys):
    code, out, err = _run(capsys, "purify", bb_file, "--clean-data", clean_npz, *FAST_OPTS, "--json",
                          "--out", tmp_path / "pure", *RUNTIME)
    assert code == 0, err
    res = json.loads(out)
    assert {"acc", "asr", "ra", "der"} <= set(res) and {"acc", "asr", "ra"} <= set(res["before"])
    assert res["source"]["format"] == "backdoorbench" and res["source"]["normalization"] == "backdoorbench"
    model, meta = load_model(tmp_path / "pure")  # a regular tsbd model folder
    assert meta["kind"] == "defended" and meta["arch"]["mean"] == pytest.approx(CIFAR_MEAN)
    assert meta["clean"]["count"] == 300 and meta["metrics"]["asr"] == res["asr"]

    code, out, _ = _run(capsys, "inspect", tmp_path / "pure", "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "defended" and info["defense"] == "tsbd"
    assert info["source"]["format"] == "backdoorbench" and info["metrics"]["asr"] == res["asr"]
    assert info["tensors"] == len(model.state_dict()) and info["finite"] is True


def test_inspect_files(tmp_path, bb_file, airbench, capsys):
    from safetensors.torch import save_file

    code, out, _ = _run(capsys, "inspect", bb_file, "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "BackdoorBench attack_result.pt" and info["arch"] == "preact_resnet18"
    assert info["num_classes"] == 10 and info["clean_data"] == "cifar10" and info["module_prefix"] is True
    assert info["poisoned_test_images"] == 90

    torch.save(airbench.state_dict(), tmp_path / "w.pth")
    save_file(airbench.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        info = describe_path(tmp_path / name)
        assert info["num_classes_guess"] == 10 and info["tensors"] == len(airbench.state_dict())
        assert info["parameters"] == sum(v.numel() for v in airbench.state_dict().values())
    save_model(tmp_path / "folder", airbench, {"kind": "attacked", "metrics": {"acc": 0.5, "asr": 0.9},
                                               "attack": {"name": "badnets"}})
    code, out, _ = _run(capsys, "inspect", tmp_path / "folder")  # human-readable
    assert code == 0 and "airbench" in out and "badnets" in out and "asr=0.9" in out
    code, _, err = _run(capsys, "inspect", tmp_path / "nope.pt")
    _one_line_error(code, err, "not found")


def test_diverging_learning_rate_stops_and_writes_no_model(bb_file, clean_npz, tmp_path, capsys):
    code, _, err = _run(capsys, "purify", bb_file, "--clean-data", clean_npz, *FAST_OPTS,
                        "--opt", "finetune_lr=1e30", "--out", tmp_path / "o", *RUNTIME)
    _one_line_error(code, err, "lower the learning rate")
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_write_failing_half_way_leaves_no_artifact(bb_file, clean_npz, tmp_path, capsys, monkeypatch):
    import tsbd.artifacts

    def broken(file, tensors, metadata):
        with open(file, "wb") as fh:
            fh.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tsbd.artifacts, "write_safetensors", broken)
    code, _, err = _run(capsys, "purify", bb_file, "--clean-data", clean_npz, *FAST_OPTS, "--out", tmp_path / "o",
                        *RUNTIME)
    _one_line_error(code, err, "nothing was written")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin


def test_read_torch_file_admits_plain_data_only(tmp_path):
    obj = {"w": torch.ones(2), "idx": np.arange(3), "mask": np.zeros(2, dtype=bool), "name": "x", "n": [1, 2.5]}
    torch.save(obj, tmp_path / "ok.pt")
    back = read_torch_file(tmp_path / "ok.pt")
    assert torch.equal(back["w"], obj["w"]) and np.array_equal(back["idx"], obj["idx"]) and back["n"] == [1, 2.5]
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"a": _Shell(tmp_path / "pwned")}, protocol=2))
    with pytest.raises(TsbdError):
        read_torch_file(tmp_path / "legacy.pt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("payload", [_Shell, _Open])
@pytest.mark.parametrize("form", ["zip", "legacy", "protocol0", "protocol2", "protocol4", "protocol5"])
def test_a_hostile_pickle_is_named_as_hostile_in_every_format(tmp_path, payload, form, capsys):
    marker, path = tmp_path / "pwned", tmp_path / "w.pt"
    # (a bare pickle of a tensor names torch.storage._load_from_bytes, itself refused: plain numbers here)
    obj = {"w": torch.ones(2) if form in ("zip", "legacy") else [1.0, 2.0], "x": payload(marker)}
    if form in ("zip", "legacy"):
        torch.save(obj, path, _use_new_zipfile_serialization=form == "zip")
    else:
        path.write_bytes(pickle.dumps(obj, protocol=int(form[-1])))
    code, _, err = _run(capsys, "inspect", path)  # no torch warning above the line
    global_name = "posix.system" if payload is _Shell else "io.open"
    _one_line_error(code, err, f"refused: it contains {global_name} which could run code when loaded; tsbd loads "
                               "only tensors and plain containers")
    assert "corrupt" not in err and "weights_only" not in err and not marker.exists()


@pytest.mark.parametrize("form,needle", [
    ("protocol4", "uses the pickle instruction FRAME, which tsbd's safe loader does not read"),
    ("bare_pickle", "is a pickle, but not one torch.save wrote"),
    ("legacy_truncated", "is corrupt or truncated"),
    ("zip_truncated", "is corrupt or truncated"),
    ("garbage", "is corrupt or truncated"),
])
def test_a_harmless_or_damaged_pickle_is_called_what_it_is(tmp_path, form, needle, capsys):
    path = tmp_path / "w.pt"
    if form == "protocol4":  # torch's safe loader reads protocol 2, which torch.save writes
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    elif form == "bare_pickle":
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    elif form.endswith("truncated"):
        torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=form.startswith("zip"))
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(b"\x00garbage" * 50)
    code, _, err = _run(capsys, "inspect", path)
    _one_line_error(code, err, needle)
    assert "weights_only" not in err and ("refused" not in err)
