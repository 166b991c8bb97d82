"""The ``tsbd`` command line: attack, defend, eval, demo, list.

Method options are ``--opt KEY=VALUE`` (repeatable) or a TOML file (``--config``); every
option's default and the source of that default are listed by ``--help`` and ``tsbd list``.
Errors caused by input print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from tsbd.errors import TsbdError

log = logging.getLogger("tsbd")

# modules that add subcommands (bench, report, analyze, inspect, show-attack)
EXTRA_COMMANDS = ["tsbd.bench.cli", "tsbd.analysis.cli", "tsbd.interop.cli", "tsbd.attacks.show"]


# ------------------------------------------------------------------------------------------
# helpers
def _parse_opts(pairs: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise TsbdError(f"{what} option {pair!r} must look like KEY=VALUE")
        k, v = pair.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def _json_value(text: str):
    """A CLI value as JSON when it parses (numbers, lists), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _read_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise TsbdError(f"config file {path!r} not found; pass an existing TOML file to --config")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise TsbdError(f"config file {path} is not valid TOML: {err}") from None


def _options_table(registry, title: str) -> str:
    from tsbd.config import describe

    lines = [title]
    for name in registry.names():
        cls = registry.get(name)
        lines.append(f"  {name}:")
        for field, default, help_, source in describe(cls.config_class):
            lines.append(f"    {field} = {default!r}  -- {help_} [{source}]")
    return "\n".join(lines)


def _train_options_table() -> str:
    from tsbd.config import describe
    from tsbd.pipeline import PRESET_HELP, TrainConfig

    lines = ["training options (--train-opt KEY=VALUE; defaults of TrainConfig, presets override):"]
    for field, default, help_, source in describe(TrainConfig):
        lines.append(f"    {field} = {default!r}  -- {help_} [{source}]")
    lines.append("presets (--preset):")
    lines += [f"    {k}: {v}" for k, v in PRESET_HELP.items()]
    return "\n".join(lines)


def _runtime(args):
    from tsbd.train.runtime import Runtime

    return Runtime.create(args.device, args.precision, args.threads, getattr(args, "compile", False))


def _print_metrics_table(rows: list[tuple[str, dict]], console) -> None:
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


def _console(args):
    from rich.console import Console

    return Console(stderr=bool(getattr(args, "json", False)))


def _emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


# ------------------------------------------------------------------------------------------
# commands
def cmd_attack(args) -> int:
    from tsbd.artifacts import save_model
    from tsbd.attacks import build_attack
    from tsbd.data import load_dataset
    from tsbd.pipeline import setup_attack, train_attacked_model, train_config

    file_cfg = _read_config_file(args.config)
    attack_opts = {**file_cfg.get("attack", {}), **_parse_opts(args.attack_opt, "attack")}
    for key in ("target", "poison_ratio", "trigger_image"):
        if getattr(args, key) is not None:
            attack_opts[key] = getattr(args, key)
    train_opts = {**file_cfg.get("train", {}), **_parse_opts(args.train_opt, "training")}
    if args.epochs is not None:
        train_opts["epochs"] = args.epochs
    console = _console(args)
    runtime = _runtime(args)
    attack = build_attack(args.attack, attack_opts)
    cfg = train_config(args.preset, train_opts)
    out = Path(args.out)
    dataset = load_dataset(args.dataset, root=args.data_root, cache_dir=args.cache_dir)
    arch_kwargs = {k: _json_value(v) for k, v in _parse_opts(args.model_opt, "model").items()}
    setup = setup_attack(dataset, attack, args.seed, runtime, arch=args.model, arch_kwargs=arch_kwargs,
                         cache_dir=args.cache_dir, progress=not args.quiet)
    key = hashlib.sha256(json.dumps([args.attack, attack.describe(), repr(cfg), args.model, arch_kwargs, args.seed,
                                     dataset.fingerprint], default=str).encode()).hexdigest()[:12]
    ckpt = out.parent / f".{out.name}.{key}.resume.pt"
    console.print(f"[bold]attack[/] {args.attack} on {dataset.name} ({len(dataset.train)} train), model {args.model}, "
                  f"{cfg.epochs} epochs, {runtime.precision} on {runtime.device}")
    model, meta = train_attacked_model(setup, args.model, cfg, runtime, arch_kwargs=arch_kwargs,
                                       progress=not args.quiet, checkpoint=ckpt)
    save_model(out, model, meta)
    ckpt.unlink(missing_ok=True)
    m = dict(meta["metrics"], time=meta["timings"]["train"])
    if args.json:
        _emit_json({"model": str(out), **meta["metrics"], "train_seconds": meta["timings"]["train"]})
    else:
        _print_metrics_table([(f"{args.attack} (no defense)", m)], console)
        console.print(f"saved to {out}")
    return 0


def cmd_defend(args) -> int:
    from tsbd.artifacts import load_model, save_model
    from tsbd.pipeline import defend_model, load_setup_from_meta

    file_cfg = _read_config_file(args.config)
    opts = {**file_cfg.get("defense", {}), **_parse_opts(args.opt, "defense")}
    console = _console(args)
    runtime = _runtime(args)
    model, meta = load_model(args.model, runtime.device)
    setup = load_setup_from_meta(meta, runtime, data_root=args.data_root, cache_dir=args.cache_dir)
    from tsbd.defenses import build_defense
    from tsbd.interop.purify import check_clean_size

    # an empty clean set, or one smaller than a batch: one clear line before any work
    check_clean_size(setup.clean_set(args.clean_ratio)[0], build_defense(args.defense, opts).config.batch_size)
    before = meta.get("metrics") if meta.get("kind") == "attacked" else None
    result, record = defend_model(model, setup, args.defense, opts, args.clean_ratio, runtime, seed=args.seed,
                                  progress=not args.quiet, metrics_before=before)
    out_meta = {k: meta[k] for k in ("classes", "dataset", "attack", "poison", "train") if k in meta}
    out_meta.update({"kind": "defended", "parent": str(args.model), **record,
                     "timings": result.timings})
    if args.out:
        save_model(args.out, result.model, out_meta)
    if args.json:
        _emit_json({"defense": args.defense, **record["metrics"], "before": record["metrics_before"],
                    "stages": record["defense"].get("stages", {}), "timings": result.timings, "info": result.info,
                    "model": args.out})
    else:
        stages = [(f"  after {name.replace('after_', '').replace('_', ' ')}", dict(m))
                  for name, m in record["defense"].get("stages", {}).items() if name != "after_finetune"]
        _print_metrics_table([("no defense", dict(record["metrics_before"])), *stages,
                              (args.defense, dict(record["metrics"], time=result.timings.get("total")))], console)
        if args.out:
            console.print(f"saved to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from tsbd.artifacts import load_model
    from tsbd.metrics import evaluate
    from tsbd.pipeline import load_setup_from_meta

    console = _console(args)
    runtime = _runtime(args)
    model, meta = load_model(args.model, runtime.device)
    setup = load_setup_from_meta(meta, runtime, data_root=args.data_root, cache_dir=args.cache_dir)
    t0 = time.perf_counter()
    metrics = evaluate(model, setup.dataset.test, setup.poisoned_test, runtime)
    metrics["time"] = time.perf_counter() - t0
    if args.json:
        _emit_json({"model": str(args.model), **metrics})
    else:
        _print_metrics_table([(str(args.model), metrics)], console)
    return 0


def cmd_demo(args) -> int:
    from tsbd.artifacts import save_model
    from tsbd.attacks import build_attack
    from tsbd.data import load_dataset
    from tsbd.pipeline import defend_model, setup_attack, train_attacked_model, train_config

    console = _console(args)
    runtime = _runtime(args)
    t_start = time.perf_counter()
    dataset = load_dataset("demo")
    if not 0 < args.poison_ratio < 1:
        raise TsbdError(f"--poison-ratio must be in (0, 1), got {args.poison_ratio}")
    attack = build_attack("badnets", {"poison_ratio": args.poison_ratio})
    cfg = train_config("cpu", {"epochs": args.epochs})
    setup = setup_attack(dataset, attack, args.seed, runtime)
    console.print(f"[bold]tsbd demo[/]: BadNets ({args.poison_ratio:.0%} poisoned) on {len(dataset.train)} "
                  f"embedded CIFAR-10 images, "
                  f"airbench model, {cfg.epochs} epochs, then TSBD ({runtime.precision} on {runtime.device}, "
                  f"{runtime.threads} threads)")
    model, meta = train_attacked_model(setup, "airbench", cfg, runtime, progress=not args.quiet)
    before = dict(meta["metrics"], time=meta["timings"]["train"])
    tsbd_opts = {"unlearn_lr": args.unlearn_lr, **_parse_opts(args.opt, "defense")}
    result, record = defend_model(model, setup, "tsbd", tsbd_opts, args.clean_ratio, runtime, seed=args.seed,
                                  progress=not args.quiet, metrics_before=meta["metrics"])
    after = dict(record["metrics"], time=result.timings["total"])
    total = time.perf_counter() - t_start
    if args.out:
        out = Path(args.out)
        save_model(out / "backdoored", model, meta)
        save_model(out / "purified", result.model,
                   {k: meta[k] for k in ("classes", "dataset", "attack", "poison")} |
                   {"kind": "defended", **record, "timings": result.timings})
    if args.json:
        _emit_json({"before": meta["metrics"], "after": record["metrics"],
                    "acc_drop": meta["metrics"]["acc"] - record["metrics"]["acc"],
                    "attack_train_seconds": meta["timings"]["train"], "defense_timings": result.timings,
                    "defense_info": {k: v for k, v in result.info.items()}, "total_seconds": total,
                    "runtime": runtime.describe(), "seed": args.seed, "poison_ratio": args.poison_ratio,
                    "clean_ratio": args.clean_ratio, "dataset_fingerprint": dataset.fingerprint})
    else:
        _print_metrics_table([("backdoored (BadNets)", before), ("after TSBD", after)], console)
        info = result.info
        console.print(f"TSBD: unlearning {info['unlearn']['epochs']} epochs, "
                      f"{info['reinit']['neurons_selected']}/{info['reinit']['neurons_total']} neurons selected, "
                      f"{info['reinit']['subweights_zeroed']} subweights zeroed; "
                      f"stage times " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
        console.print(f"total {total:.0f} s")
    return 0


def cmd_list(args) -> int:
    from tsbd.attacks import ATTACKS
    from tsbd.data import DATASETS
    from tsbd.defenses import DEFENSES
    from tsbd.models import MODELS

    print("datasets:", ", ".join(DATASETS.names()))
    print("models:  ", ", ".join(MODELS.names()))
    print(_options_table(ATTACKS, "attacks (--attack NAME, options --attack-opt KEY=VALUE):"))
    print(_options_table(DEFENSES, "defenses (--defense NAME, options --opt KEY=VALUE):"))
    print(_train_options_table())
    return 0


# ------------------------------------------------------------------------------------------
def _add_runtime_args(p: argparse.ArgumentParser) -> None:
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


def _add_data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="folder with the dataset files (default: $TSBD_DATA_ROOT; `demo` needs none)")


def build_parser() -> argparse.ArgumentParser:
    from tsbd.attacks import ATTACKS
    from tsbd.defenses import DEFENSES
    from tsbd.pipeline import TRAIN_PRESETS

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="tsbd", description="Backdoor attacks, TSBD and baseline defenses.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('tsbd').__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("attack", help="train a backdoored model", formatter_class=fmt,
                       epilog=_options_table(ATTACKS, "attack options:") + "\n" + _train_options_table())
    p.add_argument("--attack", default="badnets", help="attack name (default: badnets; see `tsbd list`)")
    p.add_argument("--dataset", default="demo", help="dataset name (default: demo, the embedded CIFAR-10 subset)")
    _add_data_root(p)
    p.add_argument("--model", default="airbench", help="architecture (default: airbench, the CPU-scale model)")
    p.add_argument("--model-opt", action="append", metavar="KEY=VALUE",
                   help="architecture option, e.g. widths=[16,32,64] or width=16 (repeatable)")
    p.add_argument("--preset", default="cpu", choices=sorted(TRAIN_PRESETS), help="training preset (default: cpu)")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--target", type=int, default=None, help="target label (default: 0, BackdoorBench)")
    p.add_argument("--poison-ratio", type=float, default=None, help="poisoned fraction (default: 0.1, paper)")
    p.add_argument("--trigger-image", default=None, help="trigger image file (BadNets patch / Blended image)")
    p.add_argument("--attack-opt", action="append", metavar="KEY=VALUE", help="attack option (repeatable)")
    p.add_argument("--train-opt", action="append", metavar="KEY=VALUE", help="training option (repeatable)")
    p.add_argument("--config", default=None, help="TOML file with [attack] and [train] tables")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--json", action="store_true", help="print metrics as one JSON object")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("defend", help="purify a model with a defense", formatter_class=fmt,
                       epilog=_options_table(DEFENSES, "defense options (--opt KEY=VALUE):"))
    p.add_argument("model", help="model folder (from `tsbd attack`)")
    p.add_argument("--defense", default="tsbd", help="defense name (default: tsbd)")
    p.add_argument("--clean-ratio", type=float, default=0.05,
                   help="fraction of the training set given to the defender as clean data (default: 0.05, paper)")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="defense option (repeatable)")
    p.add_argument("--config", default=None, help="TOML file with a [defense] table")
    p.add_argument("--out", default=None, help="output folder for the purified model")
    p.add_argument("--json", action="store_true", help="print metrics as one JSON object")
    _add_data_root(p)
    _add_runtime_args(p)
    p.set_defaults(func=cmd_defend)

    p = sub.add_parser("eval", help="ACC / ASR / RA of a model on its dataset and attack")
    p.add_argument("model", help="model folder")
    p.add_argument("--json", action="store_true", help="print metrics as one JSON object")
    _add_data_root(p)
    _add_runtime_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="BadNets then TSBD on the embedded data, in minutes on a CPU")
    p.add_argument("--epochs", type=int, default=40, help="attack training epochs (default: 40)")
    p.add_argument("--poison-ratio", type=float, default=0.2,
                   help="BadNets poison fraction (default: 0.2; at the paper's 0.1 the 10,000 embedded images "
                        "give a weaker backdoor, about 85%% ASR with 40 or 60 epochs, measured in BENCHMARKS.md)")
    p.add_argument("--clean-ratio", type=float, default=0.1,
                   help="defender's clean fraction (default: 0.1 = 1,000 images; the paper's 5%% of "
                        "the 10,000 embedded images is too few to recover accuracy)")
    p.add_argument("--unlearn-lr", type=float, default=0.01,
                   help="TSBD clean-unlearning lr (default: 0.01 for the airbench model, whose 1/8-scaled "
                        "logits make the paper's 1e-4 need hundreds of epochs; see BENCHMARKS.md)")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="other TSBD option (repeatable)")
    p.add_argument("--out", default=None, help="also save both models under this folder")
    p.add_argument("--json", action="store_true", help="print metrics as one JSON object")
    _add_runtime_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("list", help="registered datasets, models, attacks, defenses and their options")
    p.set_defaults(func=cmd_list)

    # Commands of other subsystems: each module has register(subparsers, add_runtime_args, add_data_root)
    for module in EXTRA_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is None or not module.startswith(err.name):
                raise
            continue
        mod.register(sub, _add_runtime_args, _add_data_root)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return int(args.func(args) or 0)
    except TsbdError as err:
        print(f"tsbd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tsbd: interrupted; finished work is saved -- rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
