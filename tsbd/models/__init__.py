"""The model zoo: every architecture registered by name and built through one factory.

Each file in this package defines one architecture and registers a factory
``fn(num_classes, *, mean, std, **options) -> nn.Module`` with ``@MODELS.register(name)``;
the registry imports the files on first lookup, so a new model is one new file.

Conventions every model follows:

* input is float images in [0, 1], N x 3 x H x W; the model normalizes them itself as the
  first step of ``forward`` (:class:`~tsbd.models.normalize.Normalize`, non-persistent
  buffers, so ``state_dict`` keys are exactly the reference implementation's);
* :func:`build_model` attaches ``model.arch_spec``, a JSON-serializable dict from which
  :func:`model_from_spec` rebuilds the same architecture (weights come from the state dict);
* a model that derives weights from training data (airbench's whitening conv) has an
  ``init_from_data(images_uint8)`` method; training code calls :func:`init_from_data`,
  which is a no-op for every other model.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from tsbd.errors import TsbdError
from tsbd.models.normalize import Normalize, check_stats
from tsbd.registry import Registry

__all__ = [
    "MODELS",
    "Normalize",
    "build_model",
    "check_model_options",
    "count_parameters",
    "describe_model",
    "init_from_data",
    "model_from_spec",
    "non_default_options",
    "spec_options",
]

MODELS: Registry = Registry("model", "tsbd.models")

_SPEC_KEYS = ("name", "num_classes", "mean", "std")


def _options_of(factory) -> dict[str, inspect.Parameter]:
    """The architecture options a factory accepts (keyword arguments beyond the common ones)."""
    params = inspect.signature(factory).parameters
    return {k: p for k, p in params.items() if k not in _SPEC_KEYS and p.kind is not p.VAR_KEYWORD}


def _to_json(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def spec_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture options of a saved ``arch`` spec (everything but name, classes and normalization)."""
    return {k: v for k, v in spec.items() if k not in _SPEC_KEYS}


def non_default_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` minus those equal to the factory's defaults (lists and tuples compare equal), so
    two spellings of one architecture -- ``{}`` and ``{"widths": [32, 64, 128]}`` -- give one cache key."""
    params = _options_of(MODELS.get(name))
    out = {}
    for key, value in (options or {}).items():
        param = params.get(key)
        if param is None or param.default is param.empty or _to_json(param.default) != _to_json(value):
            out[key] = value
    return out


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise TsbdError(f"num_classes must be an integer >= 2, got {num_classes!r}; pass the data set's class count")
    return int(num_classes)


def build_model(
    name: str,
    num_classes: int,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    **options: Any,
) -> nn.Module:
    """Build the registered model ``name`` for ``num_classes`` classes.

    ``mean``/``std`` are the per-channel statistics the model normalizes its [0, 1] input
    with; ``options`` are the architecture's own keyword options (e.g. ``width`` for
    ``preact_resnet18``). The result carries ``arch_spec`` (name, num_classes, mean, std and
    every option, defaults included) for :func:`model_from_spec`.
    """
    if not isinstance(name, str):
        raise TsbdError(f"model name must be a string, got {name!r}; choose one of: {', '.join(MODELS.names())}")
    factory = MODELS.get(name)
    key = name.lower()
    num_classes = _check_num_classes(num_classes)
    mean_l, std_l = check_stats(mean, std)
    accepted = _options_of(factory)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) or "none"
        raise TsbdError(f"model {key!r} has no option {', '.join(map(repr, unknown))}; its options are: {valid}")
    resolved = {k: p.default for k, p in accepted.items() if p.default is not p.empty}
    resolved.update(options)
    model = factory(num_classes, mean=mean_l, std=std_l, **resolved)
    spec = {"name": key, "num_classes": num_classes, "mean": mean_l, "std": std_l, **_to_json(resolved)}
    try:
        json.dumps(spec)
    except (TypeError, ValueError):
        raise TsbdError(f"model options must be JSON values (numbers, strings, lists), got {resolved!r}") from None
    model.arch_spec = spec
    return model


def check_model_options(name: str, options: Mapping[str, Any] | None) -> None:
    """Refuse an unknown model or a bad architecture option before any work: the model is built on
    the meta device (no memory, no initialization), where its factory checks its options."""
    with torch.device("meta"):
        build_model(name, 10, **(options or {}))


def model_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model (freshly initialized) from the ``arch_spec`` of another one."""
    if not isinstance(spec, Mapping):
        raise TsbdError(f"model spec must be a mapping like model.arch_spec, got {type(spec).__name__}")
    missing = [k for k in ("name", "num_classes") if k not in spec]
    if missing:
        raise TsbdError(
            f"model spec lacks {', '.join(missing)}; use the arch_spec tsbd saved with the weights"
        )
    if spec.get("factory"):
        raise TsbdError(f"this model was built by your own architecture {spec['name']!r}; tsbd never imports code "
                        "named in a file -- rebuild it and load model.safetensors, or pass --arch to `tsbd purify`")
    options = spec_options(spec)
    return build_model(
        spec["name"],
        spec["num_classes"],
        mean=spec.get("mean", (0.0, 0.0, 0.0)),
        std=spec.get("std", (1.0, 1.0, 1.0)),
        **options,
    )


def init_from_data(model: nn.Module, images: torch.Tensor) -> bool:
    """Let ``model`` derive data-dependent weights from uint8 training images, if it has any.

    Returns True when the model had an ``init_from_data`` method (and ran it), else False.
    """
    method = getattr(model, "init_from_data", None)
    if method is None:
        return False
    method(images)
    return True


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe_model(model: nn.Module) -> dict:
    """A short JSON-serializable summary: name, parameter counts and the arch spec."""
    spec = getattr(model, "arch_spec", None)
    return {
        "name": spec["name"] if spec else type(model).__name__,
        "params": count_parameters(model),
        "trainable_params": count_parameters(model, trainable_only=True),
        "spec": dict(spec) if spec else None,
    }
