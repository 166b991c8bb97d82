"""The attack interface.

An attack knows which training samples it poisons (:meth:`Attack.poison_indices`) and how to
poison an image (:meth:`Attack.apply`); from these the base class builds the poisoned training
set and the poisoned test set (every non-target test image, triggered). Attacks that need
resources (a trained generator, a clean model) build them in :meth:`Attack.prepare`; attacks
that poison on the fly during training return a :meth:`Attack.batch_hook`.

Training-controllable attacks (WaNet, Input-aware) have a ``poisoning`` option:
``"batch"`` (as BackdoorBench and the attacks' papers train; Input-aware's default) stores no
poisoned image; instead the first int(ratio * B) samples of every shuffled batch get the trigger
and the target label on the fly (:meth:`Attack.poison_batch_head`), so over training the model
sees the trigger on ever new images. ``"stored"`` (WaNet's default) poisons one fixed set of
round(ratio * N) training images once, like the static attacks. Each default is the one that
learned its backdoor at the CPU-scale schedule (BENCHMARKS.md, "Settings measured for this grid").
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from tsbd.config import FRACTION, NON_NEGATIVE, Validated, option, override, to_dict
from tsbd.data.base import Dataset, ImageSet
from tsbd.data.poison import PoisonedTest, PoisonedTrain, sample_indices
from tsbd.errors import TsbdError
from tsbd.registry import Registry

log = logging.getLogger(__name__)

ATTACKS: Registry[type[Attack]] = Registry("attack", "tsbd.attacks")

Poisoning = Literal["batch", "stored"]  # the ``poisoning`` option of training-controllable attacks
_CHUNK = 4096  # images poisoned per chunk, bounds the float working memory


@dataclasses.dataclass(frozen=True)
class AttackConfig(Validated):
    """Settings every attack shares."""

    target: int = option(0, "target label (all-to-one)", "BackdoorBench attack_target / paper Sec. 4.1",
                         check=NON_NEGATIVE)
    poison_ratio: float = option(0.1, "fraction of the training set poisoned", "paper Sec. 4.1 / BackdoorBench pratio",
                                 check=FRACTION)


class Attack:
    """Base class: subclasses set ``name``, ``config_class`` and implement :meth:`apply`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = AttackConfig
    clean_label: ClassVar[bool] = False  # poison only target-class images and keep labels
    # what :meth:`prepare` trains before the attacked model when it is not cached (e.g. "a trigger
    # generator"); "" for attacks whose prepare is quick. Planning reads it (:meth:`builds_first`).
    builds: ClassVar[str] = ""

    def __init__(self, config: Any = None, **overrides: Any):
        cfg = config if config is not None else self.config_class()
        if not isinstance(cfg, self.config_class):
            raise TsbdError(f"{self.name} expects a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.config = override(cfg, overrides)

    # -- resources -------------------------------------------------------------------------
    def prepare(self, dataset: Dataset, **context: Any) -> None:
        """Build what the trigger needs (a trigger image at the data's size, a generator, ...).
        ``context`` may hold runtime, seed, cache_dir, arch, progress. Default: checks only."""
        if not 0 <= self.config.target < dataset.num_classes:
            raise TsbdError(
                f"target label {self.config.target} is outside the {dataset.num_classes} classes of {dataset.name}; "
                f"choose --target 0..{dataset.num_classes - 1}"
            )

    def memo_trigger(self, shape: tuple[int, int, int], build) -> torch.Tensor:
        """A static trigger for images of ``shape``: ``build(shape)`` once, then the same tensor
        while the image shape stays the same."""
        cached = getattr(self, "_memo_trigger", None)
        if cached is None or tuple(cached.shape) != tuple(shape):
            cached = self._memo_trigger = build(tuple(shape))
        return cached

    def builds_first(self) -> str:
        """What :meth:`prepare` trains with this config before the attacked model, unless cached
        (``builds``); "" when nothing. A planner estimating the cell from another attack's time has
        not counted it."""
        return self.builds

    # -- what each attack defines ----------------------------------------------------------
    def apply(self, x: torch.Tensor, index: torch.Tensor | None = None, split: str = "train") -> torch.Tensor:
        """Poison uint8 images ``x`` (N x C x H x W); ``index`` are their dataset indices."""
        raise NotImplementedError

    def requested_poison_count(self, n_train: int) -> int:
        """round(ratio * N): how many of ``n_train`` training images the poison ratio asks for (a
        clean-label attack poisons fewer when its target class is smaller; see :meth:`poison_indices`)."""
        return round(self.config.poison_ratio * n_train)

    def poison_indices(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        """The training indices to poison: round(ratio * N) drawn from all samples (dirty-label,
        BackdoorBench includes the target class) or from the target class (clean-label)."""
        count = self.requested_poison_count(len(labels))
        if self.clean_label:
            pool = torch.nonzero(labels == self.config.target).flatten()
            if count > len(pool):
                # BackdoorBench draws without replacement and stops here (e.g. SIG on GTSRB: 3,921 of
                # class 0's 210 images); tsbd poisons the whole class and says so
                log.warning("%s: poison ratio %g asks for %d images but the target class %d has only %d "
                            "training images; all %d are poisoned (%.2f%% of the training set)", self.name,
                            self.config.poison_ratio, count, self.config.target, len(pool), len(pool),
                            100 * len(pool) / max(len(labels), 1))
                count = len(pool)
        else:
            pool = torch.arange(len(labels))
        return sample_indices(pool, count, seed)

    def batch_hook(self, seed: int):
        """A per-batch hook for :func:`tsbd.train.fit` (training-controllable attacks), else None."""
        return None

    def train_overrides(self) -> dict[str, Any]:
        """TrainConfig fields this attack's training needs changed (e.g. its own augmentation)."""
        return {}

    # -- per-batch poisoning (training-controllable attacks) --------------------------------
    @property
    def poisoning(self) -> str:
        """``"batch"`` or ``"stored"``; attacks without the option store their poisoned set."""
        return getattr(self.config, "poisoning", "stored")

    @property
    def poisons_per_batch(self) -> bool:
        """True when the attack poisons each training batch on the fly (``poisoning="batch"``)."""
        return self.poisoning == "batch"

    def poison_batch_head(self, x: torch.Tensor, y: torch.Tensor, trigger) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Batch mode: ``trigger`` (float [0, 1] images -> poisoned ones) on the first
        int(ratio * B) samples of a shuffled batch, labelled with the target, as BackdoorBench's
        WaNet and Input-aware training loops. Returns the batch and how many were poisoned."""
        if not self.poisons_per_batch:
            return x, y, 0
        n = int(self.config.poison_ratio * len(y))
        if n:
            x, y = x.clone(), y.clone()
            x[:n] = trigger(x[:n])
            y[:n] = self.config.target
        return x, y, n

    def cross_count(self, batch_size: int) -> int:
        """Cross / noise-mode samples per batch: int(int(ratio * B) * cross_ratio), as BackdoorBench."""
        return int(int(self.config.poison_ratio * batch_size) * getattr(self.config, "cross_ratio", 0.0))

    def cross_picks(self, y: torch.Tensor, start: int) -> torch.Tensor:
        """Batch positions for the cross / noise-mode samples: the first :meth:`cross_count`
        non-target samples after the poisoned head. The batch is shuffled, so they are a random
        draw, and stored poisoned images (label = target) are never among them."""
        return torch.nonzero(y[start:] != self.config.target).flatten()[: self.cross_count(len(y))] + start

    # -- derived ---------------------------------------------------------------------------
    def apply_chunked(self, x: torch.Tensor, index: torch.Tensor | None, split: str) -> torch.Tensor:
        parts = []
        for s in range(0, len(x), _CHUNK):
            idx = None if index is None else index[s : s + _CHUNK]
            out = self.apply(x[s : s + _CHUNK], idx, split)
            if out.dtype != torch.uint8 or out.shape != x[s : s + _CHUNK].shape:
                raise RuntimeError(f"{self.name}.apply must return uint8 images of the input shape")
            parts.append(out)
        return torch.cat(parts) if parts else x.clone()

    def poison_train(self, train: ImageSet, seed: int) -> PoisonedTrain:
        if self.poisons_per_batch:  # nothing stored: the batch hook poisons during training
            return PoisonedTrain(ImageSet(train.x, train.y, hflip=train.hflip), torch.empty(0, dtype=torch.int64))
        idx = self.poison_indices(train.y, seed)
        x, y = train.x.clone(), train.y.clone()
        if len(idx):
            x[idx] = self.apply_chunked(train.x[idx], idx, "train")
            if not self.clean_label:
                y[idx] = self.config.target
        return PoisonedTrain(ImageSet(x, y, hflip=train.hflip), idx)

    def poison_test(self, test: ImageSet) -> PoisonedTest:
        keep = torch.nonzero(test.y != self.config.target).flatten()
        x = self.apply_chunked(test.x[keep], keep, "test")
        return PoisonedTest(x, torch.full((len(keep),), self.config.target, dtype=torch.int64), test.y[keep].clone())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "config": to_dict(self.config)}


def build_attack(name: str, config: dict[str, Any] | None = None) -> Attack:
    cls = ATTACKS.get(name)
    return cls(**(config or {}))


def load_trigger_image(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """An image file (any Pillow format) or .npy array as a uint8 3 x H x W tensor at ``size``
    (resized bilinearly, aspect not kept, like BackdoorBench's Resize)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise TsbdError(f"trigger image {str(path)!r} not found; pass an existing image file to --trigger-image")
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        arr = arr[0] if arr.ndim == 4 else arr
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise TsbdError(f"trigger array {path} has shape {arr.shape}; expected H x W x 3")
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    else:
        try:
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError) as err:
            raise TsbdError(f"cannot read trigger image {path}: {err}; pass a PNG/JPEG file") from None
    img = img.convert("RGB")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()
