"""Generated attack resources (a trigger, a perturbation, an encoder): made once, cached, fingerprinted.

A resource is a set of named tensors plus a JSON record, stored as a folder
``<cache_dir>/attack_resources/<name>-<fingerprint>/`` with ``resource.safetensors`` and
``meta.json``. The fingerprint hashes everything that determines the resource (the attack's
settings, the data fingerprint, the seed, the clean model's recipe) *before* it is made, so a
second :func:`load_or_generate` with the same inputs finds the folder without training
anything. ``meta.json`` also records a hash of the tensors' content (checked on every load),
the generation time and whatever the generator reports (bit accuracy, clean accuracy, ...).
Folders are written under a temporary name and renamed into place; a corrupt or foreign
entry is logged and regenerated. Nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsbd.artifacts import versions, write_safetensors
from tsbd.config import override, to_dict
from tsbd.data.base import Dataset
from tsbd.data.cache import resolve_cache_dir
from tsbd.errors import TsbdError
from tsbd.models import non_default_options
from tsbd.reference import clean_reference_model
from tsbd.train.presets import TRAIN_PRESETS
from tsbd.train.runtime import Runtime

log = logging.getLogger(__name__)

RESOURCE_FORMAT = "tsbd-attack-resource"
RESOURCE_VERSION = 1  # bump when a generator changes, so stale entries are not reused
TENSORS = "resource.safetensors"
META = "meta.json"

GenerateFn = Callable[[], "tuple[dict[str, torch.Tensor], dict[str, Any]]"]


@dataclasses.dataclass(frozen=True)
class Resource:
    """A generated (or loaded) resource: its tensors and its record."""

    name: str
    fingerprint: str  # hash of the inputs that determine the resource (the cache key)
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path | None  # cache folder (None when it could not be written)
    from_cache: bool  # loaded from an earlier run rather than generated now

    def describe(self) -> dict[str, Any]:
        """What results record about the resource; the same whether it was generated or loaded."""
        return {
            "fingerprint": self.fingerprint,
            "content_sha256": self.meta.get("content_sha256"),
            "generation_seconds": self.meta.get("generation_seconds"),
            "created": self.meta.get("created"),
            "settings": self.meta.get("settings"),
            "info": self.meta.get("info", {}),
        }


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def resource_fingerprint(name: str, settings: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex) of the resource name, format version and settings (JSON)."""
    payload = {"format": RESOURCE_FORMAT, "version": RESOURCE_VERSION, "name": name, "settings": settings}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()[:16]


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resource_folder(name: str, fingerprint: str, cache_dir: str | os.PathLike | None) -> Path:
    return resolve_cache_dir(cache_dir) / "attack_resources" / f"{name}-{fingerprint}"


def read_resource(folder: Path, name: str, fingerprint: str) -> Resource | None:
    """The resource stored in ``folder``, or None if absent; a damaged entry is logged and ignored."""
    from safetensors.torch import load_file

    meta_path = folder / META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != RESOURCE_FORMAT or meta.get("version") != RESOURCE_VERSION:
            raise ValueError(f"format {meta.get('format')} v{meta.get('version')} "
                             f"is not {RESOURCE_FORMAT} v{RESOURCE_VERSION}")
        if meta.get("name") != name or meta.get("fingerprint") != fingerprint:
            raise ValueError("it belongs to another resource")
        tensors = load_file(str(folder / TENSORS))
        digest = tensors_sha256(tensors)
        if digest != meta.get("content_sha256"):
            raise ValueError(f"content hash {digest[:12]} differs from the recorded "
                             f"{str(meta.get('content_sha256'))[:12]}")
    except Exception as err:  # a torn, edited or foreign entry: regenerate rather than fail
        log.warning("ignoring damaged attack resource %s (%s); regenerating it", folder, err)
        return None
    return Resource(name, fingerprint, tensors, meta, folder, from_cache=True)


def _write_resource(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bool:
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        write_safetensors(tmp / TENSORS, tensors, {"format": RESOURCE_FORMAT, "fingerprint": meta["fingerprint"]})
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str) + "\n")
        if folder.exists():  # a damaged entry (or a concurrent writer's): move it aside, then swap in
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, folder)
        return True
    except OSError as err:
        log.warning("could not cache attack resource at %s (%s); continuing without the cache", folder, err)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def work_folder(name: str, settings: Mapping[str, Any], cache_dir: str | os.PathLike | None) -> Path:
    """Where the generation of resource ``name`` for ``settings`` keeps its training checkpoints,
    so an interrupted generation resumes: ``.<name>-<fingerprint>.partial/`` beside the resource's
    folder, removed by :func:`load_or_generate` once the resource is stored."""
    settings = json.loads(_canonical(settings))
    return _work_of(resource_folder(name, resource_fingerprint(name, settings), cache_dir))


def _work_of(folder: Path) -> Path:
    """The checkpoint folder of the generation whose resource goes into ``folder``."""
    return folder.with_name(f".{folder.name}.partial")


def load_or_generate(name: str, settings: Mapping[str, Any], generate: GenerateFn,
                     cache_dir: str | os.PathLike | None) -> Resource:
    """The resource ``name`` for ``settings``: from the cache if there, else ``generate()``d and stored.

    ``generate`` returns (tensors, info); ``info`` is a JSON-ready dict recorded in meta.json.
    ``settings`` must hold everything the resource depends on (it is the cache key). A generation
    that checkpoints into :func:`work_folder` has that folder removed once the resource is stored.
    """
    settings = json.loads(_canonical(settings))
    fingerprint = resource_fingerprint(name, settings)
    folder = resource_folder(name, fingerprint, cache_dir)
    cached = read_resource(folder, name, fingerprint)
    if cached is not None:
        log.info("loaded %s resource %s from %s", name, fingerprint, folder)
        return cached
    log.info("generating %s resource %s", name, fingerprint)
    start = time.perf_counter()
    tensors, info = generate()
    seconds = time.perf_counter() - start
    meta = {
        "format": RESOURCE_FORMAT, "version": RESOURCE_VERSION, "name": name, "fingerprint": fingerprint,
        "settings": settings, "info": json.loads(json.dumps(info, default=str)),
        "content_sha256": tensors_sha256(tensors), "generation_seconds": round(seconds, 3),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    written = _write_resource(folder, tensors, meta)
    if written:
        shutil.rmtree(_work_of(folder), ignore_errors=True)
    log.info("generated %s resource %s in %.1f s", name, fingerprint, seconds)
    return Resource(name, fingerprint, {k: v.detach().cpu() for k, v in tensors.items()}, meta,
                    folder if written else None, from_cache=False)


# -- context shared by the attacks that generate resources ---------------------------------
def runtime_of(context: Mapping[str, Any]) -> Runtime:
    """The runtime passed to ``prepare``, else CPU fp32 without touching the thread count."""
    runtime = context.get("runtime")
    if runtime is None:
        runtime = Runtime(torch.device("cpu"), "fp32", torch.get_num_threads())
    return runtime


def resource_arch(chosen: str, context: Mapping[str, Any]) -> tuple[str, dict]:
    """(architecture, options) a resource is built for: ``chosen`` (an attack option; "" = the victim's
    architecture from the ``prepare`` context, airbench when it names none), with the victim's options
    when it is the victim's architecture. Options equal to the factory defaults are dropped, so ``{}``
    and the defaults spelled out (as the grid records them) give one cache key."""
    arch = chosen or context.get("arch") or "airbench"  # airbench is the CLI's default
    kwargs = dict(context.get("arch_kwargs") or {}) if arch == context.get("arch") else {}
    return arch, non_default_options(arch, kwargs)


def image_shape_of(dataset: Dataset) -> list[int]:
    return [int(s) for s in dataset.train.image_shape]


@dataclasses.dataclass(frozen=True)
class CleanModelRecipe:
    """How the clean reference model an attack optimizes against is trained
    (:func:`tsbd.reference.clean_reference_model`, which caches it per recipe)."""

    arch: str
    arch_kwargs: dict
    epochs: int
    seed: int

    @classmethod
    def from_context(cls, clean_arch: str, clean_epochs: int, context: Mapping[str, Any]) -> CleanModelRecipe:
        arch, kwargs = resource_arch(clean_arch, context)
        if clean_epochs < 1:
            raise TsbdError(f"clean_epochs must be >= 1, got {clean_epochs}")
        return cls(arch, kwargs, int(clean_epochs), int(context.get("seed", 0) or 0))

    def train_config(self):
        return override(TRAIN_PRESETS["cpu"], {"epochs": self.epochs})

    def settings(self, dataset: Dataset) -> dict[str, Any]:
        """The recipe as cache-key settings (no training needed to compute them)."""
        return {"arch": self.arch, "arch_kwargs": self.arch_kwargs, "train": to_dict(self.train_config()),
                "seed": self.seed, "data": dataset.fingerprint}

    def build(self, dataset: Dataset, runtime: Runtime, cache_dir, progress: bool) -> tuple[nn.Module, dict]:
        """The trained clean model (eval mode, gradients off) and a summary of its record."""
        model, meta = clean_reference_model(dataset, self.arch, runtime, seed=self.seed, cfg=self.train_config(),
                                            arch_kwargs=self.arch_kwargs or None, cache_dir=cache_dir,
                                            progress=progress)
        model = model.to(runtime.device).eval()
        model.requires_grad_(False)
        weights = {k: v for k, v in model.state_dict().items()}
        info = {"arch": self.arch, "epochs": self.epochs, "seed": self.seed,
                "clean_acc": (meta.get("metrics") or {}).get("acc"),
                "weights_sha256": tensors_sha256(weights)[:16]}
        return model, info


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` in module order (the classifier head of every tsbd model)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise TsbdError(f"{type(model).__name__} has no nn.Linear layer whose input units could be selected")
    return found[-1]


# BackdoorBench's trigger files (SCLBD/BackdoorBench @ f02e353, ``resource/``; CC BY-NC 4.0, so not
# shipped here) and the option of each attack that takes one. LF's file is made per (dataset, model).
BACKDOORBENCH_TRIGGERS = {
    "badnets": ("trigger_image", "trigger_image.png"),
    "blended": ("trigger_image", "hello_kitty.jpeg"),
    "trojan": ("mask_image", "apple4.png"),
    "lf": ("trigger_file", "{dataset}_{model}_0_255.npy"),
}


def backdoorbench_trigger_options(folder: str | os.PathLike, dataset: str = "cifar10",
                                  model: str = "preactresnet18") -> dict[str, dict[str, str]]:
    """``{attack: {option: path}}`` for BackdoorBench's trigger files in ``folder`` (LF's for
    ``dataset`` and ``model`` in BackdoorBench's spelling, e.g. ``preactresnet18``, ``vgg19_bn``).
    Raises a TsbdError naming the first file that is missing."""
    out = {}
    for attack, (option, name) in BACKDOORBENCH_TRIGGERS.items():
        path = Path(folder) / name.format(dataset=dataset, model=model)
        if not path.is_file():
            raise TsbdError(f"BackdoorBench trigger file {path} not found; pass the folder that holds "
                            f"BackdoorBench's resource files "
                            f"({', '.join(n for _, n in BACKDOORBENCH_TRIGGERS.values())})")
        out[attack] = {option: str(path)}
    return out

