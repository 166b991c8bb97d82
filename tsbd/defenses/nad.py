"""Neural Attention Distillation (NAD): Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention
Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021.

1. teacher = the backdoored model fine-tuned on the clean set (:func:`tsbd.defenses.ft.finetune`);
2. student = the backdoored model trained with CE + sum_l beta_l * AT_l (:func:`attention_distillation_step`),
   where AT_l is the mean squared difference of the student's and the frozen teacher's attention
   maps (:func:`attention_map`) at feature point l.

Defaults are BackdoorBench's ``config/defense/nad/config.yaml``: te_epochs 10 for the teacher and,
as BackdoorBench codes it, for the student; SGD 0.01 / 0.9 / 5e-4; p = 2; betas 500 / 1000 / 1000.
BackdoorBench's teacher schedule (cosine with T_max 100 stopped after 10 epochs, lr >= 0.0098) and
its student schedule (lr fixed at 0.01 for epochs < 20) are both taken as a constant 0.01.

Layers. NAD distills at the ends of the network's last stages (the paper's WRN: its three
groups). We find them generically with :func:`tsbd.models.surgery.stage_outputs` and use the last
``len(betas)`` stage ends larger than 1x1 (the deepest gets the last beta). PreActResNet18:
layer2, layer3, layer4 with 500 / 1000 / 1000. BackdoorBench uses layer3 (500), layer4 (1000) and
the avgpool output (1000) -- a 1x1 map whose normalized attention is constant, a term that is
0 -- and for VGG19-BN only that degenerate term, i.e. plain fine-tuning; we do not repeat that.
The teacher is kept in eval mode (frozen BN statistics); BackdoorBench leaves it in train mode.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from tsbd.config import MOMENTUM, NON_NEGATIVE, POSITIVE, UNCONSTRAINED, option
from tsbd.defenses.base import DEFENSES, Defense, DefenseConfig
from tsbd.defenses.ft import FTConfig, finetune
from tsbd.errors import TsbdError
from tsbd.metrics import accuracy
from tsbd.models.surgery import capture_features, stage_outputs
from tsbd.train.engine import StepFn, predict


@dataclasses.dataclass(frozen=True)
class NADConfig(DefenseConfig):
    teacher_epochs: int = option(10, "epochs of fine-tuning that make the teacher (te_epochs)",
                                 "BackdoorBench config/defense/nad/config.yaml", check=NON_NEGATIVE)
    epochs: int = option(10, "epochs of student training (BackdoorBench also uses te_epochs here)",
                         "BackdoorBench defense/nad.py", check=NON_NEGATIVE)
    lr: float = option(0.01, "SGD learning rate (teacher and student)", "BackdoorBench config/defense/nad/config.yaml",
                       check=POSITIVE)
    momentum: float = option(0.9, "SGD momentum", "BackdoorBench sgd_momentum", check=MOMENTUM)
    weight_decay: float = option(5e-4, "SGD weight decay", "BackdoorBench wd (the yaml's 1e-4 is unused)",
                                 check=NON_NEGATIVE)
    schedule: Literal["constant", "cosine"] = option(
        "constant", "learning-rate schedule of both stages", "BackdoorBench (lr stays ~0.01 for 10 epochs)")
    betas: tuple[float, ...] = option((500.0, 1000.0, 1000.0), "AT loss weights, shallowest to deepest layer",
                                      "BackdoorBench beta1/beta2/beta3, NAD paper", check=NON_NEGATIVE)
    p: float = option(2.0, "attention map power: mean over channels of |f|^p", "BackdoorBench p, NAD paper",
                      check=POSITIVE)
    layers: tuple[str, ...] = option(
        (), "feature points to distill ('module' output or 'module:input'); empty = the last len(betas) stage ends",
        "tsbd (stage_outputs)", check=UNCONSTRAINED)
    augment: bool = option(True, "random crop + flip on clean batches", "BackdoorBench train transform")


def attention_map(features: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """N x C x H x W -> N x (H W): mean over channels of |f|^p, flattened, divided by its L2 norm (+ eps).
    (Zagoruyko & Komodakis sum over channels; after normalizing, mean and sum agree.)"""
    a = features.float().abs().pow(p).mean(1).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + eps)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps (BackdoorBench's ``AT``)."""
    return nn.functional.mse_loss(attention_map(student, p), attention_map(teacher, p))


def attention_distillation_step(teacher: nn.Module, layers: Sequence[str], betas: Sequence[float],
                                p: float = 2.0) -> StepFn:
    """A :func:`tsbd.train.engine.fit` step: CE + sum beta_l AT_l against the frozen ``teacher``."""
    if len(layers) != len(betas):
        raise TsbdError(f"NAD needs one beta per layer: {len(layers)} layers, {len(betas)} betas")

    def step(model, x, y, optimizer, runtime):
        with torch.no_grad(), capture_features(teacher, layers) as t_feats, runtime.autocast():
            teacher(x)
        with capture_features(model, layers) as s_feats, runtime.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        for layer, beta in zip(layers, betas):
            loss = loss + beta * attention_loss(s_feats[layer], t_feats[layer], p)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def distillation_layers(model: nn.Module, image_shape: Sequence[int], cfg: NADConfig) -> tuple[list[str], list[float]]:
    """The configured layers, or the last ``len(betas)`` stage ends; with fewer stages, the last betas."""
    layers = list(cfg.layers) or stage_outputs(model, image_shape)[-len(cfg.betas):]
    if not layers:
        raise TsbdError(f"found no feature map larger than 1x1 to distill in {type(model).__name__}; "
                        "name the layers with --opt layers=...")
    if len(layers) > len(cfg.betas):
        raise TsbdError(f"{len(layers)} NAD layers but {len(cfg.betas)} betas; give one beta per layer")
    return layers, list(cfg.betas)[-len(layers):]


@DEFENSES.register("nad")
class NeuralAttentionDistillation(Defense):
    """NAD (Li et al. 2021): attention distillation from a fine-tuned teacher."""

    name = "nad"
    config_class = NADConfig

    def run(self, model, clean, *, runtime, seed, progress, stages, result):
        cfg: NADConfig = self.config
        layers, betas = distillation_layers(model, clean.image_shape, cfg)
        result.info.update({"layers": layers, "betas": betas})
        stage_cfg = dict(batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         schedule=cfg.schedule, augment=cfg.augment)
        with stages.stage("teacher"):
            teacher = copy.deepcopy(model)
            result.info["teacher"] = finetune(teacher, clean, FTConfig(epochs=cfg.teacher_epochs, **stage_cfg),
                                              runtime, seed=seed, progress=progress, desc="NAD teacher")
            teacher.eval().requires_grad_(False)
            # accuracy on the clean defense set the teacher was tuned on (test metrics: stages)
            result.info["teacher_clean_acc"] = accuracy(predict(teacher, clean.x, runtime), clean.y)
        stages.observe("teacher", teacher)
        with stages.stage("distill"):
            step = attention_distillation_step(teacher, layers, betas, cfg.p)
            result.info["student"] = finetune(model, clean, FTConfig(epochs=cfg.epochs, **stage_cfg), runtime,
                                              seed=seed + 1, progress=progress, step=step, desc="NAD student")
        stages.observe("after_distill", model)
        return model
