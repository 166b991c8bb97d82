"""The ``tsbd`` command line: one module per group of subcommands.

- :mod:`tsbd.cli.methods`: ``attack``, ``defend``, ``eval``, ``demo``, ``list``
- :mod:`tsbd.cli.bench`: ``bench``, ``report``, ``merge``
- :mod:`tsbd.cli.analyze`: ``analyze``
- :mod:`tsbd.cli.interop`: ``inspect``, ``purify``
- :mod:`tsbd.cli.show`: ``show-attack``

Method options are ``--opt KEY=VALUE`` (repeatable; VALUE in TOML syntax, else a plain string) or
a TOML file (``--config``); every option's default and the source of that default are listed by
``--help`` and ``tsbd list``. Errors caused by input print one line and exit with status 2.

Every subcommand is registered with its name and one-line help; only the one named on the command
line gets its arguments and epilog (which need the method registries, hence torch), so
``tsbd --help`` and ``tsbd --version`` load no torch. This is the top layer: nothing in the library
imports it (tests/test_layers.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Sequence

from tsbd import __version__
from tsbd.cli import analyze, bench, interop, methods, show
from tsbd.errors import TsbdError

# the subcommands, in the order `tsbd --help` lists them
COMMANDS = [*methods.COMMANDS, *bench.COMMANDS, *analyze.COMMANDS, *interop.COMMANDS, *show.COMMANDS]

__all__ = ["COMMANDS", "build_parser", "main"]


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``tsbd`` parser. Every subcommand is listed; those in ``commands`` (default: all) get
    their arguments, epilogs and handlers."""
    wanted = None if commands is None else set(commands)
    parser = argparse.ArgumentParser(prog="tsbd", description="Backdoor attacks, TSBD and baseline defenses.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        if wanted is None or command.name in wanted:
            command.configure(p)
    return parser


def command_named(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the top-level
    options take no values), or None (``tsbd --help``, ``tsbd --version``)."""
    for i, word in enumerate(argv):
        if word == "--":
            return argv[i + 1] if i + 1 < len(argv) else None
        if not word.startswith("-"):
            return word
    return None


RESUMABLE = ("bench", "attack")  # commands that keep finished work (cells, epoch checkpoints) when stopped


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every command stops the same clean way (a bench hands
    its running cell back, writes are not left half done)."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills at once
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    name = None
    try:
        name = command_named(argv)
        parser = build_parser([name] if name else [])
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return int(args.func(args) or 0)
    except TsbdError as err:
        print(f"tsbd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        how = "terminated" if isinstance(err, Terminated) else "interrupted"
        if name in RESUMABLE:
            print(f"tsbd: {how}; finished work is saved -- rerun the same command to resume", file=sys.stderr)
        else:
            print(f"tsbd: {how}; no output was left half-written -- rerun the command to start again", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except BrokenPipeError:  # the reader went away (`tsbd list | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE
