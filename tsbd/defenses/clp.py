"""Channel Lipschitzness-based Pruning (CLP): Zheng, Zhang, Wang, Zhao & Zhang, "Data-Free
Backdoor Removal Based on Channel Lipschitzness", ECCV 2022.

Data-free: for every BatchNorm channel k fed by a convolution, the upper bound of the channel's
Lipschitz constant (UCLC, :func:`channel_lipschitz`) is

    UCLC_k = sigma_max(W_k) * |gamma_k / sigma_k|,

W_k the conv's filter k reshaped C_in x (kh kw), sigma_k = sqrt(running_var_k + eps) the BN's
scale. Channels whose UCLC exceeds mean + u * std of their layer (:func:`clp_prune`) are pruned
by zeroing the BN's gamma and beta. No clean data is used (the clean set only gives the input
size for tracing the network); the model is otherwise returned as it is, without fine-tuning.

Pairing (BackdoorBench @ f02e353, ``defense/clp.py`` ``CLP_prune``, lines 56-81). UCLC bounds
BN(conv(x)), so each BN must be paired with the conv that FEEDS it
(:func:`tsbd.models.surgery.bn_conv_pairs`, traced from the data flow). In a pre-activation ResNet,
a block's ``bn1`` reads the residual sum of the previous block, which no single filter bounds: it
is left unpruned, and listed under ``unpaired``. BackdoorBench pairs each BN with the previous
Conv2d in module order, which for PreActResNet18 scores ``bn1`` channels with the previous block's
``conv2`` or shortcut filters; ``pairing="module-order"`` reproduces that for comparison with its
numbers. We also take sigma_k with the BN's eps (the scale the layer applies); BackdoorBench uses
sqrt(running_var), which divides by 0 for a channel of zero variance.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from tsbd.config import FINITE, option
from tsbd.defenses.base import DEFENSES, Defense, DefenseConfig
from tsbd.models.surgery import bn_conv_pairs, zero_channels

U_SWEEP = [round(0.5 * i, 1) for i in range(21)]  # BackdoorBench logs u in linspace(0, 10, 21)


@dataclasses.dataclass(frozen=True)
class CLPConfig(DefenseConfig):
    u: float = option(3.0, "prune channels with UCLC > mean + u * std of their layer",
                      "BackdoorBench config/defense/clp/config.yaml, CLP paper", check=FINITE)
    pairing: Literal["dataflow", "module-order"] = option(
        "dataflow", "how a BN finds its conv: the conv feeding it, or BackdoorBench's previous conv in module order",
        "CLP paper (BackdoorBench: module-order)")


def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC of each output channel of BN(conv(.)): sigma_max(W_k as C_in x kh kw) * |gamma_k| / sqrt(var_k + eps)."""
    w = conv.weight.detach().float()
    spectral = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(spectral)
    scale = (gamma / torch.sqrt(bn.running_var.detach().float() + bn.eps)).abs()
    return spectral * scale


def clp_prune(model: nn.Module, pairs: list[tuple[str, str | None]], u: float) -> dict:
    """Zero gamma and beta of every paired BN channel with UCLC > mean + u * std (unbiased std over the
    layer's channels), in place. Returns the pruned channel indices per BN, and the per-u counts."""
    mods = dict(model.named_modules())
    pruned: dict[str, list[int]] = {}
    by_u = {str(v): 0 for v in U_SWEEP}
    for bn_name, conv_name in pairs:
        bn = mods[bn_name]
        if conv_name is None or bn.weight is None:
            continue
        uclc = channel_lipschitz(mods[conv_name], bn)
        mean, std = uclc.mean(), uclc.std()
        for v in U_SWEEP:
            by_u[str(v)] += int((uclc > mean + v * std).sum())
        idx = torch.nonzero(uclc > mean + u * std).flatten()
        zero_channels(bn, idx)
        pruned[bn_name] = idx.tolist()
    return {"pruned_channels": pruned, "pruned_by_u": by_u}


@DEFENSES.register("clp")
class ChannelLipschitzPruning(Defense):
    """CLP (Zheng et al. 2022): data-free pruning of channels with outlying Lipschitz upper bounds."""

    name = "clp"
    config_class = CLPConfig

    def run(self, model, clean, *, runtime, seed, progress, stages, result):
        cfg: CLPConfig = self.config
        with stages.stage("prune"):
            pairs = bn_conv_pairs(model, clean.image_shape, rule=cfg.pairing)
            info = clp_prune(model, pairs, cfg.u)
        per_layer = {name: len(idx) for name, idx in info["pruned_channels"].items()}
        result.info.update({
            "pairs": {bn: conv for bn, conv in pairs if conv is not None},
            "unpaired": [bn for bn, conv in pairs if conv is None],
            "pruned_per_layer": per_layer,
            "pruned": sum(per_layer.values()),
            "channels": sum(dict(model.named_modules())[bn].num_features for bn in per_layer),
            **info,
        })
        stages.observe("after_prune", model)
        return model
