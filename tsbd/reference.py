"""Models trained once and cached: the clean reference model (for attacks that need a clean model,
e.g. LF and TrojanNN, and for analyses) and the cache folder / load-or-build helpers that
:func:`tsbd.pipeline.cached_attacked_model` shares. At the artifacts layer: it trains and saves
models, and knows nothing of attacks or defenses."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from tsbd.artifacts import is_model_folder, load_model, provenance, save_model
from tsbd.config import to_dict
from tsbd.data import Dataset
from tsbd.data.cache import resolve_cache_dir
from tsbd.errors import TsbdError
from tsbd.metrics import evaluate
from tsbd.models import build_model, non_default_options
from tsbd.train.engine import TrainConfig, fit
from tsbd.train.presets import TRAIN_PRESETS
from tsbd.train.runtime import Runtime, seed_everything

log = logging.getLogger(__name__)


def _cache_folder(kind: str, name: str, key_json: str, cache_dir: str | Path | None) -> Path:
    """``<cache>/<kind>/<name>-<first 16 hex of sha256(key_json)>``."""
    return resolve_cache_dir(cache_dir) / kind / f"{name}-{hashlib.sha256(key_json.encode()).hexdigest()[:16]}"


def _resume_path(folder: Path) -> Path:
    """The training checkpoint of the model a cache ``folder`` will hold: ``.<folder>.resume.pt``
    beside it, so an interrupted build resumes (removed once the model is saved)."""
    return folder.parent / f".{folder.name}.resume.pt"


def _cached_model(folder: Path, runtime: Runtime, build) -> tuple[nn.Module, dict, bool]:
    """The model saved in ``folder`` (:func:`_cache_folder`), else ``build(checkpoint)``'s (model,
    meta), saved there as the artifact ``tsbd attack`` writes; ``build`` trains with its epochs
    checkpointed to ``checkpoint`` (:func:`_resume_path`), deleted once the model is saved. A
    damaged entry is rebuilt. Returns (model in eval mode, meta, whether it came from the cache)."""
    if folder.exists():
        try:
            model, meta = load_model(folder, runtime.device)
            return model.eval(), meta, True
        except TsbdError as err:
            log.warning("rebuilding cached model %s: %s", folder, err)
    checkpoint = _resume_path(folder)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    model, meta = build(checkpoint)
    if folder.is_dir() and not is_model_folder(folder):  # a damaged entry of tsbd's own cache
        shutil.rmtree(folder)
    save_model(folder, model, meta, overwrite=True)
    checkpoint.unlink(missing_ok=True)
    return model.eval(), meta, False


def clean_reference_model(dataset: Dataset, arch: str, runtime: Runtime, *, seed: int = 0,
                          cfg: TrainConfig | None = None, arch_kwargs: dict | None = None,
                          cache_dir: str | Path | None = None, progress: bool = False) -> tuple[nn.Module, dict]:
    """A clean model of ``arch`` on ``dataset`` (for attacks that need one, e.g. LF and TrojanNN,
    and for analyses), trained once per (data fingerprint, arch, config, seed) and cached as an
    artifact under the cache folder."""
    cfg = cfg or TRAIN_PRESETS["cpu"]
    arch_kwargs = non_default_options(arch, arch_kwargs)  # one key for {} and the defaults spelled out

    def build(checkpoint: Path):
        seed_everything(seed)
        model = build_model(arch, dataset.num_classes, mean=dataset.mean, std=dataset.std, **arch_kwargs)
        if hasattr(model, "init_from_data"):
            model.init_from_data(dataset.train.x[torch.randperm(len(dataset.train),
                                                                generator=torch.Generator().manual_seed(seed))[:5000]])
        res = fit(model, dataset.train, cfg, runtime, seed=seed, desc=f"clean {arch}", progress=progress,
                  checkpoint=checkpoint)
        metrics = evaluate(model, dataset.test, None, runtime)
        return model, {"kind": "clean", "classes": dataset.classes, "dataset": dataset.describe(),
                       "train": to_dict(cfg), "seed": seed, "runtime": runtime.describe(), "metrics": metrics,
                       "timings": {"train": res.seconds}, "provenance": provenance()}

    key = json.dumps([dataset.fingerprint, arch, arch_kwargs, repr(cfg), seed])
    model, meta, _ = _cached_model(_cache_folder("clean_models", f"{dataset.name}-{arch}", key, cache_dir), runtime,
                                   build)
    return model, meta
