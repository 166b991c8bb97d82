"""Model artifacts: a folder with ``model.safetensors`` and a ``meta.json`` sidecar.

meta.json holds the format version, the architecture spec (enough to rebuild the model),
class names, dataset name and fingerprint, attack and defense configs, metrics, seed, runtime
and package versions. Folders are written under a temporary name and renamed into place, so
a reader never sees a half-written artifact. Nothing is ever unpickled.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tsbd.errors import TsbdError

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


def write_safetensors(file: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` as a safetensors file with the permissions of any file the user creates (the
    umask's; safetensors' own ``save_file`` creates it 0600)."""
    from safetensors.torch import save

    Path(file).write_bytes(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model`` and ``meta`` to the folder ``path`` atomically (replacing an old one)."""
    spec = getattr(model, "arch_spec", None)
    if spec is None:
        raise TsbdError("the model has no arch_spec; build it with tsbd.models.build_model so it can be saved")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    full_meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": spec, **meta}
    full_meta.setdefault("provenance", provenance())
    try:
        tmp.mkdir()
        write_safetensors(tmp / WEIGHTS, model.state_dict(),
                          {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        (tmp / META).write_text(json.dumps(full_meta, indent=2, default=str) + "\n")
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TsbdError(f"{meta_path} is corrupt ({err.__class__.__name__}); re-create the model") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TsbdError(f"{meta_path} is not a tsbd model description")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise TsbdError(f"{path} uses format version {meta['format_version']}; upgrade tsbd to read it")
    return meta


def load_state(file: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with corrupt files reported in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        msg = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise TsbdError(f"{file} is corrupt or truncated ({msg}); re-create or re-download it") from None


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` into ``model`` strictly, with mismatches and non-finite weights as one-line errors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise TsbdError(f"{source} does not fit this architecture: {'; '.join(parts)}; "
                        "check the architecture and class count")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TsbdError(f"{source} has NaN or infinite weights in {len(bad)} tensors (e.g. {bad[0]}); "
                        "the checkpoint is broken")
    model.load_state_dict(state, strict=True)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in folder ``path``; returns (model in eval mode, meta)."""
    from tsbd.models import model_from_spec

    path = Path(path)
    meta = read_meta(path)
    model = model_from_spec(meta["arch"])
    load_into(model, load_state(path / WEIGHTS), str(path / WEIGHTS))
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
