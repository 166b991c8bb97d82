"""What the command modules of :mod:`tsbd.cli` share: the runtime and data-root options, KEY=VALUE
and TOML config parsing, the options tables of ``--help`` and ``tsbd list``, console and JSON output.

Imported on every ``tsbd`` call, ``--help`` included: the imports of torch-backed modules stay
inside the functions (lazy), so that ``tsbd --help`` and ``tsbd --version`` load no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

from tsbd.config import describe, parse_key_values
from tsbd.errors import TsbdError


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


def runtime(args):
    from tsbd.train.runtime import Runtime  # lazy: keeps torch off the --help path

    return Runtime.create(args.device, args.precision, args.threads, getattr(args, "compile", False))


# ------------------------------------------------------------------------------------------
# help texts
def options_table(registry, title: str) -> str:
    lines = [title]
    for name in registry.names():
        cls = registry.get(name)
        lines.append(f"  {name}:")
        for field, default, help_, source in describe(cls.config_class):
            lines.append(f"    {field} = {default!r}  -- {help_} [{source}]")
    return "\n".join(lines)


def train_options_table() -> str:
    from tsbd.train.engine import TrainConfig  # lazy: keeps torch off the --help path
    from tsbd.train.presets import PRESET_HELP

    lines = ["training options (--train-opt KEY=VALUE; defaults of TrainConfig, presets override):"]
    for field, default, help_, source in describe(TrainConfig):
        lines.append(f"    {field} = {default!r}  -- {help_} [{source}]")
    lines.append("presets (--preset):")
    lines += [f"    {k}: {v}" for k, v in PRESET_HELP.items()]
    return "\n".join(lines)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda[:N] (default: auto)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto = bf16 on CUDA or on CPUs with AVX512-BF16/AMX, else fp32 (default: auto)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores available)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model for plain training (minutes of compiling first; pays on long runs)")
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
