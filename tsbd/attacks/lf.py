"""LF, the low-frequency attack (Zeng et al., ICCV 2021, "Rethinking the backdoor attacks'
triggers: a frequency perspective"): a smooth universal adversarial perturbation, found
against a clean model of the victim's architecture, added to the poisoned images.

BackdoorBench ships the perturbation as a file (``resource/lowFrequency/<data>_<model>_0_255.npy``)
and applies x' = uint8(clip(x + t, 0, 255)) to a random 10% of the training set with the label
flipped to the target (dirty-label). Its generator (``resource/lowFrequency/generate_pattern.py``)
runs an untargeted DeepFool universal perturbation with Gaussian smoothing after each update.

tsbd generates the perturbation itself, reproducibly from the seed, and caches it
(:mod:`tsbd.attacks.resources`):

1. a clean model of the victim's architecture (:func:`tsbd.reference.clean_reference_model`,
   the "cpu" preset with ``clean_epochs`` epochs, cached);
2. a *targeted* universal perturbation: projected gradient descent of the cross-entropy
   toward the target class (each step the low-passed gradient scaled to a peak of ``step_size``) on
   ``images`` non-target training images, through the engine's
   :func:`tsbd.train.fit` (the classifier frozen in eval mode, only the perturbation trained).
   Targeted rather than DeepFool's untargeted direction because the trigger's job is to push
   every image to the target; DeepFool needs one backward pass per class per image, which
   CPUs cannot afford on the full training set;
3. after every step, the projection onto the constraints: an ideal low-pass filter in the 2-D
   Fourier domain (keeps spatial frequencies of radius <= ``cutoff`` x Nyquist; the paper's
   low-pass window; BackdoorBench's generator smooths with a Gaussian instead), then a
   rescaling to the L-infinity bound ``epsilon`` (0.2 x 255, the range of BackdoorBench's
   files). Rescaling, unlike clipping, adds no high frequencies.

The perturbation is rounded to integers on the 0-255 scale and applied as BackdoorBench
does: x' = uint8(clip(x + t, 0, 255)).

``trigger_file`` takes BackdoorBench's ``.npy`` files instead. The PreAct-ResNet18 files are
uint8 (32, 32, 3) in 0..51 and are added on the 0-255 scale. The VGG19-BN files are float32
(1, 32, 32, 3) in [0, 0.2]: BackdoorBench adds them on the 0-255 scale too and truncates, so
they change (almost) no pixel -- an LF attack with those files is effectively no attack. They
are applied exactly that way, with a warning; ``trigger_scale=255`` rescales them to 0..51.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tsbd.attacks.base import ATTACKS, Attack, AttackConfig
from tsbd.attacks.resources import (
    CleanModelRecipe,
    Resource,
    file_sha256,
    image_shape_of,
    load_or_generate,
    runtime_of,
    tensors_sha256,
)
from tsbd.config import AT_LEAST_ONE, POSITIVE, UNCONSTRAINED, Range, option
from tsbd.data.base import Dataset
from tsbd.errors import TsbdError
from tsbd.train.engine import TrainConfig, fit, predict

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LFConfig(AttackConfig):
    epsilon: float = option(0.2, "L-infinity bound of the perturbation, fraction of 255",
                            "BackdoorBench lowFrequency files (values up to 51 = 0.2 x 255)",
                            check=Range(0, 1, low_open=True))
    cutoff: float = option(0.25, "low-pass radius, fraction of the Nyquist frequency (0.25: 4 cycles per 32 px)",
                           "tsbd (Zeng et al. low-pass window; BackdoorBench smooths with a Gaussian)",
                           check=Range(0, 1, low_open=True))
    step_size: float = option(0.01, "largest change of a pixel per optimization step, fraction of 255", "tsbd",
                              check=POSITIVE)
    epochs: int = option(5, "passes over the images when optimizing the perturbation", "tsbd", check=AT_LEAST_ONE)
    images: int = option(2000, "non-target training images the perturbation is optimized on", "tsbd (CPU budget)",
                         check=AT_LEAST_ONE)
    batch_size: int = option(128, "images per optimization step", "tsbd", check=AT_LEAST_ONE)
    clean_arch: str = option("", "architecture of the clean model; empty = the victim's", "BackdoorBench (same model)",
                             check=UNCONSTRAINED)
    clean_epochs: int = option(10, "epochs of the clean model ('cpu' preset)", "tsbd (CPU budget)", check=AT_LEAST_ONE)
    trigger_file: str = option("", "BackdoorBench .npy trigger (H x W x 3 or 1 x H x W x 3, added on 0-255); "
                               "empty = generate", "BackdoorBench lf/default.yaml", check=UNCONSTRAINED)
    trigger_scale: float = option(1.0, "factor applied to trigger_file values (255 for the float VGG files)",
                                  "BackdoorBench (1)", check=POSITIVE)


def low_pass(v: torch.Tensor, cutoff: float) -> torch.Tensor:
    """``v`` (... x H x W) with every spatial frequency of radius > cutoff x Nyquist removed."""
    h, w = v.shape[-2:]
    return torch.fft.irfft2(torch.fft.rfft2(v) * low_pass_mask(h, w, cutoff).to(v.device), s=(h, w))


def low_pass_mask(h: int, w: int, cutoff: float) -> torch.Tensor:
    """Boolean rfft2 mask (H x (W//2+1)) of the frequencies within ``cutoff`` of Nyquist (radius)."""
    fy = torch.fft.fftfreq(h).abs().view(-1, 1) / 0.5  # in units of Nyquist
    fx = torch.fft.rfftfreq(w).view(1, -1) / 0.5
    return (fy**2 + fx**2).sqrt() <= cutoff + 1e-9


def low_frequency_energy(v: torch.Tensor, cutoff: float) -> float:
    """Fraction of the spectral energy of ``v`` (C x H x W, mean removed per channel) within the cutoff."""
    h, w = v.shape[-2:]
    spec = torch.fft.fft2(v.double() - v.double().mean((-2, -1), keepdim=True)).abs().pow(2)
    fy = torch.fft.fftfreq(h, dtype=torch.float64).abs().view(-1, 1) / 0.5
    fx = torch.fft.fftfreq(w, dtype=torch.float64).abs().view(1, -1) / 0.5
    inside = (fy**2 + fx**2).sqrt() <= cutoff + 1e-9
    total = float(spec.sum())
    return float(spec[..., inside].sum()) / total if total > 0 else 1.0


def project(v: torch.Tensor, cutoff: float, epsilon: float) -> torch.Tensor:
    """Low-pass ``v``, then scale it into the L-infinity ball of radius ``epsilon``."""
    v = low_pass(v, cutoff)
    peak = float(v.abs().max())
    return v * (epsilon / peak) if peak > epsilon else v


class UniversalPerturbation(nn.Module):
    """A frozen classifier behind one learnable perturbation shared by every input."""

    def __init__(self, classifier: nn.Module, shape: tuple[int, int, int]):
        super().__init__()
        self.classifier = classifier
        self.delta = nn.Parameter(torch.zeros(1, *shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier((x + self.delta).clamp(0, 1))


def targeted_step(target: int, cutoff: float, epsilon: float):
    """A :func:`fit` step: move the perturbation by ``lr`` (peak) along the low-passed gradient of
    CE(target), then project."""

    def step(model: UniversalPerturbation, x, y, optimizer, runtime):
        with runtime.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), torch.full_like(y, target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # steepest descent within the low-pass band, scaled to a peak of 1
            grad = low_pass(model.delta.grad.float(), cutoff)
            model.delta.grad.copy_(grad / grad.abs().max().clamp_min(1e-12))
        optimizer.step()
        with torch.no_grad():
            model.delta.copy_(project(model.delta.detach().float(), cutoff, epsilon))
        return loss.detach()

    return step


@ATTACKS.register("lf")
class LowFrequency(Attack):
    """LF (Zeng et al., ICCV 2021): a smooth, low-frequency universal adversarial perturbation."""

    name = "lf"
    config_class = LFConfig
    builds = "a clean model and its trigger"

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.resource: Resource | None = None
        self._file_info: dict | None = None
        self._trigger: torch.Tensor | None = None  # C x H x W float on the 0-255 scale

    def builds_first(self) -> str:
        return "" if self.config.trigger_file else self.builds  # a trigger file is read, not trained

    # -- resources ---------------------------------------------------------------------------
    def prepare(self, dataset: Dataset, **context):
        super().prepare(dataset, **context)
        cfg = self.config
        if cfg.trigger_file:
            self._trigger, self._file_info = self._load_file(Path(cfg.trigger_file), dataset.train.image_shape)
            return
        runtime = runtime_of(context)
        seed = int(context.get("seed", 0) or 0)
        cache_dir = context.get("cache_dir")
        progress = bool(context.get("progress", False))
        recipe = CleanModelRecipe.from_context(cfg.clean_arch, cfg.clean_epochs, context)
        generator_cfg = {k: getattr(cfg, k) for k in ("target", "epsilon", "cutoff", "step_size", "epochs", "images",
                                                       "batch_size")}
        settings = {"generator": generator_cfg, "seed": seed, "data": dataset.fingerprint,
                    "image_shape": image_shape_of(dataset), "clean_model": recipe.settings(dataset)}

        def generate():
            return self._generate(dataset, recipe, runtime, seed, cache_dir, progress)

        self.resource = load_or_generate("lf", settings, generate, cache_dir)
        self._trigger = self.resource.tensors["perturbation"].float()

    def _generate(self, dataset: Dataset, recipe: CleanModelRecipe, runtime, seed: int, cache_dir, progress: bool):
        cfg = self.config
        classifier, clean_info = recipe.build(dataset, runtime, cache_dir, progress)
        pool = torch.nonzero(dataset.train.y != cfg.target).flatten()
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
        chosen = pool[order[: cfg.images]]
        held_out = pool[order[cfg.images : cfg.images + 1000]]
        if len(held_out) == 0:  # tiny data: report the success rate on the optimization images
            held_out = chosen
        shape = dataset.train.image_shape
        wrapper = UniversalPerturbation(classifier, shape)
        train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=min(cfg.batch_size, len(chosen)), lr=cfg.step_size,
                                momentum=0.0, weight_decay=0.0, schedule="constant", augment=False)
        optimizer = torch.optim.SGD([wrapper.delta], lr=cfg.step_size, momentum=0.0)
        result = fit(wrapper, dataset.train.subset(chosen), train_cfg, runtime, seed=seed,
                     step=targeted_step(cfg.target, cfg.cutoff, cfg.epsilon), optimizer=optimizer,
                     desc="LF perturbation", progress=progress, train_mode=False)
        delta = wrapper.delta.detach().float().cpu()[0].contiguous()
        perturbation = (delta * 255).round()  # integers on the 0-255 scale, |t| <= epsilon * 255
        info = {"clean_model": clean_info, "optimized_on": len(chosen),
                "steps": result.epochs * max(1, len(chosen) // train_cfg.batch_size),
                "final_loss": result.history[-1]["loss"] if result.history else None,
                "linf_255": float(perturbation.abs().max()),
                "low_frequency_energy": low_frequency_energy(perturbation, cfg.cutoff),
                "target_rate_clean_model": self._target_rate(classifier, dataset.train.x[held_out], perturbation,
                                                             runtime),
                "target_rate_measured_on": len(held_out)}
        return {"perturbation": perturbation}, info

    def _target_rate(self, model, x, perturbation, runtime) -> float:
        preds = predict(model, self._add(x, perturbation), runtime)
        return float((preds == self.config.target).float().mean())

    def _load_file(self, path: Path, shape) -> tuple[torch.Tensor, dict]:
        if not path.is_file():
            raise TsbdError(f"LF trigger file {str(path)!r} not found; pass BackdoorBench's .npy (e.g. "
                            f"cifar10_preactresnet18_0_255.npy) or leave trigger_file empty to generate one")
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise TsbdError(f"cannot read LF trigger file {path}: {err}; pass a .npy array") from None
        arr = arr[0] if arr.ndim == 4 else arr  # BackdoorBench uses the first slice of 4-D files
        c, h, w = shape
        if arr.shape != (h, w, c):
            raise TsbdError(f"LF trigger file {path} holds {arr.shape}; the images need ({h}, {w}, {c})")
        trigger = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1).contiguous() * self.config.trigger_scale
        peak = float(trigger.abs().max())
        if peak < 1:
            log.warning("LF trigger file %s peaks at %.3g on the 0-255 scale: added to images and truncated as "
                        "BackdoorBench does, it changes no pixel (its VGG19-BN files have this scale issue); "
                        "set trigger_scale=255 to use it as a [0, 1] perturbation", path, peak)
        info = {"file": str(path), "sha256": file_sha256(path), "dtype": str(arr.dtype),
                "scale": self.config.trigger_scale,
                "peak_255": peak, "fingerprint": tensors_sha256({"perturbation": trigger})[:16]}
        return trigger, info

    # -- poisoning ---------------------------------------------------------------------------
    @staticmethod
    def _add(x: torch.Tensor, trigger: torch.Tensor) -> torch.Tensor:
        return (x.float() + trigger).clamp_(0, 255).to(torch.uint8)  # truncation, as BackdoorBench's astype(uint8)

    @property
    def perturbation(self) -> torch.Tensor:
        """The C x H x W perturbation on the 0-255 scale (after :meth:`prepare`)."""
        if self._trigger is None:
            raise TsbdError("the LF attack has no perturbation yet; call prepare(dataset, ...) first")
        return self._trigger

    def apply(self, x, index=None, split="train"):
        return self._add(x, self.perturbation)

    def describe(self):
        out = super().describe()
        if self.resource is not None:
            out["resource"] = self.resource.describe()
        elif self._file_info is not None:
            out["resource"] = {"kind": "BackdoorBench trigger file", **self._file_info}
        return out
