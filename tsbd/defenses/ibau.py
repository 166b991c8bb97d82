"""Implicit Backdoor Adversarial Unlearning (Zeng et al., "Adversarial Unlearning of Backdoors
via Implicit Hypergradient", ICLR 2022), as BackdoorBench runs it (``defense/i-bau.py``).

The minimax  min_theta max_delta  L(theta, delta)  is solved in ``n_rounds`` rounds; the model
stays in eval mode throughout, as in BackdoorBench:

1. inner maximization (:func:`universal_perturbation_step`) -- one pass over the clean data
   builds a universal perturbation delta (1 x C x H x W, from 0) by SGD (lr 10) on
   -CE(f(x + delta), f(x)) + 0.001 |delta|^2, with no norm projection;
2. outer minimization (:func:`hypergradient_step`) -- one pass over batches cached once: the
   loss CE(f(x + delta on 1% of the batch), y); its gradient w.r.t. theta includes the implicit
   term through the inner problem's fixed point delta = Phi(delta) = delta - 0.1 grad_delta
   inner(delta), approximated by K = 5 fixed-point iterations of v <- J_Phi^T v + dL/ddelta
   (:func:`fixed_point_hypergradient`, the ``hypergrad`` package's ``fixed_point``); Adam
   (lr 1e-4, amsgrad) steps on it.

BackdoorBench works on normalized tensors, so delta lives in normalized units; our models
normalize inside ``forward``, so delta is scaled by the model's ``Normalize`` std before being
added to the [0, 1] input -- the same perturbation, lr and penalty as theirs. As BackdoorBench
(and the authors' code), the fixed-point map uses the first cached batch, the clean batches are
augmented once and reused every round, and the perturbation pass draws fresh augmentations.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn

from tsbd.config import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, option
from tsbd.data.base import ImageSet
from tsbd.defenses.base import DEFENSES, Defense, DefenseConfig
from tsbd.models.normalize import Normalize
from tsbd.models.surgery import frozen
from tsbd.train.augment import crop_flip
from tsbd.train.engine import TrainConfig, fit
from tsbd.train.runtime import Runtime

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class IBAUConfig(DefenseConfig):
    n_rounds: int = option(5, "minimax rounds", "BackdoorBench i-bau config", check=NON_NEGATIVE)
    K: int = option(5, "fixed-point iterations of the implicit hypergradient", "BackdoorBench i-bau config",
                    check=AT_LEAST_ONE)
    lr: float = option(1e-4, "outer Adam learning rate (amsgrad, betas 0.9/0.999, no weight decay)",
                       "BackdoorBench i-bau config / train_settings_generate.py", check=POSITIVE)
    perturbation_lr: float = option(10.0, "SGD learning rate of the universal perturbation", "BackdoorBench i-bau.py",
                                    check=POSITIVE)
    fixed_point_lr: float = option(0.1, "gradient step of the inner fixed-point map", "BackdoorBench i-bau.py",
                                   check=POSITIVE)
    perturbation_penalty: float = option(0.001, "weight of |delta|^2 in the inner objective", "BackdoorBench i-bau.py",
                                         check=NON_NEGATIVE)
    portion: float = option(0.01, "fraction of each outer batch that carries the perturbation",
                            "BackdoorBench i-bau.py loss_outer", check=FRACTION)
    augment: bool = option(True, "random crop + flip on clean batches", "BackdoorBench train transform")


def input_scale(model: nn.Module) -> torch.Tensor | float:
    """The std the model divides its [0, 1] input by (1 if it has no :class:`Normalize`)."""
    for m in model.modules():
        if isinstance(m, Normalize):
            return m.std
    return 1.0


def _forward(model, x, runtime):
    with runtime.autocast():
        return model(x).float()


def universal_perturbation_step(delta: torch.Tensor, penalty: float, scale):
    """BackdoorBench's inner pass: push predictions away from the model's own labels."""

    def step(model, x, y, optimizer, runtime):
        with torch.no_grad():
            own = _forward(model, x, runtime).argmax(1)
        loss = nn.functional.cross_entropy(_forward(model, x + delta * scale, runtime), own)
        objective = -loss + penalty * delta.pow(2).sum()
        delta.grad = torch.autograd.grad(objective, [delta])[0]
        optimizer.step()
        return loss.detach()

    return step


def fixed_point_hypergradient(model: nn.Module, params: list[torch.Tensor], delta: torch.Tensor,
                              outer: tuple[torch.Tensor, torch.Tensor], inner: tuple[torch.Tensor, torch.Tensor],
                              carriers: torch.Tensor, cfg: IBAUConfig, scale, runtime: Runtime,
                              tol: float = 1e-10) -> tuple[list[torch.Tensor], torch.Tensor]:
    """d outer_loss / d params through the inner fixed point (hypergrad ``fixed_point``).

    ``carriers`` (bool, one per outer image) marks the images the perturbation is added to.
    Returns (gradient per parameter, outer loss).
    """
    w = delta.detach().requires_grad_(True)
    x, y = outer
    shift = carriers.view(-1, 1, 1, 1).to(x.dtype) * (w * scale)
    outer_loss = nn.functional.cross_entropy(_forward(model, x + shift, runtime), y)
    grads = torch.autograd.grad(outer_loss, [w, *params], allow_unused=True)
    g_w = grads[0] if grads[0] is not None else torch.zeros_like(w)
    g_params = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads[1:])]

    x0, y0 = inner
    inner_obj = (-nn.functional.cross_entropy(_forward(model, x0 + w * scale, runtime), y0)
                 + cfg.perturbation_penalty * w.pow(2).sum())
    w_mapped = w - cfg.fixed_point_lr * torch.autograd.grad(inner_obj, w, create_graph=True)[0]
    v = torch.zeros_like(w)
    for _ in range(cfg.K):  # v = sum_k (dPhi/dw^T)^k dL/dw, a truncated Neumann series
        v_prev = v
        v = torch.autograd.grad(w_mapped, w, grad_outputs=v, retain_graph=True)[0] + g_w
        if float((v - v_prev).norm()) < tol:
            break
    implicit = torch.autograd.grad(w_mapped, params, grad_outputs=v, allow_unused=True)
    return [g if i is None else g + i for g, i in zip(g_params, implicit)], outer_loss.detach()


def hypergradient_step(delta_ref: dict, cfg: IBAUConfig, scale, generator: torch.Generator):
    """Outer step: implicit hypergradient of the unlearning loss, then the optimizer's update.
    The fixed-point map uses the first batch this step ever sees (BackdoorBench: ``images_list[0]``)."""
    anchor: dict = {}

    def step(model, x, y, optimizer, runtime):
        if "batch" not in anchor:
            anchor["batch"] = (x, y)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        carriers = torch.zeros(len(x), dtype=torch.bool)
        carriers[torch.randperm(len(x), generator=generator)[: int(len(x) * cfg.portion)]] = True
        grads, loss = fixed_point_hypergradient(model, params, delta_ref["delta"], (x, y), anchor["batch"],
                                                carriers.to(x.device), cfg, scale, runtime)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        return loss

    return step


def ibau_unlearn(model: nn.Module, clean: ImageSet, cfg: IBAUConfig, runtime: Runtime, *, seed: int = 0,
                 progress: bool = False) -> dict:
    """Run the i-BAU rounds on ``model`` in place; returns diagnostics."""
    params = [p for p in model.parameters() if p.requires_grad]
    outer_opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0, amsgrad=True)
    scale = input_scale(model)
    generator = torch.Generator().manual_seed(seed)
    cached = ImageSet(crop_flip(clean.x, generator, flip=clean.hflip), clean.y) if cfg.augment else clean
    one_pass = dict(epochs=1, batch_size=cfg.batch_size, schedule="constant", drop_last=False)
    outer_step = None
    delta_ref: dict = {}
    rounds = []
    c, h, w = clean.image_shape
    for r in range(cfg.n_rounds):
        delta = torch.zeros(1, c, h, w, device=runtime.device, requires_grad=True)
        delta_ref["delta"] = delta
        with frozen(model):  # only the perturbation trains here
            pert = fit(model, clean, TrainConfig(lr=cfg.perturbation_lr, augment=cfg.augment, **one_pass), runtime,
                       seed=seed + 1 + r, step=universal_perturbation_step(delta, cfg.perturbation_penalty, scale),
                       optimizer=torch.optim.SGD([delta], lr=cfg.perturbation_lr), train_mode=False,
                       desc=f"i-BAU round {r + 1} perturbation", progress=progress)
        if outer_step is None:
            outer_step = hypergradient_step(delta_ref, cfg, scale, generator)
        # the same seed every round: the cached batches come in the same order each time
        res = fit(model, cached, TrainConfig(lr=cfg.lr, augment=False, **one_pass), runtime, seed=seed,
                  step=outer_step, optimizer=outer_opt, train_mode=False, desc=f"i-BAU round {r + 1} unlearning",
                  progress=progress)
        rounds.append({"perturbation_loss": pert.history[-1]["loss"] if pert.history else math.nan,
                       "perturbation_norm": float(delta.detach().norm()),
                       "unlearning_loss": res.history[-1]["loss"] if res.history else math.nan})
    return {"rounds": rounds}


@DEFENSES.register("ibau")
class IBAU(Defense):
    """i-BAU: minimax unlearning of a universal adversarial perturbation via implicit hypergradients."""

    name = "ibau"
    config_class = IBAUConfig

    def run(self, model, clean, *, runtime, seed, progress, stages, result):
        cfg: IBAUConfig = self.config
        with stages.stage("unlearn"):
            result.info.update(ibau_unlearn(model, clean, cfg, runtime, seed=seed, progress=progress))
        stages.observe("after_unlearn", model)
        return model
