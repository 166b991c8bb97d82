"""``tsbd inspect PATH``: what a model file or folder holds, read without building anything from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tsbd.errors import TsbdError


def _tensor_summary(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    from tsbd.interop.checkpoints import infer_num_classes

    prefixed = bool(state) and all(k.startswith("module.") for k in state)
    floats = [v for v in state.values() if v.is_floating_point()]
    return {"tensors": len(state), "parameters": sum(v.numel() for v in state.values()),
            "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in state.values()}),
            "module_prefix": prefixed,
            "finite": all(bool(torch.isfinite(v).all()) for v in floats),
            "num_classes_guess": infer_num_classes(state)}


def guess_architecture(state: dict[str, torch.Tensor], num_classes: int | None) -> str | None:
    """The registered architecture whose state dict has exactly these keys and shapes, if one does."""
    from tsbd.interop.checkpoints import strip_module_prefix
    from tsbd.models import MODELS, build_model

    state = strip_module_prefix(state)
    if not num_classes or num_classes < 2:
        return None
    for name in MODELS.names():
        opts = {}
        if name == "preact_resnet18" and "conv1.weight" in state:
            opts["width"] = int(state["conv1.weight"].shape[0])
        elif name == "vgg19_bn" and "features.0.weight" not in state:
            continue
        try:
            own = build_model(name, num_classes, **opts).state_dict()
        except (TsbdError, TypeError, ValueError, RuntimeError):
            continue
        if set(own) == set(state) and all(tuple(own[k].shape) == tuple(state[k].shape) for k in own):
            return name + (f" (width={opts['width']})" if opts.get("width", 64) != 64 else "")
    return None


def describe_path(path: str | Path) -> dict[str, Any]:
    """A JSON-ready description of a tsbd model folder, a safetensors file, a plain state dict or a
    BackdoorBench ``attack_result.pt``: format, architecture, classes, provenance, metrics, tensors."""
    from tsbd.artifacts import WEIGHTS, load_state, read_meta, recorded_dataset
    from tsbd.interop.checkpoints import (
        BACKDOORBENCH_ARCHS,
        TORCH_SUFFIXES,
        backdoorbench_poisoned_test,
        read_torch_file,
        unpack_torch_object,
    )

    path = Path(path)
    if not path.exists():
        raise TsbdError(f"{str(path)!r} not found; pass a model folder or a .pt/.pth/.safetensors file")
    if path.is_dir():
        meta = read_meta(path)
        state = load_state(path / WEIGHTS)
        ds = recorded_dataset(meta)
        prov = meta.get("provenance") or {}
        out = {"path": str(path), "format": f"tsbd model folder (format {meta.get('format_version')})",
               "kind": meta.get("kind"), "arch": meta.get("arch"), "num_classes": meta["arch"].get("num_classes"),
               "classes": meta.get("classes"), "dataset": {k: ds.get(k) for k in ("name", "fingerprint", "image_shape")
                                                           if k in ds} or None,
               "attack": (meta.get("attack") or {}).get("name"),
               "defense": (meta.get("defense") or {}).get("defense"),
               "source": meta.get("source"), "parent": meta.get("parent"), "seed": meta.get("seed"),
               "metrics_before": meta.get("metrics_before"), "metrics": meta.get("metrics"),
               "provenance": {"created": prov.get("created"), "host": prov.get("host"),
                              "command": prov.get("command"),
                              "tsbd": (prov.get("versions") or {}).get("tsbd"),
                              "torch": (prov.get("versions") or {}).get("torch")}}
        out.update(_tensor_summary(state))
        return {k: v for k, v in out.items() if v is not None}
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        state = load_state(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                file_meta = fh.metadata() or {}
        except Exception:  # load_state already proved the file readable; metadata is optional
            file_meta = {}
        out = {"path": str(path), "format": "safetensors", "metadata": file_meta or None}
        out.update(_tensor_summary(state))
        out["arch_guess"] = guess_architecture(state, out["num_classes_guess"])
        return {k: v for k, v in out.items() if v is not None}
    if suffix in TORCH_SUFFIXES:
        obj = read_torch_file(path)
        fmt, state, info = unpack_torch_object(obj, path)
        out = {"path": str(path), "format": "BackdoorBench attack_result.pt" if fmt == "backdoorbench"
               else "PyTorch state dict (weights only)"}
        if fmt == "backdoorbench":
            name = str(info.get("model_name"))
            out.update({"model_name": name, "arch": BACKDOORBENCH_ARCHS.get(name.lower(), f"{name} (no tsbd match)"),
                        "num_classes": info.get("num_classes"), "img_size": info.get("img_size"),
                        "clean_data": info.get("clean_data"), "data_path": info.get("data_path"),
                        "other_keys": sorted(k for k in obj if k not in ("model", *info)) or None})
            poisoned = backdoorbench_poisoned_test(obj, path)
            out["poisoned_test_images"] = len(poisoned) if poisoned is not None else 0
        out.update(_tensor_summary(state))
        if fmt != "backdoorbench":
            out["arch_guess"] = guess_architecture(state, out["num_classes_guess"])
        return {k: v for k, v in out.items() if v is not None}
    raise TsbdError(f"{path} is not a model file tsbd reads (.safetensors, .pt/.pth, or a tsbd model folder)")
