"""The defense interface: ``Defense(config).purify(model, clean_data) -> DefenseResult``."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tsbd.config import AT_LEAST_ONE, Validated, option, override, to_dict
from tsbd.data.base import ImageSet
from tsbd.errors import TsbdError
from tsbd.registry import Registry
from tsbd.train.runtime import Runtime, seed_everything

DEFENSES: Registry[type[Defense]] = Registry("defense", "tsbd.defenses")

# monitor(stage, model) -> metrics to record after a stage (e.g. test ACC/ASR in benchmarks)
Monitor = Callable[[str, nn.Module], dict]


@dataclasses.dataclass(frozen=True)
class DefenseConfig(Validated):
    batch_size: int = option(256, "mini-batch size", "paper App. C / BackdoorBench defense configs", check=AT_LEAST_ONE)


@dataclasses.dataclass
class DefenseResult:
    """The purified model and a record of what the defense did."""

    model: nn.Module
    defense: str
    config: dict
    info: dict = dataclasses.field(default_factory=dict)  # method-specific diagnostics
    timings: dict = dataclasses.field(default_factory=dict)  # seconds per stage
    stages: dict = dataclasses.field(default_factory=dict)  # monitor output per stage

    def record(self) -> dict:
        return {"defense": self.defense, "config": self.config, "info": self.info, "timings": self.timings,
                "stages": self.stages}


class Stages:
    """Times named stages, runs the optional monitor after each, and names the checkpoint files of
    long stages (under ``checkpoint_dir``, when the caller gives one) so a rerun resumes them."""

    def __init__(self, result: DefenseResult, monitor: Monitor | None, checkpoint_dir: str | Path | None = None):
        self.result, self.monitor = result, monitor
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    def checkpoint(self, name: str) -> Path | None:
        """Where a stage's :func:`~tsbd.train.engine.fit` saves its epochs (None: no checkpoints)."""
        return None if self.checkpoint_dir is None else self.checkpoint_dir / f"{name}.resume.pt"

    def resumed(self, name: str, at: int, earlier_seconds: float) -> None:
        """Record that a stage resumed from its checkpoint: where (an epoch, a count of finished
        items; 0: not resumed) and the seconds the earlier runs spent on it
        (``timings["earlier_runs"]``, which a cell's compute time adds)."""
        if at:
            self.result.info.setdefault("resumed", {})[name] = at
            self.result.timings["earlier_runs"] = self.result.timings.get("earlier_runs", 0.0) + earlier_seconds

    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        yield
        self.result.timings[name] = time.perf_counter() - t0

    def observe(self, name: str, model: nn.Module) -> None:
        if self.monitor is not None:
            self.result.stages[name] = self.monitor(name, model)


class Defense:
    """Base class: subclasses set ``name``, ``config_class`` and implement :meth:`run`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = DefenseConfig
    # options that add measurements to a run but leave the returned model as it is (e.g. TSBD's sweep
    # of n on test data): reports put cells that differ only in these into one column
    report_only: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any = None, **overrides: Any):
        cfg = config if config is not None else self.config_class()
        if not isinstance(cfg, self.config_class):
            raise TsbdError(f"{self.name} expects a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.config = override(cfg, overrides)

    def purify(self, model: nn.Module, clean: ImageSet, *, runtime: Runtime | None = None, seed: int = 0,
               progress: bool = False, monitor: Monitor | None = None,
               checkpoint_dir: str | Path | None = None) -> DefenseResult:
        """Return a purified copy of ``model`` (the input is not modified). With ``checkpoint_dir``,
        the defense's long stages checkpoint there after every epoch and a rerun with the same model,
        data, config and seed resumes them; the caller removes the folder once the result is kept."""
        runtime = runtime or Runtime.create()
        check_clean_data(model, clean, runtime)
        seed_everything(seed)
        work = copy.deepcopy(model).to(runtime.device)
        result = DefenseResult(model=work, defense=self.name, config=to_dict(self.config))
        total0 = time.perf_counter()
        result.model = self.run(work, clean, runtime=runtime, seed=seed, progress=progress,
                                stages=Stages(result, monitor, checkpoint_dir), result=result)
        result.timings["total"] = time.perf_counter() - total0
        return result

    def run(self, model: nn.Module, clean: ImageSet, *, runtime: Runtime, seed: int, progress: bool,
            stages: Stages, result: DefenseResult) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def seconds_like(cls, options: dict, like_options: dict, like_timings: dict, like_seconds: float) -> float:
        """A planning estimate: the seconds a cell with ``options`` would take, given a done cell of
        this defense with ``like_options`` that took ``like_seconds`` (its stage times:
        ``like_timings``). By default the same; a defense whose options change its work (e.g.
        TSBD's sweep of n) scales it."""
        return like_seconds


def check_clean_data(model: nn.Module, clean: ImageSet, runtime: Runtime) -> None:
    """Fail early, in one line, when the clean set cannot be used with this model."""
    if len(clean) == 0:
        raise TsbdError("the clean defense set is empty; provide clean images (raise --clean-ratio or add data)")
    c = clean.x.shape[1]
    if c != 3:
        raise TsbdError(f"clean images have {c} channels; the models expect RGB (3 channels)")
    model_was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.to(runtime.device)(clean.x[:2].to(runtime.device).float() / 255)
    except RuntimeError as err:
        raise TsbdError(f"the model cannot process the clean images of size {tuple(clean.x.shape[1:])}: "
                        f"{str(err).splitlines()[0]}; use data of the size the model was trained on") from None
    finally:
        model.train(model_was_training)
    n_classes = out.shape[1]
    if int(clean.y.max()) >= n_classes:
        raise TsbdError(f"clean labels go up to {int(clean.y.max())} but the model has {n_classes} classes; "
                        "use the dataset the model was trained on")


def build_defense(name: str, config: dict[str, Any] | None = None) -> Defense:
    return DEFENSES.get(name)(**(config or {}))
