"""Running one cell: train an attacked model, or defend one, and write its artifact folder.

Both kinds call the pipeline's building blocks (:func:`tsbd.pipeline.setup_attack`,
:func:`~tsbd.pipeline.train_attacked_model`, :func:`~tsbd.pipeline.defend_model`). The artifact
goes to ``RESULTS_DIR/artifacts/<cell id>/`` through :func:`tsbd.artifacts.save_model`, which
writes a temporary folder and renames it into place; only then does the caller mark the cell
done. Attack training checkpoints to ``RESULTS_DIR/checkpoints/<cell id>.resume.pt`` after every
epoch, so a killed run resumes mid-training; a defense's long stages (TSBD's unlearning and
fine-tuning, ANP's mask optimization, NC's reverse engineering) checkpoint into
``RESULTS_DIR/checkpoints/<cell id>/`` the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tsbd import pipeline  # its steps are called as pipeline.X, so that a test can wrap them
from tsbd.artifacts import load_model, provenance, save_model, write_json_atomic
from tsbd.attacks import build_attack
from tsbd.bench.grid import Cell, canonical_json, load_bench_dataset, resolve_data_options
from tsbd.bench.store import now_iso
from tsbd.config import override
from tsbd.errors import TsbdError
from tsbd.train.engine import TrainConfig
from tsbd.train.runtime import Runtime

log = logging.getLogger(__name__)

ARTIFACTS = "artifacts"
CHECKPOINTS = "checkpoints"
RECORD = "record.json"


@dataclasses.dataclass(frozen=True)
class CellContext:
    """Where results go and how cells run (never part of a cell's identity)."""

    results_dir: str
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    compile: bool | str | None = None  # None: auto (tsbd.train.runtime.compile_mode)
    data_root: str | None = None
    cache_dir: str | None = None
    progress: bool = False
    save_defended_models: bool = True

    def runtime(self):
        return Runtime.create(self.device, self.precision, self.threads, self.compile)


@dataclasses.dataclass
class CellResult:
    metrics: dict
    timings: dict
    versions: dict
    artifact: str  # relative to the results folder
    host: str
    started: str
    finished: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------
# data
class DataCache:
    """The last dataset and attack setup a process used, so that the defense cells of one
    attacked model do not reload and re-poison the data."""

    def __init__(self):
        self._dataset: tuple[str, Any] | None = None
        self._setup: tuple[str, Any] | None = None

    def dataset(self, ds_spec: dict, ctx: CellContext):
        key = canonical_json({k: v for k, v in ds_spec.items() if k != "fingerprint"})
        if self._dataset is None or self._dataset[0] != key:
            self._dataset = None
            self._setup = None
            ds = load_bench_dataset(ds_spec, data_root=ctx.data_root, cache_dir=ctx.cache_dir)
            want = ds_spec.get("fingerprint")
            if want and ds.fingerprint != want:
                raise TsbdError(f"dataset {ds_spec['name']} has fingerprint {ds.fingerprint}, but the grid was planned "
                                f"with {want}; the data changed -- rerun `tsbd bench` to plan against the current data")
            self._dataset = (key, ds)
        return self._dataset[1]

    def setup(self, attack_cell: Cell, ctx: CellContext, runtime):
        if self._setup is None or self._setup[0] != attack_cell.id:
            c = attack_cell.config
            ds = self.dataset(c["dataset"], ctx)
            opts = resolve_data_options(c["attack"]["config"], ctx.data_root, c.get("files"),
                                        f"[attack_opts.{c['attack']['name']}]")
            attack = build_attack(c["attack"]["name"], opts)
            setup = pipeline.setup_attack(ds, attack, c["seed"], runtime, arch=c["model"]["name"],
                                          arch_kwargs=c["model"].get("options", {}), cache_dir=ctx.cache_dir,
                                          progress=ctx.progress)
            self._setup = (attack_cell.id, setup)
        return self._setup[1]


# ------------------------------------------------------------------------------------------
# the two kinds of cell
def artifact_path(results_dir: str | Path, cell_id: str) -> Path:
    return Path(results_dir) / ARTIFACTS / cell_id


def checkpoint_path(results_dir: str | Path, cell_id: str) -> Path:
    return Path(results_dir) / CHECKPOINTS / f"{cell_id}.resume.pt"


def checkpointed_epochs(results_dir: str | Path, cell_id: str) -> int:
    """How many epochs of an attack cell's model training its checkpoint holds: 0 where it has none
    or it cannot be read (a resumed run then starts over too)."""
    path = checkpoint_path(results_dir, cell_id)
    if not path.exists():
        return 0
    import torch

    try:  # mmap: only the epoch is read, not the model and optimizer tensors
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # torn or foreign: the training engine ignores it as well
        return 0


def checkpoint_dir(results_dir: str | Path, cell_id: str) -> Path:
    """Where a defense cell's stages checkpoint (removed once the cell is done)."""
    return Path(results_dir) / CHECKPOINTS / cell_id


def run_attack_cell(cell: Cell, ctx: CellContext, cache: DataCache | None = None) -> CellResult:
    started = now_iso()
    t0 = time.perf_counter()
    cache = cache or DataCache()
    runtime = ctx.runtime()
    kept = earlier_compile_choice(ctx.results_dir, cell.id) if runtime.compile == "auto" else None
    if kept is not None:  # trained again: the earlier attempt's choice, not a new timing race
        runtime = dataclasses.replace(runtime, compile="on" if kept else "off")
        log.info("attack cell %s trains %s, as its earlier attempt chose", cell.id, "compiled" if kept else "eager")
    c = cell.config
    setup = cache.setup(cell, ctx, runtime)
    t_setup = time.perf_counter() - t0
    cfg = override(TrainConfig(), c["train"])
    ckpt = checkpoint_path(ctx.results_dir, cell.id)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    model, meta = pipeline.train_attacked_model(setup, c["model"]["name"], cfg, runtime,
                                                arch_kwargs=c["model"]["options"], progress=ctx.progress,
                                                checkpoint=ckpt)
    meta["dataset"].update(limit_train=c["dataset"]["limit_train"], limit_test=c["dataset"]["limit_test"],
                           options=c["dataset"]["options"])
    meta["bench"] = {"cell": cell.id, "kind": "attack", "config": c}
    out = artifact_path(ctx.results_dir, cell.id)
    save_model(out, model, meta, overwrite=True)  # a cell redone after a crash replaces its own artifact
    ckpt.unlink(missing_ok=True)
    timings = {"setup": t_setup, **meta["timings"], "total": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
    versions = _versions(runtime, provenance())
    if isinstance((meta.get("compile") or {}).get("compiled"), bool):
        versions["runtime"]["compiled"] = meta["compile"]["compiled"]
    return CellResult(metrics=dict(meta["metrics"]), timings=timings, versions=versions,
                      artifact=str(Path(ARTIFACTS) / cell.id), host=socket.gethostname(), started=started,
                      finished=now_iso())


def earlier_compile_choice(results_dir: str | Path, cell_id: str) -> bool | None:
    """Whether the attack cell's earlier attempt trained compiled (recorded in its versions, which a
    reopen keeps), or None. With ``--compile`` auto the choice rests on a timing race (the compiled
    step must be 5% faster), and compiled and eager steps round differently: an attacked model
    trained again with the other choice is another model."""
    from tsbd.bench.store import DB_NAME, Store

    if not (Path(results_dir) / DB_NAME).is_file():
        return None
    with Store(results_dir, create=False) as store:
        row = store.state(cell_id) or {}
    choice = ((row.get("versions") or {}).get("runtime") or {}).get("compiled")
    return choice if isinstance(choice, bool) else None


def peak_rss_mb() -> float | None:
    """The peak resident memory of this process so far, in MiB (a grid worker's high-water mark when
    recorded after a cell); None where the platform does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def run_defense_cell(cell: Cell, parent: Cell, ctx: CellContext, cache: DataCache | None = None) -> CellResult:
    started = now_iso()
    t0 = time.perf_counter()
    cache = cache or DataCache()
    runtime = ctx.runtime()
    c = cell.config
    parent_dir = artifact_path(ctx.results_dir, parent.id)
    # weights from the artifact, never from memory: every executor sees the same model
    model, parent_meta = load_model(parent_dir, runtime.device)
    setup = cache.setup(parent, ctx, runtime)
    t_setup = time.perf_counter() - t0
    ckpt_dir = checkpoint_dir(ctx.results_dir, cell.id)
    result, record = pipeline.defend_model(model, setup, c["defense"]["name"], c["defense"]["config"],
                                           c["clean_ratio"], runtime, seed=c["seed"], progress=ctx.progress,
                                           metrics_before=parent_meta.get("metrics"), checkpoint_dir=ckpt_dir)
    meta = {k: parent_meta[k] for k in ("classes", "dataset", "attack", "poison", "train") if k in parent_meta}
    meta.update({"kind": "defended", "parent": parent.id, **record, "timings": result.timings,
                 "bench": {"cell": cell.id, "kind": "defense", "config": c}})
    out = artifact_path(ctx.results_dir, cell.id)
    if ctx.save_defended_models:
        save_model(out, result.model, meta, overwrite=True)
    else:  # the record alone, still written to a temporary folder and renamed into place
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            write_json_atomic(tmp / RECORD, meta)
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    metrics = dict(record["metrics"])
    if record["defense"].get("stages"):
        metrics["stages"] = record["defense"]["stages"]
    timings = {"setup": t_setup, **result.timings, "cell": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
    return CellResult(metrics=metrics, timings=timings, versions=_versions(runtime, provenance()),
                      artifact=str(Path(ARTIFACTS) / cell.id), host=socket.gethostname(), started=started,
                      finished=now_iso())


def run_cell(cell: Cell, parent: Cell | None, ctx: CellContext, cache: DataCache | None = None) -> CellResult:
    """Run ``cell`` (``parent`` is a defense cell's attack cell, already done)."""
    if cell.kind == "attack":
        return run_attack_cell(cell, ctx, cache)
    if parent is None:
        raise ValueError(f"defense cell {cell.id} needs its attack cell")
    return run_defense_cell(cell, parent, ctx, cache)


def _versions(runtime, prov: dict) -> dict:
    return {**prov["versions"], "runtime": runtime.describe()}


def one_line_error(err: BaseException) -> str:
    """A failure as one line: a TsbdError's message, else ``Type: first line``."""
    if isinstance(err, TsbdError):
        return str(err)
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
