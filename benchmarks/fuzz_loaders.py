"""Mutation fuzz of everything tsbd reads from a user: checkpoints (torch.save zip and legacy files,
bare pickles, BackdoorBench ``attack_result.pt``, safetensors, a model folder's ``meta.json``) and
clean data (``.npz``, ``.npy``, class-per-folder images).

Each input is a valid (or hostile) seed file with one to four mutations: byte flips, interesting
integers over length fields, insertions, deletions, splices, truncation; and mutations that know
the format -- pickle opcodes replaced, dropped, duplicated or a code-running GLOBAL inserted, a zip
member rewritten and the archive rebuilt, a safetensors header's dtype / shape / offsets, meta.json
values, a .npy header's dtype and shape, a PNG's size with a valid checksum. Every input must end in
a model (or images), or in tsbd's one-line error (:class:`tsbd.errors.TsbdError`); anything else is
counted as a failure: another exception, a hang, a warning printed, or code run -- the hostile
seeds' ``__reduce__`` would create a canary file, which must never appear.

Inputs are derived from (seed, target, index) alone, so any failure is reproduced with
``--target T --index I``. Each input runs in a worker process watched for hangs.

    OMP_NUM_THREADS=1 python benchmarks/fuzz_loaders.py --inputs 3000 --out benchmarks/results/fuzz_loaders.json

``tests/test_fuzz_loaders.py`` runs a fast slice of the same inputs in-process.
"""

from __future__ import annotations

import argparse
import binascii
import collections
import dataclasses
import io
import json
import os
import pickle
import pickletools
import platform
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tsbd.artifacts import META, WEIGHTS, load_model, provenance, save_model, write_json_atomic
from tsbd.errors import TsbdError
from tsbd.interop import load_images, load_model_file
from tsbd.models import build_model

WIDTHS = [8, 16, 16]
INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**31, 2**63 - 1,
               2**64 - 1]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "X9", "", 7, None]
NPY_DESCRS = ["|u1", "<f4", "<f8", ">i4", "<i8", "|b1", "|O", "|V8", "|S3", "<U2", "<c16", "<M8[s]", "x", 5]


class Hang(Exception):
    """An input ran past its time limit."""


# ------------------------------------------------------------------------------------------
# payloads whose unpickling would create the canary file: if it ever exists, code ran
class _System:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


class _Exec:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (exec, (f"open({self.canary!r}, 'w').close()",))


class _Open:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return (open, (self.canary, "w"))


def _hostile_snippet(canary: Path) -> bytes:
    """Protocol-0 opcodes that call os.system(touch canary) when unpickled, for insertion anywhere."""
    return b"cos\nsystem\n(S'touch " + str(canary).encode() + b"'\ntR"


# ------------------------------------------------------------------------------------------
# mutations
def _positions(data: bytes) -> list[int]:
    """Byte offsets of the opcodes of the pickle(s) at the start of ``data``."""
    out, stream = [], io.BytesIO(data)
    for _ in range(5):
        try:
            for _op, _arg, pos in pickletools.genops(stream):
                out.append(pos)
        except Exception:  # the rest is raw bytes (legacy torch files) or damage
            break
    return out or [0]


def mutate_bytes(rng: random.Random, data: bytes, others: list[bytes], canary: Path) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(8)
    if not b:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    i = rng.randrange(len(b))
    if kind == 0:  # flip bits
        for _ in range(rng.randrange(1, 9)):
            j = rng.randrange(len(b))
            b[j] ^= 1 << rng.randrange(8)
    elif kind == 1:  # an interesting integer over whatever is there (length fields, counts, offsets)
        size = rng.choice([1, 2, 4, 8])
        value = rng.choice(INTERESTING) & ((1 << (8 * size)) - 1)
        b[i:i + size] = value.to_bytes(size, rng.choice(["little", "big"]))
    elif kind == 2:  # insert random bytes
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
    elif kind == 3:  # delete a range
        del b[i:i + rng.randrange(1, 64)]
    elif kind == 4:  # duplicate a range
        b[i:i] = b[i:i + rng.randrange(1, 256)]
    elif kind == 5:  # truncate
        del b[rng.randrange(len(b)):]
    elif kind == 6:  # splice the tail of another seed
        other = rng.choice(others) if others else data
        j = rng.randrange(len(other)) if other else 0
        b[i:] = other[j:]
    else:  # set a run of bytes to one value
        b[i:i + rng.randrange(1, 16)] = bytes([rng.choice([0, 0xFF, 0x7F, 0x80])]) * rng.randrange(1, 16)
    return bytes(b)


def mutate_pickle(rng: random.Random, data: bytes, others: list[bytes], canary: Path) -> bytes:
    pos = _positions(data)
    b = bytearray(data)
    i = rng.randrange(len(pos))
    start = pos[i]
    end = pos[i + 1] if i + 1 < len(pos) else min(len(b), start + 1)
    kind = rng.randrange(5)
    if kind == 0:  # another opcode in its place
        b[start] = ord(rng.choice(pickletools.opcodes).code)
    elif kind == 1:  # drop an opcode with its argument
        del b[start:end]
    elif kind == 2:  # do one twice
        b[start:start] = b[start:end]
    elif kind == 3:  # a call of os.system inserted between two opcodes
        b[start:start] = _hostile_snippet(canary)
    else:  # move an opcode elsewhere
        chunk = bytes(b[start:end])
        del b[start:end]
        j = rng.randrange(len(b) + 1)
        b[j:j] = chunk
    return bytes(b)


def _zip_members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info, zf.read(info)) for info in zf.infolist()]


def _zip(members: list[tuple[zipfile.ZipInfo, bytes]], compress: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info, payload in members:
            entry = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))  # not the clock: reproducible
            entry.compress_type = compress
            zf.writestr(entry, payload)
    return buf.getvalue()


def mutate_zip_member(rng: random.Random, data: bytes, others: list[bytes], canary: Path) -> bytes:
    """One member of a zip (torch.save's data.pkl or a tensor record; a .npz array) mutated, the
    archive rebuilt so the mutation reaches the reader inside."""
    try:
        members = _zip_members(data)
    except Exception:  # an earlier mutation broke the container
        return mutate_bytes(rng, data, others, canary)
    if not members:
        return data
    k = rng.randrange(len(members))
    info, payload = members[k]
    if info.filename.endswith(".pkl"):
        payload = mutate_pickle(rng, payload, others, canary) if rng.random() < 0.7 else \
            mutate_bytes(rng, payload, others, canary)
    elif info.filename.endswith(".npy"):
        payload = mutate_npy(rng, payload, others, canary)
    else:
        payload = mutate_bytes(rng, payload, others, canary)
    members[k] = (info, payload)
    if rng.random() < 0.1:
        del members[rng.randrange(len(members))]
    return _zip(members, rng.choice([zipfile.ZIP_STORED, zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 6:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return {rng.choice(["name", "num_classes", "widths", "mean", "x"]): _random_json(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return [None, True, rng.choice(INTERESTING) * rng.choice([1, -1]), rng.uniform(-1e9, 1e9),
            rng.choice(["", "x", "airbench", "preact_resnet18", "badnets", "F32", "../../etc", "\U0001f600"]),
            float("nan"), None, None, [[[[[]]]]]][kind]


def _json_paths(obj: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _json_paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _json_paths(v, (*path, i))
    return out


def mutate_json_value(rng: random.Random, obj: Any) -> Any:
    """A random value, key or list item of ``obj`` replaced, removed or nested deeply."""
    paths = [p for p in _json_paths(obj) if p]
    if not paths:
        return _random_json(rng)
    path = rng.choice(paths)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    kind = rng.randrange(4)
    if kind == 0:
        parent[path[-1]] = _random_json(rng)
    elif kind == 1:
        del parent[path[-1]]
    elif kind == 2:
        nested: Any = parent[path[-1]]
        for _ in range(rng.choice([2, 50, 900])):
            nested = [nested]
        parent[path[-1]] = nested
    else:
        parent[path[-1]] = rng.choice([-1, 0, 10**30, "1", [1, 2], {"a": 1}, None])
    return obj


def mutate_meta_json(rng: random.Random, data: bytes, others: list[bytes], canary: Path) -> bytes:
    if rng.random() < 0.05:  # nested deeper than a recursive parser goes
        depth = rng.choice([1000, 100_000])
        return b'{"format": "tsbd-model", "arch": ' + b"[" * depth + b"]" * depth + b"}"
    try:
        obj = json.loads(data)
    except Exception:
        return mutate_bytes(rng, data, others, canary)
    try:
        return json.dumps(mutate_json_value(rng, obj)).encode()
    except (RecursionError, ValueError):
        return data


def mutate_safetensors_header(rng: random.Random, data: bytes, others: list[bytes], canary: Path) -> bytes:
    """The JSON header's dtypes, shapes and data offsets, and the header length in front of it."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        body = data[8 + n:]
    except Exception:
        return mutate_bytes(rng, data, others, canary)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.randrange(7)
    if names and kind == 0:
        header[rng.choice(names)]["dtype"] = rng.choice(DTYPES)
    elif names and kind == 1:
        header[rng.choice(names)]["shape"] = rng.choice([[], [0], [-1], [2**40, 2**40], [1] * 40, ["a"], None,
                                                         [rng.randrange(1, 100) for _ in range(rng.randrange(5))]])
    elif names and kind == 2:
        a, b = rng.choice(INTERESTING), rng.choice(INTERESTING)
        header[rng.choice(names)]["data_offsets"] = rng.choice([[a, b], [b, a], [0, len(body) + 8], [a], None])
    elif kind == 3:
        header = mutate_json_value(rng, header)
    elif kind == 4:
        header["__metadata__"] = _random_json(rng)
    elif kind == 5:  # a header length that disagrees with the header
        return struct.pack("<Q", rng.choice(INTERESTING)) + data[8:]
    else:
        body = mutate_bytes(rng, body, others, canary)
    try:
        text = json.dumps(header).encode()
    except (RecursionError, ValueError):
        return data
    return struct.pack("<Q", len(text)) + text + body


def mutate_npy(rng: random.Random, data: bytes, others: list[bytes], canary: Path) -> bytes:
    """A .npy's header dict (dtype, shape, order) rewritten, or its bytes mutated."""
    if rng.random() < 0.4 or not data.startswith(b"\x93NUMPY"):
        return mutate_bytes(rng, data, others, canary)
    major = data[6]
    hlen_size = 2 if major == 1 else 4
    (hlen,) = struct.unpack("<H" if hlen_size == 2 else "<I", data[8:8 + hlen_size])
    start = 8 + hlen_size
    body = data[start + hlen:]
    descr = rng.choice(NPY_DESCRS)
    shape = rng.choice([(), (0,), (-1, 3), (2**40,), (2**62, 2**62), (16, 32, 32, 3), (16, 3, 32, 32), (16,),
                        (3, 2, 1, 2, 1), tuple(rng.randrange(1, 40) for _ in range(rng.randrange(1, 5)))])
    order = rng.choice(["False", "True", "1"])
    header = f"{{'descr': {descr!r}, 'fortran_order': {order}, 'shape': {shape!r}, }}"
    if rng.random() < 0.2:
        header = rng.choice(["{", "__import__('os').system('touch " + str(canary) + "')", "{'descr': '|u1'}",
                             "[1, 2]", "{'descr': '|u1', 'fortran_order': False, 'shape': (1,), 'x': " +
                             "(" * 1000 + ")" * 1000 + "}"])
    text = header.encode("latin1") + b"\n"
    return data[:8] + struct.pack("<H" if hlen_size == 2 else "<I", len(text)) + text + body


def mutate_png_size(rng: random.Random, data: bytes, others: list[bytes], canary: Path) -> bytes:
    """A PNG's width and height changed with a valid checksum: sizes PIL must refuse, not decode."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return mutate_bytes(rng, data, others, canary)
    w, h = rng.choice([(0, 0), (1, 2**31 - 1), (2**16, 2**16), (12000, 12000), (9500, 9500), (32, 33), (1, 1)])
    ihdr = b"IHDR" + struct.pack(">II", w, h) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", binascii.crc32(ihdr)) + data[33:]


def _one_storage(state: dict) -> dict:
    """``state`` as float32 views of one storage (a legacy file then names one storage)."""
    flat = torch.cat([v.detach().float().flatten() for v in state.values()])
    out, at = {}, 0
    for k, v in state.items():
        out[k] = flat[at:at + v.numel()].view(v.shape)
        at += v.numel()
    return out


def _stable_storage_keys(data: bytes) -> bytes:
    """A legacy torch.save file with its storage keys (memory addresses, different in every process)
    renamed 0, 1, ... at the same length, so that an input index means the same bytes in every run
    (with one storage, whose place in the file does not depend on the address)."""
    stream = io.BytesIO(data)
    for _ in range(4):  # magic number, protocol, system info, the object
        for _op in pickletools.genops(stream):
            pass
    keys = [arg for op, arg, _ in pickletools.genops(stream) if isinstance(arg, str)]  # the storage keys
    head, tail = data[:stream.tell()], data[stream.tell():]
    for i, key in enumerate(keys):
        head = head.replace(key.encode(), str(i).zfill(len(key)).encode())
    return head + tail


# ------------------------------------------------------------------------------------------
# targets: seeds, how an input is put on disk, and the loader it is fed to
@dataclasses.dataclass
class Target:
    name: str
    seeds: list[bytes]
    mutators: list[Callable]
    place: Callable[[Path, bytes], Path]  # writes the input under a scratch folder, returns what to load
    load: Callable[[Path], Any]


def _file(suffix: str) -> Callable[[Path, bytes], Path]:
    def place(scratch: Path, data: bytes) -> Path:
        path = scratch / f"input{suffix}"
        path.write_bytes(data)
        return path
    return place


def _image(size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _encoded(fmt: str, seed: int) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(_image(seed=seed))
    img = img.convert("P") if fmt == "GIF" else img
    img.save(buf, format=fmt)
    return buf.getvalue()


class Fuzzer:
    """The seeds (built once in ``work``) and the deterministic inputs derived from them."""

    def __init__(self, work: Path, seed: int = 0, canary: Path | None = None):
        self.work = Path(work)
        self.seed = seed
        # a fixed path (not in ``work``): it is written into the hostile seeds, which must be the
        # same bytes in every run for an index to mean the same input
        self.canary = Path(canary or Path(tempfile.gettempdir()) / "tsbd-fuzz-canary")
        self.scratch = self.work / "scratch"
        self.scratch.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        net = build_model("airbench", 10, widths=WIDTHS).eval()
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        bb_net = build_model("preact_resnet18", 10, width=4).eval()
        self.model_folder = self.work / "model"
        if not self.model_folder.exists():
            save_model(self.model_folder, net, {"kind": "attacked", "dataset": {"name": "demo"},
                                                "provenance": {"created": "fixed, for reproducible inputs"}})
        meta_seed = (self.model_folder / META).read_bytes()
        self.targets = {t.name: t for t in self._targets(state, bb_net, meta_seed)}

    def _targets(self, state, bb_net, meta_seed) -> list[Target]:
        from safetensors.torch import save as save_safetensors

        canary = self.canary

        def torch_bytes(obj, legacy=False) -> bytes:
            buf = io.BytesIO()
            torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
            return _stable_storage_keys(buf.getvalue()) if legacy else buf.getvalue()

        hostile = [_System(canary), _Exec(canary), _Open(canary)]
        state_seeds = [torch_bytes(state), torch_bytes({"state_dict": state, "epoch": 3}),
                       torch_bytes({f"module.{k}": v for k, v in state.items()}),
                       torch_bytes({**state, "extra": hostile[0]}), torch_bytes([hostile[1]])]
        shared = _one_storage(state)  # legacy files name storages by memory address: one storage, one name
        legacy_seeds = [torch_bytes(shared, legacy=True), torch_bytes({**shared, "x": hostile[2]}, legacy=True)]
        pickle_seeds = [pickle.dumps({"a": hostile[i % 3], "n": [1, 2.5]}, protocol=p) for i, p in enumerate((0, 2, 4))]
        pickle_seeds.append(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
        # BackdoorBench's attack_result.pt (v1 layout, as tsbd.interop.save_backdoorbench writes it)
        bd_x = torch.from_numpy(np.stack([_image(seed=i) for i in range(4)])).permute(0, 3, 1, 2).float()
        bb_seeds = [torch_bytes({"model_name": "preactresnet18", "num_classes": 10,
                                 "model": {f"module.{k}": v.contiguous() for k, v in bb_net.state_dict().items()},
                                 "data_path": "./data/cifar10", "img_size": [32, 32, 3], "clean_data": "cifar10",
                                 "bd_train": None, "bd_test": {"x": bd_x, "y": torch.zeros(4).long(),
                                                               "original_targets": torch.arange(4),
                                                               "original_index": np.arange(4)}})]
        x = np.stack([_image(seed=i) for i in range(12)])
        y = np.arange(12) % 3
        npz_seeds = []
        for save in (np.savez, np.savez_compressed):
            buf = io.BytesIO()
            save(buf, x=x, y=y, x_test=x[:4], y_test=y[:4])
            npz_seeds.append(buf.getvalue())
        buf = io.BytesIO()
        np.savez(buf, images=x.astype(np.float32) / 255, labels=y)
        npz_seeds.append(buf.getvalue())
        npy_buf = io.BytesIO()
        np.save(npy_buf, x)
        np.save(self.work / "labels.npy", y)
        image_seeds = [_encoded(fmt, i) for i, fmt in enumerate(("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"))]
        sd_kwargs = {"arch": "airbench", "options": {"widths": WIDTHS}}
        zip_mutators = [mutate_bytes, mutate_zip_member, mutate_zip_member]
        return [
            Target("torch_zip", state_seeds, zip_mutators, _file(".pt"), lambda p: load_model_file(p, **sd_kwargs)),
            Target("torch_legacy", legacy_seeds, [mutate_bytes, mutate_pickle], _file(".pth"),
                   lambda p: load_model_file(p, **sd_kwargs)),
            Target("pickle", pickle_seeds, [mutate_bytes, mutate_pickle, mutate_pickle], _file(".pt"),
                   lambda p: load_model_file(p, **sd_kwargs)),
            Target("backdoorbench", bb_seeds, zip_mutators, _file(".pt"), load_model_file),
            Target("safetensors", [save_safetensors(state, metadata={"format": "pt"})],
                   [mutate_bytes, mutate_safetensors_header, mutate_safetensors_header], _file(".safetensors"),
                   lambda p: load_model_file(p, **sd_kwargs)),
            Target("meta_json", [meta_seed], [mutate_bytes, mutate_meta_json, mutate_meta_json], self._meta_folder,
                   load_model),
            Target("npz", npz_seeds, [mutate_bytes, mutate_zip_member, mutate_zip_member], _file(".npz"),
                   load_images),
            Target("npy", [npy_buf.getvalue()], [mutate_bytes, mutate_npy, mutate_npy], _file(".npy"),
                   lambda p: load_images(p, labels=self.work / "labels.npy")),
            Target("image_folder", image_seeds, [mutate_bytes, mutate_bytes, mutate_png_size], self._image_folder,
                   lambda p: load_images(p, image_size=32)),
        ]

    def _meta_folder(self, scratch: Path, data: bytes) -> Path:
        folder = scratch / "model"
        folder.mkdir()
        shutil.copyfile(self.model_folder / WEIGHTS, folder / WEIGHTS)
        (folder / META).write_bytes(data)
        return folder

    def _image_folder(self, scratch: Path, data: bytes) -> Path:
        root = scratch / "images"
        for name in ("a", "b"):
            (root / name).mkdir(parents=True)
        (root / "b" / "ok.png").write_bytes(_encoded("PNG", 99))
        suffix = {b"\x89P": ".png", b"\xff\xd8": ".jpg", b"BM": ".bmp", b"GI": ".gif", b"II": ".tif",
                  b"RI": ".webp"}.get(data[:2], ".png")
        (root / "a" / f"input{suffix}").write_bytes(data)
        return root

    def input(self, target: str, index: int) -> bytes:
        """Input ``index`` of ``target``: a seed with one to four mutations (index 0: the first seed as is)."""
        t = self.targets[target]
        rng = random.Random(f"{self.seed}:{target}:{index}")
        data = t.seeds[index % len(t.seeds)]
        if index < len(t.seeds):
            return data
        for _ in range(rng.choice([1, 1, 2, 3, 4])):
            data = rng.choice(t.mutators)(rng, data, t.seeds, self.canary)
        return data

    def place(self, target: str, index: int) -> tuple[Path, int]:
        """Input ``index`` of ``target`` on disk, in an emptied scratch folder: (what to load, its size)."""
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        data = self.input(target, index)
        return self.targets[target].place(self.scratch, data), len(data)

    def run(self, target: str, index: int, time_limit: float | None = None) -> dict:
        """Feed input ``index`` of ``target`` to its loader; its outcome class and message."""
        t = self.targets[target]
        path, size = self.place(target, index)
        outcome, message = "loaded", ""
        old = None
        if time_limit:
            old = signal.signal(signal.SIGALRM, _raise_hang)
            signal.setitimer(signal.ITIMER_REAL, time_limit)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                t.load(path)
            except TsbdError as err:
                outcome, message = "error", str(err)
            except Hang:
                outcome, message = "hang", f"over {time_limit} s"
            except Exception as err:  # the bugs this looks for
                outcome, message = f"crash:{err.__class__.__name__}", str(err).splitlines()[0][:300] if str(err) else ""
            finally:
                if time_limit:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.signal(signal.SIGALRM, old)
        warned = [f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught]
        if self.canary.exists():
            outcome, message = "code_ran", f"the canary {self.canary.name} was created"
            self.canary.unlink()
        if outcome in ("loaded", "error") and warned:
            outcome, message = "warned", warned[0]
        if outcome == "error" and "\n" in message:
            outcome = "multi_line_error"
        return {"target": target, "index": index, "outcome": outcome, "message": message, "bytes": size}


def _raise_hang(signum, frame):
    raise Hang


FAILURES = ("crash", "hang", "code_ran", "warned", "multi_line_error")


def is_failure(outcome: str) -> bool:
    return outcome.split(":")[0] in FAILURES


# ------------------------------------------------------------------------------------------
# the benchmark: inputs in a worker process, a hang killed and counted
def _worker(work: str, seed: int, time_limit: float) -> None:
    fuzzer = Fuzzer(Path(work), seed)  # the same seeds and canary as the parent's
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        target, index = line.split()
        sys.stdout.write(json.dumps(fuzzer.run(target, int(index), time_limit)) + "\n")
        sys.stdout.flush()


class Worker:
    """A fuzzing process; one that stops answering (a hang in C code) is killed and replaced."""

    def __init__(self, work: Path, seed: int, time_limit: float):
        self.args = [sys.executable, __file__, "--worker", "--work", str(work), "--seed", str(seed),
                     "--time-limit", str(time_limit)]
        self.time_limit = time_limit
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, target: str, index: int) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(f"{target} {index}\n")
        self.proc.stdin.flush()
        result: list[str] = []
        reader = _reader(self.proc.stdout, result)
        reader.join(self.time_limit * 3 + 30)
        if not result or not result[0]:
            died = self.proc.poll() is not None
            self.stop()
            return {"target": target, "index": index, "outcome": "crash:process_died" if died else "hang",
                    "message": "the worker died" if died else "no answer: killed", "bytes": 0}
        return json.loads(result[0])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _reader(stream, out: list):
    import threading

    thread = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    thread.start()
    return thread


def schedule(targets: list[str], inputs: int) -> list[tuple[str, int]]:
    """``inputs`` (target, index) pairs, the targets taken in turn."""
    return [(targets[i % len(targets)], i // len(targets)) for i in range(inputs)]


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                   platform.processor())
    except (OSError, subprocess.SubprocessError):
        cpu = platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=3000, help="inputs in all, spread over the targets in turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", default=None, help="only this target (with --index: one input, to reproduce it)")
    ap.add_argument("--index", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=20.0, help="seconds an input may take (default: 20)")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.work, args.seed, args.time_limit)
        return 0
    with tempfile.TemporaryDirectory(prefix="tsbd-fuzz-") as work:
        if args.index is not None:  # reproduce one input in this process
            result = Fuzzer(Path(work), args.seed).run(args.target, args.index, args.time_limit)
            print(json.dumps(result, indent=2))
            return 1 if is_failure(result["outcome"]) else 0
        fuzzer = Fuzzer(Path(work), args.seed)  # builds the seeds the worker reuses
        names = [args.target] if args.target else list(fuzzer.targets)
        worker = Worker(Path(work), args.seed, args.time_limit)
        t0 = time.perf_counter()
        by_target: dict[str, collections.Counter] = {n: collections.Counter() for n in names}
        failures, errors = [], collections.Counter()
        try:
            for n, (target, index) in enumerate(schedule(names, args.inputs), 1):
                res = worker.run(target, index)
                by_target[target][res["outcome"]] += 1
                if is_failure(res["outcome"]):
                    failures.append(res)
                    print(f"FAIL {target} {index}: {res['outcome']} {res['message']}", file=sys.stderr)
                elif res["outcome"] == "error":
                    errors[res["message"].split(" ", 1)[-1][:60]] += 1
                if n % 250 == 0:
                    print(f"{n}/{args.inputs} inputs, {len(failures)} failures, {time.perf_counter() - t0:.0f} s",
                          file=sys.stderr)
        finally:
            worker.stop()
        seconds = time.perf_counter() - t0
    total = collections.Counter()
    for counts in by_target.values():
        total.update(counts)
    report = {"inputs": args.inputs, "seed": args.seed, "seconds": round(seconds, 1),
              "inputs_per_second": round(args.inputs / seconds, 1), "time_limit_s": args.time_limit,
              "outcomes": dict(total), "by_target": {k: dict(v) for k, v in by_target.items()},
              "failures": failures[:50], "failure_count": len(failures),
              "common_errors": dict(errors.most_common(12)), "machine": machine(), "provenance": provenance()}
    print(json.dumps({k: report[k] for k in ("inputs", "seconds", "outcomes", "failure_count")}))
    if args.out:
        write_json_atomic(args.out, report)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
