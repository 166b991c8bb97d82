"""The paper's two observations (Sec. 4, Fig. 1), as functions of a backdoored model.

Observation 1: the neurons that change most during *clean* unlearning (gradient ascent on clean
data until clean accuracy <= 10%) are those that change most during *poison* unlearning (ascent
on poisoned data with the target label until ASR <= 10%) -- measured as the Pearson correlation
of the two per-neuron NWC vectors, per layer and over all neurons.

Observation 2: during clean unlearning, a backdoored model's neurons receive larger gradients
than a clean model's -- measured as each neuron's gradient L2 norm averaged over one epoch.

Both reuse TSBD's own stage 1a (:func:`tsbd.defenses.tsbd.clean_unlearn`): poison unlearning is
the same gradient ascent on a set whose labels are the target, where "accuracy" is the ASR.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tsbd.data.base import ImageSet
from tsbd.data.poison import sample_indices
from tsbd.defenses.tsbd import TSBDConfig, clean_unlearn
from tsbd.errors import TsbdError
from tsbd.models.surgery import neuron_weight_change, prunable_units
from tsbd.train.engine import TrainConfig, fit
from tsbd.train.runtime import Runtime


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two equally long vectors (nan when either is constant)."""
    a, b = a.double().flatten(), b.double().flatten()
    if a.shape != b.shape or len(a) < 2:
        raise TsbdError(f"pearson needs two vectors of one length >= 2, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float("nan")


def poison_unlearning_set(poisoned_train: ImageSet, poison_index: torch.Tensor, target: int, count: int,
                          seed: int) -> ImageSet:
    """``count`` of the attacker's poisoned training images, labelled with the target (what
    poison unlearning ascends on; the paper's Sec. 4 setting)."""
    if len(poison_index) == 0:
        raise TsbdError("the attack poisoned no training image; observation 1 needs a poisoned model")
    pick = poison_index[sample_indices(torch.arange(len(poison_index)), min(count, len(poison_index)), seed)]
    x = poisoned_train.x[pick]
    return ImageSet(x, torch.full((len(pick),), int(target), dtype=torch.int64))


def attacker_poison_set(setup, count: int, seed: int) -> ImageSet:
    """``count`` poisoned training images labelled with the target, as the attacker trained on
    them: drawn from the stored poisoned set, or -- for an attack that poisons each batch on
    the fly (``poisoning="batch"``) -- seeded training images given their trigger now."""
    attack, ptrain = setup.attack, setup.poisoned_train
    if not attack.poisons_per_batch:
        return poison_unlearning_set(ptrain.data, ptrain.poison_index, attack.config.target, count, seed)
    idx = sample_indices(torch.arange(len(ptrain.data)), min(count, len(ptrain.data)), seed)
    x = attack.apply_chunked(ptrain.data.x[idx], idx, "train")
    return ImageSet(x, torch.full((len(idx),), int(attack.config.target), dtype=torch.int64))


@dataclasses.dataclass
class NWCComparison:
    """Per-neuron NWC of clean and of poison unlearning, from one backdoored model."""

    clean: dict[str, torch.Tensor]
    poison: dict[str, torch.Tensor]
    clean_info: dict
    poison_info: dict

    def per_layer_correlation(self) -> dict[str, float]:
        return {name: pearson(self.clean[name], self.poison[name]) for name in self.clean if len(self.clean[name]) > 1}

    def overall_correlation(self) -> float:
        return pearson(torch.cat(list(self.clean.values())), torch.cat(list(self.poison.values())))

    def top_overlap(self, ratio: float) -> float:
        """Fraction of the top-``ratio`` neurons by clean NWC that are also top by poison NWC."""
        c, p = torch.cat(list(self.clean.values())), torch.cat(list(self.poison.values()))
        k = max(1, int(ratio * len(c)))
        top_c = set(torch.topk(c, k).indices.tolist())
        top_p = set(torch.topk(p, k).indices.tolist())
        return len(top_c & top_p) / k

    def rows(self) -> list[dict]:
        return [{"layer": name, "neuron": k, "nwc_clean": float(self.clean[name][k]),
                 "nwc_poison": float(self.poison[name][k])}
                for name in self.clean for k in range(len(self.clean[name]))]


def nwc_comparison(model: nn.Module, clean: ImageSet, poisoned: ImageSet, cfg: TSBDConfig, runtime: Runtime, *,
                   seed: int = 0, progress: bool = False) -> NWCComparison:
    """Observation 1: clean-unlearn and poison-unlearn copies of ``model`` (each stopped at
    ``cfg.unlearn_acc_threshold``) and return both NWC vectors."""
    clean_ul, clean_info = clean_unlearn(model, clean, cfg, runtime, seed=seed, progress=progress)
    poison_ul, poison_info = clean_unlearn(model, poisoned, cfg, runtime, seed=seed, progress=progress)
    return NWCComparison(neuron_weight_change(model, clean_ul), neuron_weight_change(model, poison_ul),
                         clean_info, poison_info)


def gradient_norms_during_unlearning(model: nn.Module, clean: ImageSet, lr: float, runtime: Runtime, *,
                                     batch_size: int = 256, seed: int = 0,
                                     progress: bool = False) -> dict[str, torch.Tensor]:
    """Observation 2: per-neuron gradient L2 norm, averaged over the batches of one epoch of
    clean unlearning (gradient ascent, SGD ``lr``, momentum 0.9, train mode) on a copy of ``model``."""
    import copy

    work = copy.deepcopy(model)
    units = prunable_units(work)
    sums = {name: torch.zeros(conv.out_channels, dtype=torch.float64) for name, conv in units}
    batches = [0]

    def step(m, x, y, optimizer, rt):
        with rt.autocast():
            loss = nn.functional.cross_entropy(m(x), y)
        optimizer.zero_grad(set_to_none=True)
        (-loss).backward()
        for name, conv in units:
            g = conv.weight.grad
            if g is not None:
                sums[name] += g.detach().float().flatten(1).norm(dim=1).double().cpu()
        batches[0] += 1
        optimizer.step()
        return loss.detach()

    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=lr, momentum=0.9, weight_decay=0.0, schedule="constant",
                      augment=True, drop_last=False)
    fit(work, clean, cfg, runtime, seed=seed, step=step, desc="gradient norms (1 epoch of clean unlearning)",
        progress=progress)
    return {name: (s / max(1, batches[0])).float() for name, s in sums.items()}
