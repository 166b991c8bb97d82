"""Model surgery shared by TSBD, the pruning baselines and the analyses.

A *neuron* is an output channel of a convolution (paper Sec. 3.1: row k of the layer's
K x I weight matrix); its *subweights* are the I = C_in * kh * kw weights of that row.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from tsbd.errors import TsbdError

# Shortcut / downsample convolutions are excluded, as in the authors' code (name lacks "shortcut").
SKIP_CONNECTION = re.compile(r"(^|\.)(shortcut|downsample|skip)(\.|$)")


def prunable_units(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """(name, conv) of every trainable Conv2d except shortcut/downsample convolutions, in module order."""
    units = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not SKIP_CONNECTION.search(name) and m.weight.requires_grad
    ]
    if not units:
        raise TsbdError(
            f"{type(model).__name__} has no trainable Conv2d layers outside shortcuts; "
            "TSBD and the pruning defenses need convolutional neurons"
        )
    return units


def subweight_change(before: nn.Module, after: nn.Module) -> dict[str, torch.Tensor]:
    """|w_after - w_before| of every prunable unit, reshaped K x I (neuron x subweight)."""
    mods_after = dict(after.named_modules())
    out = {}
    for name, conv in prunable_units(before):
        other = mods_after.get(name)
        if not isinstance(other, nn.Conv2d) or other.weight.shape != conv.weight.shape:
            raise TsbdError(f"layer {name!r} differs between the two models; compare models of one architecture")
        delta = (other.weight.detach().float().cpu() - conv.weight.detach().float().cpu()).abs()
        out[name] = delta.reshape(delta.shape[0], -1)
    return out


def neuron_weight_change(before: nn.Module, after: nn.Module) -> dict[str, torch.Tensor]:
    """NWC (paper Eq. 1): per layer, the L1 norm of each neuron's weight change."""
    return {name: d.sum(dim=1) for name, d in subweight_change(before, after).items()}


def rank_neurons(nwc: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """All (layer, channel) pairs, ranked globally across layers by descending value (stable)."""
    keys = [(name, k) for name, v in nwc.items() for k in range(len(v))]
    values = torch.cat([v.flatten().float() for v in nwc.values()])
    order = torch.argsort(values, descending=True, stable=True)
    return [keys[i] for i in order.tolist()]


def zero_subweights(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Set the conv weights where ``masks[name]`` (K x I bool) is True to 0, in place; returns the count."""
    mods = dict(model.named_modules())
    count = 0
    with torch.no_grad():
        for name, mask in masks.items():
            w = mods[name].weight
            flat = w.view(w.shape[0], -1)
            flat[mask.to(w.device)] = 0
            count += int(mask.sum())
    return count
