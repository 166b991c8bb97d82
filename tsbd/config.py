"""Typed, frozen configs with documented defaults.

Every method's config is a frozen dataclass whose fields are declared with :func:`option`,
which records a one-line help text, where the default comes from (paper, BackdoorBench,
the authors' code, or ours) and the values it admits (a :class:`Range` of numbers, or
:data:`UNCONSTRAINED` for free text; a ``Literal`` or ``bool`` type is its own constraint). The CLI
turns these into flags, ``--help`` prints them, and :func:`to_dict` stores the resolved config with
every result.

The configs derive from :class:`Validated`: constructing one (directly, through
:func:`override` or ``dataclasses.replace``) converts every field to its annotated type and checks it
against its constraint, so the CLI, the Python API and grid files refuse a bad value in one place,
before any work, with an :class:`~tsbd.errors.OptionError` naming the option, the value and what
is valid (``unlearn_lr=-1: must be > 0``).

Options given on a command line are ``KEY=VALUE`` pairs, read by :func:`parse_key_values` (the
one syntax of every ``--opt``-like flag, ``tsbd bench --set`` and the benchmark scripts): VALUE
in TOML syntax (``5``, ``1e-4``, ``true``, ``[16,32,64]``, ``"quoted"``), else the plain string
(``runs/trigger.png``, ``per-tensor``). :func:`override` accepts such typed values as well as strings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from tsbd.errors import OptionError, TsbdError

C = TypeVar("C")


class Check:
    """What values a config field admits; the base class admits every value of the field's type."""

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is refused (``"must be > 0"``), or None when it is admitted."""
        return None

    def __str__(self) -> str:
        return ""


UNCONSTRAINED = Check()  # free text (file paths, architecture and layer names), checked where it is used


@dataclasses.dataclass(frozen=True)
class Range(Check):
    """Finite numbers from ``low`` to ``high`` (either may be None: unbounded), the ends included
    unless ``low_open`` / ``high_open``; for a sequence-typed field, each of its numbers."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "finite"

    def problem(self, value: Any) -> str | None:
        ok = math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if ok:
            return None
        return "must be a finite number" if str(self) == "finite" else f"must be {self}"


# the usual constraints, by what the field is
POSITIVE = Range(0, low_open=True)  # learning rates, scales, step sizes
NON_NEGATIVE = Range(0)  # epoch counts where 0 skips the stage, loss weights, weight decay
AT_LEAST_ONE = Range(1)  # batch sizes, counts that must do something
FRACTION = Range(0, 1)  # ratios, thresholds on accuracies
MOMENTUM = Range(0, 1, high_open=True)  # SGD momentum
FINITE = Range()  # any finite number


def option(default: Any, help: str, source: str = "tsbd", check: Check | None = None) -> Any:
    """A config field with its help text, the source of its default and the values it admits
    (``check``; None for a ``bool`` or ``Literal`` field, whose type says it)."""
    return dataclasses.field(default=default, metadata={"help": help, "source": source, "check": check})


def check_of(cls_or_obj: Any, name: str) -> str:
    """The admitted values of field ``name`` in words (``> 0``, ``in [0, 1]``, ``one of v3, v2, v1``,
    ``true or false``), or "" for free text."""
    field = {f.name: f for f in dataclasses.fields(cls_or_obj)}[name]
    tp = _hints(cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj))[name]
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if tp is bool:
        return "true or false"
    check = field.metadata.get("check")
    text = str(check) if check is not None else ""
    return f"each {text}" if text and typing.get_origin(tp) in (tuple, list) else text


def fields_of(cls_or_obj: Any) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls_or_obj))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (often a CLI string) to the annotated type ``tp``; an :class:`OptionError`
    for ``name`` when it is not one."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))) and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, name)
            except OptionError as err:
                errors.append(err)
        raise errors[0] if errors else OptionError(name, value, "is not a valid value")
    if origin is typing.Literal:
        if value not in args:
            raise OptionError(name, value, "must be one of " + ", ".join(map(str, args)))
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        elif not isinstance(value, list | tuple):  # one typed value (e.g. TOML's 16) for a sequence
            value = [value]
        inner = args[0] if args else str
        try:
            return tuple(coerce(v, inner, name) for v in value)
        except OptionError as err:
            raise OptionError(name, value, f"each value {err.problem}") from None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            low = str(value).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp in (int, float) and isinstance(value, bool):  # TOML's true is no number
            raise ValueError
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if isinstance(value, list | tuple | dict):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise OptionError(name, value, f"must be {_EXPECTED[tp]}") from None
    return value


def validate(cfg: Any) -> None:
    """Convert every field of the dataclass ``cfg`` to its annotated type (in place, also for a frozen
    one) and check it against its declared :class:`Check`; the first bad field raises
    :class:`OptionError`."""
    hints = _hints(type(cfg))
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        typed = coerce(value, hints[field.name], field.name)
        check = field.metadata.get("check")
        if check is not None and typed is not None:
            for item in typed if isinstance(typed, tuple) else (typed,):
                problem = check.problem(item)
                if problem:
                    raise OptionError(field.name, value, f"each value {problem}" if isinstance(typed, tuple)
                                      else problem)
        object.__setattr__(cfg, field.name, typed)


class Validated:
    """Base of the option dataclasses (attacks, defenses, training): every construction runs
    :func:`validate`, so no config holds a value its fields refuse."""

    def __post_init__(self) -> None:
        validate(self)


def parse_value(text: str) -> Any:
    """One ``KEY=VALUE`` value: TOML when ``text`` is one TOML value (a number, boolean, array,
    inline table or quoted string), else ``text`` itself (file paths, names, words)."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    value = doc.get("v")
    if len(doc) != 1 or isinstance(value, datetime.date | datetime.time):  # a second key, or a TOML date
        return text
    return value


def parse_key_values(pairs: Iterable[str] | None, what: str, *, dash_to_underscore: bool = True,
                     example: str | None = None) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> {key: value}, each value read by :func:`parse_value`; the later of two
    equal keys wins. ``what`` names the pairs in the one-line error for a pair without ``=``
    (``"{what} 'x' must look like KEY=VALUE"``, then `` (e.g. EXAMPLE)`` when given); keys are
    stripped and, with ``dash_to_underscore``, spelled with ``_`` for ``-`` (config fields;
    off for dotted grid keys)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise TsbdError(f"{what} {pair!r} must look like KEY=VALUE" + (f" (e.g. {example})" if example else ""))
        key = key.strip()
        out[key.replace("-", "_") if dash_to_underscore else key] = parse_value(raw.strip())
    return out


def override(cfg: C, values: Mapping[str, Any] | None) -> C:
    """Return ``cfg`` with the given fields replaced, converted and checked (:func:`validate`);
    unknown keys are errors."""
    if not values:
        return cfg
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key not in names:
            raise TsbdError(
                f"unknown option {key!r} for {type(cfg).__name__}; valid: {', '.join(sorted(names))}"
            )
        changes[key] = value
    new = dataclasses.replace(cfg, **changes)
    if not isinstance(new, Validated):  # a plain dataclass: converted and checked here
        validate(new)
    return new


@contextlib.contextmanager
def options_given_by(*sources: tuple[str, Mapping[str, Any]]):
    """Within the block, an :class:`OptionError` for a key one of ``sources`` gave -- (where, the
    options given there), later sources winning like later overrides -- is re-raised naming where
    (``--opt unlearn_lr=-1: must be > 0``)."""
    try:
        yield
    except OptionError as err:
        for where, given in reversed(sources):
            if err.key in {str(k).replace("-", "_") for k in given}:
                raise err.given_by(where) from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def describe(cls_or_obj: Any) -> list[tuple[str, Any, str, str, str]]:
    """(name, default, help, source, admitted values) for each field, for help texts and docs; the
    values of an instance stand in for the defaults."""
    out = []
    for f in dataclasses.fields(cls_or_obj):
        default = getattr(cls_or_obj, f.name) if not isinstance(cls_or_obj, type) else f.default
        out.append((f.name, default, f.metadata.get("help", ""), f.metadata.get("source", ""),
                    check_of(cls_or_obj, f.name)))
    return out
