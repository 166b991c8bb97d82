"""Model files from elsewhere: BackdoorBench ``attack_result.pt``, plain PyTorch state dicts
(``.pt``/``.pth``), safetensors, and tsbd's own model folders.

PyTorch files are pickles. :func:`read_torch_file` first lists the globals the pickle would
import (by reading its opcodes, without running it) and refuses any outside an allow-list of
tensors, plain containers and numeric numpy arrays; only then does it call
``torch.load(weights_only=True)``, PyTorch's own restricted unpickler, with that allow-list. A
pickle whose ``__reduce__`` names ``os.system`` or ``builtins.eval`` is refused before anything
in it is called.

BackdoorBench (SCLBD/BackdoorBench ``utils/save_load_attack.py``) saves ``torch.save({'model_name',
'num_classes', 'model': state_dict, 'data_path', 'img_size', 'clean_data', 'bd_train', 'bd_test'})``.
Its ``preactresnet18`` and ``vgg19_bn`` are tsbd's ``preact_resnet18`` and ``vgg19_bn`` with the
same parameter names, so the weights load with ``strict=True`` after a ``module.`` prefix
(DataParallel) is dropped. BackdoorBench normalizes images in its data transform; the imported
model gets that data set's mean and std inside, so it takes [0, 1] images like every tsbd model.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import dataclasses
import logging
import mmap
import os
import pickle
import pickletools
import re
import struct
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tsbd.artifacts import load_into, load_model, load_state, recorded_dataset
from tsbd.data.poison import PoisonedTest
from tsbd.errors import TsbdError
from tsbd.interop.architectures import NormalizedModel, build_from_factory, is_factory_spec

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# BackdoorBench model names (utils/aggregate_block/model_trainer_generate.py) -> tsbd architectures.
BACKDOORBENCH_ARCHS = {"preactresnet18": "preact_resnet18", "preact_resnet18": "preact_resnet18",
                       "vgg19_bn": "vgg19_bn"}
# BackdoorBench's per-data-set normalization (utils/aggregate_block/dataset_and_transform_generate.py,
# get_dataset_normalization); its models see (x - mean) / std.
BACKDOORBENCH_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "celeba": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# BackdoorBench data set names -> tsbd data sets (for `--clean-data` defaults and `tsbd inspect`).
BACKDOORBENCH_DATASETS = {"cifar10": "cifar10", "gtsrb": "gtsrb", "tiny": "tiny-imagenet"}


# ------------------------------------------------------------------------------------------
# reading pickles safely
def _numpy_globals() -> dict[str, Any]:
    """Globals a pickled numeric numpy array needs, by the names numpy 1.x and 2.x write."""
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for func in ("_reconstruct", "scalar"):
        obj = None
        for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
            try:
                obj = obj or getattr(__import__(mod, fromlist=[func]), func)
            except (ImportError, AttributeError):
                continue
        if obj is not None:
            out.update({f"numpy._core.multiarray.{func}": obj, f"numpy.core.multiarray.{func}": obj})
    for code in "?bBhHiIlLqQefdgFDGUSV":  # numeric, string and void dtypes (never object "O")
        cls = type(np.dtype(code))
        out[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return out


NUMPY_GLOBALS = _numpy_globals()


def _safe_globals() -> list:
    return [(obj, name) for name, obj in NUMPY_GLOBALS.items()]


def _admitted_globals() -> set[str] | None:
    """The globals a file may name: those torch's weights-only unpickler builds, and numeric numpy
    arrays'; None where this torch does not list its own (its unpickler alone decides then)."""
    try:
        from torch import _weights_only_unpickler as wou

        return set(wou._get_allowed_globals()) | set(NUMPY_GLOBALS)
    except (ImportError, AttributeError):
        return None


@dataclasses.dataclass
class PickleScan:
    """What a file's pickle opcodes say, read without running any of them."""

    globals: list[str]  # module.name of every global the pickles would import, in order
    pickles: int = 0  # pickles read to their STOP
    malformed: str | None = None  # why the opcodes could not be read to a pickle's end (damage), else None
    torchscript: bool = False  # a torch.jit.save archive, not a torch.save file


_STRING_OPCODES = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                   "BINUNICODE8"}
_SCAN_ERRORS = (ValueError, EOFError, struct.error, OverflowError, MemoryError, zlib.error, zipfile.BadZipFile,
                NotImplementedError, OSError, KeyError)


def _global_name(module: Any, name: Any) -> str:
    """``module.name`` as Python 3 imports it (protocol 2 files say ``__builtin__``, ``copy_reg``)."""
    if not isinstance(module, str) or not isinstance(name, str):
        return "a global named at load time"
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    full = f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"
    return full if re.fullmatch(r"[\w.]{1,200}", full) else ascii(full)[:80]  # a damaged name, shown escaped


def _scan_opcodes(stream: Any, found: list[str], max_pickles: int) -> tuple[int, str | None]:
    """Add the globals of up to ``max_pickles`` consecutive pickles in ``stream`` to ``found``, running
    nothing (``pickletools.genops``). Returns (pickles read to their STOP, why the stream broke off inside
    a pickle or is no pickle at all, else None). STACK_GLOBAL's names are followed through the stack
    and the memo as far as they are plain strings."""
    for index in range(max_pickles):
        pushed: list[Any] = []  # recently pushed values: a string, or None for anything else
        memo: dict[Any, Any] = {}
        started = False
        try:
            for op, arg, _pos in pickletools.genops(stream):
                started = True
                if op.name in ("GLOBAL", "INST"):
                    module, _, name = str(arg).partition(" ")
                    found.append(_global_name(module, name))
                elif op.name == "STACK_GLOBAL":
                    found.append(_global_name(*(pushed[-2:] if len(pushed) >= 2 else (None, None))))
                if op.name in _STRING_OPCODES:
                    pushed.append(arg if isinstance(arg, str) else None)
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                    memo[len(memo) if op.name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed.append(memo.get(arg))
                elif op.stack_after:
                    pushed.append(None)
                del pushed[:-64]
        except _SCAN_ERRORS as err:
            if started or index == 0:  # broken off inside a pickle, or no pickle at all
                return index, (str(err).splitlines()[0][:120] if str(err) else err.__class__.__name__)
            return index, None  # what follows the pickles (a legacy torch file's raw tensor bytes, or nothing)
    return max_pickles, None


class _Bytes:
    """A read-only file over a buffer (an mmap), whose read(n) never allocates more than is there."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.buf) if n is None or n < 0 else min(len(self.buf), self.pos + n)
        out, self.pos = bytes(self.buf[self.pos:end]), end
        return out

    def readline(self) -> bytes:
        end = self.buf.find(b"\n", self.pos)
        return self.read((len(self.buf) if end < 0 else end + 1) - self.pos)

    def tell(self) -> int:
        return self.pos


def scan_torch_file(path: str | Path) -> PickleScan:
    """The globals a ``torch.save`` file (zip or legacy) or a bare pickle would import, found by
    reading its opcodes; nothing in it is run or built."""
    found: list[str] = []
    with open(path, "rb") as fh:
        if fh.read(4) == b"PK\x03\x04":  # torch.save's zip format: the pickle is <archive>/data.pkl
            try:
                with zipfile.ZipFile(fh) as zf:
                    names = zf.namelist()
                    if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
                        return PickleScan(found, torchscript=True)
                    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
                    if not pickles:
                        return PickleScan(found, malformed="no data.pkl in the zip archive")
                    scan = PickleScan(found)
                    for name in pickles:
                        with zf.open(name) as member:
                            count, malformed = _scan_opcodes(member, found, 1)
                        scan.pickles += count
                        scan.malformed = scan.malformed or malformed
                    return scan
            except _SCAN_ERRORS as err:
                return PickleScan(found, malformed=f"{err.__class__.__name__}: {str(err)[:120]}")
        if os.fstat(fh.fileno()).st_size == 0:
            return PickleScan(found, malformed="the file is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            # a legacy torch.save file is five pickles (magic number, protocol, system info, the
            # object, storage keys) and then raw tensor bytes; a bare pickle is one
            count, malformed = _scan_opcodes(_Bytes(buf), found, 5)
            return PickleScan(found, count, malformed)


def _refuse(path: Path, names: Sequence[str]) -> TsbdError:
    names = list(dict.fromkeys(names))
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return TsbdError(f"{path} refused: it contains {shown} which could run code when loaded; tsbd loads only tensors "
                     "and plain containers -- save model.state_dict() with torch.save, or use safetensors")


def _corrupt(path: Path, why: str) -> TsbdError:
    return TsbdError(f"{path} is corrupt or truncated ({why}); re-create or re-download it")


def _unpickling_error(path: Path, err: pickle.UnpicklingError, scan: PickleScan) -> TsbdError:
    """What torch's weights-only unpickler refused, in tsbd's words: torch's message advises turning
    safe loading off, and is never shown."""
    if scan.malformed:  # a name torch read from a truncated stream is a fragment, not a finding
        return _corrupt(path, f"its pickle data cannot be read: {scan.malformed}")
    text = str(err)
    named = [_global_name(*m.rpartition(".")[::2]) for m in re.findall(r"GLOBAL ([\w.]+)", text)]
    named += re.findall(r"<class '([\w.]+)'>", text) + re.findall(r"<function ([\w.]+)", text)
    if named:
        return _refuse(path, named)
    code = re.search(r"Unsupported operand (\d+)", text)
    if code:
        op = pickletools.code2op.get(chr(int(code.group(1))))
        return TsbdError(f"{path} uses the pickle instruction {op.name if op else code.group(1)}, which tsbd's safe "
                         "loader does not read (it reads what torch.save writes); re-save the weights with "
                         "torch.save(model.state_dict(), path) or as safetensors")
    return TsbdError(f"{path} refused: it holds objects other than tensors and plain containers, which tsbd does "
                     "not load; save model.state_dict() with torch.save, or use safetensors")


def read_torch_file(path: str | Path) -> Any:
    """The contents of a ``torch.save`` file, admitting only tensors, plain containers, numbers,
    strings and numeric numpy arrays; anything else raises :class:`TsbdError` and is never built."""
    path = Path(path)
    if not path.is_file():
        raise TsbdError(f"model file {str(path)!r} not found; pass an existing .pt/.pth/.safetensors file")
    try:
        scan = scan_torch_file(path)
    except OSError as err:
        raise TsbdError(f"cannot read {path} ({err.strerror or err.__class__.__name__})") from None
    if scan.torchscript:
        raise TsbdError(f"{path} is a TorchScript archive (torch.jit.save); tsbd reads weights: save "
                        "model.state_dict() with torch.save, or use safetensors")
    admitted = _admitted_globals()
    if admitted is not None:
        refused = [name for name in scan.globals if name not in admitted]
        if refused:
            raise _refuse(path, refused)
    # torch < 2.6 lacks safe_globals with renamed entries: numpy arrays are then refused too (still safe)
    admit = torch.serialization.safe_globals(_safe_globals()) if hasattr(torch.serialization, "safe_globals") \
        else contextlib.nullcontext()
    try:
        with admit, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's warnings (pickle protocol, storage) are not the user's business
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _unpickling_error(path, err, scan) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, IndexError, KeyError, TypeError,
            AttributeError, AssertionError, struct.error, OverflowError, MemoryError, UnicodeDecodeError,
            zlib.error) as err:  # torch's legacy reader asserts on storage keys the file does not hold
        if "magic number" in str(err) and scan.pickles and not scan.malformed:
            raise TsbdError(f"{path} is a pickle, but not one torch.save wrote; save the weights with "
                            "torch.save(model.state_dict(), path), or use safetensors") from None
        raise _corrupt(path, scan.malformed or _first_line(err)) from None


def _first_line(err: BaseException) -> str:
    """The first line of an error from a library, without advice to turn safe loading off."""
    text = str(err).strip()
    line = text.splitlines()[0][:200] if text else ""
    if not line or "weights_only" in line or "trust" in line.lower():
        return err.__class__.__name__
    return line


# ------------------------------------------------------------------------------------------
# state dicts
def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's ``module.`` prefix (BackdoorBench strips every key that has it)."""
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


def infer_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """The output size of the last 2-D weight (the classifier), or None."""
    last = [v for k, v in state.items() if k.endswith("weight") and isinstance(v, torch.Tensor) and v.ndim == 2]
    return int(last[-1].shape[0]) if last else None


def _as_state(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise TsbdError(f"{path} holds {what} of type {type(obj).__name__}, not a state dict of tensors; "
                        "save model.state_dict()")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TsbdError(f"{path}: {what} has {len(bad)} entries that are not tensors (e.g. {bad[0]!r}); "
                        "save model.state_dict()")
    return {str(k): v for k, v in obj.items()}


def unpack_torch_object(obj: Any, path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(format, state dict, file info) of what :func:`read_torch_file` returned."""
    if isinstance(obj, dict) and "model" in obj and "model_name" in obj:
        info = {k: obj.get(k) for k in ("model_name", "num_classes", "img_size", "clean_data", "data_path")}
        return "backdoorbench", _as_state(obj["model"], path, "its 'model' entry"), info
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return "state_dict", _as_state(obj, path, "the file"), {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return "state_dict", _as_state(obj["state_dict"], path, "its 'state_dict' entry"), {}
    keys = ", ".join(map(repr, list(obj)[:5])) if isinstance(obj, dict) else ""
    raise TsbdError(f"{path} is not a state dict or a BackdoorBench attack_result.pt "
                    f"({type(obj).__name__}{' with keys ' + keys if keys else ''}); save model.state_dict()")


def read_weights(path: str | Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any], Any]:
    """(format, state dict without ``module.`` prefixes, file info, raw object) of a model file."""
    path = Path(path)
    if not path.exists():
        raise TsbdError(f"model file {str(path)!r} not found; pass an existing .pt/.pth/.safetensors file "
                        "or model folder")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors", strip_module_prefix(load_state(path)), {}, None
    if suffix in TORCH_SUFFIXES:
        obj = read_torch_file(path)
        fmt, state, info = unpack_torch_object(obj, path)
        return fmt, strip_module_prefix(state), info, obj
    raise TsbdError(f"{path} has the suffix {suffix or '(none)'!r}; tsbd reads .safetensors, .pt/.pth state dicts, "
                    "BackdoorBench attack_result.pt files and tsbd model folders")


# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImportedModel:
    """A model read from a file, with what the file said about it."""

    model: nn.Module  # takes [0, 1] images (normalization inside), eval mode
    path: str
    format: str  # "tsbd" | "backdoorbench" | "state_dict" | "safetensors"
    arch: str  # registered name or package.module:factory
    num_classes: int
    image_shape: tuple[int, int, int] | None  # C x H x W the model was trained on, when known
    dataset: str | None  # tsbd data set the model was trained on, when known
    stats_source: str  # where the normalization came from: "file", "backdoorbench", "user", "none"
    poisoned_test: PoisonedTest | None = None  # BackdoorBench's triggered test images, when present
    meta: dict = dataclasses.field(default_factory=dict)

    def set_stats(self, mean: Sequence[float], std: Sequence[float], source: str) -> None:
        """Give a registered architecture the normalization it was trained with (its ``normalize`` module)."""
        norm = getattr(self.model, "normalize", None)
        if norm is None or not hasattr(norm, "mean"):
            return
        from tsbd.models.normalize import check_stats

        mean_l, std_l = check_stats(mean, std)
        device = norm.mean.device
        norm.mean = torch.tensor(mean_l, device=device).view(1, -1, 1, 1)
        norm.std = torch.tensor(std_l, device=device).view(1, -1, 1, 1)
        spec = getattr(self.model, "arch_spec", None)
        if spec is not None:
            spec.update(mean=mean_l, std=std_l)
        self.stats_source = source

    def describe(self) -> dict:
        return {"path": self.path, "format": self.format, "arch": self.arch, "num_classes": self.num_classes,
                "image_shape": list(self.image_shape) if self.image_shape else None, "dataset": self.dataset,
                "normalization": self.stats_source}


def backdoorbench_arch(name: Any) -> str:
    key = str(name).lower()
    if key not in BACKDOORBENCH_ARCHS:
        raise TsbdError(f"BackdoorBench model {name!r} has no tsbd architecture (tsbd has preactresnet18 and "
                        "vgg19_bn); pass your own with --arch package.module:factory")
    return BACKDOORBENCH_ARCHS[key]


def _image_shape(img_size: Any) -> tuple[int, int, int] | None:
    """BackdoorBench's ``img_size`` [H, W, C] as C x H x W."""
    try:
        h, w, c = (int(v) for v in img_size)
    except (TypeError, ValueError):
        return None
    return (c, h, w)


def load_model_file(path: str | Path, *, arch: str | None = None, num_classes: int | None = None,
                    options: dict[str, Any] | None = None, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, device: str | torch.device = "cpu") -> ImportedModel:
    """Read any model file or folder tsbd understands and rebuild its model.

    ``arch`` is a registered model name or ``package.module:factory`` (needed unless the file names
    its architecture); ``num_classes`` is checked against the file's; ``options`` go to the
    architecture; ``mean``/``std`` override the normalization (else BackdoorBench's for its data
    set, else none: the model is assumed to take [0, 1] images).
    """
    path = Path(path)
    if (mean is None) != (std is None):
        raise TsbdError("pass both mean and std (3 numbers each), or neither")
    folder_meta = None
    if path.is_dir():
        from tsbd.artifacts import WEIGHTS, read_meta

        folder_meta = read_meta(path)
    if folder_meta is not None and folder_meta["arch"].get("factory"):
        # saved from a user's architecture: rebuilt only with the factory the user names now
        spec = folder_meta["arch"]
        if not arch:
            raise TsbdError(f"{path} holds a model of your own architecture {spec['name']}; pass --arch {spec['name']}")
        if mean is None and spec.get("mean") is not None:
            mean, std = spec["mean"], spec["std"]
        fmt, state, raw = "tsbd", load_state(path / WEIGHTS), None
        info = {"num_classes": spec.get("num_classes")}
    elif path.is_dir():
        model, meta = load_model(path, device)
        ds = recorded_dataset(meta)
        shape = tuple(ds["image_shape"]) if ds.get("image_shape") else None
        imported = ImportedModel(model, str(path), "tsbd", meta["arch"]["name"], int(meta["arch"]["num_classes"]),
                                 shape, ds.get("name"), "file", meta=meta)
        if mean is not None:
            imported.set_stats(mean, std, "user")
        return imported

    else:
        fmt, state, info, raw = read_weights(path)
    bb_name = info.get("model_name")
    if arch is None and bb_name is not None:
        arch = backdoorbench_arch(bb_name)
    if arch is None:
        from tsbd.models import MODELS

        raise TsbdError(f"{path.name} does not say which architecture it holds; pass --arch NAME "
                        f"({', '.join(MODELS.names())}) or --arch package.module:factory, and --num-classes")
    file_classes = info.get("num_classes")
    if num_classes is not None and file_classes is not None and int(file_classes) != int(num_classes):
        raise TsbdError(f"{path} holds a {file_classes}-class model but --num-classes is {num_classes}; "
                        "drop --num-classes or use the matching checkpoint")
    n = num_classes if num_classes is not None else file_classes
    n = int(n) if n is not None else infer_num_classes(state)
    if n is None:
        raise TsbdError(f"cannot tell how many classes {path.name} has; pass --num-classes")
    stats_source = "user" if mean is not None else "none"
    clean_data = str(info.get("clean_data") or "").lower()
    if mean is None and clean_data in BACKDOORBENCH_STATS:
        (mean, std), stats_source = BACKDOORBENCH_STATS[clean_data], "backdoorbench"
    opts = dict(options or {})
    if is_factory_spec(arch):
        net = build_from_factory(arch, n, opts)
        load_into(net, state, str(path))
        model: nn.Module = NormalizedModel(net, mean, std) if mean is not None else net
        model.arch_spec = {"name": arch, "num_classes": n, "factory": True, **opts,  # type: ignore[assignment]
                           **({"mean": list(mean), "std": list(std)} if mean is not None else {})}
    else:
        from tsbd.models import build_model

        if arch == "preact_resnet18" and "width" not in opts and "conv1.weight" in state:
            opts["width"] = int(state["conv1.weight"].shape[0])  # BackdoorBench's is 64; narrower ones load too
        model = build_model(arch, n, mean=mean or (0.0, 0.0, 0.0), std=std or (1.0, 1.0, 1.0), **opts)
        load_into(model, state, str(path))
    if stats_source == "none":
        log.info("%s: no normalization known; assuming the model takes [0, 1] images", path)
    poisoned = backdoorbench_poisoned_test(raw, path) if fmt == "backdoorbench" else None
    dataset = BACKDOORBENCH_DATASETS.get(clean_data) if fmt == "backdoorbench" else None
    return ImportedModel(model.to(device).eval(), str(path), fmt, arch, n, _image_shape(info.get("img_size")),
                         dataset, stats_source, poisoned, meta={k: v for k, v in info.items() if v is not None})


# ------------------------------------------------------------------------------------------
# BackdoorBench's poisoned test set
def _to_uint8_nchw(x: Any) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x))  # a copy: loaded arrays are read-only
    if t.ndim == 3:
        t = t[None]
    if t.ndim == 4 and t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if t.is_floating_point():
        t = (t * 255 if float(t.max()) <= 1.0 else t).round().clamp(0, 255)
    return t.to(torch.uint8).contiguous()


def _find_file(p: str, base: Path) -> Path | None:
    candidate = Path(p)
    for c in ([candidate] if candidate.is_absolute() else []) + [base / candidate, base / Path(*candidate.parts[-3:])]:
        if c.is_file():
            return c
    return None


def backdoorbench_poisoned_test(obj: Any, path: Path) -> PoisonedTest | None:
    """The triggered test images an ``attack_result.pt`` carries, in either BackdoorBench layout:
    v1 ``bd_test = {'x': N x C x H x W floats in 0..255, 'y': targets}``; v2 ``bd_test`` = a dataset
    state whose ``bd_data_container.data_dict`` maps test index -> (image, target, original label)
    or -> {'path': png file, 'other_info': [target, original label]}. None when it has neither
    (or the v2 image files are not next to the file); the defense then reports ACC only."""
    bd = obj.get("bd_test") if isinstance(obj, dict) else None
    if not isinstance(bd, dict):
        return None
    try:
        if isinstance(bd.get("x"), (torch.Tensor, np.ndarray)) and bd.get("y") is not None:
            x = _to_uint8_nchw(bd["x"])
            y = torch.as_tensor(np.asarray(bd["y"])).long().flatten()
            true = bd.get("original_targets")
            y_true = torch.as_tensor(np.asarray(true)).long().flatten() if true is not None else torch.full_like(y, -1)
            return PoisonedTest(x, y, y_true)
        container = bd.get("bd_data_container") or {}
        entries = container.get("data_dict") or {}
        if not entries:
            return None
        images, targets, originals = [], [], []
        for key in sorted(entries):
            value = entries[key]
            if isinstance(value, dict):
                file = _find_file(str(value.get("path", "")), path.parent)
                if file is None:
                    log.warning("%s: BackdoorBench test image %s not found next to the file; ASR not measured",
                                path, value.get("path"))
                    return None
                img = _read_png(file)
                target, original = (list(value.get("other_info") or []) + [-1, -1])[:2]
            else:
                img, target, original = (list(value) + [-1, -1])[:3]
            images.append(_to_uint8_nchw(img))
            targets.append(int(target))
            originals.append(int(original))
        return PoisonedTest(torch.cat(images), torch.tensor(targets), torch.tensor(originals))
    except (TypeError, ValueError, RuntimeError) as err:
        log.warning("%s: cannot read BackdoorBench's poisoned test data (%s); ASR not measured", path, err)
        return None


def _read_png(file: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(file) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


# ------------------------------------------------------------------------------------------
def save_backdoorbench(path: str | Path, model: nn.Module, *, model_name: str, num_classes: int,
                       clean_data: str, img_size: Sequence[int], poisoned_test: PoisonedTest | None = None,
                       data_parallel: bool = False) -> Path:
    """Write ``model`` as BackdoorBench's ``attack_result.pt`` (its v1 layout: ``bd_test`` as tensors),
    so BackdoorBench's defenses can read a tsbd model. ``data_parallel`` prefixes keys with ``module.``
    as a DataParallel-trained model has them. Written to a temporary name, then renamed."""
    path = Path(path)
    prefix = "module." if data_parallel else ""
    state = {prefix + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bd_test = None
    if poisoned_test is not None:
        bd_test = {"x": poisoned_test.x.float(), "y": poisoned_test.y_target.clone(),
                   "original_targets": poisoned_test.y_true.clone(),
                   "original_index": np.arange(len(poisoned_test.x))}
    obj = {"model_name": model_name, "num_classes": int(num_classes), "model": state,
           "data_path": f"./data/{clean_data}", "img_size": [int(v) for v in img_size], "clean_data": clean_data,
           "bd_train": None, "bd_test": bd_test}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
