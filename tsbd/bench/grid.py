"""Benchmark grids: a TOML file or a built-in preset, expanded into content-addressed cells.

A grid names axes -- ``dataset``, ``model``, ``preset``, ``attack``, ``defense``,
``poison_ratio``, ``clean_ratio``, ``seed``, ``limit_train``, ``limit_test`` -- each a value or a
list of values, and option tables whose list values are axes too::

    name = "tsbd-sweep"
    dataset = "cifar10"
    model = "airbench"
    preset = "cpu"                       # attack-training preset (tsbd.pipeline.TRAIN_PRESETS)
    attack = ["badnets", "blended"]
    defense = ["none", "tsbd"]           # "none" is the attacked model itself (No Defense)
    poison_ratio = 0.1
    clean_ratio = 0.05
    seed = [0, 1]
    limit_train = 0                      # 0 = whole split; N = a class-balanced N-image subset

    [train]                              # TrainConfig overrides for attack training
    epochs = 20
    [model_opts.airbench]                # architecture options
    widths = [16, 32, 32]                # a sequence-typed field: a flat list is ONE value
    [attack_opts.blended]
    blend_ratio = 0.2
    [defense_opts.tsbd]
    neuron_ratio = [0.1, 0.15]           # two defense cells per attacked model
    [defense_opts.rnp]
    clean_ratio = 0.005                  # per-defense clean ratio (the paper's RNP setting)

A list is an axis, except for a sequence-typed field (``widths``), where a list of lists is.
Unknown methods, models, datasets, presets and option names are rejected when the grid is
loaded, in one line.

A string option that starts with ``{data_root}`` names a file under the data root (``--data-root``
or ``$TSBD_DATA_ROOT``), e.g. ``trigger_file = "{data_root}/backdoorbench-triggers/x.npy"``: the cell
keeps the placeholder (so its id is the same on every machine) and the file's sha256 (so a changed
file is a new cell); the worker resolves it against its own data root and checks the hash.

Each attack cell is identified by the hash of everything that determines the attacked model
(resolved attack config, dataset fingerprint, model and resolved architecture options, resolved
training config, seed, tsbd and torch major.minor versions); each defense cell by the hash of
its attack cell's id, the defense name and resolved config, the clean ratio and the seed. Equal
cells from different grids are computed once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from tsbd import __version__
from tsbd.attacks import ATTACKS, build_attack
from tsbd.attacks.resources import BACKDOORBENCH_TRIGGERS, file_sha256
from tsbd.config import options_given_by, override, parse_key_values, to_dict
from tsbd.data import DATASETS, load_dataset, resolve_data_root
from tsbd.defenses import DEFENSES, build_defense
from tsbd.errors import TsbdError
from tsbd.models import MODELS, check_model_options
from tsbd.train.engine import TrainConfig
from tsbd.train.presets import TRAIN_PRESETS, train_config

NO_DEFENSE = "none"
AXES = ("dataset", "model", "preset", "attack", "defense", "poison_ratio", "clean_ratio", "seed",
        "limit_train", "limit_test")
TABLES = ("train", "model_opts", "attack_opts", "defense_opts", "dataset_opts")
SETTINGS = ("name", "description", "save_defended_models")
DEFAULTS: dict[str, Any] = {
    "dataset": "demo", "model": "airbench", "preset": "cpu", "attack": "badnets", "defense": [NO_DEFENSE, "tsbd"],
    "poison_ratio": 0.1,  # paper Sec. 4.1
    "clean_ratio": 0.05,  # paper Sec. 3.1 / App. C
    "seed": 0, "limit_train": 0, "limit_test": 0,
}

DATA_ROOT = "{data_root}"  # placeholder for the data root in grid options that name files
PAPER_ATTACKS = ["badnets", "blended", "inputaware", "lf", "sig", "ssba", "trojan", "wanet"]  # paper Sec. 4.1
PAPER_DEFENSES = [NO_DEFENSE, "tsbd", "ft", "fp", "nad", "nc", "anp", "clp", "ibau", "rnp"]  # paper App. C
_PAPER = {"attack": PAPER_ATTACKS, "defense": PAPER_DEFENSES, "poison_ratio": 0.1, "clean_ratio": 0.05, "seed": 0,
          # paper App. C: "for RNP ... the clean data ratio is set to 0.5%"
          "defense_opts": {"rnp": {"clean_ratio": 0.005}}}


def backdoorbench_triggers(dataset: str = "cifar10", model: str = "preactresnet18") -> dict[str, dict[str, str]]:
    """attack_opts pointing each attack that has a BackdoorBench trigger file at its copy under
    ``{data_root}/backdoorbench-triggers/`` (LF's file is made per dataset and model)."""
    return {attack: {option: f"{DATA_ROOT}/backdoorbench-triggers/{name.format(dataset=dataset, model=model)}"}
            for attack, (option, name) in BACKDOORBENCH_TRIGGERS.items()}


def _merge_opts(*tables: dict[str, dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for table in tables:
        for method, opts in table.items():
            out[method] = {**out.get(method, {}), **opts}
    return out


PRESETS: dict[str, dict[str, Any]] = {
    "paper-cifar10-cpu": {**_PAPER, "description": "Table 1 at CPU scale: CIFAR-10, airbench, cpu training preset",
                          "dataset": "cifar10", "model": "airbench", "preset": "cpu",
                          # airbench scales its logits by 1/8, which scales every gradient by 1/8: the
                          # paper's unlearning lr 1e-4 x 8 (with 1e-4 unlearning does not reach 10% clean
                          # accuracy in hundreds of epochs; 0.01 does in 3 but ranks neurons worse, BENCHMARKS.md)
                          "defense_opts": {**_PAPER["defense_opts"], "tsbd": {"unlearn_lr": 8e-4}},
                          # Input-aware at BackdoorBench's size (width 1, 25 + 75 epochs) takes hours on 2 cores:
                          # half-width generator/mask and the victim's 30 epochs (benchmarks/attacks_dynamic.py)
                          "attack_opts": _merge_opts(backdoorbench_triggers(),
                                                     {"inputaware": {"width": 0.5, "joint_epochs": 30}})},
    # the paper's architecture at CPU scale: PreAct-ResNet18 with BackdoorBench's layout and names at a
    # quarter of its width (ordinary logits, so the paper's learning rates apply unchanged),
    # BackdoorBench's trigger files, the paper's defense settings (docs/fidelity.md)
    "paper-cifar10-r18-cpu": {**_PAPER, "description": "Table 1 at CPU scale on the paper's architecture: "
                                                       "CIFAR-10, PreAct-ResNet18 width 16, cpu preset 40 epochs",
                              "dataset": "cifar10", "model": "preact_resnet18", "preset": "cpu",
                              "model_opts": {"preact_resnet18": {"width": 16}}, "train": {"epochs": 40},
                              "attack_opts": _merge_opts(backdoorbench_triggers(),
                                                         {"inputaware": {"width": 0.5, "joint_epochs": 40}})},
    "paper-cifar10": {**_PAPER, "description": "Table 1: CIFAR-10, PreAct-ResNet18, BackdoorBench training",
                      "dataset": "cifar10", "model": "preact_resnet18", "preset": "backdoorbench"},
    "paper-tiny-imagenet": {**_PAPER, "description": "Table 2: Tiny ImageNet, PreAct-ResNet18, BackdoorBench training",
                            "dataset": "tiny-imagenet", "model": "preact_resnet18", "preset": "backdoorbench"},
    "paper-gtsrb": {**_PAPER, "description": "Table 5: GTSRB, PreAct-ResNet18, BackdoorBench training",
                    "dataset": "gtsrb", "model": "preact_resnet18", "preset": "backdoorbench"},
    "paper-vgg": {**_PAPER, "description": "Table 6: CIFAR-10, VGG19-BN, BackdoorBench training",
                  "dataset": "cifar10", "model": "vgg19_bn", "preset": "backdoorbench"},
}


# ------------------------------------------------------------------------------------------
# cells
@dataclasses.dataclass(frozen=True)
class Cell:
    """One unit of work: train an attacked model (``kind='attack'``) or defend one."""

    kind: str  # "attack" | "defense"
    id: str
    config: dict  # exactly what :func:`cell_id` hashes
    parent: str | None = None  # a defense cell's attack cell

    def label(self) -> str:
        if self.kind == "attack":
            c = self.config
            return f"{c['attack']['name']} {c['model']['name']} {c['dataset']['name']} seed {c['seed']}"
        return f"{self.config['defense']['name']} clean {self.config['clean_ratio']:g}"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def cell_id(config: dict) -> str:
    """sha256 (first 16 hex) of the canonical JSON of a cell's config."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def relevant_versions() -> dict[str, str]:
    """Versions that change results: tsbd and torch, major.minor."""
    return {"tsbd": major_minor(__version__), "torch": major_minor(torch.__version__)}


def attack_cell(*, dataset: dict, model: dict, attack: dict, train: dict, seed: int,
                versions: dict | None = None, files: dict | None = None) -> Cell:
    """``files``: {option: sha256} of the options that name files under the data root (omitted
    when there are none, so the ids of grids without such files do not change)."""
    config = {"kind": "attack", "dataset": dataset, "model": model, "attack": attack, "train": train,
              "seed": int(seed), "versions": versions or relevant_versions()}
    if files:
        config["files"] = dict(files)
    return Cell("attack", cell_id(config), config)


def load_bench_dataset(ds_spec: dict, *, data_root: str | None = None, cache_dir: str | None = None):
    """The dataset of a cell's ``dataset`` spec: loaded, then cut to ``limit_train``/``limit_test``."""
    ds = load_dataset(ds_spec["name"], root=data_root, cache_dir=cache_dir, **ds_spec.get("options", {}))
    return ds.limited(int(ds_spec.get("limit_train", 0)), int(ds_spec.get("limit_test", 0)))


def resolve_data_path(value: str, data_root: str | None, where: str) -> Path:
    """The file a ``{data_root}/...`` option names, on this machine; a one-line error if it is not there."""
    root = resolve_data_root(data_root)
    if root is None:
        raise TsbdError(f"{where} = {value!r} names a file under the data root; pass --data-root DIR "
                        f"(or set TSBD_DATA_ROOT)")
    path = root / value[len(DATA_ROOT):].lstrip("/")
    if not path.is_file():
        raise TsbdError(f"{where}: {path} not found; put the file there or point --data-root at the folder "
                        f"that holds it")
    return path


def data_files(options: dict, data_root: str | None, where: str) -> dict[str, str]:
    """{option: sha256} of the ``{data_root}/...`` options in ``options``."""
    return {k: file_sha256(resolve_data_path(v, data_root, f"{where}.{k}")) for k, v in sorted(options.items())
            if isinstance(v, str) and v.startswith(DATA_ROOT)}


def resolve_data_options(options: dict, data_root: str | None, files: dict | None, where: str) -> dict:
    """``options`` with each ``{data_root}/...`` value replaced by the file's path here, after
    checking that its content is the one the cell was planned with."""
    out = dict(options)
    for k, v in options.items():
        if isinstance(v, str) and v.startswith(DATA_ROOT):
            path = resolve_data_path(v, data_root, f"{where}.{k}")
            want = (files or {}).get(k)
            if want and file_sha256(path) != want:
                raise TsbdError(f"{where}.{k}: {path} is not the file this grid was planned with (sha256 differs); "
                                f"restore it, or rerun `tsbd bench` to plan against the current file")
            out[k] = str(path)
    return out


def defense_cell(parent: Cell, *, defense: dict, clean_ratio: float, seed: int) -> Cell:
    config = {"kind": "defense", "parent": parent.id, "defense": defense, "clean_ratio": float(clean_ratio),
              "seed": int(seed)}
    return Cell("defense", cell_id(config), config, parent.id)


@dataclasses.dataclass
class Plan:
    """An expanded grid: its cells, each attack cell followed by its defense cells."""

    name: str
    spec: dict  # the grid spec as loaded (before expansion)
    cells: list[Cell]

    def __post_init__(self):
        self.by_id = {c.id: c for c in self.cells}

    @property
    def attack_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.kind == "attack"]

    def defenses_of(self, attack_id: str) -> list[Cell]:
        return [c for c in self.cells if c.parent == attack_id]

    def describe(self) -> str:
        n_att = len(self.attack_cells)
        return (f"grid {self.name}: {len(self.cells)} cells "
                f"({n_att} attacked models, {len(self.cells) - n_att} defenses)")


# ------------------------------------------------------------------------------------------
# loading
def load_spec(grid: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec of a preset name or TOML file, with ``overrides`` (dotted keys) applied."""
    text = str(grid)
    if text in PRESETS:
        spec = json.loads(json.dumps(PRESETS[text]))  # a deep copy
        spec["name"] = text
    else:
        path = Path(text)
        if not path.is_file():
            raise TsbdError(f"grid {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing TOML file")
        try:
            spec = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise TsbdError(f"grid file {path} is not valid TOML: {err}") from None
        except UnicodeDecodeError:
            raise TsbdError(f"grid file {path} is not a UTF-8 text file; pass a TOML grid") from None
        spec.setdefault("name", path.stem)
    for key, value in (overrides or {}).items():
        node = spec
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TsbdError(f"--set {key}: {part!r} is not a table in the grid")
        node[parts[-1]] = value
    unknown = sorted(set(spec) - set(AXES) - set(TABLES) - set(SETTINGS))
    if unknown:
        raise TsbdError(f"grid {spec['name']} has unknown key(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(AXES + TABLES + SETTINGS)}")
    for table in TABLES:
        if not isinstance(spec.get(table, {}), dict):
            raise TsbdError(f"grid key {table!r} must be a table, e.g. [{table}]")
    return spec


def parse_set(pairs: Iterable[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (VALUE in TOML syntax, else a plain string) as a dict; dotted keys
    (``train.epochs``) are kept as they are (:func:`tsbd.config.parse_key_values`)."""
    return parse_key_values(pairs, "--set", dash_to_underscore=False, example="train.epochs=5")


def _axis(spec: dict, key: str) -> list:
    value = spec.get(key, DEFAULTS[key])
    values = value if isinstance(value, list) else [value]
    if not values:
        raise TsbdError(f"grid axis {key!r} is an empty list; give at least one value")
    return values


def _is_sequence_type(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_sequence_type(a) for a in typing.get_args(tp) if a is not type(None))
    return origin in (tuple, list, Sequence) or tp in (tuple, list)


def _expand(options: dict[str, Any], sequence_fields: set[str], where: str) -> list[dict[str, Any]]:
    """The cartesian product of the list-valued (axis) options."""
    keys, choices = [], []
    for key, value in options.items():
        if isinstance(value, dict):
            raise TsbdError(f"{where}: option {key!r} is a table; give a value or a list of values")
        axis = isinstance(value, list) and (key not in sequence_fields or (value and isinstance(value[0], list)))
        if axis and not value:
            raise TsbdError(f"{where}: option {key!r} is an empty list")
        keys.append(key)
        choices.append(value if axis else [value])
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def _config_sequence_fields(config_class: type) -> set[str]:
    hints = typing.get_type_hints(config_class)
    return {f.name for f in dataclasses.fields(config_class) if _is_sequence_type(hints.get(f.name))}


def _factory_options(factory) -> tuple[dict[str, Any], set[str]]:
    """(defaults, sequence-typed names) of a model factory's or dataset loader's own options."""
    skip = {"num_classes", "mean", "std", "root", "cache_dir"}
    params = {k: p for k, p in inspect.signature(factory).parameters.items()
              if k not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # an annotation that does not resolve: fall back to the defaults' types
        hints = {}
    defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
    seq = {k for k in params if _is_sequence_type(hints.get(k)) or isinstance(defaults.get(k), (tuple, list))}
    return defaults, seq


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def _split_opts(table: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict]]:
    """(options for every method, options per method) of an ``attack_opts``/``defense_opts`` table."""
    common = {k: v for k, v in table.items() if not isinstance(v, dict)}
    per = {k: v for k, v in table.items() if isinstance(v, dict)}
    return common, per


def check_names(spec: dict) -> None:
    """Raise one TsbdError naming every unknown attack, defense, dataset, model or preset."""
    problems = []
    checks = [("attack", ATTACKS.names(), []), ("defense", DEFENSES.names(), [NO_DEFENSE]),
              ("dataset", DATASETS.names(), []), ("model", MODELS.names(), []), ("preset", list(TRAIN_PRESETS), [])]
    for axis, registered, extra in checks:
        names = [str(v) for v in _axis(spec, axis)]
        unknown = [n for n in names if n.lower() not in registered and n.lower() not in extra]
        if unknown:
            problems.append(f"unknown {axis}{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                            f"(registered: {', '.join(registered + extra)})")
    for table, registry, axis in (("attack_opts", ATTACKS, "attack"), ("defense_opts", DEFENSES, "defense"),
                                  ("model_opts", MODELS, "model"), ("dataset_opts", DATASETS, "dataset")):
        _, per = _split_opts(spec.get(table, {}))
        unknown = [n for n in per if n.lower() not in registry.names() and n.lower() != NO_DEFENSE]
        if unknown:
            problems.append(f"[{table}] names unknown {axis}{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    if problems:
        raise TsbdError(f"grid {spec.get('name', '?')}: " + "; ".join(problems))


def expand(spec: dict, *, data_root: str | None = None, cache_dir: str | None = None, seeds: list[int] | None = None,
           dataset_loader=None) -> Plan:
    """Resolve every config of ``spec`` and expand it into cells (attack cells each followed by
    their defense cells). Datasets are loaded once here, for their fingerprints."""
    check_names(spec)
    name = str(spec.get("name", "grid"))
    loader = dataset_loader or load_bench_dataset
    versions = relevant_versions()
    seeds = seeds if seeds is not None else [int(s) for s in _axis(spec, "seed")]
    attack_common, attack_per = _split_opts(spec.get("attack_opts", {}))
    defense_common, defense_per = _split_opts(spec.get("defense_opts", {}))
    train_seq = _config_sequence_fields(TrainConfig)
    train_variants = _expand(spec.get("train", {}), train_seq, "[train]")
    # one attack's own training overrides ([attack_opts.NAME.train]), applied on top of [train]
    attack_train: dict[str, list[dict]] = {}
    for att, own in list(attack_per.items()):
        own = dict(own)
        own_train = own.pop("train", {})
        if not isinstance(own_train, dict):
            raise TsbdError(f"[attack_opts.{att}]: 'train' must be a table of training options, "
                            f"e.g. [attack_opts.{att}.train] epochs = 60")
        attack_per[att] = own
        attack_train[att] = _expand(own_train, train_seq, f"[attack_opts.{att}.train]")
    defenses = [str(d).lower() for d in _axis(spec, "defense")]
    clean_ratios = [float(c) for c in _axis(spec, "clean_ratio")]
    for c in clean_ratios:
        if not 0 < c <= 1:
            raise TsbdError(f"clean_ratio must be in (0, 1], got {c}")

    # defense variants (name, resolved config, clean ratios), resolved once for every attacked model
    defense_variants: list[tuple[str, dict, list[float]]] = []
    for d in defenses:
        if d == NO_DEFENSE:
            continue
        opts = {**defense_common, **defense_per.get(d, {})}
        own_clean = opts.pop("clean_ratio", None)
        if own_clean is None:
            ratios = clean_ratios
        else:
            ratios = [float(c) for c in (own_clean if isinstance(own_clean, list) else [own_clean])]
        cls = DEFENSES.get(d)
        for variant in _expand(opts, _config_sequence_fields(cls.config_class), f"[defense_opts.{d}]"):
            with options_given_by((f"grid {name} [defense_opts.{d}]", variant)):
                config = to_dict(build_defense(d, variant).config)
            defense_variants.append((d, config, ratios))

    cells: list[Cell] = []
    seen: set[str] = set()
    datasets: dict[tuple, dict] = {}
    data_axes = itertools.product(_axis(spec, "dataset"), _axis(spec, "limit_train"), _axis(spec, "limit_test"))
    for ds_name, lt, lte in data_axes:
        ds_name = str(ds_name).lower()
        ds_factory = DATASETS.get(ds_name)
        ds_defaults, ds_seq = _factory_options(ds_factory)
        ds_opts_raw = spec.get("dataset_opts", {}).get(ds_name, {})
        for ds_opts in _expand(ds_opts_raw, ds_seq, f"[dataset_opts.{ds_name}]"):
            unknown = sorted(set(ds_opts) - set(ds_defaults) - set(inspect.signature(ds_factory).parameters))
            if unknown:
                raise TsbdError(f"dataset {ds_name!r} has no option {unknown[0]!r}; valid: "
                                f"{', '.join(ds_defaults) or 'none'}")
            ds_spec = {"name": ds_name, "options": _jsonable(ds_opts), "limit_train": int(lt), "limit_test": int(lte)}
            key = canonical_json(ds_spec)
            if key not in datasets:
                ds = loader(ds_spec, data_root=data_root, cache_dir=cache_dir)
                datasets[key] = {**ds_spec, "fingerprint": ds.fingerprint, "_num_classes": ds.num_classes}
                if not ds.train.hflip:  # trained without flips since BackdoorBench's per-dataset transforms:
                    datasets[key]["hflip"] = False  # a new cell (flipped data sets keep their ids)
            ds_cfg = {k: v for k, v in datasets[key].items() if not k.startswith("_")}
            for model_name, preset in itertools.product(_axis(spec, "model"), _axis(spec, "preset")):
                model_name = str(model_name).lower()
                m_defaults, m_seq = _factory_options(MODELS.get(model_name))
                for m_opts in _expand(spec.get("model_opts", {}).get(model_name, {}), m_seq,
                                      f"[model_opts.{model_name}]"):
                    unknown = sorted(set(m_opts) - set(m_defaults))
                    if unknown:
                        raise TsbdError(f"model {model_name!r} has no option {unknown[0]!r}; its options are: "
                                        f"{', '.join(m_defaults) or 'none'}")
                    check_model_options(model_name, m_opts)
                    model_cfg = {"name": model_name, "options": _jsonable({**m_defaults, **m_opts})}
                    for t_opts, att, ratio in itertools.product(train_variants, _axis(spec, "attack"),
                                                                _axis(spec, "poison_ratio")):
                        att = str(att).lower()
                        opts = {"poison_ratio": ratio, **attack_common, **attack_per.get(att, {})}
                        cls = ATTACKS.get(att)
                        for tv, a_opts in itertools.product(
                                attack_train.get(att, [{}]),
                                _expand(opts, _config_sequence_fields(cls.config_class), f"[attack_opts.{att}]")):
                            with options_given_by((f"grid {name} [train]", t_opts),
                                                  (f"grid {name} [attack_opts.{att}.train]", tv)):
                                train_cfg = to_dict(train_config(str(preset), {**t_opts, **tv}))
                            given = {**attack_common, **attack_per.get(att, {})}  # else the poison_ratio axis
                            with options_given_by((f"grid {name}", {"poison_ratio": ratio}),
                                                  (f"grid {name} [attack_opts.{att}]", given)):
                                attack = build_attack(att, a_opts)
                            if not 0 <= attack.config.target < datasets[key]["_num_classes"]:
                                raise TsbdError(f"attack target {attack.config.target} is outside the "
                                                f"{datasets[key]['_num_classes']} classes of {ds_name}")
                            files = data_files(a_opts, data_root, f"[attack_opts.{att}]")
                            for seed in seeds:
                                a = attack_cell(dataset=ds_cfg, model=model_cfg, attack=attack.describe(),
                                                train=train_cfg, seed=seed, versions=versions, files=files)
                                if a.id in seen:
                                    continue
                                seen.add(a.id)
                                cells.append(a)
                                for d, d_cfg, ratios in defense_variants:
                                    for clean_ratio in ratios:
                                        dc = defense_cell(a, defense={"name": d, "config": d_cfg},
                                                          clean_ratio=clean_ratio, seed=seed)
                                        if dc.id not in seen:
                                            seen.add(dc.id)
                                            cells.append(dc)
    # the training config must round-trip (it is rebuilt from JSON in the worker)
    for c in cells:
        if c.kind == "attack":
            override(TrainConfig(), c.config["train"])
    for c in cells:
        for v in (c.config.get("clean_ratio"), c.config.get("attack", {}).get("config", {}).get("poison_ratio")):
            if isinstance(v, float) and not math.isfinite(v):
                raise TsbdError(f"grid {name}: non-finite ratio {v}")
    return Plan(name, spec, cells)


def load_grid(grid: str | Path, *, overrides: dict[str, Any] | None = None, data_root: str | None = None,
              cache_dir: str | None = None, seeds: list[int] | None = None, dataset_loader=None) -> Plan:
    """Load a preset or TOML grid and expand it (see the module docstring)."""
    return expand(load_spec(grid, overrides), data_root=data_root, cache_dir=cache_dir, seeds=seeds,
                  dataset_loader=dataset_loader)
