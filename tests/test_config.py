"""The one KEY=VALUE syntax (tsbd.config.parse_key_values) and typed values in tsbd.config.override."""

import dataclasses

import pytest

from tsbd.bench.grid import parse_set
from tsbd.config import option, override, parse_key_values
from tsbd.errors import TsbdError


@dataclasses.dataclass(frozen=True)
class Cfg:
    lr: float = option(0.1, "learning rate")
    epochs: int = option(3, "epochs")
    flag: bool = option(False, "a switch")
    widths: tuple[int, ...] = option((16, 32), "widths")
    path: str = option("", "a file")
    limit: float | None = option(None, "optional")


def test_values_are_toml_else_the_plain_string():
    got = parse_key_values(["widths=[16,32,64]", "unlearn-lr=1e-4", "trigger_image=runs/a b.png", "n = 5 ",
                            "on=true", "name=per-tensor", "quoted=\"1e3\"", "empty=", "day=2024-01-01",
                            "two=1\nthree=3"], "x")
    assert got == {"widths": [16, 32, 64], "unlearn_lr": 1e-4, "trigger_image": "runs/a b.png", "n": 5, "on": True,
                   "name": "per-tensor", "quoted": "1e3", "empty": "", "day": "2024-01-01", "two": "1\nthree=3"}
    assert parse_key_values(None, "x") == {} and parse_key_values(["a=1", "a=2"], "x") == {"a": 2}


def test_a_pair_without_equals_is_a_one_line_error():
    with pytest.raises(TsbdError, match=r"^attack option 'foo' must look like KEY=VALUE$"):
        parse_key_values(["foo"], "attack option")
    with pytest.raises(TsbdError, match=r"^--set 'foo' must look like KEY=VALUE \(e.g. train.epochs=5\)$"):
        parse_set(["foo"])


def test_grid_set_keeps_dotted_and_dashed_keys():
    assert parse_set(["train.epochs=5", "attack_opts.badnets.patch-size=3", 'attack=["badnets"]']) == {
        "train.epochs": 5, "attack_opts.badnets.patch-size": 3, "attack": ["badnets"]}


def test_override_takes_typed_values_and_strings_alike():
    typed = override(Cfg(), parse_key_values(["lr=1e-4", "epochs=5", "flag=true", "widths=[16,32,64]",
                                              "path=runs/t.png", "limit=0.5"], "x"))
    strings = override(Cfg(), {"lr": "1e-4", "epochs": "5", "flag": "true", "widths": "16,32,64",
                               "path": "runs/t.png", "limit": "0.5"})
    assert typed == strings == Cfg(1e-4, 5, True, (16, 32, 64), "runs/t.png", 0.5)
    assert override(Cfg(), {"widths": 16, "epochs": 4.0, "limit": "none"}) == Cfg(widths=(16,), epochs=4)
    with pytest.raises(TsbdError, match=r"^epochs=2.5: must be an integer$"):
        override(Cfg(), {"epochs": 2.5})
    with pytest.raises(TsbdError, match=r"^flag=2: must be true or false$"):
        override(Cfg(), {"flag": 2})
