"""Typed, frozen configs with documented defaults.

Every method's config is a frozen dataclass whose fields are declared with :func:`option`,
which records a one-line help text and where the default comes from (paper, BackdoorBench,
the authors' code, or ours). The CLI turns these into flags, ``--help`` prints them, and
:func:`to_dict` stores the resolved config with every result.

Options given on a command line are ``KEY=VALUE`` pairs, read by :func:`parse_key_values` (the
one syntax of every ``--opt``-like flag, ``tsbd bench --set`` and the benchmark scripts): VALUE
in TOML syntax (``5``, ``1e-4``, ``true``, ``[16,32,64]``, ``"quoted"``), else the plain string
(``runs/trigger.png``, ``per-tensor``). :func:`override` accepts such typed values as well as strings.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from tsbd.errors import TsbdError

C = TypeVar("C")


def option(default: Any, help: str, source: str = "tsbd") -> Any:
    """A config field with its help text and the source of its default."""
    return dataclasses.field(default=default, metadata={"help": help, "source": source})


def fields_of(cls_or_obj: Any) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls_or_obj))


def _field_type(cls: type, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[name]


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (often a CLI string) to the annotated type ``tp``."""
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
            except TsbdError as err:
                errors.append(str(err))
        raise TsbdError(errors[0] if errors else f"invalid value {value!r} for {name}")
    if origin is typing.Literal:
        if value not in args:
            raise TsbdError(f"invalid value {value!r} for {name}; choose one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        elif not isinstance(value, list | tuple):  # one typed value (e.g. TOML's 16) for a sequence
            value = [value]
        inner = args[0] if args else str
        return tuple(coerce(v, inner, name) for v in value)
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
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise TsbdError(f"invalid value {value!r} for {name}: expected {tp.__name__}") from None
    return value


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
    """Return ``cfg`` with the given fields replaced, type-checked; unknown keys are errors."""
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
        changes[key] = coerce(value, _field_type(type(cfg), key), key)
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def describe(cls_or_obj: Any) -> list[tuple[str, Any, str, str]]:
    """(name, default, help, source) for each field, for help texts and docs."""
    out = []
    for f in dataclasses.fields(cls_or_obj):
        default = getattr(cls_or_obj, f.name) if not isinstance(cls_or_obj, type) else f.default
        out.append((f.name, default, f.metadata.get("help", ""), f.metadata.get("source", "")))
    return out
