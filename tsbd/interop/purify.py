"""``tsbd.purify(model, clean_data)``: run a defense on any ``nn.Module``, checked first."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tsbd.data.base import ImageSet
from tsbd.defenses import DefenseResult, build_defense
from tsbd.errors import TsbdError
from tsbd.interop.architectures import NormalizedModel, check_prunable
from tsbd.interop.images import check_images, load_images
from tsbd.train.runtime import Runtime

log = logging.getLogger(__name__)


def check_finite_weights(model: nn.Module, source: str = "the model") -> None:
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TsbdError(f"{source} has NaN or infinite weights in {len(bad)} tensors (e.g. {bad[0]}); "
                        "the checkpoint is broken")


def check_clean_size(clean: ImageSet, batch_size: int) -> None:
    """A clean set smaller than one batch gives the defense too few steps to be meaningful."""
    if len(clean) == 0:
        raise TsbdError("the clean defense set is empty; provide clean images (raise --clean-ratio or add data)")
    if len(clean) < batch_size:
        raise TsbdError(f"the clean set has {len(clean)} images, fewer than one batch ({batch_size}); add clean "
                        f"images or lower the batch size (--opt batch_size=N with N <= {len(clean)})")


def purify(model: nn.Module, clean_data: Any, defense: str = "tsbd", *, labels: Any = None,
           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           image_shape: Sequence[int] | None = None, runtime: Runtime | None = None, seed: int = 0,
           progress: bool = False, monitor=None, **options: Any) -> DefenseResult:
    """Purify ``model`` (any ``nn.Module``) with ``defense`` on ``clean_data``; returns the
    :class:`~tsbd.defenses.DefenseResult` (``.model`` is a purified copy; the input is not modified).

    ``clean_data``: an :class:`~tsbd.data.ImageSet`, an ``(images, labels)`` pair of uint8 or float
    arrays, a data set name, an image folder or a ``.npz``/``.npy`` file (see
    :func:`tsbd.interop.load_images`). The model must take images in [0, 1]; if it expects
    normalized input, pass the ``mean`` and ``std`` it was trained with. ``image_shape`` (C, H, W)
    checks the clean images' size. ``options`` are the defense's (``tsbd list``), e.g.
    ``finetune_epochs=5``. For TSBD the prunable units (Conv2d neurons) are found automatically;
    layers it cannot classify are named in the error.
    """
    if not isinstance(model, nn.Module):
        raise TsbdError(f"purify needs a torch.nn.Module, got {type(model).__name__}")
    if (mean is None) != (std is None):
        raise TsbdError("pass both mean and std (3 numbers each), or neither")
    method = build_defense(defense, options)
    size = int(image_shape[1]) if image_shape else None
    clean = load_images(clean_data, labels=labels, image_size=size, seed=seed).images
    check_finite_weights(model)
    net = NormalizedModel(model, mean, std) if mean is not None else model
    if method.name == "tsbd":
        check_prunable(net)
    check_images(clean, image_shape)
    check_clean_size(clean, method.config.batch_size)
    result = method.purify(net, clean, runtime=runtime, seed=seed, progress=progress, monitor=monitor)
    if net is not model:
        result.model = result.model.net
    return result
