"""Data layer: registry, the embedded demo set, every reader on small trees made here, the
restricted unpickler, error messages, the decode cache, and the full archives if present."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tsbd.data import DATASETS, Dataset, load_dataset, resolve_data_root
from tsbd.data import cifar10 as cifar10_module
from tsbd.data.archive import open_jpeg_archive, write_jpeg_archive
from tsbd.data.cache import dataset_fingerprint
from tsbd.data.images import channel_stats
from tsbd.errors import TsbdError

REPO = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# sha256 of tsbd/data/assets/demo_cifar10.npz as scripts/make_demo_data.py writes it (seed 0).
DEMO_SHA256 = "5238f43ba447eaf88a145abb8026cfe446dfa55b3042a54a08a2aef80c676482"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the user's data root or writes the user's cache."""
    monkeypatch.delenv("TSBD_DATA_ROOT", raising=False)
    monkeypatch.setenv("TSBD_CACHE_DIR", str(tmp_path / "env-cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real archives: ``<repo>/../shared/data`` (as conftest); only the full-archive tests skip without it."""
    root = Path(os.environ.get("TSBD_TEST_SHARED_DATA", REPO / ".." / "shared" / "data")).resolve()
    if not (root / "cifar10.npz").is_file():
        pytest.skip(f"real data archives not found at {root}")
    return root


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _jpeg(pixels: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode if pixels.ndim == 3 else "L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _save(path: Path, pixels: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)


# ---------------------------------------------------------------- registry and demo


def test_registry_lists_all_datasets():
    assert {"cifar10", "gtsrb", "tiny-imagenet", "imagefolder", "demo"} <= set(DATASETS.names())
    for name in DATASETS.names():
        assert callable(DATASETS.get(name))


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="module")
def demo(demo_cache) -> Dataset:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TSBD_DATA_ROOT", raising=False)
        return load_dataset("demo", cache_dir=demo_cache)


def test_demo_is_a_balanced_cifar10_subset(demo):
    assert demo.name == "demo" and demo.classes == CIFAR10_CLASSES
    assert (len(demo.train), len(demo.test)) == (10_000, 2_000)
    assert demo.train.x.shape == (10_000, 3, 32, 32) and demo.test.x.shape == (2_000, 3, 32, 32)
    assert demo.train.x.dtype == torch.uint8 and demo.train.y.dtype == torch.int64
    assert torch.equal(demo.train.y.bincount(minlength=10), torch.full((10,), 1000))
    assert torch.equal(demo.test.y.bincount(minlength=10), torch.full((10,), 200))
    # Real photographs: a wide range of values, not a constant or random noise.
    assert int(demo.train.x.min()) == 0 and int(demo.train.x.max()) == 255
    assert 0.3 < demo.train.x.float().mean().item() / 255 < 0.6
    assert demo.mean == cifar10_module.MEAN and demo.std == cifar10_module.STD


def test_demo_fingerprint_is_deterministic(demo, demo_cache, monkeypatch):
    asset = Path(demo.source)
    assert hashlib.sha256(asset.read_bytes()).hexdigest() == DEMO_SHA256
    assert demo.fingerprint == dataset_fingerprint(demo.train, demo.test)
    monkeypatch.setenv("TSBD_DATA_ROOT", "/nonexistent")  # the demo ignores any data root
    again = load_dataset("demo", cache_dir=demo_cache)  # from the cache
    assert again.fingerprint == demo.fingerprint
    assert torch.equal(again.train.x, demo.train.x) and torch.equal(again.test.y, demo.test.y)


def test_demo_copies_source_jpeg_bytes(shared_data):
    demo = open_jpeg_archive(REPO / "tsbd" / "data" / "assets" / "demo_cifar10.npz")
    source = open_jpeg_archive(shared_data / "cifar10.npz")
    with np.load(demo.path) as npz:
        index = {s: npz[f"{s}_source_index"] for s in ("train", "test")}
    for split in ("train", "test"):
        assert np.array_equal(source.labels[split][index[split]], demo.labels[split])
        for i in (0, 1, len(index[split]) // 2, len(index[split]) - 1):
            assert demo.image_bytes(split, i) == source.image_bytes(split, int(index[split][i]))


# ---------------------------------------------------------------- CIFAR-10 releases


def _fake_cifar(tmp_path: Path, protocol: int = 2):
    """A tiny ``cifar-10-batches-py`` and ``-bin`` pair holding the same random images."""
    rng = _rng(1)
    batches = {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 4}
    arrays = {}
    py, binary = tmp_path / "cifar-10-batches-py", tmp_path / "cifar-10-batches-bin"
    py.mkdir(parents=True)
    binary.mkdir()
    for name, n in batches.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        arrays[name] = (data, labels)
        # Keys and strings as bytes, as the Python 2 pickles of the real release load.
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        (py / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], data], axis=1)
        (binary / f"{name}.bin").write_bytes(records.tobytes())
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_cases_per_batch": 3, b"num_vis": 3072}
    (py / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    (binary / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n\n")
    train = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    train_y = sum((arrays[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test, test_y = arrays["test_batch"][0].reshape(-1, 3, 32, 32), arrays["test_batch"][1]
    return py, binary, (train, train_y, test, test_y)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_python_release_equals_source_pixels(tmp_path, cache, protocol):
    py, _, (train, train_y, test, test_y) = _fake_cifar(tmp_path, protocol)
    ds = load_dataset("cifar10", root=tmp_path, cache_dir=cache)
    assert ds.source == str(py) and ds.classes == CIFAR10_CLASSES
    assert np.array_equal(ds.train.x.numpy(), train) and ds.train.y.tolist() == train_y
    assert np.array_equal(ds.test.x.numpy(), test) and ds.test.y.tolist() == test_y
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.247, 0.243, 0.261)


def test_cifar10_binary_release_and_root_forms(tmp_path, cache):
    py, binary, _ = _fake_cifar(tmp_path)
    from_py = load_dataset("cifar10", root=py, cache_dir=cache)  # root is the release folder itself
    from_bin = load_dataset("cifar10", root=binary, cache_dir=cache)
    assert from_bin.source == str(binary)
    assert from_bin.fingerprint == from_py.fingerprint
    assert torch.equal(from_bin.train.x, from_py.train.x) and from_bin.classes == from_py.classes


class _Shell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Open:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_Shell, _Open])
@pytest.mark.parametrize("target", ["data_batch_1", "batches.meta"])
def test_malicious_pickle_is_refused_without_side_effects(tmp_path, cache, payload, target):
    py, _, _ = _fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    (py / target).write_bytes(pickle.dumps({b"data": payload(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(TsbdError, match="refusing to unpickle") as err:
        load_dataset("cifar10", root=tmp_path, cache_dir=cache)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_corrupt_or_incomplete_python_release(tmp_path, cache):
    py, _, _ = _fake_cifar(tmp_path)
    good = (py / "data_batch_2").read_bytes()
    (py / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(TsbdError, match="corrupt or truncated"):
        load_dataset("cifar10", root=py, cache_dir=cache)
    (py / "data_batch_2").unlink()
    with pytest.raises(TsbdError, match="data_batch_2 is missing"):
        load_dataset("cifar10", root=py, cache_dir=cache)
    (py / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}))
    with pytest.raises(TsbdError, match="uint8 N x 3072"):
        load_dataset("cifar10", root=py, cache_dir=cache)
    (py / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(TsbdError, match="out of range"):
        load_dataset("cifar10", root=py, cache_dir=cache)


# ---------------------------------------------------------------- JPEG archives


def _write_archive(path: Path, n_train=20, n_test=10, classes=CIFAR10_CLASSES, **overrides) -> dict:
    rng = _rng(2)
    images = {s: [_jpeg(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
              for s, n in (("train", n_train), ("test", n_test))}
    labels = {s: [i % len(classes) for i in range(len(images[s]))] for s in images}
    for key, value in overrides.items():
        split, what = key.split("_")
        {"images": images, "labels": labels}[what][split] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jpeg_archive(path, (images["train"], labels["train"]), (images["test"], labels["test"]), classes)
    return {"images": images, "labels": labels}


def test_archive_round_trip(tmp_path, cache):
    parts = _write_archive(tmp_path / "cifar10.npz")
    ds = load_dataset("cifar10", root=tmp_path, cache_dir=cache)
    assert ds.source == str(tmp_path / "cifar10.npz") and (len(ds.train), len(ds.test)) == (20, 10)
    assert ds.train.y.tolist() == parts["labels"]["train"]
    first = np.asarray(Image.open(io.BytesIO(parts["images"]["test"][3])))
    assert np.array_equal(ds.test.x[3].permute(1, 2, 0).numpy(), first)
    assert load_dataset("cifar10", root=tmp_path / "cifar10.npz", cache_dir=cache).fingerprint == ds.fingerprint


def _gray_jpeg() -> bytes:
    return _jpeg(np.zeros((32, 32), np.uint8))


def _big_jpeg() -> bytes:
    return _jpeg(np.zeros((40, 32, 3), np.uint8))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "corrupt or truncated"),
        ("not_a_zip", "corrupt or truncated"),
        ("npy", "single .npy array"),
        ("missing_key", "lacks the array"),
        ("label", "out of range"),
        ("empty", "split .* is empty"),
        ("bad_jpeg", "not a readable image"),
        ("gray", "mode L, expected RGB"),
        ("size", "32x40, expected 32x32"),
        ("classes", "has 3 classes, expected 10"),
    ],
)
def test_archive_damage_gives_one_line_error(tmp_path, cache, damage, message):
    path = tmp_path / "cifar10.npz"
    if damage == "label":
        _write_archive(path, test_labels=[0] * 9 + [10])
    elif damage == "empty":
        _write_archive(path, test_images=[], test_labels=[])
    elif damage == "bad_jpeg":
        _write_archive(path)
        images = [open_jpeg_archive(path).image_bytes("train", i) for i in range(20)]
        images[5] = images[5][: len(images[5]) // 2]
        _write_archive(path, train_images=images)
    elif damage == "gray":
        _write_archive(path, train_images=[_gray_jpeg()] * 20)
    elif damage == "size":
        _write_archive(path, test_images=[_big_jpeg()] * 10)
    elif damage == "classes":
        _write_archive(path, classes=["a", "b", "c"], train_labels=[0] * 20, test_labels=[0] * 10)
    else:
        _write_archive(path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "not_a_zip":
        path.write_bytes(b"this is not an archive" * 100)
    elif damage == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.zeros(10, np.uint8))
    elif damage == "missing_key":
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files if k != "test_labels"}
        np.savez(path, **arrays)
    with pytest.raises(TsbdError, match=message) as err:
        load_dataset("cifar10", root=tmp_path, cache_dir=cache)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- GTSRB official layout


def _fake_gtsrb(tmp_path: Path, csv_place: str) -> tuple[Path, dict]:
    rng = _rng(3)
    gtsrb = tmp_path / "GTSRB"
    frames = {"train": [], "test": []}
    for class_id in (0, 2, 42):
        for k in range(2):
            pixels = rng.integers(0, 256, (35 + k, 41, 3), dtype=np.uint8)
            _save(gtsrb / "Final_Training" / "Images" / f"{class_id:05d}" / f"00000_{k:05d}.ppm", pixels)
            frames["train"].append((pixels, class_id))
        (gtsrb / "Final_Training" / "Images" / f"{class_id:05d}" / f"GT-{class_id:05d}.csv").write_text("x")
    images = gtsrb / "Final_Test" / "Images"
    rows = []
    for i, class_id in enumerate((5, 0, 42)):
        pixels = rng.integers(0, 256, (30, 33, 3), dtype=np.uint8)
        _save(images / f"{i:05d}.ppm", pixels)
        frames["test"].append((pixels, class_id))
        rows.append([f"{i:05d}.ppm", 33, 30, 5, 5, 25, 28, class_id])
    csv_dir = {"images": images, "final_test": gtsrb / "Final_Test", "beside": tmp_path}[csv_place]
    with open(csv_dir / "GT-final_test.csv", "w", newline="") as fh:
        writer = csv.writer(fh, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        writer.writerows(rows)
    return gtsrb, frames


def _resized(pixels: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("csv_place", ["images", "final_test", "beside"])
def test_gtsrb_official_layout(tmp_path, cache, csv_place):
    gtsrb, frames = _fake_gtsrb(tmp_path, csv_place)
    ds = load_dataset("gtsrb", root=tmp_path, cache_dir=cache)
    assert ds.source == str(gtsrb) and ds.num_classes == 43 and ds.classes[42] == "00042"
    assert ds.train.x.shape == (6, 3, 32, 32) and ds.test.x.shape == (3, 3, 32, 32)
    assert ds.train.y.tolist() == [y for _, y in frames["train"]]
    assert ds.test.y.tolist() == [5, 0, 42]
    for split, data in (("train", ds.train), ("test", ds.test)):
        for i, (pixels, _) in enumerate(frames[split]):
            assert np.array_equal(data.x[i].permute(1, 2, 0).numpy(), _resized(pixels, 32))
    assert ds.mean == (0.0, 0.0, 0.0) and ds.std == (1.0, 1.0, 1.0)


def test_gtsrb_errors(tmp_path, cache):
    gtsrb, _ = _fake_gtsrb(tmp_path, "images")
    csv_path = gtsrb / "Final_Test" / "Images" / "GT-final_test.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace(";42\n", ";43\n"))
    with pytest.raises(TsbdError, match="ClassId 43 is out of range"):
        load_dataset("gtsrb", root=gtsrb, cache_dir=cache)
    csv_path.unlink()
    with pytest.raises(TsbdError, match="GT-final_test.csv not found"):
        load_dataset("gtsrb", root=gtsrb, cache_dir=cache)
    csv_path.write_text(text)
    (gtsrb / "Final_Training" / "Images" / "00002" / "00000_00001.ppm").write_bytes(b"P6\n41 36\n255\n\x00\x01")
    with pytest.raises(TsbdError, match="cannot read image .*00000_00001.ppm"):
        load_dataset("gtsrb", root=gtsrb, cache_dir=cache)


# ---------------------------------------------------------------- Tiny ImageNet and image folders


def _fake_tiny(tmp_path: Path) -> tuple[Path, dict]:
    rng = _rng(4)
    tiny = tmp_path / "tiny-imagenet-200"
    wnids = ["n09999999", "n01443537", "n02099601"]  # not in sorted order, as in the release
    (tiny / "val" / "images").mkdir(parents=True)
    (tiny / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (tiny / "words.txt").write_text(
        "n01443537\tgoldfish, Carassius auratus\nn02099601\tgolden retriever\nn00000001\tunused\n"
    )
    files = {}
    for wnid in wnids:
        for k in range(2):
            shape = (64, 64) if (wnid, k) == ("n02099601", 1) else (64, 64, 3)  # one grayscale image
            path = tiny / "train" / wnid / "images" / f"{wnid}_{k}.JPEG"
            _save(path, rng.integers(0, 256, shape, dtype=np.uint8), format="JPEG")
            files[path] = wnid
        (tiny / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    lines = []
    for i, wnid in enumerate(["n02099601", "n09999999", "n01443537", "n02099601"]):
        path = tiny / "val" / "images" / f"val_{i}.JPEG"
        _save(path, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), format="JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (tiny / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return tiny, files


def test_tiny_imagenet_layout(tmp_path, cache):
    tiny, files = _fake_tiny(tmp_path)
    ds = load_dataset("tiny-imagenet", root=tmp_path, cache_dir=cache)
    assert ds.source == str(tiny)
    assert ds.classes == ["goldfish", "golden retriever", "n09999999"]  # sorted wnids, words.txt names
    assert ds.train.x.shape == (6, 3, 64, 64) and ds.test.x.shape == (4, 3, 64, 64)
    assert ds.train.y.tolist() == [0, 0, 1, 1, 2, 2] and ds.test.y.tolist() == [1, 2, 0, 1]
    gray = tiny / "train" / "n02099601" / "images" / "n02099601_1.JPEG"
    expected = np.asarray(Image.open(gray).convert("RGB"))
    assert np.array_equal(ds.train.x[3].permute(1, 2, 0).numpy(), expected)
    assert ds.mean == (0.4802, 0.4481, 0.3975) and ds.std == (0.2302, 0.2265, 0.2262)
    (tiny / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000042\t0\t0\t1\t1\n")
    with pytest.raises(TsbdError, match="names no class from wnids.txt"):
        load_dataset("tiny-imagenet", root=tiny, cache_dir=cache)


def _fake_folder(tmp_path: Path, test_split: str = "val") -> Path:
    rng = _rng(5)
    root = tmp_path / "flowers"
    _save(root / "train" / "tulip" / "a.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    _save(root / "train" / "tulip" / "b.jpg", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    _save(root / "train" / "rose" / "c.png", rng.integers(0, 256, (40, 40, 4), dtype=np.uint8))  # RGBA
    _save(root / "train" / "rose" / "d.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))  # grayscale
    (root / "train" / "rose" / "notes.txt").write_text("not an image")
    _save(root / test_split / "rose" / "e.bmp", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    return root


@pytest.mark.parametrize("test_split", ["val", "test"])
def test_imagefolder(tmp_path, cache, test_split):
    root = _fake_folder(tmp_path, test_split)
    ds = load_dataset("imagefolder", root=root, cache_dir=cache, size=16)
    assert ds.classes == ["rose", "tulip"] and ds.train.y.tolist() == [0, 0, 1, 1] and ds.test.y.tolist() == [0]
    assert ds.train.x.shape == (4, 3, 16, 16) and ds.test.x.shape == (1, 3, 16, 16)
    expected = _resized(np.asarray(Image.open(root / "train" / "tulip" / "a.png")), 16)
    assert np.array_equal(ds.train.x[2].permute(1, 2, 0).numpy(), expected)
    assert (ds.mean, ds.std) == channel_stats(ds.train.x)
    x = ds.train.x.double() / 255
    assert np.allclose(ds.mean, x.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    assert np.allclose(ds.std, x.std(dim=(0, 2, 3), correction=0).numpy(), atol=1e-5)
    assert load_dataset("imagefolder", root=root, cache_dir=cache).train.x.shape[-1] == 32  # default size


def test_imagefolder_errors(tmp_path, cache):
    root = _fake_folder(tmp_path)
    with pytest.raises(TsbdError, match="has no option 'colour'"):
        load_dataset("imagefolder", root=root, cache_dir=cache, colour=True)
    with pytest.raises(TsbdError, match="size must be an integer"):
        load_dataset("imagefolder", root=root, cache_dir=cache, size="big")
    _save(root / "val" / "daisy" / "f.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(TsbdError, match="daisy is a class that train/ does not have"):
        load_dataset("imagefolder", root=root, cache_dir=cache)
    (root / "val" / "daisy" / "f.png").unlink()
    (root / "val" / "daisy").rmdir()
    (root / "val" / "rose" / "e.bmp").unlink()
    with pytest.raises(TsbdError, match="holds no images"):
        load_dataset("imagefolder", root=root, cache_dir=cache)
    (root / "val" / "rose" / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(TsbdError, match="cannot read image .*e.png"):
        load_dataset("imagefolder", root=root, cache_dir=cache)
    (root / "val" / "rose" / "e.png").unlink()
    _save(root / "val" / "rose" / "e.tif", np.zeros((8, 8), np.float32))  # a float image, mode F
    with pytest.raises(TsbdError, match="image mode F"):
        load_dataset("imagefolder", root=root, cache_dir=cache)


# ---------------------------------------------------------------- data root


@pytest.mark.parametrize("name, wanted", [
    ("cifar10", "cifar10.npz"), ("gtsrb", "gtsrb.npz"), ("tiny-imagenet", "tiny-imagenet-200"),
    ("imagefolder", "train/<class>/"),
])
def test_missing_data_root_names_both_fixes(tmp_path, cache, name, wanted):
    for root in (None, tmp_path / "absent", tmp_path):  # not given, not there, there but empty
        with pytest.raises(TsbdError) as err:
            load_dataset(name, root=root, cache_dir=cache)
        message = str(err.value)
        assert "--data-root" in message and "TSBD_DATA_ROOT" in message and wanted in message, message
        assert "\n" not in message


def test_data_root_from_environment(tmp_path, cache, monkeypatch):
    _fake_cifar(tmp_path)
    monkeypatch.setenv("TSBD_DATA_ROOT", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    assert resolve_data_root(tmp_path / "x") == tmp_path / "x"  # an explicit root wins
    assert load_dataset("cifar10", cache_dir=cache).source == str(tmp_path / "cifar-10-batches-py")


def test_unknown_dataset_lists_choices():
    with pytest.raises(TsbdError, match="unknown dataset 'mnist'; choose one of: cifar10"):
        load_dataset("mnist")


# ---------------------------------------------------------------- cache


def _entry(cache: Path) -> Path:
    (entry,) = (cache / "datasets").iterdir()
    return entry


def test_cache_round_trip_and_corruption_rebuild(tmp_path, cache, monkeypatch, caplog):
    _fake_cifar(tmp_path)
    first = load_dataset("cifar10", root=tmp_path, cache_dir=cache)
    entry = _entry(cache)
    names = sorted(p.name for p in entry.iterdir())
    assert names == ["meta.json", "test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]

    real_decode = cifar10_module._decode_python

    def must_not_decode(folder):
        raise AssertionError("decoded although the cache was valid")

    monkeypatch.setattr(cifar10_module, "_decode_python", must_not_decode)
    cached = load_dataset("cifar10", root=tmp_path, cache_dir=cache)
    assert cached.fingerprint == first.fingerprint and torch.equal(cached.train.x, first.train.x)
    assert cached.classes == first.classes

    monkeypatch.setattr(cifar10_module, "_decode_python", real_decode)
    train_x = entry / "train_x.npy"
    good = train_x.read_bytes()
    for damaged in (good[: len(good) - 100], good[:-1] + bytes([good[-1] ^ 0xFF]), b""):
        train_x.write_bytes(damaged)
        with caplog.at_level(logging.WARNING, logger="tsbd.data.cache"):
            rebuilt = load_dataset("cifar10", root=tmp_path, cache_dir=cache)
        assert "ignoring corrupt cache entry" in caplog.text
        caplog.clear()
        assert rebuilt.fingerprint == first.fingerprint and torch.equal(rebuilt.train.x, first.train.x)
        assert train_x.read_bytes() == good  # the entry was rewritten
    (entry / "meta.json").write_text("{not json")
    assert load_dataset("cifar10", root=tmp_path, cache_dir=cache).fingerprint == first.fingerprint
    assert not [p for p in entry.iterdir() if p.name.endswith(".tmp")]


def test_cache_key_follows_the_source(tmp_path, cache):
    py, _, _ = _fake_cifar(tmp_path)
    load_dataset("cifar10", root=tmp_path, cache_dir=cache)
    batch = py / "test_batch"
    os.utime(batch, ns=(batch.stat().st_atime_ns, batch.stat().st_mtime_ns + 10**9))
    load_dataset("cifar10", root=tmp_path, cache_dir=cache)
    assert len(list((cache / "datasets").iterdir())) == 2


def test_unwritable_cache_still_loads(tmp_path):
    _fake_cifar(tmp_path)
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    ds = load_dataset("cifar10", root=tmp_path, cache_dir=blocker / "cache")
    assert len(ds.train) == 15


# ---------------------------------------------------------------- the full archives


@pytest.mark.slow
def test_full_cifar10_archive(shared_data, tmp_path):
    ds = load_dataset("cifar10", root=shared_data, cache_dir=tmp_path / "cache")
    assert ds.source == str(shared_data / "cifar10.npz") and ds.classes == CIFAR10_CLASSES
    assert ds.train.x.shape == (50_000, 3, 32, 32) and ds.test.x.shape == (10_000, 3, 32, 32)
    assert torch.equal(ds.train.y.bincount(), torch.full((10,), 5000))
    assert torch.equal(ds.test.y.bincount(), torch.full((10,), 1000))
    cached = load_dataset("cifar10", root=shared_data, cache_dir=tmp_path / "cache")
    assert cached.fingerprint == ds.fingerprint and torch.equal(cached.test.x, ds.test.x)


def test_full_gtsrb_archive(shared_data):
    # Structure only (no decode, to keep the suite fast); decoding is the path the cifar10 test covers.
    archive = open_jpeg_archive(shared_data / "gtsrb.npz", num_classes=43)
    assert (len(archive.labels["train"]), len(archive.labels["test"])) == (39_209, 12_630)
    assert set(np.unique(archive.labels["test"]).tolist()) == set(range(43))
    image = Image.open(io.BytesIO(archive.image_bytes("test", 0)))
    assert (image.mode, image.size) == ("RGB", (32, 32))
