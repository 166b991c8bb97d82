"""What every ``tsbd analyze`` subcommand shares: the context it runs in, the registry of
analyses by name, and the writers for its CSV and figures.

An analysis is a function ``run(ctx) -> (result, markdown)`` registered with
:func:`analysis`; it writes its CSV / figures into ``ctx.out`` and returns the numbers for
``result.json`` and the Markdown for ``section.md`` (the CLI writes both, with provenance and the
exact command). Options an analysis needs beyond the shared ones are declared with it and added
to ``tsbd analyze``'s parser.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tsbd.artifacts import write_bytes_atomic
from tsbd.errors import TsbdError
from tsbd.metrics import evaluate
from tsbd.models import spec_options
from tsbd.reference import clean_reference_model
from tsbd.train.engine import TrainConfig


@dataclasses.dataclass
class AnalysisContext:
    """Everything an analysis gets: the attacked model and its rebuilt setup (dataset, attack,
    poisoned test set), the defender's clean set, TSBD's config (with ``--opt`` applied), the
    runtime, the output folder and the parsed command line (``args``) for its own options."""

    model: Any
    setup: Any
    clean: Any
    cfg: Any
    runtime: Any
    out: Path
    seed: int
    progress: bool
    meta: dict
    args: argparse.Namespace
    cache_dir: str | None = None

    def evaluate(self, model) -> dict:
        """ACC / ASR / RA of ``model`` on the full clean and poisoned test sets."""
        return evaluate(model, self.setup.dataset.test, self.setup.poisoned_test, self.runtime)

    def values(self, default: str) -> list[float]:
        """--values, or ``default`` when it is not given (an empty --values is an error, not the default)."""
        return parse_values(default if self.args.values is None else self.args.values)

    def clean_reference_model(self) -> tuple[Any, dict]:
        """(model, meta): a clean model of the attacked model's architecture and training recipe on
        the same dataset (trained once, cached; :func:`tsbd.reference.clean_reference_model`)."""
        arch = self.meta.get("arch", {})
        train_cfg = TrainConfig(**self.meta["train"]) if self.meta.get("train") else None
        return clean_reference_model(self.setup.dataset, arch["name"], self.runtime, seed=self.setup.seed,
                                     cfg=train_cfg, arch_kwargs=spec_options(arch), cache_dir=self.cache_dir,
                                     progress=self.progress)


Runner = Callable[[AnalysisContext], "tuple[dict, str]"]


@dataclasses.dataclass
class Analysis:
    name: str
    run: Runner
    help: str
    options: list[tuple[tuple[str, ...], dict]] = dataclasses.field(default_factory=list)
    command_options: tuple[str, ...] = ()  # dest names echoed into section.md's command line


ANALYSES: dict[str, Analysis] = {}


def analysis(name: str, help: str, options: list[tuple[tuple[str, ...], dict]] | None = None):
    """Register ``run`` as ``tsbd analyze NAME``. ``options``: extra argparse options, as
    ``(flags, kwargs)`` pairs; their values reach ``run`` as ``ctx.args.<dest>`` and are written
    into the recorded command."""

    def wrap(run: Runner) -> Runner:
        opts = list(options or [])
        dests = tuple(kw.get("dest") or flags[0].lstrip("-").replace("-", "_") for flags, kw in opts)
        ANALYSES[name] = Analysis(name, run, help, opts, dests)
        return run

    return wrap


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as CSV (header from the first row), written atomically."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode())


def parse_values(text: str, flag: str = "--values") -> list[float]:
    """Comma-separated numbers, with a one-line error naming the flag."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TsbdError(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.05,0.15,0.3") from None
    if not values:
        raise TsbdError(f"{flag} is empty; give comma-separated numbers, e.g. 0.05,0.15,0.3")
    return values


def fractions(values: list[float], flag: str = "--values", what: str = "ratios") -> list[float]:
    """``values`` if all are in (0, 1], else a one-line error naming ``flag``."""
    bad = [v for v in values if not 0 < v <= 1]
    if bad:
        raise TsbdError(f"{flag}: {what} {bad[0]:g} is outside (0, 1]; give fractions such as 0.1,0.05,0.3")
    return values
