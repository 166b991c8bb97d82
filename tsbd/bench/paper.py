"""The paper's published numbers (``data/paper_tables.json``) and how our cells map onto them.

Each paper table names a dataset, a model and a poison ratio; each of its columns a defense
(``none`` = No Defense), a clean ratio and the defense options that differ from the defaults
(e.g. Table 8's fine-tuning learning rates). Our result matches a paper cell when the attack is
the same with its default options, the poison ratio is the same, and the defense, clean ratio
and every option that differs from the defense's defaults agree with the column. Models the
paper does not use (airbench) are compared with the paper's main model for that dataset.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data" / "paper_tables.json"

ATTACK_NAMES = {"badnets": "BadNets", "blended": "Blended", "inputaware": "Input-aware", "lf": "LF", "sig": "SIG",
                "ssba": "SSBA", "trojan": "Trojan", "wanet": "WaNet"}
DEFENSE_NAMES = {"none": "No Defense", "ft": "FT", "fp": "FP", "nad": "NAD", "nc": "NC", "anp": "ANP", "clp": "CLP",
                 "ibau": "i-BAU", "rnp": "RNP", "tsbd": "TSBD"}
# option settings the report names in words beside the option: {(defense, option, value): name}
VARIANT_NAMES = {("tsbd", "neuron_ratio", 0.0): "stage 2 alone"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "gtsrb": "GTSRB", "tiny-imagenet": "Tiny ImageNet",
                 "demo": "demo (CIFAR-10 subset)"}
MODEL_NAMES = {"preact_resnet18": "PreAct-ResNet18", "vgg19_bn": "VGG19-BN", "airbench": "airbench"}
# our datasets that are the paper's under another name
DATASET_ALIASES = {"demo": "cifar10"}
METRICS = ("acc", "asr", "der")


def attack_order(name: str) -> tuple[int, str]:
    keys = list(ATTACK_NAMES)
    return (keys.index(name), name) if name in keys else (len(keys), name)


def defense_order(name: str) -> tuple[int, str]:
    keys = ["none", "ft", "fp", "nad", "nc", "anp", "clp", "ibau", "rnp", "tsbd"]  # the paper's column order
    return (keys.index(name), name) if name in keys else (len(keys), name)


def display(name: str, names: dict[str, str]) -> str:
    return names.get(name, name)


@functools.lru_cache(maxsize=4)
def load_tables(path: str | None = None) -> dict[str, Any]:
    return json.loads(Path(path or DATA).read_text())


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def backdoorbench_file(attack: str, option: str, value: Any) -> bool:
    """Whether ``option = value`` points ``attack`` at BackdoorBench's own trigger file (the paper's
    resource, e.g. LF's ``cifar10_preactresnet18_0_255.npy``): a cell that uses it is the paper's attack."""
    from tsbd.attacks.resources import BACKDOORBENCH_TRIGGERS

    if attack not in BACKDOORBENCH_TRIGGERS or not isinstance(value, str):
        return False
    name_option, pattern = BACKDOORBENCH_TRIGGERS[attack]
    regex = re.escape(pattern).replace(re.escape("{dataset}"), r"[\w-]+").replace(re.escape("{model}"), r"[\w-]+")
    return option == name_option and re.fullmatch(regex, Path(value).name) is not None


def non_default(config: dict, defaults: dict | None) -> dict:
    """The entries of ``config`` that differ from ``defaults`` (all of them when defaults are unknown)."""
    if defaults is None:
        return dict(config)
    return {k: v for k, v in config.items() if k not in defaults or not _close(v, defaults[k])}


class PaperIndex:
    """Looks up the paper's [ACC, ASR, DER] for one of our (table, row, column)."""

    def __init__(self, path: str | None = None):
        self.doc = load_tables(path)
        self.tables = self.doc["tables"]

    def candidates(self, dataset: str, model: str, poison_ratio: float) -> list[dict]:
        """Paper tables to compare a results table with, best first."""
        ds = DATASET_ALIASES.get(dataset, dataset)
        same = [t for t in self.tables if t["dataset"] == ds and _close(t["poison_ratio"], poison_ratio)]
        exact = [t for t in same if t["model"] == model]
        if exact:
            return exact
        primary = [t for t in same if t.get("primary")]
        main_models = {t["model"] for t in primary}
        return [t for t in same if t["model"] in main_models]

    @staticmethod
    def column_matches(column: dict, defense: str, clean_ratio: float | None, changed: dict, config: dict) -> bool:
        if column["defense"] != defense:
            return False
        if defense == "none":
            return True
        if clean_ratio is None or not _close(column.get("clean_ratio"), clean_ratio):
            return False
        wanted = column.get("defense_config", {})
        if any(k not in wanted for k in changed):
            return False
        return all(k in config and _close(config[k], v) for k, v in wanted.items())

    def lookup(self, tables: list[dict], attack: str, attack_changed: dict, defense: str,
               clean_ratio: float | None, defense_changed: dict, defense_config: dict) -> tuple[list, dict] | None:
        """([ACC, ASR, DER] in %, the table) for one of our cells, or None where the paper has none."""
        attack_changed = {k: v for k, v in attack_changed.items() if not backdoorbench_file(attack, k, v)}
        if attack_changed:  # a non-default attack is not the paper's
            return None
        for table in tables:
            row = table["rows"].get(attack)
            if not row:
                continue
            for column in table["columns"]:
                if column["key"] in row and self.column_matches(column, defense, clean_ratio, defense_changed,
                                                                defense_config):
                    values = row[column["key"]]
                    if any(v is not None for v in values):
                        return values, table
        return None
