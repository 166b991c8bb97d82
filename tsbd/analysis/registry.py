"""What every ``tsbd analyze`` subcommand shares: the context it measures in, its options, the
registry of analyses by name, and the writers for its CSV and figures.

An analysis is two functions and an options class, registered with :func:`register`:

* ``measure(ctx, options) -> Measurement`` computes: it returns the numbers for ``result.json``
  and the per-item records its files are drawn from, and writes nothing;
* ``render(ctx, options, measurement, out) -> markdown`` writes the CSV and figures into ``out``
  and returns the Markdown for ``section.md`` (the CLI writes it and ``result.json``, with
  provenance and the exact command);
* ``options`` is a frozen dataclass whose fields, with their defaults, are the analysis's own
  settings. ``tsbd analyze`` builds it once from its flags (:func:`cli_option` says which flag sets
  a field and how its text is read); from Python, construct it directly.
"""

from __future__ import annotations

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
    """What every analysis measures on: the attacked model, its meta.json and rebuilt setup (dataset,
    attack, poisoned test set), the defender's clean set (``clean_ratio`` of the training set, drawn
    with :meth:`tsbd.pipeline.AttackSetup.clean_set`), TSBD's config and the runtime."""

    model: Any
    setup: Any
    clean: Any
    cfg: Any
    runtime: Any
    meta: dict
    seed: int = 0
    progress: bool = False
    clean_ratio: float = 0.05  # the fraction ``clean`` was drawn with (paper Sec. 3.1)
    cache_dir: str | None = None

    def evaluate(self, model) -> dict:
        """ACC / ASR / RA of ``model`` on the full clean and poisoned test sets."""
        return evaluate(model, self.setup.dataset.test, self.setup.poisoned_test, self.runtime)

    def clean_reference_model(self) -> tuple[Any, dict]:
        """(model, meta): a clean model of the attacked model's architecture and training recipe on
        the same dataset (trained once, cached; :func:`tsbd.reference.clean_reference_model`)."""
        arch = self.meta.get("arch", {})
        train_cfg = TrainConfig(**self.meta["train"]) if self.meta.get("train") else None
        return clean_reference_model(self.setup.dataset, arch["name"], self.runtime, seed=self.setup.seed,
                                     cfg=train_cfg, arch_kwargs=spec_options(arch), cache_dir=self.cache_dir,
                                     progress=self.progress)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What an analysis measured: ``result``, the numbers recorded in result.json, and ``records``,
    the per-item rows and arrays its CSV files and figures are drawn from."""

    result: dict
    records: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of an analysis that has none of its own."""


@dataclasses.dataclass(frozen=True)
class Analysis:
    name: str
    help: str  # one line, listed by ``tsbd analyze --help``
    options: type  # the frozen dataclass of its options
    measure: Callable[[AnalysisContext, Any], Measurement]
    render: Callable[[AnalysisContext, Any, Measurement, Path], str]

    def run(self, ctx: AnalysisContext, options: Any, out: Path) -> tuple[dict, str]:
        """Measure, then render into ``out``: (result, markdown)."""
        measured = self.measure(ctx, options)
        return measured.result, self.render(ctx, options, measured, Path(out))


ANALYSES: dict[str, Analysis] = {}


def register(name: str, help: str, options: type, measure: Callable, render: Callable) -> Analysis:
    """Register an analysis as ``tsbd analyze NAME`` (see the module docstring)."""
    ANALYSES[name] = Analysis(name, help, options, measure, render)
    return ANALYSES[name]


def cli_option(default: Any, help: str, source: str = "tsbd", *, flag: str | None = None, dest: str | None = None,
               parse: Callable[[Any], Any] | None = None, **argparse_kw: Any) -> Any:
    """A field of an analysis's options that ``tsbd analyze`` sets from ``flag`` (default
    ``--FIELD-NAME``): argparse reads it (with ``argparse_kw``) into ``dest`` (default the field's
    name), ``parse`` turns that into the field's value (default: as read); a flag not given leaves
    ``default``. ``help`` and ``source`` as in :func:`tsbd.config.option`."""
    cli = {"flag": flag, "dest": dest, "parse": parse, "argparse": argparse_kw}
    return dataclasses.field(default=default, metadata={"help": help, "source": source, "cli": cli})


def values_option(default: str, help: str, source: str = "tsbd") -> Any:
    """The ``--values`` field: comma-separated numbers (``default`` in that form), held as a tuple."""
    return cli_option(tuple(parse_values(default)), help, source, parse=lambda text: tuple(parse_values(text)))


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
