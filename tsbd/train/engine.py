"""The single training loop and evaluation loop.

Attack training, clean unlearning, fine-tuning and every baseline defense run through
:func:`fit`; methods differ only in the *step* they plug in (plain cross-entropy, gradient
ascent, the two-gradient activeness-aware step, ...), an optional per-batch hook (on-the-fly
poisoning) and an epoch-end callback (early stopping). Images stay uint8 in memory; each batch
is augmented with torch ops, scaled to [0, 1] and laid out channels_last.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from tsbd.config import AT_LEAST_ONE, FRACTION, MOMENTUM, NON_NEGATIVE, POSITIVE, Validated, option
from tsbd.data.base import ImageSet
from tsbd.errors import DivergedError, TsbdError
from tsbd.train.augment import crop_flip
from tsbd.train.runtime import Runtime

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Validated):
    """Optimizer, schedule and data settings of one :func:`fit` call (BackdoorBench's attack
    training defaults unless a method overrides them)."""

    epochs: int = option(100, "training epochs", "BackdoorBench prototype/cifar10.yaml", check=NON_NEGATIVE)
    batch_size: int = option(128, "mini-batch size", "BackdoorBench prototype/cifar10.yaml", check=AT_LEAST_ONE)
    lr: float = option(0.01, "(peak) learning rate", "BackdoorBench prototype/cifar10.yaml", check=POSITIVE)
    momentum: float = option(0.9, "SGD momentum", "BackdoorBench prototype/cifar10.yaml", check=MOMENTUM)
    weight_decay: float = option(5e-4, "SGD weight decay", "BackdoorBench prototype/cifar10.yaml", check=NON_NEGATIVE)
    nesterov: bool = option(False, "Nesterov momentum", "BackdoorBench (plain SGD)")
    schedule: Literal["cosine", "onecycle", "constant"] = option(
        "cosine", "learning-rate schedule (cosine per epoch; onecycle per step)", "BackdoorBench CosineAnnealingLR"
    )
    warmup: float = option(0.2, "onecycle: fraction of steps spent warming up", "airbench recipe", check=FRACTION)
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", "BackdoorBench (none)", check=FRACTION)
    augment: bool = option(True, "random crop (pad 4) + horizontal flip", "BackdoorBench train transform")
    drop_last: bool = option(True, "drop the last incomplete batch", "BackdoorBench train loader")


StepFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer, Runtime], torch.Tensor]
BatchHook = Callable[[torch.Tensor, torch.Tensor, torch.Generator], "tuple[torch.Tensor, torch.Tensor]"]
EpochEnd = Callable[[int, nn.Module, dict], bool | None]


@dataclasses.dataclass
class FitResult:
    epochs: int  # epochs completed
    seconds: float
    stopped_early: bool
    history: list[dict]
    images: int  # images processed
    compile: dict | None = None  # what --compile decided for this run (plain training only)
    resumed_at: int = 0  # the epoch a checkpoint resumed from (0: trained from the start)

    @property
    def epoch_seconds(self) -> float:
        """Seconds of all completed epochs, those of earlier runs resumed from a checkpoint included."""
        return sum(float(h.get("seconds", 0.0)) for h in self.history)

    @property
    def earlier_seconds(self) -> float:
        """Seconds of the epochs that earlier runs completed before this one resumed them."""
        return sum(float(h.get("seconds", 0.0)) for h in self.history[:self.resumed_at])

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def cross_entropy_step(label_smoothing: float = 0.0, ascent: bool = False) -> StepFn:
    """Plain SGD step on cross-entropy; ``ascent=True`` maximizes it (unlearning)."""
    sign = -1.0 if ascent else 1.0

    def step(model, x, y, optimizer, runtime):
        with runtime.autocast():
            loss = nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        (sign * loss).backward()
        optimizer.step()
        return loss.detach()

    return step


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TsbdError("the model has no trainable parameters; check that its weights are not all frozen")
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )


def _lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":  # stepped per epoch, T_max = epochs (BackdoorBench)
        epoch = step // steps_per_epoch
        return 0.5 * (1 + math.cos(math.pi * epoch / max(1, cfg.epochs)))
    if cfg.schedule == "onecycle":  # linear warm-up then linear decay to 0, per step
        warm = max(1, int(cfg.warmup * total))
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))
    raise TsbdError(f"unknown schedule {cfg.schedule!r}; choose cosine, onecycle or constant")


def to_model_input(x_uint8: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """uint8 N x C x H x W -> float in [0, 1], on the runtime's device, channels_last."""
    x = x_uint8.to(runtime.device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


def iterate_batches(
    data: ImageSet,
    batch_size: int,
    runtime: Runtime,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    augment: bool = False,
    drop_last: bool = False,
    order: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float images in [0, 1], labels) batches on the runtime's device: in a fresh random
    order drawn from ``generator`` with ``shuffle``, else in ``order`` (default: dataset order)."""
    n = len(data)
    if shuffle:
        order = torch.randperm(n, generator=generator)
    elif order is None:
        order = torch.arange(n)
    elif len(order) != n:
        raise ValueError(f"order has {len(order)} indices for {n} images")
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        xb = data.x[idx.to(data.x.device)]
        if augment:
            xb = crop_flip(xb, generator, flip=data.hflip)
        yield to_model_input(xb, runtime), data.y[idx.to(data.y.device)].to(runtime.device, non_blocking=True)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` with torch.save to a temporary file and rename it to ``path``: a reader never
    sees half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


AUTO_COMPILE_MIN_STEPS = 2000  # compile="auto" tries torch.compile only on plain runs this long
CALIBRATION_STEPS = 12  # steps timed each way (alternating) before compile="auto" keeps the faster
COMPILE_MARGIN = 1.05  # the compiled step must be this much faster to be kept


class _CompileChoice:
    """Which module a plain-training step runs through: the model, or ``torch.compile(model)``.

    ``on`` compiles from the first step. ``auto``, on a run of at least ``AUTO_COMPILE_MIN_STEPS``
    steps, compiles after two eager steps, then alternates compiled and eager steps until it has
    timed ``CALIBRATION_STEPS`` of each, and keeps the faster (by median) for the rest of the run:
    nothing is trained twice, only the compile time is spent. A compile that fails falls back to eager.
    The compiled module shares the model's parameters, so the optimizer and checkpoints see the same
    tensors, and the choice changes no result beyond fused-kernel rounding."""

    WARM = 2

    def __init__(self, model: nn.Module, mode: str, plain: bool, steps: int, runtime: Runtime):
        self.model, self.runtime = model, runtime
        self.record: dict = {"mode": mode, "compiled": False}
        self.compiled: nn.Module | None = None
        self.calibrating = False
        if not plain:
            if mode != "off":
                self.record["reason"] = "custom step: runs eager"
        elif mode == "on":
            self.compiled = self._compile()
            self.record["compiled"] = self.compiled is not None
        elif mode == "auto":
            if steps >= AUTO_COMPILE_MIN_STEPS:
                self.calibrating, self.timed = True, {"eager": [], "compiled": []}
            else:
                self.record["reason"] = f"{steps} steps, under {AUTO_COMPILE_MIN_STEPS}: runs eager"
        self.k = 0  # steps seen

    def _compile(self) -> nn.Module | None:
        try:
            return torch.compile(self.model)
        except Exception as err:  # noqa: BLE001 - no compiler, unsupported platform: train eager
            self._fallback(err)
            return None

    def _fallback(self, err: BaseException) -> None:
        log.warning("torch.compile failed (%s: %s); training eager", type(err).__name__, str(err).splitlines()[0]
                    if str(err) else "")
        self.record.update(compiled=False, error=f"{type(err).__name__}")
        self.compiled, self.calibrating = None, False

    def _sync(self) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)

    def run(self, step: StepFn, x, y, optimizer, runtime) -> torch.Tensor:
        k, self.k = self.k, self.k + 1
        if not self.calibrating:
            if self.compiled is None:
                return step(self.model, x, y, optimizer, runtime)
            if k > 0:
                return step(self.compiled, x, y, optimizer, runtime)
            try:  # compile errors surface at the first call, before the optimizer steps
                return step(self.compiled, x, y, optimizer, runtime)
            except Exception as err:  # noqa: BLE001
                self._fallback(err)
                return step(self.model, x, y, optimizer, runtime)
        w, n = self.WARM, CALIBRATION_STEPS
        if k < w:
            return step(self.model, x, y, optimizer, runtime)
        if k == w:
            self.compiled = self._compile()
            if self.compiled is None:
                return step(self.model, x, y, optimizer, runtime)
        # after the compiling step, compiled and eager steps alternate, so drift in the machine's
        # speed hits both alike
        phase = "compiled" if (k - w) % 2 == 0 else "eager"
        self._sync()
        t = time.perf_counter()
        try:
            loss = step(self.model if phase == "eager" else self.compiled, x, y, optimizer, runtime)
        except Exception as err:  # noqa: BLE001 - compile errors surface at the first call
            if k > w:
                raise
            self._fallback(err)
            return step(self.model, x, y, optimizer, runtime)
        float(loss)
        seconds = time.perf_counter() - t
        if k == w:
            self.record["compile_s"] = seconds
        else:
            self.timed[phase].append(seconds)
        if len(self.timed["compiled"]) == n and len(self.timed["eager"]) == n:
            eager, compiled = (sorted(v)[len(v) // 2] for v in (self.timed["eager"], self.timed["compiled"]))
            keep = eager > compiled * COMPILE_MARGIN
            self.record.update(compiled=keep, eager_step_s=eager, compiled_step_s=compiled,
                               speedup=eager / compiled if compiled > 0 else math.inf)
            log.info("torch.compile: %.1f ms/step against %.1f eager (compiling took %.0f s): %s", 1e3 * compiled,
                     1e3 * eager, self.record.get("compile_s", 0.0), "compiled" if keep else "eager")
            if not keep:
                self.compiled = None
            self.calibrating = False
        return loss


def fit(
    model: nn.Module,
    data: ImageSet,
    cfg: TrainConfig,
    runtime: Runtime,
    *,
    seed: int = 0,
    step: StepFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    batch_hook: BatchHook | None = None,
    on_epoch_end: EpochEnd | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_generators: dict[str, torch.Generator] | None = None,
    checkpoint_state: dict[str, Any] | None = None,
    on_resume: Callable[[list[dict]], None] | None = None,
    desc: str = "train",
    progress: bool = True,
    train_mode: bool = True,
    shuffle: bool = True,
) -> FitResult:
    """Train ``model`` in place on ``data`` for ``cfg.epochs`` epochs.

    ``step`` does forward/backward/update for one batch and returns the loss (default:
    cross-entropy SGD). ``batch_hook(x, y, generator)`` may rewrite a batch (on-the-fly
    poisoning). ``on_epoch_end(epoch, model, stats)`` returning True stops training.
    With ``checkpoint`` set, state is saved there after every epoch and a rerun resumes: the model,
    the optimizer, the data order and augmentation draws, ``checkpoint_generators`` (generators
    the ``step`` draws from, by name) and ``checkpoint_state`` (other things the ``step`` trains,
    by name: modules or optimizers, anything with ``state_dict``/``load_state_dict``). A run that
    ``on_epoch_end`` stopped resumes as stopped.
    ``on_resume(history)`` sees the restored epochs' stats before the first epoch this run trains
    (for an ``on_epoch_end`` that judges an epoch against the earlier ones).
    ``train_mode=False`` keeps the model in eval mode (frozen BN statistics), for methods that
    optimize something other than the weights (trigger reverse-engineering, masks).
    ``shuffle=False`` visits the images in one order, drawn from ``seed`` once and kept for every
    epoch: an unshuffled loader over a randomly drawn set (BackdoorBench's clean subsets are in the
    order of their random draw). Dataset order itself would give one-class batches on the data
    sets tsbd stores class by class.
    """
    if len(data) == 0:
        raise TsbdError("the training set is empty; provide at least one image")
    model.to(runtime.device).to(memory_format=torch.channels_last)
    plain = step is None  # only the plain step may be compiled: custom steps (input gradients,
    # weight perturbation) stay eager
    step = step or cross_entropy_step(cfg.label_smoothing)
    optimizer = optimizer or make_optimizer(model, cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    generator = torch.Generator()
    generator.manual_seed(seed)
    # the unshuffled order: its own generator, so the augmentation draws do not depend on it
    fixed_order = None if shuffle else torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    drop_last = cfg.drop_last and len(data) >= cfg.batch_size
    steps_per_epoch = len(data) // cfg.batch_size if drop_last else math.ceil(len(data) / cfg.batch_size)
    if runtime.device.type == "cuda":  # keep the whole uint8 set on the GPU: no per-batch copies
        data = ImageSet(data.x.to(runtime.device), data.y.to(runtime.device), hflip=data.hflip)

    history: list[dict] = []
    start_epoch = 0
    resumed_stopped = False  # the checkpoint's run had been stopped by on_epoch_end: nothing left to do
    ckpt_path = Path(checkpoint) if checkpoint else None
    if ckpt_path and ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location=runtime.device, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"].cpu())
            for name, gen in (checkpoint_generators or {}).items():
                gen.set_state(state["generators"][name].cpu())
            for name, obj in (checkpoint_state or {}).items():
                obj.load_state_dict(state["state"][name])
            start_epoch, history = int(state["epoch"]), list(state["history"])
            resumed_stopped = bool(state.get("stopped", False))
            log.info("resumed %s from %s at epoch %d", desc, ckpt_path, start_epoch)
            if on_resume is not None:
                on_resume(list(history))
        except Exception as err:  # a torn or foreign checkpoint: start over rather than fail
            # (the exception's type only: torch's text would advise loading it unsafely)
            log.warning("ignoring unreadable checkpoint %s (%s); starting from epoch 0", ckpt_path,
                        err.__class__.__name__)
            start_epoch, history, resumed_stopped = 0, [], False

    total_steps = cfg.epochs * steps_per_epoch
    choice = _CompileChoice(model, runtime.compile, plain, total_steps - start_epoch * steps_per_epoch, runtime)
    bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, desc=desc, disable=not progress,
               unit="step", leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    images = 0
    stopped = resumed_stopped
    shown: dict[str, str] = {}
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, start_epoch if resumed_stopped else cfg.epochs):
            model.train(train_mode)
            loss_sum = torch.zeros((), device=runtime.device)
            n_batches = 0
            t_epoch = time.perf_counter()
            for i, (x, y) in enumerate(iterate_batches(data, cfg.batch_size, runtime, generator=generator,
                                                       shuffle=shuffle, augment=cfg.augment,
                                                       drop_last=drop_last, order=fixed_order)):
                factor = _lr_factor(cfg, epoch * steps_per_epoch + i, steps_per_epoch)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
                if batch_hook is not None:
                    x, y = batch_hook(x, y, generator)
                loss = choice.run(step, x, y, optimizer, runtime)
                loss_sum += loss.float()
                n_batches += 1
                images += len(y)
                if n_batches % 50 == 0 or progress:
                    value = float(loss)
                    if not math.isfinite(value):
                        raise DivergedError(
                            f"{desc}: the loss became {value} at epoch {epoch + 1}, batch {n_batches}; "
                            f"lower the learning rate (now {base_lrs[0]:g})"
                        )
                    bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{value:.3f}", **shown, refresh=False)
                bar.update(1)
            mean_loss = float(loss_sum) / max(1, n_batches)
            if not math.isfinite(mean_loss):
                raise DivergedError(
                    f"{desc}: the loss became {mean_loss} in epoch {epoch + 1}; "
                    f"lower the learning rate (now {base_lrs[0]:g})"
                )
            stats = {"epoch": epoch + 1, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                     "seconds": time.perf_counter() - t_epoch}
            if on_epoch_end is not None and on_epoch_end(epoch + 1, model, stats):
                stopped = True
            # what the callback measured (e.g. clean accuracy) stays on the progress bar
            shown = {k: f"{v:.3g}" for k, v in stats.items()
                     if k not in ("epoch", "loss", "lr", "seconds") and isinstance(v, (int, float))}
            history.append(stats)
            if ckpt_path:
                save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                             "generator": generator.get_state(), "epoch": epoch + 1,
                                             "history": history, "stopped": stopped,
                                             "generators": {name: gen.get_state() for name, gen
                                                            in (checkpoint_generators or {}).items()},
                                             "state": {name: obj.state_dict() for name, obj
                                                       in (checkpoint_state or {}).items()}})
            if stopped:
                break
    finally:
        bar.close()
    done = history[-1]["epoch"] if history else 0
    return FitResult(epochs=done, seconds=time.perf_counter() - t0, stopped_early=stopped, history=history,
                     images=images, compile=choice.record if runtime.compile != "off" else None,
                     resumed_at=start_epoch)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, runtime: Runtime, batch_size: int = 1024,
            progress: bool = False) -> torch.Tensor:
    """Predicted class of each uint8 image (eval mode), as a CPU int64 tensor."""
    was_training = model.training
    model.eval()
    model.to(runtime.device)
    out = []
    for start in tqdm(range(0, len(x), batch_size), desc="eval", disable=not progress, leave=False):
        xb = to_model_input(x[start : start + batch_size], runtime)
        with runtime.autocast():
            out.append(model(xb).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)
