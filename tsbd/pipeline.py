"""The end-to-end steps behind the CLI, the demo and the benchmarks: train an attacked model,
purify it with a defense, evaluate it -- each recorded with seed, configs, versions and the
data fingerprint."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from tsbd.artifacts import provenance, recorded_dataset
from tsbd.attacks import Attack, build_attack
from tsbd.config import override, to_dict
from tsbd.data import Dataset, load_dataset
from tsbd.data.base import ImageSet
from tsbd.data.poison import PoisonedTest, PoisonedTrain, clean_defense_split
from tsbd.defenses import DefenseResult, build_defense
from tsbd.errors import TsbdError
from tsbd.metrics import der, evaluate
from tsbd.models import build_model, non_default_options, spec_options
from tsbd.reference import _cache_folder, _cached_model, clean_reference_model
from tsbd.train.engine import TrainConfig, fit
from tsbd.train.presets import PRESET_HELP, TRAIN_PRESETS, train_config
from tsbd.train.runtime import Runtime, seed_everything

log = logging.getLogger(__name__)

# re-exported: the training presets live in tsbd.train.presets, the clean reference model in tsbd.reference
__all__ = ["PRESET_HELP", "TRAIN_PRESETS", "AttackSetup", "cached_attacked_model", "clean_reference_model",
           "defend_model", "load_setup_from_meta", "setup_attack", "train_attacked_model", "train_config"]


@dataclasses.dataclass
class AttackSetup:
    """A dataset with an attack applied: poisoned training set and poisoned test set (none without an attack)."""

    dataset: Dataset
    attack: Attack | None  # None: a model whose attack is unknown (ACC only)
    seed: int
    poisoned_train: PoisonedTrain | None
    poisoned_test: PoisonedTest | None

    def clean_set(self, ratio: float, seed: int | None = None) -> tuple[ImageSet, dict]:
        """The defender's clean data: a seeded ``ratio`` of the training set, none of it poisoned."""
        seed = self.seed if seed is None else seed
        poisoned = self.poisoned_train.poison_index if self.poisoned_train is not None else None
        idx = clean_defense_split(len(self.dataset.train), poisoned, ratio, seed)
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
                   "requested": setup.attack.requested_poison_count(len(ds.train)),
                   "mode": "batch" if setup.attack.poisons_per_batch else "stored"},
        "train": to_dict(cfg),
        "seed": setup.seed,
        "runtime": runtime.describe(),
        "metrics": metrics,
        # "train": every epoch's time, those before a resume included ("train_this_run": since it)
        "timings": {"train": res.epoch_seconds if res.resumed_at else res.seconds, "eval": time.perf_counter() - t0,
                    **({"train_this_run": res.seconds, "resumed_at_epoch": res.resumed_at} if res.resumed_at else {})},
        **({"compile": res.compile} if res.compile else {}),
        "train_images_per_second": res.images_per_second,
        "provenance": provenance(),
    }
    return model, meta


def defend_model(model: nn.Module, setup: AttackSetup, defense_name: str, defense_cfg: dict | None,
                 clean_ratio: float, runtime: Runtime, *, seed: int = 0, progress: bool = False,
                 metrics_before: dict | None = None, monitor_stages: bool = True,
                 checkpoint_dir: str | Path | None = None) -> tuple[DefenseResult, dict]:
    """Purify ``model`` with a defense on the clean split; evaluate before and after. With
    ``checkpoint_dir``, the defense's long stages checkpoint there (see :meth:`Defense.purify`)."""
    defense = build_defense(defense_name, defense_cfg)
    clean, clean_info = setup.clean_set(clean_ratio)
    ds = setup.dataset
    before = metrics_before or evaluate(model, ds.test, setup.poisoned_test, runtime)

    def monitor(stage: str, m: nn.Module) -> dict:
        return evaluate(m, ds.test, setup.poisoned_test, runtime)

    result = defense.purify(model, clean, runtime=runtime, seed=seed, progress=progress,
                            monitor=monitor if monitor_stages else None, checkpoint_dir=checkpoint_dir)
    after = evaluate(result.model, ds.test, setup.poisoned_test, runtime)
    if "asr" in before and "asr" in after:
        after["der"] = der(before["acc"], before["asr"], after["acc"], after["asr"])
    record = {"defense": result.record(), "clean": clean_info, "metrics_before": before, "metrics": after,
              "runtime": runtime.describe(), "seed": seed, "provenance": provenance()}
    return result, record


def load_setup_from_meta(meta: dict, runtime: Runtime, *, data_root: str | None = None,
                         cache_dir: str | None = None, progress: bool = False, dataset: str | None = None,
                         attack: str | None = None, attack_options: dict | None = None) -> AttackSetup:
    """Rebuild the dataset and attack a model was trained with, checking the data fingerprint.

    ``dataset`` (a registered name) and ``attack`` (with ``attack_options``) name them where the model
    folder does not (a model purified from a file records no attack) or replace them;
    ``attack_options`` alone adjust the recorded attack. A model that records no attack and is given
    none gets a setup without one: ACC only, and a clean split drawn from the whole training set."""
    ds_meta = recorded_dataset(meta)
    name = dataset or ds_meta.get("name")
    if not name:
        raise TsbdError("the model's meta.json names no data set; pass --dataset NAME (a registered data set)")
    recorded = name == ds_meta.get("name")
    ds = load_dataset(name, root=data_root, cache_dir=cache_dir)
    if recorded:
        ds = ds.limited(int(ds_meta.get("limit_train") or 0), int(ds_meta.get("limit_test") or 0))
        if ds_meta.get("fingerprint") and ds.fingerprint != ds_meta["fingerprint"]:
            log.warning("dataset %s fingerprint %s differs from the model's record %s; results may not be "
                        "comparable", name, ds.fingerprint, ds_meta["fingerprint"])
    arch = meta.get("arch", {})
    shape = ds_meta.get("image_shape")
    if shape and list(shape) != list(ds.train.image_shape):
        raise TsbdError(f"the model was trained on {'x'.join(map(str, shape))} images but {name} has "
                        f"{'x'.join(map(str, ds.train.image_shape))}; pass the data set it was trained on")
    if arch.get("num_classes") and int(arch["num_classes"]) != ds.num_classes:
        raise TsbdError(f"the model has {arch['num_classes']} classes but {name} has {ds.num_classes}; "
                        "pass the data set it was trained on")
    attack_meta = meta.get("attack") or {}
    if attack:
        method = build_attack(attack, attack_options)
    elif attack_meta.get("name"):
        method = build_attack(attack_meta["name"], {**(attack_meta.get("config") or {}), **(attack_options or {})})
    elif attack_options:
        raise TsbdError("attack options need an attack: the model records none; pass --attack NAME")
    else:
        return AttackSetup(ds, None, int(meta.get("seed", 0)), None, None)
    # the attack's own seed (its trigger resources, the poisoned set) is recorded with the poison;
    # a defended model's "seed" is the defense's
    seed = int((meta.get("poison") or {}).get("seed", meta.get("seed", 0)))
    return setup_attack(ds, method, seed, runtime, arch=arch.get("name"), arch_kwargs=spec_options(arch),
                        cache_dir=cache_dir, progress=progress)


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

    def build(checkpoint: Path):
        return train_attacked_model(setup, arch, cfg, runtime, arch_kwargs=arch_kwargs, progress=progress,
                                    checkpoint=checkpoint)

    return _cached_model(folder, runtime, build)
