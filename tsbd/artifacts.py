"""Model artifacts: a folder with ``model.safetensors`` and a ``meta.json`` sidecar.

meta.json holds the format version, the architecture spec (enough to rebuild the model),
class names, dataset name and fingerprint, attack and defense configs, metrics, seed, runtime
and package versions. Folders are written under a temporary name and renamed into place, so
a reader never sees a half-written artifact. Nothing is ever unpickled.

Outputs never cost the user data: :func:`check_model_output` and :func:`check_output_folder`
decide, before any work, whether a destination may be written (new, empty, or tsbd's own earlier
output with ``overwrite``) and whether it is writable; every command that writes calls one of them.
Replacing a model folder removes only the two files tsbd wrote there.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tsbd.errors import TsbdError

log = logging.getLogger(__name__)

FORMAT = "tsbd-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "meta.json"


def versions() -> dict[str, str]:
    from tsbd import __version__

    return {"tsbd": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def provenance() -> dict[str, Any]:
    """Versions, host and time, recorded with every artifact and result."""
    return {"versions": versions(), "host": socket.gethostname(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# where outputs may go: checked before any work, and again when a model folder is written
def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder :func:`save_model` wrote and nobody added to: exactly ``meta.json``
    (a JSON object with ``"format": "tsbd-model"``) and ``model.safetensors``, both plain files. Only
    such a folder may be replaced (and only with ``overwrite``); its two files are all that is removed."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        names = sorted(p.name for p in path.iterdir())
        if names != sorted((META, WEIGHTS)) or any((path / n).is_symlink() or not (path / n).is_file()
                                                   for n in names):
            return False
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _nearest_folder(path: Path, flag: str) -> Path:
    """``path`` or its nearest existing ancestor, which must be a folder."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise TsbdError(f"{flag} {path}: {probe} is a file, not a folder; choose another {flag}")
    return probe


def _check_writable(folder: Path, flag: str) -> None:
    """Create and remove a hidden entry in ``folder``: the only test that holds for root and for
    read-only mounts alike (``os.access`` says yes to root on a read-only file system)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tsbd-write-test-", dir=folder))
    except OSError as err:
        raise TsbdError(f"cannot write to {folder} ({err.strerror or err.__class__.__name__}); "
                        f"choose another {flag} or make the folder writable") from None


def check_model_output(path: str | Path, *, overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse, with one line, a model folder destination that would cost the user anything.

    ``path`` may be absent, an empty folder, or -- with ``overwrite`` -- a tsbd model folder
    (:func:`is_model_folder`); anything else (a file, a link, a folder with other contents) is
    refused, and so is a destination tsbd cannot write to. Call it before any work; :func:`save_model`
    calls it again when it writes."""
    path = Path(path)
    if path.is_symlink():
        raise TsbdError(f"{flag} {path} is a symbolic link; pass the real folder or a new path")
    if path.exists():
        if path.is_file():
            raise TsbdError(f"{flag} {path} is an existing file; tsbd writes a model folder there and never "
                            f"replaces a file -- choose a new {flag}")
        if is_model_folder(path):
            if not overwrite:
                raise TsbdError(f"{flag} {path} already holds a tsbd model; pass --overwrite to replace it, "
                                f"or choose a new {flag}")
            _check_writable(path, flag)  # its two files are removed after the new folder is in place
        elif any(path.iterdir()):
            raise TsbdError(f"{flag} {path} is a folder with other contents (not a tsbd model folder); tsbd "
                            f"never replaces it -- choose a new or empty {flag}")
    _check_writable(_nearest_folder(path.parent, flag), flag)
    return path


def check_output_folder(path: str | Path, files: Sequence[str], *, overwrite: bool = False, shared: bool = False,
                        flag: str = "--out") -> Path:
    """Refuse, with one line, an output folder for the named ``files`` that would cost the user anything.

    The folder may be absent or empty. With ``shared`` it may hold anything else: files not in
    ``files`` are never touched. Without, a non-empty folder must be an earlier output of the same
    command (it holds ``files[0]``). A file of ``files`` that exists is replaced only with
    ``overwrite``; the folder must be writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TsbdError(f"{flag} {path} is a file; pass a folder")
    if path.is_dir():
        if not shared and any(path.iterdir()) and not (path / files[0]).exists():
            raise TsbdError(f"{flag} {path} is a folder with other contents; choose a new or empty {flag} "
                            "(tsbd writes into a folder only when it is new, empty or its own earlier output)")
        existing = [f for f in files if (path / f).exists()]
        if existing and not overwrite:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise TsbdError(f"{flag} {path} already holds {existing[0]}{more} from an earlier run; pass --overwrite "
                            f"to replace it, or choose another {flag}")
    _check_writable(_nearest_folder(path, flag), flag)
    return path


def _remove_model_folder(path: Path) -> None:
    """Remove a replaced model folder: its two files and the folder, nothing else. Something added
    meanwhile is left where it is (with a warning), never deleted."""
    for name in (WEIGHTS, META):
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        log.warning("left %s in place: something other than a tsbd model was added to it while it was replaced",
                    path)


def write_safetensors(file: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` as a safetensors file with the permissions of any file the user creates (the
    umask's; safetensors' own ``save_file`` creates it 0600)."""
    from safetensors.torch import save

    Path(file).write_bytes(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``model`` and ``meta`` to the folder ``path`` atomically. An existing tsbd model folder is
    replaced only with ``overwrite``; anything else there is refused (:func:`check_model_output`)."""
    spec = getattr(model, "arch_spec", None)
    if spec is None:
        raise TsbdError("the model has no arch_spec; build it with tsbd.models.build_model so it can be saved")
    path = Path(path)
    check_model_output(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": spec, **meta}
    full_meta.setdefault("provenance", provenance())
    try:
        tmp.mkdir()
        write_safetensors(tmp / WEIGHTS, model.state_dict(),
                          {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        (tmp / META).write_text(json.dumps(full_meta, indent=2, default=str) + "\n")
        if is_model_folder(path):  # checked above: overwrite was given
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(old, path)  # put the old model back
                raise
            _remove_model_folder(old)
        else:  # absent, or an empty folder (which rename replaces; one that filled up meanwhile makes it fail)
            os.rename(tmp, path)
    except OSError as err:  # disk full, permissions: the old folder (if any) is untouched, nothing new is left
        raise TsbdError(f"cannot write model folder {path} ({err.__class__.__name__}: {err.strerror or err}); "
                        "nothing was written -- free disk space or choose another output folder") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise TsbdError(f"model {str(path)!r} not found; pass a folder written by `tsbd attack` or `tsbd defend`")
    if path.is_file():
        raise TsbdError(f"{str(path)!r} is a file; pass the model folder that holds {WEIGHTS} and {META} "
                        "(for a .pt/.pth/.safetensors or BackdoorBench file use `tsbd purify FILE --clean-data DATA`)")
    meta_path = path / META
    if not meta_path.is_file() or not (path / WEIGHTS).is_file():
        raise TsbdError(f"{str(path)!r} is not a tsbd model folder (needs {WEIGHTS} and {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8; nesting deeper than the parser goes
        raise TsbdError(f"{meta_path} is corrupt ({err.__class__.__name__}); re-create the model") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TsbdError(f"{meta_path} is not a tsbd model description")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise TsbdError(f"{meta_path} has the format version {version!r}, not a number; re-create the model")
    if version > FORMAT_VERSION:
        raise TsbdError(f"{path} uses format version {version}; upgrade tsbd to read it")
    if not isinstance(meta.get("arch"), dict):
        raise TsbdError(f"{meta_path} has no architecture record ('arch'); re-create the model")
    return meta


def recorded_dataset(meta: dict[str, Any]) -> dict[str, Any]:
    """The data set a model folder records: ``meta["dataset"]``, or ``meta["data"]``, where `tsbd
    purify` wrote it before ``dataset`` became the one key."""
    ds = meta.get("dataset") or meta.get("data") or {}
    return ds if isinstance(ds, dict) else {}


def _read_safetensors(file: str | Path, read):
    """``read(file)`` with a corrupt or truncated safetensors file reported in one line."""
    from safetensors import SafetensorError

    try:
        return read(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        msg = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise TsbdError(f"{file} is corrupt or truncated ({msg}); re-create or re-download it") from None


def load_state(file: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with corrupt files reported in one line."""
    from safetensors.torch import load_file

    return _read_safetensors(file, load_file)


def state_shapes(file: str | Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file declares, read from its header alone."""
    from safetensors import safe_open

    def read(name: str) -> dict[str, tuple[int, ...]]:
        with safe_open(name, framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 -- not a dict

    return _read_safetensors(file, read)


def check_fits(own: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]], source: str) -> None:
    """One line when the tensor names and shapes ``given`` are not exactly those a model has (``own``)."""
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    shape = [k for k in own if k in given and tuple(own[k]) != tuple(given[k])]
    if missing or unexpected or shape:
        parts = []
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} shape mismatches (e.g. {k}: {tuple(given[k])} vs {tuple(own[k])})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise TsbdError(f"{source} does not fit this architecture: {'; '.join(parts)}; "
                        "check the architecture and class count")


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` into ``model`` strictly, with mismatches and non-finite weights as one-line errors."""
    check_fits({k: tuple(v.shape) for k, v in model.state_dict().items()},
               {k: tuple(v.shape) for k, v in state.items()}, source)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TsbdError(f"{source} has NaN or infinite weights in {len(bad)} tensors (e.g. {bad[0]}); "
                        "the checkpoint is broken")
    model.load_state_dict(state, strict=True)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in folder ``path``; returns (model in eval mode, meta).

    The architecture meta.json describes is first built on the ``meta`` device (no memory) and
    checked against the shapes the weights file declares, so a damaged description cannot make
    tsbd allocate a model far larger than the weights."""
    from tsbd.models import model_from_spec

    path = Path(path)
    meta = read_meta(path)
    weights = path / WEIGHTS
    try:
        with torch.device("meta"):
            skeleton = model_from_spec(meta["arch"])
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as err:
        why = str(err).splitlines()[0][:200] if str(err) else err.__class__.__name__
        raise TsbdError(f"{path / META} describes an architecture tsbd cannot build ({why}); "
                        "re-create the model") from None
    check_fits({k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, state_shapes(weights), str(weights))
    model = model_from_spec(meta["arch"])
    load_into(model, load_state(weights), str(weights))
    return model.to(device).eval(), meta


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file and a rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed); imported on first use, as
    matplotlib is slow to import and only the commands that draw need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem: str | Path, formats: tuple[str, ...] = ("png", "svg"), dpi: int = 130) -> dict[str, Path]:
    """A matplotlib figure as ``stem.png`` / ``stem.svg`` (atomic; SVGs without a date, so reruns
    give identical files)."""
    import io

    out = {}
    for ext in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=dpi, bbox_inches="tight", metadata={"Date": None} if ext == "svg" else None)
        out[ext] = write_bytes_atomic(Path(f"{stem}.{ext}"), buf.getvalue())
    return out
