"""Model folders round-trip; bad checkpoints give one clear error and no partial files."""

import json

import pytest
import torch

from tsbd.artifacts import load_model, save_model
from tsbd.errors import TsbdError
from tsbd.models import build_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("airbench", 10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), widths=(8, 16, 16))


def test_round_trip(tmp_path, model):
    x = torch.rand(4, 3, 32, 32)
    model.eval()
    save_model(tmp_path / "m", model, {"classes": list("abcdefghij"), "metrics": {"acc": 0.5}, "seed": 3})
    loaded, meta = load_model(tmp_path / "m")
    torch.testing.assert_close(loaded(x), model(x))
    assert meta["metrics"] == {"acc": 0.5} and meta["seed"] == 3
    assert meta["arch"]["name"] == "airbench" and meta["format_version"] == 1
    assert {"torch", "tsbd", "python"} <= set(meta["provenance"]["versions"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left


def test_overwrite_is_atomic_and_complete(tmp_path, model):
    save_model(tmp_path / "m", model, {"v": 1})
    with pytest.raises(TsbdError, match="already holds a tsbd model; pass --overwrite"):
        save_model(tmp_path / "m", model, {"v": 2})
    assert load_model(tmp_path / "m")[1]["v"] == 1
    save_model(tmp_path / "m", model, {"v": 2}, overwrite=True)
    assert load_model(tmp_path / "m")[1]["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no hidden .old-* or .tmp-* left


def test_failed_write_leaves_nothing(tmp_path, model, monkeypatch):
    import tsbd.artifacts

    def broken(file, tensors, metadata):
        with open(file, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(tsbd.artifacts, "write_safetensors", broken)
    with pytest.raises(TsbdError, match="nothing was written") as err:
        save_model(tmp_path / "m", model, {})
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights(tmp_path, model):
    save_model(tmp_path / "m", model, {})
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(TsbdError, match="corrupt or truncated") as err:
        load_model(tmp_path / "m")
    assert "\n" not in str(err.value)


def test_wrong_architecture_or_classes(tmp_path, model):
    save_model(tmp_path / "m", model, {})
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    meta["arch"]["num_classes"] = 43
    (tmp_path / "m" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TsbdError, match="does not fit this architecture"):
        load_model(tmp_path / "m")


def test_nan_weights_refused(tmp_path, model):
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    save_model(tmp_path / "m", model, {})
    with pytest.raises(TsbdError, match="NaN"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("setup", ["missing", "file", "no_meta", "bad_json"])
def test_bad_paths(tmp_path, model, setup):
    target = tmp_path / "m"
    if setup == "file":
        target.write_text("x")
    elif setup == "no_meta":
        save_model(target, model, {})
        (target / "meta.json").unlink()
    elif setup == "bad_json":
        save_model(target, model, {})
        (target / "meta.json").write_text("{not json")
    with pytest.raises(TsbdError):
        load_model(target)
