"""Per-channel masks on BatchNorm2d layers, shared by the mask-based pruning defenses (ANP, RNP).

A BN channel computes ``gamma * x_hat + beta``. ANP (Wu & Wang 2021) and RNP (Li et al. 2023)
learn a mask ``m`` in [0, 1] per channel that scales ``gamma``; ANP also perturbs the channel
as ``gamma * (m + delta)`` and ``beta * (1 + delta_b)``. :func:`masked_batchnorm` swaps every
affine ``nn.BatchNorm2d`` of a model for a :class:`MaskedBatchNorm2d` wrapping it, for the
duration of a ``with`` block, and puts the original modules back on exit, so the model is a
plain model again (same ``state_dict`` keys) whatever happens inside. Nothing is specific to an
architecture: any model whose BN layers are ``nn.BatchNorm2d`` modules works.

:func:`prune_bn_channels` bakes a pruning decision into the weights of a plain model: every
channel whose mask value is ``<= threshold`` gets ``gamma = 0`` (BackdoorBench/ANP/RNP
``pruning``: only the BN weight is zeroed, the bias stays).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tsbd.errors import TsbdError
from tsbd.models.surgery import frozen


class MaskedBatchNorm2d(nn.Module):
    """``bn`` with its affine weight scaled per channel by ``neuron_mask`` (init 1).

    With ``perturbed`` set, the affine parameters become ``gamma * (mask + neuron_noise)`` and
    ``beta * (1 + neuron_noise_bias)`` (ANP's NoisyBatchNorm2d, BackdoorBench
    ``anp_batchnorm.py``). Running statistics are handled exactly as ``nn.BatchNorm2d`` does.
    """

    def __init__(self, bn: nn.BatchNorm2d, perturbable: bool = False):
        super().__init__()
        self.bn = bn
        ref = bn.weight
        self.neuron_mask = nn.Parameter(torch.ones(bn.num_features, device=ref.device, dtype=ref.dtype))
        self.perturbable = perturbable
        if perturbable:
            self.neuron_noise = nn.Parameter(torch.zeros_like(self.neuron_mask))
            self.neuron_noise_bias = nn.Parameter(torch.zeros_like(self.neuron_mask))
        self.perturbed = False

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        if self.perturbed:
            return bn.weight * (self.neuron_mask + self.neuron_noise), bn.bias * (1.0 + self.neuron_noise_bias)
        return bn.weight * self.neuron_mask, bn.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        track = not bn.training or bn.track_running_stats
        weight, bias = self.affine()
        return F.batch_norm(x, bn.running_mean if track else None, bn.running_var if track else None,
                            weight, bias, use_batch_stats, factor, bn.eps)


class BNMasks:
    """Handle on the masked layers of a model inside :func:`masked_batchnorm`."""

    def __init__(self, layers: dict[str, MaskedBatchNorm2d]):
        self.layers = layers

    def masks(self) -> list[nn.Parameter]:
        return [m.neuron_mask for m in self.layers.values()]

    def noises(self) -> list[nn.Parameter]:
        return [p for m in self.layers.values() if m.perturbable for p in (m.neuron_noise, m.neuron_noise_bias)]

    def perturb(self, on: bool) -> None:
        for m in self.layers.values():
            m.perturbed = on and m.perturbable

    @torch.no_grad()
    def reset_noise(self, eps: float, generator: torch.Generator) -> None:
        """Draw every perturbation from U(-eps, eps) (ANP's ``reset(rand_init=True)``)."""
        for p in self.noises():
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1).mul_(eps).to(p))

    @torch.no_grad()
    def clip_masks(self, lower: float = 0.0, upper: float = 1.0) -> None:
        for p in self.masks():
            p.clamp_(lower, upper)

    def values(self) -> dict[str, torch.Tensor]:
        """Mask value per channel, per BN layer (module name in the plain model), on the CPU."""
        return {name: m.neuron_mask.detach().float().cpu().clone() for name, m in self.layers.items()}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def bn_layers(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Every affine BatchNorm2d of ``model`` by module name, in module order."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine}
    if not layers:
        raise TsbdError(f"{type(model).__name__} has no affine BatchNorm2d layers; "
                        "ANP and RNP mask BN channels and need a model with batch normalization")
    return layers


@contextlib.contextmanager
def masked_batchnorm(model: nn.Module, perturbable: bool = False) -> Iterator[BNMasks]:
    """Within the block, every affine BatchNorm2d of ``model`` (in place) carries a channel mask.

    The model's own parameters are frozen inside the block (only masks/perturbations train)
    and everything is restored on exit: modules, ``requires_grad`` flags, ``state_dict`` keys.
    """
    layers = {name: MaskedBatchNorm2d(bn, perturbable) for name, bn in bn_layers(model).items()}
    with frozen(model):  # before the wrappers go in: their masks stay trainable
        for name, wrapper in layers.items():
            _set_submodule(model, name, wrapper)
        try:
            yield BNMasks(layers)
        finally:
            for name, wrapper in layers.items():
                _set_submodule(model, name, wrapper.bn)


@torch.no_grad()
def prune_bn_channels(model: nn.Module, masks: dict[str, torch.Tensor], threshold: float) -> dict[str, list[int]]:
    """Set ``gamma = 0`` (in place) for every BN channel whose mask value is ``<= threshold``.

    ``<=`` as BackdoorBench's and the ANP/RNP authors' ``evaluate_by_threshold``. Returns the
    pruned channel indices per layer (only layers with at least one).
    """
    layers = dict(model.named_modules())
    pruned = {}
    for name, values in masks.items():
        bn = layers.get(name)
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != len(values):
            raise TsbdError(f"mask for {name!r} does not match a BatchNorm2d of the model; "
                            "prune a model of the architecture the masks were learned on")
        idx = torch.nonzero(values <= threshold).flatten()
        if len(idx):
            bn.weight[idx.to(bn.weight.device)] = 0
            pruned[name] = idx.tolist()
    return pruned


def thresholds(maximum: float, step: float) -> list[float]:
    """0, step, 2 step, ..., maximum (BackdoorBench ``np.arange(0, max + step, step)``, without
    floating-point drift)."""
    if step <= 0 or maximum < 0:
        raise TsbdError(f"pruning step must be > 0 and maximum >= 0, got step {step} and maximum {maximum}")
    n = int(math.floor(maximum / step + 1e-9))
    return [round(k * step, 10) for k in range(n + 1)]


def mask_summary(masks: dict[str, torch.Tensor]) -> dict:
    """Distribution of the mask values (for ``result.info``)."""
    flat = torch.cat([v.flatten() for v in masks.values()]).float()
    q = torch.quantile(flat, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))
    return {"channels": int(flat.numel()), "min": float(flat.min()), "max": float(flat.max()),
            "mean": float(flat.mean()), "quantiles_5_25_50_75_95": [float(v) for v in q],
            "at_zero": int((flat == 0).sum()), "at_one": int((flat == 1).sum())}
