"""A fast slice of the loader fuzz (benchmarks/fuzz_loaders.py): about a hundred mutated checkpoints,
model folders and data files, each of which must load or end in tsbd's one-line error -- never
another exception, a hang, a printed warning or code run (a hostile seed would create a canary file)."""

from __future__ import annotations

import importlib.util
import json
import pickle
import re
import shutil
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tsbd.cli import main
from tsbd.errors import TsbdError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_loaders.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_loaders", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzzer(fuzz, tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    return fuzz.Fuzzer(work, seed=0, canary=work / "CANARY")  # this run's own canary


def test_the_canary_catches_code_that_runs(fuzzer):
    """The oracle works: unpickling a hostile seed with plain pickle creates the canary; tsbd does not."""
    hostile = fuzzer.targets["pickle"].seeds[1]  # protocol 2, os.system("touch CANARY")
    pickle.loads(hostile)
    assert fuzzer.canary.exists()
    fuzzer.canary.unlink()
    result = fuzzer.run("pickle", 1, time_limit=30)
    assert result["outcome"] == "error" and "could run code" in result["message"] and not fuzzer.canary.exists()


def test_every_seed_loads_or_is_refused(fuzzer, fuzz):
    for name, target in fuzzer.targets.items():
        for index in range(len(target.seeds)):
            result = fuzzer.run(name, index, time_limit=30)
            assert result["outcome"] in ("loaded", "error"), result


def test_a_slice_of_the_fuzz_ends_in_a_model_or_one_line(fuzzer, fuzz):
    results = [fuzzer.run(target, index, time_limit=30)
               for target, index in fuzz.schedule(list(fuzzer.targets), 108)]
    failures = [r for r in results if fuzz.is_failure(r["outcome"])]
    assert not failures, failures
    outcomes = {r["outcome"] for r in results}
    assert outcomes == {"loaded", "error"}  # the mutations reach both ends


def test_mutated_inputs_through_the_cli_are_one_line(fuzzer, capsys):
    """What the user sees for refused inputs: exactly one `tsbd: error:` line, exit 2."""
    for target in ("torch_zip", "torch_legacy", "pickle", "safetensors", "meta_json"):
        seeds = len(fuzzer.targets[target].seeds)
        index = next(i for i in range(seeds, seeds + 50) if fuzzer.run(target, i)["outcome"] == "error")
        path, _ = fuzzer.place(target, index)
        # inspect describes a folder without building its model; eval builds it
        code = main(["eval" if target == "meta_json" else "inspect", str(path)])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("tsbd: error:"), (target, index, lines)


def _npz_with_member(path: Path, name: str, payload: bytes) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(name, payload)
        zf.writestr("y.npy", _npy_bytes(np.arange(4)))
    return path


def _npy_bytes(array) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _npy_header(header: str) -> bytes:
    text = header.encode("latin1") + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


@pytest.mark.parametrize("case,needle", [
    ("meta_nested", "is corrupt (RecursionError)"),
    ("meta_no_arch", "has no architecture record ('arch')"),
    ("meta_version", "has the format version 'x', not a number"),
    ("meta_huge_arch", "does not fit this architecture"),  # checked before a 38 GB model is allocated
    ("npz_not_zip", "is corrupt or not a .npz file (BadZipFile"),
    ("npz_bad_header", "is corrupt or not a .npz file"),
    ("npz_huge_shape", "declares an array too large to load"),
    ("npz_one_array", "holds one array, not a .npz archive"),
    ("npy_bad_header", "is corrupt or not a .npy file"),
    ("png_bomb", "cannot read image"),
])
def test_findings_of_the_fuzz_are_one_line_errors(tmp_path, fuzzer, case, needle, capsys):
    """What the fuzz found raising other exceptions (or printing PIL's warning), kept as regression tests."""
    from tsbd.artifacts import load_model
    from tsbd.interop import load_images

    if case.startswith("meta"):
        folder = tmp_path / "model"
        shutil.copytree(fuzzer.model_folder, folder)
        meta = json.loads((folder / "meta.json").read_text())
        if case == "meta_nested":
            text = '{"format": "tsbd-model", "arch": ' + "[" * 100_000 + "]" * 100_000 + "}"
        elif case == "meta_no_arch":
            text = json.dumps({k: v for k, v in meta.items() if k != "arch"})
        elif case == "meta_huge_arch":
            text = json.dumps({**meta, "arch": {**meta["arch"], "widths": [8, 16, 2**20]}})
        else:
            text = json.dumps({**meta, "format_version": "x"})
        (folder / "meta.json").write_text(text)
        load = lambda: load_model(folder)  # noqa: E731
    elif case == "png_bomb":  # a PNG whose header claims 12000 x 12000 pixels (checksum valid)
        import binascii

        folder = tmp_path / "imgs" / "a"
        folder.mkdir(parents=True)
        ihdr = b"IHDR" + struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0)
        png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", binascii.crc32(ihdr))
        (folder / "x.png").write_bytes(png + b"\x00" * 64)
        load = lambda: load_images(tmp_path / "imgs")  # noqa: E731
    elif case == "npy_bad_header":
        (tmp_path / "x.npy").write_bytes(_npy_header("{"))
        np.save(tmp_path / "y.npy", np.arange(4))
        load = lambda: load_images(tmp_path / "x.npy", labels=tmp_path / "y.npy")  # noqa: E731
    else:
        path = tmp_path / "clean.npz"
        if case == "npz_not_zip":
            path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
        elif case == "npz_bad_header":
            _npz_with_member(path, "x.npy", _npy_header("{"))
        elif case == "npz_huge_shape":
            _npz_with_member(path, "x.npy", _npy_header("{'descr': '<U2', 'fortran_order': False, "
                                                        "'shape': (1099511627776,), }"))
        else:
            with open(path, "wb") as fh:
                np.save(fh, np.zeros((4, 32, 32, 3), np.uint8))
        load = lambda: load_images(path)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing printed above the line
        with pytest.raises(TsbdError, match=re.escape(needle)) as err:
            load()
    assert "\n" not in str(err.value)
