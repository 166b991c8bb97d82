"""Output paths: no tsbd command deletes or replaces what the user owns. A destination that is not
new, empty or tsbd's own earlier output is refused with one line before any work; tsbd's own
output is replaced only with --overwrite; an unwritable destination is named before any work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_grid

from tsbd.artifacts import check_model_output, check_output_folder, is_model_folder, load_model, save_model
from tsbd.cli import main
from tsbd.errors import TsbdError
from tsbd.models import build_model

RUNTIME = ["--device", "cpu", "--precision", "fp32", "--threads", "1", "--quiet"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("airbench", 10, widths=(8, 16, 16))


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("months of work")
    (path / "figures").mkdir()
    (path / "figures" / "plot.png").write_bytes(b"\x89PNG user data")
    return path


def _one_line_error(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("tsbd: error:"), err
    assert needle in lines[0], lines[0]


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write to: a chmod 555 folder, or /sys where root ignores the mode."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    candidates = [folder, Path("/sys")]
    try:
        for candidate in candidates:
            try:
                os.rmdir(tempfile.mkdtemp(dir=candidate))
            except OSError:
                yield candidate
                return
        pytest.skip("no unwritable folder on this machine")
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------------------------------
# the library: what may be replaced, and how
def test_is_model_folder_is_exactly_what_save_model_writes(tmp_path, model):
    save_model(tmp_path / "m", model, {})
    assert is_model_folder(tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("mine")
    assert not is_model_folder(tmp_path / "m")  # something added: no longer only tsbd's
    (tmp_path / "m" / "notes.txt").unlink()
    (tmp_path / "m" / "meta.json").write_text('{"format": "other"}')
    assert not is_model_folder(tmp_path / "m")
    assert not is_model_folder(tmp_path / "nope") and not is_model_folder(tmp_path / "m" / "meta.json")


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_model_never_replaces_a_users_folder_or_file(tmp_path, model, overwrite):
    folder = _users_folder(tmp_path / "out")
    before = _tree(tmp_path)
    with pytest.raises(TsbdError, match="other contents") as err:
        save_model(folder, model, {}, overwrite=overwrite)
    assert "\n" not in str(err.value)
    (tmp_path / "file").write_text("user file")
    with pytest.raises(TsbdError, match="is an existing file"):
        save_model(tmp_path / "file", model, {}, overwrite=overwrite)
    assert _tree(tmp_path) == {**before, "file": b"user file"}  # untouched, no hidden .old-* / .tmp-* files
    (tmp_path / "link").symlink_to(folder)
    with pytest.raises(TsbdError, match="symbolic link"):
        save_model(tmp_path / "link", model, {}, overwrite=overwrite)
    # a tsbd model folder the user added a file to is the user's now
    save_model(tmp_path / "m", model, {})
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(TsbdError, match="other contents"):
        save_model(tmp_path / "m", model, {}, overwrite=overwrite)
    assert (tmp_path / "m" / "notes.txt").read_text() == "mine"


def test_save_model_writes_into_an_empty_folder(tmp_path, model):
    (tmp_path / "m").mkdir()
    save_model(tmp_path / "m", model, {"v": 1})
    assert load_model(tmp_path / "m")[1]["v"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_unwritable_destination_is_named_before_any_work(read_only_dir, model):
    for check in (lambda p: check_model_output(p), lambda p: check_output_folder(p, ("result.json",))):
        with pytest.raises(TsbdError, match="cannot write to") as err:
            check(read_only_dir / "new" / "out")
        assert str(read_only_dir) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TsbdError, match="cannot write to"):
        save_model(read_only_dir / "m", model, {})


def test_check_output_folder(tmp_path):
    mine = _users_folder(tmp_path / "mine")
    with pytest.raises(TsbdError, match="other contents"):  # not an earlier output: never written into
        check_output_folder(mine, ("result.json", "section.md"), overwrite=True)
    check_output_folder(mine, ("a.png",), shared=True)  # shared: other files stay, none clashes
    (mine / "a.png").write_bytes(b"x")
    with pytest.raises(TsbdError, match="already holds a.png from an earlier run; pass --overwrite"):
        check_output_folder(mine, ("a.png", "a.svg"), shared=True)
    check_output_folder(mine, ("a.png",), shared=True, overwrite=True)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "result.json").write_text("{}")
    (earlier / "nwc.csv").write_text("x")
    with pytest.raises(TsbdError, match="already holds result.json"):
        check_output_folder(earlier, ("result.json", "section.md"))
    check_output_folder(earlier, ("result.json", "section.md"), overwrite=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(TsbdError, match="is a file"):
        check_output_folder(tmp_path / "f", ("result.json",))
    assert _tree(mine)["thesis.tex"] == b"months of work"


# ------------------------------------------------------------------------------------------
# every command that writes: refused before any work, nothing touched
@pytest.fixture
def tiny_demo(demo, monkeypatch):
    limited = demo.limited(300, 100)
    monkeypatch.setattr("tsbd.data.load_dataset", lambda *a, **k: limited)
    return limited


TINY_ATTACK = ["--epochs", "1", "--model-opt", "widths=[8,16,16]", "--train-opt", "batch_size=100"]


def _argv(command: str, out: Path, tmp_path: Path) -> list[str]:
    nowhere = str(tmp_path / "no-such-model")
    return {
        "attack": ["attack", *TINY_ATTACK, "--out", str(out)],
        "defend": ["defend", nowhere, "--out", str(out)],
        "purify": ["purify", nowhere + ".pt", "--clean-data", "demo", "--out", str(out)],
        "demo": ["demo", "--epochs", "1", "--out", str(out)],
        "show-attack": ["show-attack", "--images", "2", "--out", str(out)],
        "analyze": ["analyze", "observation1", nowhere, "--out", str(out)],
        "report": ["report", nowhere, "--out", str(out)],
        "bench": ["bench", str(write_tiny_grid(tmp_path, attacks=["badnets"], defenses=["none"])), "--results",
                  str(out)],
        "merge": ["merge", nowhere, "--into", str(out)],
    }[command] + RUNTIME * (command not in ("report", "merge"))


@pytest.mark.parametrize("command,needle", [
    ("attack", "other contents"), ("defend", "other contents"), ("purify", "other contents"),
    ("demo", "other contents"), ("show-attack", "already holds badnets.png"), ("analyze", "other contents"),
    ("report", "other contents"), ("bench", "other contents"), ("merge", "other contents"),
])
def test_a_users_folder_is_refused_before_any_work(command, needle, tmp_path, tiny_demo, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = _users_folder(tmp_path / "out")
    if command == "demo":  # demo writes OUT/backdoored and OUT/purified
        _users_folder(out / "backdoored")
    if command == "show-attack":
        (out / "badnets.png").write_bytes(b"the user's own picture")
    before = _tree(out)
    code = main(_argv(command, out, tmp_path))
    _one_line_error(code, capsys.readouterr().err, needle)
    assert _tree(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no hidden leftovers


def test_attack_onto_an_existing_file_is_refused(tmp_path, tiny_demo, capsys):
    (tmp_path / "out").write_text("user file")
    code = main(["attack", *TINY_ATTACK, "--out", str(tmp_path / "out"), *RUNTIME])
    _one_line_error(code, capsys.readouterr().err, "is an existing file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (tmp_path / "out").read_text() == "user file"


@pytest.mark.parametrize("command", ["attack", "defend", "purify", "demo", "show-attack", "analyze", "report",
                                     "bench", "merge"])
def test_an_unwritable_destination_is_one_line_before_any_work(command, read_only_dir, tmp_path, tiny_demo, capsys,
                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(_argv(command, read_only_dir / "out", tmp_path))
    _one_line_error(code, capsys.readouterr().err, "cannot write to")


def test_attack_replaces_its_own_model_only_with_overwrite(tmp_path, tiny_demo, capsys):
    out = tmp_path / "bd"
    assert main(["attack", *TINY_ATTACK, "--out", str(out), *RUNTIME]) == 0
    first = _tree(out)
    code = main(["attack", *TINY_ATTACK, "--seed", "1", "--out", str(out), *RUNTIME])
    _one_line_error(code, capsys.readouterr().err, "already holds a tsbd model; pass --overwrite")
    assert _tree(out) == first
    assert main(["attack", *TINY_ATTACK, "--seed", "1", "--out", str(out), "--overwrite", *RUNTIME]) == 0
    assert load_model(out)[1]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bd"]  # no .old-*, no resume checkpoint
