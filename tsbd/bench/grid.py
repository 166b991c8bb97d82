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
    defense_seed = [0, 1, 2]             # defense cells per attacked model (default: its seed)
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
        "defense_seed", "limit_train", "limit_test")
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
# paper App. C: "for RNP ... the clean data ratio is set to 0.5%"
PAPER_DEFENSE_OPTS: dict[str, dict[str, Any]] = {"rnp": {"clean_ratio": 0.005}}
_PAPER = {"attack": PAPER_ATTACKS, "defense": PAPER_DEFENSES, "poison_ratio": 0.1, "clean_ratio": 0.05, "seed": 0,
          "defense_opts": {name: dict(opts) for name, opts in PAPER_DEFENSE_OPTS.items()}}


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
    # Table 5 at CPU scale: the same proxy on GTSRB (43 classes, no flip). BackdoorBench trains GTSRB for
    # half CIFAR-10's epochs (config/attack/prototype/gtsrb.yaml 50 vs cifar10.yaml 100), so 20 here
    "paper-gtsrb-cpu": {**_PAPER, "description": "Table 5 at CPU scale: GTSRB, PreAct-ResNet18 width 16, "
                                                 "cpu preset 20 epochs",
                        "dataset": "gtsrb", "model": "preact_resnet18", "preset": "cpu",
                        "model_opts": {"preact_resnet18": {"width": 16}}, "train": {"epochs": 20},
                        "attack_opts": _merge_opts(backdoorbench_triggers("gtsrb"),
                                                   {"inputaware": {"width": 0.5, "joint_epochs": 20}})},
    # Table 6 at CPU scale: VGG19-BN with torchvision's layout and names at a quarter width (the same
    # forward cost per image as the PreAct-ResNet18 proxy, BENCHMARKS.md). BackdoorBench's VGG19-BN LF
    # file holds values in [0, 0.2] that, added on the 0-255 scale and truncated, change no pixel; the
    # preset scales it by 255 into the range of its PreAct-ResNet18 files (a labelled deviation)
    "paper-cifar10-vgg-cpu": {**_PAPER, "description": "Table 6 at CPU scale: CIFAR-10, VGG19-BN width 16, "
                                                       "cpu preset 40 epochs, LF file x 255",
                              "dataset": "cifar10", "model": "vgg19_bn", "preset": "cpu",
                              "model_opts": {"vgg19_bn": {"width": 16}}, "train": {"epochs": 40},
                              "attack_opts": _merge_opts(backdoorbench_triggers("cifar10", "vgg19_bn"),
                                                         {"lf": {"trigger_scale": 255.0},
                                                          "inputaware": {"width": 0.5, "joint_epochs": 40}})},
    # the paper's scale: BackdoorBench's training and, as in the CPU presets, its trigger files
    "paper-cifar10": {**_PAPER, "description": "Table 1: CIFAR-10, PreAct-ResNet18, BackdoorBench training",
                      "dataset": "cifar10", "model": "preact_resnet18", "preset": "backdoorbench",
                      "attack_opts": backdoorbench_triggers()},
    "paper-tiny-imagenet": {**_PAPER, "description": "Table 2: Tiny ImageNet, PreAct-ResNet18, BackdoorBench training",
                            "dataset": "tiny-imagenet", "model": "preact_resnet18", "preset": "backdoorbench"},
    "paper-gtsrb": {**_PAPER, "description": "Table 5: GTSRB, PreAct-ResNet18, BackdoorBench training",
                    "dataset": "gtsrb", "model": "preact_resnet18", "preset": "backdoorbench",
                    "attack_opts": backdoorbench_triggers("gtsrb")},
    "paper-vgg": {**_PAPER, "description": "Table 6: CIFAR-10, VGG19-BN, BackdoorBench training, LF file x 255",
                  "dataset": "cifar10", "model": "vgg19_bn", "preset": "backdoorbench",
                  "attack_opts": _merge_opts(backdoorbench_triggers("cifar10", "vgg19_bn"),
                                             {"lf": {"trigger_scale": 255.0}})},
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


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _axis(spec: dict, key: str) -> list:
    values = _as_list(spec[key] if key in spec else DEFAULTS[key])
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


# ------------------------------------------------------------------------------------------
# expansion: a resolver per axis group, then one product of their variants
@dataclasses.dataclass(frozen=True)
class _Data:
    config: dict  # an attack cell's ``dataset``: name, options, limits, fingerprint (and hflip when False)
    num_classes: int  # for the attacks' targets


@dataclasses.dataclass(frozen=True)
class _Architecture:
    model: dict  # an attack cell's ``model``: name and resolved options
    preset: str  # the attack-training preset (tsbd.train.presets.TRAIN_PRESETS)


@dataclasses.dataclass(frozen=True)
class _Attack:
    config: dict  # an attack cell's ``attack``: name and resolved config
    target: int
    train: dict  # the attack's own training overrides ([attack_opts.NAME.train]), applied on top of [train]
    files: dict  # {option: sha256} of the options that name files under the data root


@dataclasses.dataclass(frozen=True)
class _Defense:
    name: str
    config: dict  # resolved defense config
    clean_ratio: float


def _datasets(spec: dict, loader, data_root: str | None, cache_dir: str | None) -> list[_Data]:
    """Each dataset x limit_train x limit_test x [dataset_opts.NAME] variant, in that order; each distinct
    one loaded once, for its fingerprint and class count."""
    loaded: dict[str, _Data] = {}
    out = []
    for name, limit_train, limit_test in itertools.product(_axis(spec, "dataset"), _axis(spec, "limit_train"),
                                                           _axis(spec, "limit_test")):
        name = str(name).lower()
        factory = DATASETS.get(name)
        defaults, seq = _factory_options(factory)
        for opts in _expand(spec.get("dataset_opts", {}).get(name, {}), seq, f"[dataset_opts.{name}]"):
            unknown = sorted(set(opts) - set(defaults) - set(inspect.signature(factory).parameters))
            if unknown:
                raise TsbdError(f"dataset {name!r} has no option {unknown[0]!r}; valid: "
                                f"{', '.join(defaults) or 'none'}")
            ds_spec = {"name": name, "options": _jsonable(opts), "limit_train": int(limit_train),
                       "limit_test": int(limit_test)}
            key = canonical_json(ds_spec)
            if key not in loaded:
                ds = loader(ds_spec, data_root=data_root, cache_dir=cache_dir)
                config = {**ds_spec, "fingerprint": ds.fingerprint}
                if not ds.train.hflip:  # trained without flips since BackdoorBench's per-dataset transforms:
                    config["hflip"] = False  # a new cell (flipped data sets keep their ids)
                loaded[key] = _Data(config, ds.num_classes)
            out.append(loaded[key])
    return out


def _architectures(spec: dict) -> list[_Architecture]:
    """Each model x training preset x [model_opts.NAME] variant, in that order (the cells' order)."""
    out = []
    for name, preset in itertools.product(_axis(spec, "model"), _axis(spec, "preset")):
        name = str(name).lower()
        defaults, seq = _factory_options(MODELS.get(name))
        for opts in _expand(spec.get("model_opts", {}).get(name, {}), seq, f"[model_opts.{name}]"):
            unknown = sorted(set(opts) - set(defaults))
            if unknown:
                raise TsbdError(f"model {name!r} has no option {unknown[0]!r}; its options are: "
                                f"{', '.join(defaults) or 'none'}")
            check_model_options(name, opts)
            out.append(_Architecture({"name": name, "options": _jsonable({**defaults, **opts})}, str(preset)))
    return out


def _attack_trainings(per_attack: dict[str, dict]) -> dict[str, list[dict]]:
    """Each attack's own training variants ([attack_opts.NAME.train]), for every attack the table names."""
    train_seq = _config_sequence_fields(TrainConfig)
    out = {}
    for name, opts in per_attack.items():
        own = opts.get("train", {})
        if not isinstance(own, dict):
            raise TsbdError(f"[attack_opts.{name}]: 'train' must be a table of training options, "
                            f"e.g. [attack_opts.{name}.train] epochs = 60")
        out[name] = _expand(own, train_seq, f"[attack_opts.{name}.train]")
    return out


def _attacks(spec: dict, data_root: str | None, label: str = "grid") -> list[_Attack]:
    """Each attack x poison ratio x own training variant x [attack_opts] variant, in that order; the
    options are the poison ratio, then those for every attack, then the attack's own."""
    common, per = _split_opts(spec.get("attack_opts", {}))
    trainings = _attack_trainings(per)
    out = []
    for name, ratio in itertools.product(_axis(spec, "attack"), _axis(spec, "poison_ratio")):
        name = str(name).lower()
        own = {k: v for k, v in per.get(name, {}).items() if k != "train"}
        where = f"[attack_opts.{name}]"
        variants = _expand({"poison_ratio": ratio, **common, **own},
                           _config_sequence_fields(ATTACKS.get(name).config_class), where)
        for train, opts in itertools.product(trainings.get(name, [{}]), variants):
            given = {**common, **own}  # an error for any other key is the poison_ratio axis's
            with options_given_by((label, {"poison_ratio": ratio}), (f"{label} {where}", given)):
                attack = build_attack(name, opts)
            out.append(_Attack(attack.describe(), attack.config.target, train, data_files(opts, data_root, where)))
    return out


def _clean_ratios(values: list, where: str) -> list[float]:
    ratios = [float(c) for c in values]
    for c in ratios:
        if not 0 < c <= 1:
            raise TsbdError(f"{where}clean_ratio must be in (0, 1], got {c}")
    return ratios


def _defenses(spec: dict, label: str = "grid") -> list[_Defense]:
    """Each defense x [defense_opts] variant x clean ratio (the defense's own ``clean_ratio`` or the grid's),
    in that order; No Defense is the attack cell itself."""
    clean_ratios = _clean_ratios(_axis(spec, "clean_ratio"), "")
    common, per = _split_opts(spec.get("defense_opts", {}))
    out = []
    for name in (str(d).lower() for d in _axis(spec, "defense")):
        if name == NO_DEFENSE:
            continue
        opts = {**common, **per.get(name, {})}
        own_clean = opts.pop("clean_ratio", None)
        ratios = clean_ratios if own_clean is None else _clean_ratios(_as_list(own_clean), f"[defense_opts.{name}]: ")
        seq = _config_sequence_fields(DEFENSES.get(name).config_class)
        for variant in _expand(opts, seq, f"[defense_opts.{name}]"):
            with options_given_by((f"{label} [defense_opts.{name}]", variant)):
                config = to_dict(build_defense(name, variant).config)
            out.extend(_Defense(name, config, ratio) for ratio in ratios)
    return out


def _check_targets(datasets: list[_Data], attacks: list[_Attack]) -> None:
    for data, attack in itertools.product(datasets, attacks):
        if not 0 <= attack.target < data.num_classes:
            raise TsbdError(f"attack target {attack.target} is outside the {data.num_classes} classes of "
                            f"{data.config['name']}")


def expand(spec: dict, *, data_root: str | None = None, cache_dir: str | None = None, seeds: list[int] | None = None,
           dataset_loader=None) -> Plan:
    """Resolve every config of ``spec`` and expand it into cells (attack cells each followed by
    their defense cells). Datasets are loaded once here, for their fingerprints."""
    check_names(spec)
    name = str(spec.get("name", "grid"))
    versions = relevant_versions()
    seeds = seeds if seeds is not None else [int(s) for s in _axis(spec, "seed")]
    # the defense cells' own seeds (batch order, augmentation; the clean set is drawn with the
    # model's seed) on every attacked model: the spread of a defense without retraining the model;
    # by default each defense cell takes its model's seed
    defense_seeds = [int(s) for s in _axis(spec, "defense_seed")] if "defense_seed" in spec else None
    trainings = _expand(spec.get("train", {}), _config_sequence_fields(TrainConfig), "[train]")
    label = f"grid {name}"  # where an option came from, in errors
    defenses = _defenses(spec, label)
    datasets = _datasets(spec, dataset_loader or load_bench_dataset, data_root, cache_dir)
    architectures = _architectures(spec)
    attacks = _attacks(spec, data_root, label)
    _check_targets(datasets, attacks)

    cells: list[Cell] = []
    seen: set[str] = set()
    for data, arch, train, attack, seed in itertools.product(datasets, architectures, trainings, attacks, seeds):
        with options_given_by((f"{label} [train]", train),
                              (f"{label} [attack_opts.{attack.config['name']}.train]", attack.train)):
            train_cfg = to_dict(train_config(arch.preset, {**train, **attack.train}))
        a = attack_cell(dataset=data.config, model=arch.model, attack=attack.config, train=train_cfg, seed=seed,
                        versions=versions, files=attack.files)
        if a.id in seen:  # the same attacked model reached through another axis value
            continue
        seen.add(a.id)
        cells.append(a)
        for d, d_seed in itertools.product(defenses, defense_seeds or [seed]):
            dc = defense_cell(a, defense={"name": d.name, "config": d.config}, clean_ratio=d.clean_ratio, seed=d_seed)
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
