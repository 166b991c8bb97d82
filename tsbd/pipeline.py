"""The end-to-end steps behind the CLI, the demo and the benchmarks: train an attacked model,
purify it with a defense, evaluate it -- each recorded with seed, configs, versions and the
data fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsbd.artifacts import provenance
from tsbd.attacks import Attack, build_attack
from tsbd.config import override, to_dict
from tsbd.data import Dataset, load_dataset
from tsbd.data.base import ImageSet
from tsbd.data.poison import PoisonedTest, PoisonedTrain, clean_defense_split
from tsbd.defenses import DefenseResult, build_defense
from tsbd.errors import TsbdError
from tsbd.metrics import der, evaluate
from tsbd.models import build_model, non_default_options, spec_options
from tsbd.train.engine import TrainConfig, fit
from tsbd.train.runtime import Runtime, seed_everything

log = logging.getLogger(__name__)

# Attack-training presets. "backdoorbench" is the paper's schedule (BackdoorBench defaults);
# "cpu" is the airbench-style recipe that trains the CPU-scale model in minutes on 2 cores.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "backdoorbench": TrainConfig(),
    "cpu": TrainConfig(epochs=30, batch_size=256, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       schedule="onecycle", warmup=0.2, label_smoothing=0.1),
    "gpu": TrainConfig(epochs=35, batch_size=512, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       schedule="onecycle", warmup=0.15),
}
PRESET_HELP = {
    "backdoorbench": "BackdoorBench defaults: 100 epochs, batch 128, SGD 0.01/0.9/5e-4, cosine (paper scale)",
    "cpu": "CPU preset: 30 epochs, batch 256, SGD nesterov lr 0.2, wd 5e-4, onecycle, label smoothing 0.1",
    "gpu": "GPU preset for paper-scale models: 35 epochs, batch 512, SGD nesterov lr 0.1, wd 5e-4, onecycle",
}


def train_config(preset: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    if preset not in TRAIN_PRESETS:
        raise TsbdError(f"unknown training preset {preset!r}; choose one of {', '.join(TRAIN_PRESETS)}")
    return override(TRAIN_PRESETS[preset], overrides)


@dataclasses.dataclass
class AttackSetup:
    """A dataset with an attack applied: poisoned training set and poisoned test set."""

    dataset: Dataset
    attack: Attack
    seed: int
    poisoned_train: PoisonedTrain
    poisoned_test: PoisonedTest

    def clean_set(self, ratio: float, seed: int | None = None) -> tuple[ImageSet, dict]:
        """The defender's clean data: a seeded ``ratio`` of the training set, none of it poisoned."""
        seed = self.seed if seed is None else seed
        idx = clean_defense_split(len(self.dataset.train), self.poisoned_train.poison_index, ratio, seed)
        clean = self.dataset.train.subset(idx)
        return clean, {"ratio": ratio, "count": len(idx), "seed": seed, "fingerprint": clean.fingerprint()}


def setup_attack(dataset: Dataset, attack: Attack, seed: int, runtime: Runtime, *, arch: str | None = None,
                 arch_kwargs: dict | None = None, cache_dir: str | None = None,
                 progress: bool = False) -> AttackSetup:
    """Prepare the attack's resources (for the victim architecture ``arch``) and poison the data."""
    attack.prepare(dataset, runtime=runtime, seed=seed, arch=arch, arch_kwargs=arch_kwargs or {},
                   cache_dir=cache_dir, progress=progress)
    ptrain = attack.poison_train(dataset.train, seed)
    ptest = attack.poison_test(dataset.test)
    return AttackSetup(dataset, attack, seed, ptrain, ptest)


def train_attacked_model(setup: AttackSetup, arch: str, cfg: TrainConfig, runtime: Runtime, *,
                         arch_kwargs: dict | None = None, progress: bool = False,
                         checkpoint: str | Path | None = None) -> tuple[nn.Module, dict]:
    """Train ``arch`` on the poisoned training set; returns the model and its meta record."""
    ds = setup.dataset
    seed_everything(setup.seed)
    model = build_model(arch, ds.num_classes, mean=ds.mean, std=ds.std, **(arch_kwargs or {}))
    train = setup.poisoned_train.data
    if hasattr(model, "init_from_data"):  # data-dependent init (airbench's whitening), on what the attacker trains on
        model.init_from_data(train.x[torch.randperm(len(train),
                                                    generator=torch.Generator().manual_seed(setup.seed))[:5000]])
    cfg = override(cfg, setup.attack.train_overrides())
    res = fit(model, train, cfg, runtime, seed=setup.seed, batch_hook=setup.attack.batch_hook(setup.seed),
              checkpoint=checkpoint, desc=f"train {arch} ({setup.attack.name})", progress=progress)
    t0 = time.perf_counter()
    metrics = evaluate(model, ds.test, setup.poisoned_test, runtime)
    meta = {
        "kind": "attacked",
        "classes": ds.classes,
        "dataset": ds.describe(),
        "attack": setup.attack.describe(),
        "poison": {"count": len(setup.poisoned_train.poison_index), "seed": setup.seed,
                   "mode": "batch" if setup.attack.poisons_per_batch else "stored"},
        "train": to_dict(cfg),
        "seed": setup.seed,
        "runtime": runtime.describe(),
        "metrics": metrics,
        "timings": {"train": res.seconds, "eval": time.perf_counter() - t0},
        "train_images_per_second": res.images_per_second,
        "provenance": provenance(),
    }
    return model, meta


def defend_model(model: nn.Module, setup: AttackSetup, defense_name: str, defense_cfg: dict | None,
                 clean_ratio: float, runtime: Runtime, *, seed: int = 0, progress: bool = False,
                 metrics_before: dict | None = None, monitor_stages: bool = True) -> tuple[DefenseResult, dict]:
    """Purify ``model`` with a defense on the clean split; evaluate before and after."""
    defense = build_defense(defense_name, defense_cfg)
    clean, clean_info = setup.clean_set(clean_ratio)
    ds = setup.dataset
    before = metrics_before or evaluate(model, ds.test, setup.poisoned_test, runtime)

    def monitor(stage: str, m: nn.Module) -> dict:
        return evaluate(m, ds.test, setup.poisoned_test, runtime)

    result = defense.purify(model, clean, runtime=runtime, seed=seed, progress=progress,
                            monitor=monitor if monitor_stages else None)
    after = evaluate(result.model, ds.test, setup.poisoned_test, runtime)
    if "asr" in before and "asr" in after:
        after["der"] = der(before["acc"], before["asr"], after["acc"], after["asr"])
    record = {"defense": result.record(), "clean": clean_info, "metrics_before": before, "metrics": after,
              "runtime": runtime.describe(), "seed": seed, "provenance": provenance()}
    return result, record


def load_setup_from_meta(meta: dict, runtime: Runtime, *, data_root: str | None = None,
                         cache_dir: str | None = None, progress: bool = False) -> AttackSetup:
    """Rebuild the dataset and attack a model was trained with, checking the data fingerprint."""
    ds_meta = meta.get("dataset") or {}
    name = ds_meta.get("name")
    if not name:
        raise TsbdError("the model's meta.json names no dataset; pass the data explicitly")
    ds = load_dataset(name, root=data_root, cache_dir=cache_dir).limited(
        int(ds_meta.get("limit_train", 0)), int(ds_meta.get("limit_test", 0)))
    if ds_meta.get("fingerprint") and ds.fingerprint != ds_meta["fingerprint"]:
        log.warning("dataset %s fingerprint %s differs from the model's record %s; results may not be comparable",
                    name, ds.fingerprint, ds_meta["fingerprint"])
    attack_meta = meta.get("attack") or {}
    attack = build_attack(attack_meta.get("name", "badnets"), attack_meta.get("config"))
    arch = meta.get("arch", {})
    return setup_attack(ds, attack, int(meta.get("seed", 0)), runtime, arch=arch.get("name"),
                        arch_kwargs=spec_options(arch), cache_dir=cache_dir, progress=progress)


def _cache_folder(kind: str, name: str, key_json: str, cache_dir: str | Path | None) -> Path:
    """``<cache>/<kind>/<name>-<first 16 hex of sha256(key_json)>``."""
    from tsbd.data.cache import resolve_cache_dir

    return resolve_cache_dir(cache_dir) / kind / f"{name}-{hashlib.sha256(key_json.encode()).hexdigest()[:16]}"


def _cached_model(folder: Path, runtime: Runtime, build) -> tuple[nn.Module, dict, bool]:
    """The model saved in ``folder`` (:func:`_cache_folder`), else ``build()``'s (model, meta), saved
    there as the artifact ``tsbd attack`` writes. A damaged entry is rebuilt. Returns (model in eval
    mode, meta, whether it came from the cache)."""
    from tsbd.artifacts import load_model, save_model

    if folder.exists():
        try:
            model, meta = load_model(folder, runtime.device)
            return model.eval(), meta, True
        except TsbdError as err:
            log.warning("rebuilding cached model %s: %s", folder, err)
    model, meta = build()
    save_model(folder, model, meta)
    return model.eval(), meta, False


def clean_reference_model(dataset: Dataset, arch: str, runtime: Runtime, *, seed: int = 0,
                          cfg: TrainConfig | None = None, arch_kwargs: dict | None = None,
                          cache_dir: str | Path | None = None, progress: bool = False) -> tuple[nn.Module, dict]:
    """A clean model of ``arch`` on ``dataset`` (for attacks that need one, e.g. LF and TrojanNN,
    and for analyses), trained once per (data fingerprint, arch, config, seed) and cached as an
    artifact under the cache folder."""
    cfg = cfg or TRAIN_PRESETS["cpu"]
    arch_kwargs = non_default_options(arch, arch_kwargs)  # one key for {} and the defaults spelled out

    def build():
        seed_everything(seed)
        model = build_model(arch, dataset.num_classes, mean=dataset.mean, std=dataset.std, **arch_kwargs)
        if hasattr(model, "init_from_data"):
            model.init_from_data(dataset.train.x[torch.randperm(len(dataset.train),
                                                                generator=torch.Generator().manual_seed(seed))[:5000]])
        res = fit(model, dataset.train, cfg, runtime, seed=seed, desc=f"clean {arch}", progress=progress)
        metrics = evaluate(model, dataset.test, None, runtime)
        return model, {"kind": "clean", "classes": dataset.classes, "dataset": dataset.describe(),
                       "train": to_dict(cfg), "seed": seed, "runtime": runtime.describe(), "metrics": metrics,
                       "timings": {"train": res.seconds}, "provenance": provenance()}

    key = json.dumps([dataset.fingerprint, arch, arch_kwargs, repr(cfg), seed])
    model, meta, _ = _cached_model(_cache_folder("clean_models", f"{dataset.name}-{arch}", key, cache_dir), runtime,
                                   build)
    return model, meta


def cached_attacked_model(setup: AttackSetup, arch: str, cfg: TrainConfig, runtime: Runtime, *,
                          arch_kwargs: dict | None = None, cache_dir: str | Path | None = None,
                          progress: bool = False) -> tuple[nn.Module, dict, bool]:
    """:func:`train_attacked_model`, trained once per (data fingerprint, arch, attack config, training
    config, seed) and cached as the artifact ``tsbd attack`` writes, under
    ``<cache>/attacked_models/<dataset>-<attack>-<arch>-<key>/`` (for analyses that need the same model
    attacked differently, e.g. at other poison ratios). Training checkpoints every epoch next to that
    folder, so an interrupted run resumes. Returns (model, meta, whether it came from the cache)."""
    key = json.dumps([setup.dataset.fingerprint, arch, non_default_options(arch, arch_kwargs), setup.attack.describe(),
                      to_dict(cfg), setup.seed], sort_keys=True, default=str)
    folder = _cache_folder("attacked_models", f"{setup.dataset.name}-{setup.attack.name}-{arch}", key, cache_dir)
    ckpt = folder.parent / f".{folder.name}.resume.pt"

    def build():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        return train_attacked_model(setup, arch, cfg, runtime, arch_kwargs=arch_kwargs, progress=progress,
                                    checkpoint=ckpt)

    model, meta, cached = _cached_model(folder, runtime, build)
    ckpt.unlink(missing_ok=True)  # after the model is saved
    return model, meta, cached
