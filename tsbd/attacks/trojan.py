"""TrojanNN (Liu et al., NDSS 2018, "Trojaning attack on neural networks"): a trigger inside a
fixed mask, optimized so that chosen internal neurons of a trained clean model fire strongly;
poisoned images get the trigger added and the target label (dirty-label, random 10%).

As BackdoorBench configures it (``attack/trojannn.py``, ``config/attack/trojannn/*.yaml``):

* neurons: the ``num_neurons`` = 2 input units of the model's last linear layer with the
  largest sum over outputs of |W|;
* optimization: the model sees only the trigger, x * mask (a black image elsewhere); cost =
  sum over the chosen neurons of (activation - 100)^2; x <- x - 0.1 * sign(grad); projected to
  |x - x0| <= 0.3 and [0, 1]; at most ``mask_update_iters`` = 1000 steps, stop when cost < 1e-3.
  It runs through the engine's :func:`tsbd.train.fit` (one-image data set, one step per
  "epoch", the model frozen in eval mode, only the trigger trained);
* poisoning: x' = clip(x + round(255 * t), 0, 255).

Differences, on purpose:

* the clean model is *trained* (:func:`tsbd.reference.clean_reference_model`, cached); BackdoorBench
  builds a 1000-class head that cannot load the trained 10-class ``linear`` weights, so it
  selects its neurons on a randomly initialized layer;
* the sum x + t is computed without uint8 overflow (BackdoorBench casts before clipping, so
  bright pixels wrap around);
* the default mask is tsbd's own apple-like blob (an ellipse with a stem, ~100 pixels at rows
  16-29, cols 18-28 on 32 x 32 images) starting white, like BackdoorBench's ``apple4.png``
  resized to 32 x 32 (117 pixels, same area); ``mask_image`` takes ``apple4.png`` itself (its
  non-zero pixels are the mask, its values the starting trigger).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from tsbd.attacks.base import ATTACKS, Attack, AttackConfig, load_trigger_image
from tsbd.attacks.resources import (
    CleanModelRecipe,
    Resource,
    file_sha256,
    image_shape_of,
    last_linear,
    load_or_generate,
    runtime_of,
)
from tsbd.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNCONSTRAINED, option
from tsbd.data.base import Dataset, ImageSet
from tsbd.errors import TsbdError
from tsbd.train.engine import TrainConfig, fit

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrojanConfig(AttackConfig):
    num_neurons: int = option(2, "input units of the last linear layer the trigger excites",
                              "BackdoorBench trojannn/preactresnet18.yaml num_neuron", check=AT_LEAST_ONE)
    neuron_target: float = option(100.0, "activation the chosen neurons are pushed to",
                                  "BackdoorBench trojannn neuron_target_values", check=POSITIVE)
    mask_update_iters: int = option(1000, "maximum sign-gradient steps on the trigger",
                                    "BackdoorBench trojannn mask_update_iters", check=NON_NEGATIVE)
    step_size: float = option(0.1, "sign-gradient step on the trigger ([0, 1] scale)",
                              "BackdoorBench attack/trojannn.py", check=POSITIVE)
    bound: float = option(0.3, "L-infinity bound around the initial trigger ([0, 1] scale)",
                          "BackdoorBench attack/trojannn.py", check=NON_NEGATIVE)
    stop_cost: float = option(1e-3, "stop once the cost falls below this", "BackdoorBench attack/trojannn.py",
                              check=NON_NEGATIVE)
    mask_image: str = option("", "image whose non-zero pixels are the mask and values the initial trigger "
                             "(BackdoorBench: apple4.png); empty = tsbd's apple-like blob",
                             "BackdoorBench trojannn mask_path", check=UNCONSTRAINED)
    clean_arch: str = option("", "architecture of the clean model; empty = the victim's", "BackdoorBench (same model)",
                             check=UNCONSTRAINED)
    clean_epochs: int = option(10, "epochs of the clean model ('cpu' preset)", "tsbd (CPU budget)", check=AT_LEAST_ONE)


def default_trojan_mask(h: int, w: int) -> torch.Tensor:
    """tsbd's apple-like mask (H x W bool): an ellipse centred at (0.765 H, 0.735 W) with radii
    (0.18 H, 0.17 W) and a stem above it -- on 32 x 32, 103 pixels at rows 16-29 and cols 18-28
    (body rows 19-29, stem rows 16-18), the place and area of BackdoorBench's apple4.png."""
    rows = (torch.arange(h, dtype=torch.float64) + 0.5).view(-1, 1) / h
    cols = (torch.arange(w, dtype=torch.float64) + 0.5).view(1, -1) / w
    body = ((rows - 0.765) / 0.18) ** 2 + ((cols - 0.735) / 0.17) ** 2 <= 1
    stem = (rows >= 0.5) & (rows < 0.59) & (cols >= 0.72) & (cols < 0.785)
    return body | stem


class NeuronExcitation(nn.Module):
    """A frozen classifier whose input is a learnable trigger (inside a mask) on a black image;
    the forward pass returns the activations of the chosen input units of its last linear layer."""

    def __init__(self, classifier: nn.Module, initial: torch.Tensor, mask: torch.Tensor, neurons: torch.Tensor):
        super().__init__()
        self.classifier = classifier
        self.trigger = nn.Parameter(initial.clone().unsqueeze(0))
        self.register_buffer("initial", initial.clone().unsqueeze(0))
        self.register_buffer("mask", mask.float().view(1, 1, *mask.shape))
        self.register_buffer("neurons", neurons.clone())
        self._head_name, _ = last_linear(classifier)

    def activations(self, trigger: torch.Tensor) -> torch.Tensor:
        captured = []
        head = self.classifier.get_submodule(self._head_name)
        handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.classifier(trigger * self.mask)
        finally:
            handle.remove()
        return captured[0].flatten(1)[:, self.neurons]

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.activations(self.trigger)


def excitation_step(target: float, bound: float):
    """A :func:`fit` step: x <- x - lr * sign(grad of sum (a - target)^2), projected (BackdoorBench)."""

    def step(model: NeuronExcitation, x, y, optimizer, runtime):
        cost = (model().float() - target).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        cost.backward()
        model.trigger.grad.sign_()
        optimizer.step()
        with torch.no_grad():
            low, high = model.initial - bound, model.initial + bound
            model.trigger.copy_(torch.maximum(torch.minimum(model.trigger, high), low).clamp_(0, 1))
        return cost.detach()

    return step


@ATTACKS.register("trojan")
class Trojan(Attack):
    """TrojanNN (Liu et al., NDSS 2018): a masked trigger that excites chosen neurons of a clean model."""

    name = "trojan"
    config_class = TrojanConfig
    builds = "a clean model and its trigger"

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.resource: Resource | None = None
        self._trigger: torch.Tensor | None = None  # uint8 C x H x W, zero outside the mask

    def initial_trigger(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(initial trigger C x H x W in [0, 1], zero outside the mask; mask H x W bool)."""
        c, h, w = shape
        if self.config.mask_image:
            image = load_trigger_image(self.config.mask_image, (h, w))[:c].float() / 255
            mask = image.amax(0) > 0
        else:
            mask = default_trojan_mask(h, w)
            image = torch.ones(shape)  # white, like apple4.png
        if not mask.any():
            raise TsbdError(f"the Trojan mask image {self.config.mask_image} has no non-zero pixel at {h}x{w}")
        return image * mask, mask

    def prepare(self, dataset: Dataset, **context):
        super().prepare(dataset, **context)
        cfg = self.config
        runtime = runtime_of(context)
        seed = int(context.get("seed", 0) or 0)
        cache_dir = context.get("cache_dir")
        progress = bool(context.get("progress", False))
        shape = dataset.train.image_shape
        initial, mask = self.initial_trigger(shape)
        recipe = CleanModelRecipe.from_context(cfg.clean_arch, cfg.clean_epochs, context)
        generator_cfg = {k: getattr(cfg, k) for k in ("num_neurons", "neuron_target", "mask_update_iters", "step_size",
                                                       "bound", "stop_cost")}
        settings = {"generator": generator_cfg, "seed": seed, "data": dataset.fingerprint,
                    "image_shape": image_shape_of(dataset), "clean_model": recipe.settings(dataset),
                    "mask_image": file_sha256(cfg.mask_image) if cfg.mask_image else "tsbd default apple blob"}

        def generate():
            return self._generate(dataset, recipe, initial, mask, runtime, cache_dir, progress)

        self.resource = load_or_generate("trojan", settings, generate, cache_dir)
        self._trigger = self.resource.tensors["trigger"]

    def _generate(self, dataset, recipe: CleanModelRecipe, initial, mask, runtime, cache_dir, progress):
        cfg = self.config
        classifier, clean_info = recipe.build(dataset, runtime, cache_dir, progress)
        head_name, head = last_linear(classifier)
        if cfg.num_neurons > head.in_features:
            raise TsbdError(f"num_neurons {cfg.num_neurons} exceeds the {head.in_features} inputs of {head_name}")
        neurons = torch.topk(head.weight.detach().abs().sum(0).cpu(), cfg.num_neurons).indices.sort().values
        net = NeuronExcitation(classifier, initial, mask, neurons.to(runtime.device)).to(runtime.device)
        with torch.no_grad():
            before = net().float().cpu()[0]
        stopped = {"early": False}

        def stop(epoch, model, stats):
            stopped["early"] = stats["loss"] < cfg.stop_cost
            return stopped["early"]

        iters = 0
        if cfg.mask_update_iters > 0:
            one = ImageSet((initial * 255).round().to(torch.uint8).unsqueeze(0), torch.zeros(1, dtype=torch.int64))
            train_cfg = TrainConfig(epochs=cfg.mask_update_iters, batch_size=1, lr=cfg.step_size, momentum=0.0,
                                    weight_decay=0.0, schedule="constant", augment=False, drop_last=False)
            optimizer = torch.optim.SGD([net.trigger], lr=cfg.step_size, momentum=0.0)
            result = fit(net, one, train_cfg, runtime, seed=recipe.seed, desc="Trojan trigger",
                         step=excitation_step(cfg.neuron_target, cfg.bound), optimizer=optimizer,
                         on_epoch_end=stop, progress=progress, train_mode=False)
            iters = result.epochs
        with torch.no_grad():
            after = net().float().cpu()[0]
            final = (net.trigger.detach().float().cpu()[0] * mask).clamp(0, 1)
        trigger = (final * 255).round().to(torch.uint8)
        info = {"clean_model": clean_info, "layer": f"{head_name} (input)", "neurons": neurons.tolist(),
                "activation_initial": before.tolist(), "activation_final": after.tolist(),
                "iterations": iters, "stopped_early": stopped["early"], "mask_pixels": int(mask.sum())}
        return {"trigger": trigger, "mask": mask.to(torch.uint8), "initial": initial.float(),
                "neurons": neurons.to(torch.int64)}, info

    @property
    def trigger(self) -> torch.Tensor:
        """The uint8 C x H x W trigger, zero outside the mask (after :meth:`prepare`)."""
        if self._trigger is None:
            raise TsbdError("the Trojan attack has no trigger yet; call prepare(dataset, ...) first")
        return self._trigger

    def apply(self, x, index=None, split="train"):
        return (x.to(torch.int16) + self.trigger.to(torch.int16)).clamp_(0, 255).to(torch.uint8)

    def describe(self):
        out = super().describe()
        if self.resource is not None:
            out["resource"] = self.resource.describe()
        return out
