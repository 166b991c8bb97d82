"""Architectures tsbd did not build: a user's factory named on the command line, and a check that
TSBD can find the units it prunes in any ``nn.Module``."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tsbd.errors import TsbdError
from tsbd.models.normalize import Normalize
from tsbd.models.surgery import SKIP_CONNECTION

log = logging.getLogger(__name__)

# Modules whose parameters TSBD knows and leaves to fine-tuning (it prunes Conv2d neurons only).
KNOWN_NON_PRUNABLE = (nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.Embedding,
                      nn.PReLU)


def is_factory_spec(arch: str) -> bool:
    """``package.module:factory`` (a user's architecture) rather than a registered model name."""
    return isinstance(arch, str) and ":" in arch


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable ``factory`` of ``package.module:factory``; imported only because the user named it.

    The current directory is searched too (as ``python -m`` would), so a ``mymodels.py`` next to
    the data works without installing it.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TsbdError(f"--arch {spec!r} must look like package.module:factory (or a registered model name)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        cwd = os.getcwd()
        if err.name and module_name.startswith(err.name) and cwd not in sys.path:
            sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as err2:
                raise TsbdError(f"cannot import {module_name!r} for --arch {spec} ({err2}); make it importable "
                                "(pip install -e it or add its folder to PYTHONPATH)") from None
        else:
            raise TsbdError(f"cannot import {module_name!r} for --arch {spec} ({err}); make it importable "
                            "(pip install -e it or add its folder to PYTHONPATH)") from None
    except Exception as err:  # the user's module failed while importing
        raise TsbdError(f"importing {module_name!r} for --arch {spec} failed: "
                        f"{err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise TsbdError(f"module {module_name!r} has no {attr!r} (from --arch {spec}); name a function or class "
                            "that returns the model")
    if not callable(factory):
        raise TsbdError(f"{spec} is a {type(factory).__name__}, not a function or class that returns the model")
    return factory


def build_from_factory(spec: str, num_classes: int | None, options: dict[str, Any] | None = None) -> nn.Module:
    """Call the user's factory with ``num_classes`` (when it takes that argument) and ``options``."""
    factory = import_factory(spec)
    kwargs = dict(options or {})
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if num_classes is not None and ("num_classes" in params or any(p.kind is p.VAR_KEYWORD
                                                                    for p in params.values())):
        kwargs.setdefault("num_classes", num_classes)
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise TsbdError(f"{spec}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: {err}; "
                        "pass the factory's options with --model-opt KEY=VALUE") from None
    if not isinstance(model, nn.Module):
        raise TsbdError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


class NormalizedModel(nn.Module):
    """A user's model that expects normalized input, behind a :class:`Normalize` so it takes [0, 1]
    images like every tsbd model. ``net`` is the user's model, unchanged."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def classify_layers(model: nn.Module) -> dict[str, list[str]]:
    """Every module that holds parameters of its own, sorted into what TSBD does with it.

    ``prunable``: trainable Conv2d outside shortcuts (TSBD's neurons, :func:`tsbd.models.surgery.prunable_units`);
    ``shortcut``: Conv2d in a shortcut/downsample branch (left alone, as in the authors' code);
    ``frozen``: Conv2d with ``requires_grad=False``; ``other``: linear, norm and other layers whose
    parameters are at most 2-D (fine-tuned, never pruned); ``unclassified``: anything else with
    conv-like (3-D or larger) trainable weights -- Conv1d/3d, transposed convs, custom layers --
    whose neurons TSBD cannot rank.
    """
    out: dict[str, list[str]] = {"prunable": [], "shortcut": [], "frozen": [], "other": [], "unclassified": []}
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        label = f"{name or '<root>'} ({type(m).__name__})"
        if isinstance(m, nn.Conv2d):  # the same test as prunable_units
            if SKIP_CONNECTION.search(name):
                out["shortcut"].append(label)
            elif not m.weight.requires_grad:
                out["frozen"].append(label)
            else:
                out["prunable"].append(label)
        elif isinstance(m, KNOWN_NON_PRUNABLE):
            out["other"].append(label)
        elif any(p.requires_grad and p.ndim >= 3 for p in own):
            out["unclassified"].append(label)
        else:
            out["other"].append(label)
    return out


def check_prunable(model: nn.Module) -> dict[str, list[str]]:
    """:func:`classify_layers`, raising one clear line when TSBD cannot find or classify its units."""
    layers = classify_layers(model)
    if layers["unclassified"]:
        names = layers["unclassified"]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise TsbdError(f"TSBD could not classify {len(names)} layer(s) of {type(model).__name__}: {shown}; it prunes "
                        "nn.Conv2d output channels only -- use nn.Conv2d there, or freeze those layers "
                        "(requires_grad=False) to leave them out")
    if not layers["prunable"]:
        seen = ", ".join((layers["other"] + layers["shortcut"] + layers["frozen"])[:4]) or "none"
        raise TsbdError(f"{type(model).__name__} has no trainable nn.Conv2d outside shortcuts for TSBD to prune "
                        f"(layers with weights: {seen}); TSBD needs a convolutional network")
    log.info("TSBD units: %d prunable conv layers, %d shortcut, %d frozen, %d other", len(layers["prunable"]),
             len(layers["shortcut"]), len(layers["frozen"]), len(layers["other"]))
    return layers
