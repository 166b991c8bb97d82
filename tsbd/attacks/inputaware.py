"""Input-aware dynamic backdoor (IAD; Nguyen & Tran, NeurIPS 2020): every image gets its own
trigger, ``x' = x + (G(x) - x) * M(x)``, from a generator G and a mask network M.

As BackdoorBench configures it (SCLBD/BackdoorBench @ f02e353: config/attack/inputaware/default.yaml,
attack/inputaware.py -- stage 1 lines 421-447 and 688-728, stage 2 lines 811-869):

* **Stage 1, mask (``mask_epochs`` = 25).** M alone, on clean training pairs (x1, x2):
  ``lambda_norm * mean(relu(M(x1) - mask_density)) + lambda_div * mean(d(x1, x2) / d(M(x1),
  M(x2)))`` with d the per-sample RMS distance on normalized images, Adam(0.01, betas (0.5,
  0.9)), lr x0.1 at epochs 10 and 20. M is then frozen.
* **Stage 2, joint (``joint_epochs``).** A classifier C and G train together: per batch of 128
  the first int(0.1 B) samples get their own trigger and the target label, the next as many
  get the trigger of *another* image (cross mode) and keep their label, the rest stay clean;
  loss ``CE + lambda_div * diversity(x, patterns)``; C by SGD(0.01, 0.9, wd 5e-4), G by Adam
  (0.01, betas (0.5, 0.9)), both at constant lr (BackdoorBench's milestones start at epoch
  100 for C and 200 for G, after its last epoch); standard crop + flip augmentation.
* After training G and M are frozen; the stored poisoned training images and the poisoned
  test set are ``x + (G(x) - x) * M(x)`` (eval mode) rounded to uint8.

How it runs here. Both stages are plain :func:`tsbd.train.fit` calls with their own step
functions (:func:`mask_step`, :func:`joint_step`) inside :meth:`InputAware.prepare`, so G and
M are ready before the pipeline poisons anything: the attack is self-contained (no change to
the Attack interface), and G/M are a deterministic function of (data fingerprint, attack
config, seed, classifier architecture). They are cached as an attack resource
(:mod:`tsbd.attacks.resources`, ``<cache_dir>/attack_resources/inputaware-<key>/``): one
safetensors file with ``generator.*`` and ``mask_net.*`` (BackdoorBench's ``netG``/``netM``
key names under those prefixes) and stage 2's classifier as ``classifier.*``, plus a
``meta.json`` recording the mask density reached and the classifier's accuracy/ASR.

Where tsbd differs from BackdoorBench, and why:

* **The victim is trained after G, not with it.** In BackdoorBench the stage-2 classifier
  *is* the attacked model. Here stage 2 trains a classifier of the victim's architecture
  (``classifier``, default the pipeline's ``arch``, else airbench) only to shape G; the
  pipeline then trains the victim from scratch with the same schedule as every other attack,
  G and M frozen. With ``poisoning="batch"`` (default) the batch hook does what BackdoorBench's
  training loop does, minus G's update: the first int(ratio * B) samples of every shuffled,
  augmented batch get their own trigger and the target label, the next
  int(int(ratio * B) * cross_ratio) non-target samples the trigger of another (clean) image of
  the batch with their label kept. With ``poisoning="stored"`` one fixed set of round(ratio * N)
  seeded images carries its trigger and the target label, and the hook adds only the cross
  samples. Measured on full CIFAR-10 (BENCHMARKS.md): the stored set is not enough -- 5,000
  fixed positives against ever new cross-mode negatives teach the victim to memorise the
  positives (ASR 32.43%), while per-batch poisoning reaches 92.28% -- hence the default.
  Stage 2's classifier (BackdoorBench's own attacked model) is kept for comparison
  (:meth:`InputAware.joint_classifier`).
* **Trigger before augmentation for the stored set.** BackdoorBench computes G/M on the
  augmented batch (so does batch mode); stored images carry the trigger computed on the raw
  image, and the engine's crop + flip moves it with the image.
* **Pairs.** BackdoorBench draws x2 from a second shuffled loader; here x2 is another image
  of the same shuffled batch (stage 1: the batch rolled by one, so one forward pass of M
  serves both masks; stage 2 and the hook: the image half a batch away), the same
  distribution at half the cost.
* **G's gradients are zeroed every step** (the paper's plain joint training). The authors'
  and BackdoorBench's code never call ``optimizerG.zero_grad()``, so Adam there steps on the
  running sum of all past gradients; ``accumulate_generator_grad=True`` reproduces that.
* lambda_div is applied once in stage 1 (BackdoorBench multiplies it in twice; equal at 1).
* One tanh at G's and M's output, as in the authors' code. BackdoorBench's generator also
  registers ``self.tanh`` as a child module, which its ``forward`` loop applies before the
  final tanh, so its patterns lie in [0.12, 0.88] rather than [0, 1] [as coded].
* ``width`` scales G and M's channels (1 = BackdoorBench's 32/64/128) to make them
  affordable on CPU; stored images are rounded to uint8 (BackdoorBench's ToPILImage
  truncates).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tsbd.artifacts import load_into
from tsbd.attacks._generators import InputAwareTrigger, blend, diversity_loss, mask_threshold
from tsbd.attacks.base import ATTACKS, Attack, AttackConfig, Poisoning
from tsbd.attacks.resources import Resource, image_shape_of, load_or_generate, resource_arch, runtime_of, work_folder
from tsbd.config import FRACTION, NON_NEGATIVE, POSITIVE, UNCONSTRAINED, Range, option, to_dict
from tsbd.data.base import Dataset, ImageSet
from tsbd.errors import TsbdError
from tsbd.train.engine import TrainConfig, fit, make_optimizer, predict
from tsbd.train.runtime import Runtime

log = logging.getLogger(__name__)

STEPS = 3  # down/up stages of G and M: BackdoorBench's setting for every data set but MNIST
APPLY_BATCH = 256  # images per G/M forward pass when poisoning stored sets
PROBE_IMAGES = 2000  # test images used to report stage 2's classifier and the mask density
ADAM_BETAS = (0.5, 0.9)  # BackdoorBench inputaware.py:405-406


@dataclasses.dataclass(frozen=True)
class InputAwareConfig(AttackConfig):
    cross_ratio: float = option(1.0, "cross-trigger samples per poisoned sample in each batch",
                                "BackdoorBench inputaware.py (num_cross = num_bd)", check=NON_NEGATIVE)
    poisoning: Poisoning = option("batch", "batch: trigger on the first ratio*B samples of every batch, on the fly; "
                            "stored: one fixed poisoned set of ratio*N images",
                            "BackdoorBench inputaware.py (per-batch num_bd)")
    width: float = option(1.0, "channel multiplier of G and M (1 = 32/64/128 channels)",
                          "BackdoorBench InputAwareGenerator", check=POSITIVE)
    mask_epochs: int = option(25, "stage 1: epochs training the mask network alone",
                              "BackdoorBench inputaware default.yaml clean_train_epochs", check=NON_NEGATIVE)
    joint_epochs: int = option(75, "stage 2: epochs training classifier and generator together",
                               "BackdoorBench: 100 epochs, the first 25 spent on the mask [derived]",
                               check=NON_NEGATIVE)
    batch_size: int = option(128, "mini-batch size of both stages", "BackdoorBench prototype/cifar10.yaml",
                             check=Range(2))
    lr_classifier: float = option(0.01, "stage 2 classifier SGD lr (momentum 0.9, wd 5e-4)",
                                  "BackdoorBench inputaware default.yaml lr_C", check=POSITIVE)
    lr_generator: float = option(0.01, "generator Adam lr (betas 0.5, 0.9)", "BackdoorBench default.yaml lr_G",
                                 check=POSITIVE)
    lr_mask: float = option(0.01, "mask network Adam lr (betas 0.5, 0.9)", "BackdoorBench default.yaml lr_M",
                            check=POSITIVE)
    mask_milestones: tuple[int, ...] = option((10, 20), "stage 1 epochs at which the mask lr drops x0.1",
                                              "BackdoorBench default.yaml schedulerM_milestones", check=NON_NEGATIVE)
    lambda_div: float = option(1.0, "weight of the diversity loss", "BackdoorBench default.yaml lambda_div",
                               check=NON_NEGATIVE)
    lambda_norm: float = option(100.0, "weight of the mask-size loss", "BackdoorBench default.yaml lambda_norm",
                                check=NON_NEGATIVE)
    mask_density: float = option(0.032, "mask area above which the size loss applies",
                                 "BackdoorBench default.yaml mask_density", check=FRACTION)
    classifier: str = option("", "architecture G is trained against; empty = the victim's (--arch), else airbench",
                             "BackdoorBench trains G with the victim model", check=UNCONSTRAINED)
    accumulate_generator_grad: bool = option(False, "never zero G's gradients, as the authors' code does",
                                             "paper: plain joint training; code: no optimizerG.zero_grad() [as coded]")


def cross_source(batch_size: int, positions: torch.Tensor) -> torch.Tensor:
    """For each batch position, another position whose image lends its trigger (cross mode)."""
    return (positions + max(1, batch_size // 2)) % batch_size


def mask_step(trigger: InputAwareTrigger, cfg: InputAwareConfig):
    """Stage 1 step: the mask net's size + diversity loss on pairs (x, x rolled by one)."""

    def step(model, x, y, optimizer, runtime):
        with runtime.autocast():
            xn = trigger.normalize(x)
            m1 = mask_threshold(model(xn)).float()
        # x2 = the batch rolled by one: in one BN batch M(x2) is M(x) rolled, no second pass
        div = diversity_loss(xn.float(), xn.float().roll(1, 0), m1, m1.roll(1, 0))
        size = F.relu(m1 - cfg.mask_density).mean()
        loss = cfg.lambda_norm * size + cfg.lambda_div * div
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def joint_step(trigger: InputAwareTrigger, gen_optimizer: torch.optim.Optimizer, cfg: InputAwareConfig):
    """Stage 2 step: classifier (the engine's model and optimizer) and generator together."""

    def step(model, x, y, optimizer, runtime):
        trigger.generator.train()
        b = len(x)
        n_bd = int(cfg.poison_ratio * b)
        n_cross = min(int(n_bd * cfg.cross_ratio), b - n_bd)
        donors = x[cross_source(b, torch.arange(n_bd, n_bd + n_cross, device=x.device))]
        with runtime.autocast():
            sources = torch.cat([x[:n_bd], donors])
            with torch.no_grad():
                masks = trigger.masks(sources)
            patterns = trigger.patterns(sources)
            poisoned = blend(torch.cat([x[:n_bd], x[n_bd : n_bd + n_cross]]), patterns, masks)
            inputs = torch.cat([poisoned, x[n_bd + n_cross :]])
            targets = torch.cat([torch.full_like(y[:n_bd], cfg.target), y[n_bd:]])
            loss = F.cross_entropy(model(inputs), targets)
        pairs = min(n_bd, n_cross)
        if pairs:
            norm = trigger.normalize
            p = patterns.float()
            loss = loss + cfg.lambda_div * diversity_loss(norm(x[:pairs]), norm(donors[:pairs]),
                                                          norm(p[:pairs]), norm(p[n_bd : n_bd + pairs]))
        optimizer.zero_grad(set_to_none=True)
        if not cfg.accumulate_generator_grad:
            gen_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if n_bd + n_cross:
            gen_optimizer.step()
        return loss.detach()

    return step


@torch.no_grad()
def mask_density(trigger: InputAwareTrigger, x: torch.Tensor, runtime: Runtime) -> float:
    """Mean mask value over uint8 images ``x``: the fraction of each image the trigger covers."""
    total = 0.0
    for s in range(0, len(x), APPLY_BATCH):
        xb = x[s : s + APPLY_BATCH].to(runtime.device).float().div_(255)
        total += float(trigger.masks(xb).mean(dim=(1, 2, 3)).sum())
    return total / max(1, len(x))


@torch.no_grad()
def probe_classifier(model: nn.Module, trigger: InputAwareTrigger, test: ImageSet, target: int,
                     runtime: Runtime) -> dict:
    """A classifier on the first test images: clean accuracy, ASR (each non-target image with its
    own trigger) and cross accuracy (another image's trigger; the true label is expected)."""
    x, y = test.x[:PROBE_IMAGES], test.y[:PROBE_IMAGES]
    bd, cross = [], []
    for s in range(0, len(x), APPLY_BATCH):
        xb = x[s : s + APPLY_BATCH].to(runtime.device).float().div_(255)
        bd.append(to_uint8(trigger(xb)))
        cross.append(to_uint8(trigger(xb, xb[cross_source(len(xb), torch.arange(len(xb), device=xb.device))])))
    keep = y != target
    return {"images": len(x),
            "acc": float((predict(model, x, runtime) == y).float().mean()),
            "asr": float((predict(model, torch.cat(bd)[keep], runtime) == target).float().mean()),
            "cross_acc": float((predict(model, torch.cat(cross), runtime) == y).float().mean())}


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> rounded uint8 on the CPU."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu()


@ATTACKS.register("inputaware")
class InputAware(Attack):
    """Input-aware (Nguyen & Tran, NeurIPS 2020): a per-image trigger from a trained generator and mask."""

    name = "inputaware"
    config_class = InputAwareConfig
    builds = "its trigger generator and mask"

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.trigger: InputAwareTrigger | None = None  # frozen G and M, after prepare
        self.resource: Resource | None = None  # the cached G, M and stage 2's classifier
        self._device = torch.device("cpu")

    # -- resources -------------------------------------------------------------------------
    def prepare(self, dataset: Dataset, **context: Any) -> None:
        """Train M, then G (or load both from the cache); ``context``: seed, runtime, arch,
        arch_kwargs, cache_dir, progress."""
        super().prepare(dataset, **context)
        _, h, w = dataset.train.image_shape
        if h % 2**STEPS or w % 2**STEPS:
            raise TsbdError(f"inputaware's generator needs image sides divisible by {2**STEPS}, got {h}x{w}; "
                            "resize the data set")
        runtime = runtime_of(context)
        seed = int(context.get("seed") or 0)
        arch, arch_kwargs = resource_arch(self.config.classifier, context)
        # how the victim is poisoned does not change G and M: left out of the resource key
        shaping = {k: v for k, v in to_dict(self.config).items() if k != "poisoning"}
        settings = {"attack": shaping, "data": dataset.fingerprint, "shape": image_shape_of(dataset),
                    "seed": seed, "classifier": arch, "classifier_kwargs": arch_kwargs}

        def generate():
            trigger, classifier, info = self.train_trigger(
                dataset, seed, arch, arch_kwargs, runtime, progress=bool(context.get("progress")),
                checkpoint_dir=work_folder(self.name, settings, context.get("cache_dir")))
            tensors = {**trigger.state_dict(), **{f"classifier.{k}": v for k, v in classifier.state_dict().items()}}
            # 0-d tensors (BN step counters) stored as 1-d: the resource hash views every tensor as bytes
            tensors = {k: v.detach().cpu().reshape(-1 if v.dim() == 0 else v.shape).contiguous()
                       for k, v in tensors.items()}
            return tensors, {**info, "classifier_spec": classifier.arch_spec}

        self.resource = load_or_generate(self.name, settings, generate, context.get("cache_dir"))
        # trained and cached triggers go through the same fresh module, so both poison identically
        trigger = self._build(dataset)
        load_into(trigger, self._part("", trigger), f"inputaware resource {self.resource.fingerprint}")
        self._device = runtime.device
        self.trigger = trigger.to(self._device).eval().requires_grad_(False)

    def _build(self, dataset: Dataset) -> InputAwareTrigger:
        return InputAwareTrigger(dataset.mean, dataset.std, dataset.train.image_shape[0], self.config.width, STEPS)

    def train_trigger(self, dataset: Dataset, seed: int, arch: str, arch_kwargs: dict, runtime: Runtime, *,
                      progress: bool = False, checkpoint_dir: str | Path | None = None,
                      ) -> tuple[InputAwareTrigger, nn.Module, dict]:
        """Stage 1 (mask) then stage 2 (classifier + generator), both through :func:`fit`.
        Returns the frozen trigger nets, stage 2's classifier and a record of both stages. With
        ``checkpoint_dir`` every epoch of both stages is checkpointed there (stage 2 with G and its
        optimizer), and a rerun resumes where the last one stopped."""
        from tsbd.models import build_model, init_from_data

        cfg = self.config
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            trigger = self._build(dataset)
            model = build_model(arch, dataset.num_classes, mean=dataset.mean, std=dataset.std, **arch_kwargs)
        trigger.to(runtime.device)
        info: dict[str, Any] = {"classifier": arch}
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if ckpt is not None:
            ckpt.mkdir(parents=True, exist_ok=True)

        # stage 1: MultiStepLR as consecutive constant-lr fits over the same Adam optimizer
        mask_opt = torch.optim.Adam(trigger.mask_net.parameters(), cfg.lr_mask, betas=ADAM_BETAS)
        bounds = sorted({0, cfg.mask_epochs, *(m for m in cfg.mask_milestones if 0 < m < cfg.mask_epochs)})
        history = []
        for i, (start, stop) in enumerate(zip(bounds, bounds[1:])):
            for group in mask_opt.param_groups:
                group["lr"] = cfg.lr_mask * 0.1**i
            stage = TrainConfig(epochs=stop - start, batch_size=cfg.batch_size, lr=cfg.lr_mask * 0.1**i,
                                schedule="constant", augment=True, drop_last=False)
            res = fit(trigger.mask_net, dataset.train, stage, runtime, seed=seed + i, step=mask_step(trigger, cfg),
                      optimizer=mask_opt, desc=f"inputaware mask {start + 1}-{stop}", progress=progress,
                      checkpoint=ckpt / f"mask-{i}.resume.pt" if ckpt else None)
            history += res.history
        trigger.mask_net.eval().requires_grad_(False)
        info["mask_loss"] = history[-1]["loss"] if history else None
        info["mask_density"] = mask_density(trigger, dataset.test.x[:PROBE_IMAGES], runtime)

        # stage 2: the engine trains the classifier; the step also updates G
        init_from_data(model, dataset.train.x[torch.randperm(len(dataset.train),
                                                             generator=torch.Generator().manual_seed(seed))[:5000]])
        stage = TrainConfig(epochs=cfg.joint_epochs, batch_size=cfg.batch_size, lr=cfg.lr_classifier, momentum=0.9,
                            weight_decay=5e-4, schedule="constant", augment=True, drop_last=False)
        gen_opt = torch.optim.Adam(trigger.generator.parameters(), cfg.lr_generator, betas=ADAM_BETAS)
        res = fit(model, dataset.train, stage, runtime, seed=seed + len(bounds), step=joint_step(trigger, gen_opt, cfg),
                  optimizer=make_optimizer(model, stage), desc="inputaware joint", progress=progress,
                  checkpoint=ckpt / "joint.resume.pt" if ckpt else None,
                  checkpoint_state={"generator": trigger.generator, "generator_optimizer": gen_opt})
        info["joint_loss"] = res.history[-1]["loss"] if res.history else None
        trigger.eval().requires_grad_(False)
        model.eval().requires_grad_(False)
        info["joint_classifier"] = probe_classifier(model, trigger, dataset.test, cfg.target, runtime)
        log.info("inputaware: mask density %.4f (target %.3f); stage-2 classifier %s", info["mask_density"],
                 cfg.mask_density, info["joint_classifier"])
        return trigger, model, info

    def joint_classifier(self, device: str | torch.device = "cpu") -> nn.Module:
        """Stage 2's classifier -- the model BackdoorBench reports as IAD's attacked model --
        rebuilt from the cached resource (eval mode)."""
        from tsbd.models import model_from_spec

        if self.resource is None:
            raise TsbdError("inputaware is not prepared; call prepare(dataset, seed=...) first")
        model = model_from_spec(self.resource.meta["info"]["classifier_spec"])
        load_into(model, self._part("classifier.", model), f"inputaware resource {self.resource.fingerprint}")
        return model.to(device).eval()

    def _part(self, prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
        """The resource tensors of ``module`` (stored under ``prefix``, or, for ``prefix=""``, the
        trigger's own keys), reshaped to the module's shapes (0-d tensors are stored 1-d)."""
        own = module.state_dict()
        out = {}
        for key, value in self.resource.tensors.items():
            if prefix and not key.startswith(prefix) or not prefix and key.startswith("classifier."):
                continue
            name = key[len(prefix):]
            out[name] = value.reshape(own[name].shape) if name in own and value.numel() == own[name].numel() else value
        return out

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.resource is not None:
            out["trigger"] = self.resource.describe()
        return out

    # -- poisoning -------------------------------------------------------------------------
    def _prepared(self) -> InputAwareTrigger:
        if self.trigger is None:
            raise TsbdError("inputaware needs its trained generator: call prepare(dataset, seed=...) first")
        return self.trigger

    @torch.no_grad()
    def apply(self, x, index=None, split="train"):
        trigger = self._prepared()
        out = []
        for s in range(0, len(x), APPLY_BATCH):
            xb = x[s : s + APPLY_BATCH].to(self._device).float().div_(255)
            out.append(to_uint8(trigger(xb)))
        return torch.cat(out) if out else x.clone()

    def batch_hook(self, seed: int):
        trigger = self._prepared()

        @torch.no_grad()
        def hook(x, y, generator):
            # batch mode: the head of the (augmented) batch with its own trigger, labelled target
            clean = x  # poison_batch_head copies, so cross triggers come from the clean images
            x, y, start = self.poison_batch_head(x, y, trigger)
            pick = self.cross_picks(y, start)
            if len(pick) and len(y) > 1:
                x = x.clone()
                x[pick] = trigger(clean[pick], clean[cross_source(len(y), pick)])
            return x, y

        return hook
