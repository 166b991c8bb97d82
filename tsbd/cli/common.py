"""What the command modules of :mod:`tsbd.cli` share: the runtime and data-root options, KEY=VALUE
and TOML config parsing, the options tables of ``--help`` and ``tsbd list``, console and JSON output.

Imported on every ``tsbd`` call, ``--help`` included: the imports of torch-backed modules stay
inside the functions (lazy), so that ``tsbd --help`` and ``tsbd --version`` load no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from tsbd.config import describe, options_given_by, parse_key_values
from tsbd.errors import TsbdError, show_value


class Command(NamedTuple):
    """A subcommand: its name and one-line help (listed by ``tsbd --help``), and the function that
    adds its arguments, epilog and ``func`` to its parser (run only for the command being called)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]


# ------------------------------------------------------------------------------------------
# input
def parse_opts(pairs: Iterable[str] | None, what: str) -> dict[str, Any]:
    """``--opt``-like ``KEY=VALUE`` pairs (VALUE in TOML syntax, else the plain string; ``-`` in KEY
    read as ``_``): :func:`tsbd.config.parse_key_values` with the CLI's error wording."""
    return parse_key_values(pairs, f"{what} option")


def read_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise TsbdError(f"config file {path!r} not found; pass an existing TOML file to --config")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise TsbdError(f"config file {path} is not valid TOML: {err}") from None


Sources = list[tuple[str, dict[str, Any]]]


def given_options(config: str | None, table: str, flag: str, pairs: Iterable[str] | None, what: str) -> Sources:
    """Where a method's options were given, later ones winning: the ``[table]`` of the ``--config``
    file, then ``flag``'s KEY=VALUE pairs; for :func:`tsbd.config.options_given_by`, which names the
    source of a refused value (``--opt unlearn_lr=-1: must be > 0``), and :func:`merged`."""
    table_opts = read_config_file(config).get(table, {})
    if not isinstance(table_opts, dict):
        raise TsbdError(f"config file {config}: {table!r} must be a table, e.g. [{table}]")
    return [(f"--config {config} [{table}]", table_opts), (flag, parse_opts(pairs, what))]


def flag_options(args: argparse.Namespace, *names: str) -> Sources:
    """The sources of options that have flags of their own (``--poison-ratio 0.2``), when given."""
    return [(f"--{name.replace('_', '-')}", {name: getattr(args, name)}) for name in names
            if getattr(args, name) is not None]


def merged(sources: Sources) -> dict[str, Any]:
    """The options of ``sources``, later ones winning."""
    return {key: value for _, given in sources for key, value in given.items()}


def defense_options(name: str, config: str | None, pairs: list[str] | None, below: Sources | None = None):
    """The options of defense ``name`` given by the ``below`` sources (flags of their own), the
    ``--config`` file and ``--opt`` pairs (later winning), and the defense built from them: an unknown
    defense, option or refused value fails here, before any work."""
    from tsbd.defenses import build_defense  # lazy: keeps torch off the --help path

    sources = [*(below or []), *given_options(config, "defense", "--opt", pairs, "defense")]
    with options_given_by(*sources):
        opts = merged(sources)
        return opts, build_defense(name, opts)


def runtime(args):
    from tsbd.train.runtime import Runtime  # lazy: keeps torch off the --help path

    return Runtime.create(args.device, args.precision, args.threads, getattr(args, "compile", None))


# ------------------------------------------------------------------------------------------
# help texts
DEFAULT_PRESET = "cpu"  # the training preset of a plain `tsbd attack`


def summary(obj: Any) -> str:
    """One line on a registered method (its class docstring's first line) or model or data set (the
    first sentence of its module's docstring: a factory's own docstring is about its arguments)."""
    own = obj.__dict__.get("__doc__") if isinstance(obj, type) else None
    if own and own.strip():
        text = inspect.cleandoc(own).splitlines()[0]
    else:
        text = " ".join((inspect.getdoc(inspect.getmodule(obj)) or "").split("\n\n")[0].split())
        cut = text.find(". ")
        text = text if cut < 0 else text[: cut + 1]
    return text.replace("``", "")


def overview(registry, title: str) -> list[str]:
    """``title``, then each registered name with its one-line :func:`summary`."""
    names = registry.names()
    width = max(map(len, names), default=0)
    return [title, *(f"  {name:<{width}}  {summary(registry.get(name))}" for name in names)]


def option_lines(cls_or_obj: Any, defaults_of: Any = None, changed_by: str = "") -> list[str]:
    """One line per config field: ``name = value (admitted values) -- help [source of the default]``.
    With ``defaults_of`` (the config class), a value differing from the class default says it was
    ``changed_by`` (``cpu preset``) and what the default is."""
    lines = []
    defaults = {f.name: f.default for f in dataclasses.fields(defaults_of)} if defaults_of is not None else {}
    for field, value, help_, source, valid in describe(cls_or_obj):
        if field in defaults and defaults[field] != value:
            source = f"{changed_by}; default {show_value(defaults[field])}: {source}"
        lines.append(f"    {field} = {show_value(value)}{f' ({valid})' if valid else ''}  -- {help_} [{source}]")
    return lines or ["    (no options)"]


def method_help(registry, name: str | None, flag: str, option_flag: str) -> list[str]:
    """The options of method ``name`` of ``registry``, or (None, or a name not registered) the methods
    in short, for the epilog of ``--help``."""
    kind = registry.kind
    if name is None or name not in registry:
        return overview(registry, f"{kind}s ({flag} NAME; `{flag} NAME --help` lists that {kind}'s options):")
    cls = registry.get(name)
    return [f"{kind} {name.lower()}: {summary(cls)}", f"  options ({option_flag} KEY=VALUE):",
            *option_lines(cls.config_class)]


def training_help(preset: str | None) -> list[str]:
    """The training options as ``preset`` (default: cpu, what a plain ``tsbd attack`` uses) sets them,
    and the presets."""
    from tsbd.train.engine import TrainConfig  # lazy: keeps torch off the --help path
    from tsbd.train.presets import PRESET_HELP, TRAIN_PRESETS

    preset = preset if preset in TRAIN_PRESETS else DEFAULT_PRESET
    return [f"training options (--train-opt KEY=VALUE), as the {preset} preset sets them:",
            *option_lines(TRAIN_PRESETS[preset], TrainConfig, f"{preset} preset"),
            "training presets (--preset NAME):", *(f"    {k}: {v}" for k, v in PRESET_HELP.items())]


def factory_help(registry, name: str, given_as: str) -> list[str]:
    """A registered model's or data set's one-line summary and its own options (the keyword arguments of
    its factory beyond the shared ones) with their defaults; ``given_as`` says how they are set."""
    shared = ("num_classes", "mean", "std", "root", "cache_dir")
    defaults = {k: p.default for k, p in inspect.signature(registry.get(name)).parameters.items()
                if k not in shared and p.default is not p.empty}
    return [f"{registry.kind} {name}: {summary(registry.get(name))}",
            f"  options ({given_as}):" if defaults else "  (no options)",
            *(f"    {k} = {show_value(v)}" for k, v in defaults.items())]


class HelpSections:
    """The epilog of a command's ``--help`` in sections, each showing what one option selects: e.g. all
    attacks in short until ``--attack NAME`` is parsed, then that attack's options only, so
    ``tsbd attack --attack wanet --help`` shows WaNet's options. ``sections`` maps an option's dest to
    a function of its value (None until given) that returns the section's lines; an option that
    narrows its section is added with ``action=SelectsHelp, sections=this``."""

    def __init__(self, parser: argparse.ArgumentParser, **sections: Callable[[Any], list[str]]):
        self.parser, self.sections = parser, sections
        self.values: dict[str, Any] = dict.fromkeys(sections)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        self.update()

    def update(self) -> None:
        self.parser.epilog = "\n\n".join("\n".join(build(self.values[dest])) for dest, build in self.sections.items())


class SelectsHelp(argparse.Action):
    """Stores its value, like the default action, and narrows the command's :class:`HelpSections`."""

    def __init__(self, option_strings, dest, sections: HelpSections, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.sections = sections

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        self.sections.values[self.dest] = values
        self.sections.update()


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N] (default: auto)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto = bf16 on CUDA or on CPUs with AVX512-BF16/AMX, else fp32 (default: auto)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores available)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model for plain training; by default a run of 2,000 steps or more "
                        "times both and keeps the faster (the choice is recorded in the model's meta)")
    g.add_argument("--seed", type=int, default=0, help="seed of poisoning, clean split and training (default: 0)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--cache-dir", default=None, help="decoded-data cache (default: $TSBD_CACHE_DIR or ~/.cache/tsbd)")


def add_defense_output_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """--opt, --config, --out, --overwrite and --json, as `tsbd defend` and `tsbd purify` take them."""
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="defense option (repeatable)")
    p.add_argument("--config", default=None, help="TOML file with a [defense] table")
    p.add_argument("--out", default=None, help=out_help)
    add_overwrite_arg(p, "a model folder")
    p.add_argument("--json", action="store_true", help="print metrics as one JSON object")


def add_overwrite_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace {what} that tsbd wrote at --out before (anything else there is never replaced)")


def add_setup_args(p: argparse.ArgumentParser) -> None:
    """--dataset, --attack and --attack-opt of the commands that read a model folder (:func:`setup_from_meta`)."""
    g = p.add_argument_group("data set and attack (default: those the model folder records)")
    g.add_argument("--dataset", default=None,
                   help="registered data set the model is evaluated on (needed when the folder names none)")
    g.add_argument("--attack", default=None,
                   help="attack whose triggered test images measure ASR and RA (a model purified from a file "
                        "records none: then ACC only)")
    g.add_argument("--attack-opt", action="append", metavar="KEY=VALUE", help="attack option (repeatable)")


def setup_from_meta(meta: dict, args, runtime, progress: bool = False):
    """The model's data set and attack, as recorded in ``meta`` or named by :func:`add_setup_args`'s options."""
    from tsbd.pipeline import load_setup_from_meta  # lazy: keeps torch off the --help path

    return load_setup_from_meta(meta, runtime, data_root=args.data_root, cache_dir=args.cache_dir, progress=progress,
                                dataset=args.dataset, attack=args.attack,
                                attack_options=parse_opts(args.attack_opt, "attack"))


def add_data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="folder with the dataset files (default: $TSBD_DATA_ROOT; `demo` needs none)")


# ------------------------------------------------------------------------------------------
# output
def console(args):
    from rich.console import Console

    return Console(stderr=bool(getattr(args, "json", False)))


def emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


def print_metrics_table(rows: list[tuple[str, dict]], console) -> None:
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    for col in ("model", "ACC %", "ASR %", "RA %", "DER %", "time s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, m in rows:
        def pct(key, m=m):
            return f"{100 * m[key]:.2f}" if key in m and m[key] is not None else "-"
        table.add_row(name, pct("acc"), pct("asr"), pct("ra"), pct("der"),
                      f"{m['time']:.1f}" if m.get("time") is not None else "-")
    console.print(table)
