"""``tsbd attack``, ``defend``, ``eval``, ``demo`` and ``list``: train an attacked model, purify it,
evaluate it, the end-to-end demo, and the registered methods with their options.

Method options are ``--opt KEY=VALUE`` (repeatable) or a TOML file (``--config``); every
option's default and the source of that default are listed by ``--help`` and ``tsbd list``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from tsbd.cli import common
from tsbd.config import options_given_by
from tsbd.errors import TsbdError

DEMO_OUTPUTS = ("backdoored", "purified")  # the model folders `tsbd demo --out` writes


# ------------------------------------------------------------------------------------------
# commands (their imports are lazy: they keep `tsbd --help` fast and free of torch)
def cmd_attack(args) -> int:
    from tsbd.artifacts import check_model_output, save_model
    from tsbd.attacks import build_attack
    from tsbd.data import load_dataset
    from tsbd.models import check_model_options
    from tsbd.pipeline import setup_attack, train_attacked_model
    from tsbd.train.presets import train_config

    check_model_output(args.out, overwrite=args.overwrite)  # before any work: never replace what is not ours
    attack_sources = [*common.given_options(args.config, "attack", "--attack-opt", args.attack_opt, "attack"),
                      *common.flag_options(args, "target", "poison_ratio", "trigger_image")]
    train_sources = [*common.given_options(args.config, "train", "--train-opt", args.train_opt, "training"),
                     *common.flag_options(args, "epochs")]
    with options_given_by(*attack_sources):  # every option checked before any work
        attack = build_attack(args.attack, common.merged(attack_sources))
    with options_given_by(*train_sources):
        cfg = train_config(args.preset, common.merged(train_sources))
    arch_kwargs = common.parse_opts(args.model_opt, "model")
    check_model_options(args.model, arch_kwargs)
    console = common.console(args)
    runtime = common.runtime(args)
    out = Path(args.out)
    dataset = load_dataset(args.dataset, root=args.data_root, cache_dir=args.cache_dir)
    setup = setup_attack(dataset, attack, args.seed, runtime, arch=args.model, arch_kwargs=arch_kwargs,
                         cache_dir=args.cache_dir, progress=not args.quiet)
    key = hashlib.sha256(json.dumps([args.attack, attack.describe(), repr(cfg), args.model, arch_kwargs, args.seed,
                                     dataset.fingerprint], default=str).encode()).hexdigest()[:12]
    ckpt = out.parent / f".{out.name}.{key}.resume.pt"
    console.print(f"[bold]attack[/] {args.attack} on {dataset.name} ({len(dataset.train)} train), model {args.model}, "
                  f"{cfg.epochs} epochs, {runtime.precision} on {runtime.device}")
    model, meta = train_attacked_model(setup, args.model, cfg, runtime, arch_kwargs=arch_kwargs,
                                       progress=not args.quiet, checkpoint=ckpt)
    save_model(out, model, meta, overwrite=args.overwrite)
    ckpt.unlink(missing_ok=True)
    m = dict(meta["metrics"], time=meta["timings"]["train"])
    if args.json:
        common.emit_json({"model": str(out), **meta["metrics"], "train_seconds": meta["timings"]["train"]})
    else:
        common.print_metrics_table([(f"{args.attack} (no defense)", m)], console)
        console.print(f"saved to {out}")
    return 0


def cmd_defend(args) -> int:
    from tsbd.artifacts import check_model_output, load_model, recorded_dataset, save_model
    from tsbd.interop.purify import check_clean_size
    from tsbd.pipeline import defend_model

    if args.out:
        check_model_output(args.out, overwrite=args.overwrite)
    opts, defense = common.defense_options(args.defense, args.config, args.opt)
    console = common.console(args)
    runtime = common.runtime(args)
    model, meta = load_model(args.model, runtime.device)
    setup = common.setup_from_meta(meta, args, runtime)
    # an empty clean set, or one smaller than a batch: one clear line before any work
    check_clean_size(setup.clean_set(args.clean_ratio)[0], defense.config.batch_size)
    recorded = meta.get("kind") == "attacked" and not (args.dataset or args.attack or args.attack_opt)
    before = meta.get("metrics") if recorded else None
    result, record = defend_model(model, setup, args.defense, opts, args.clean_ratio, runtime, seed=args.seed,
                                  progress=not args.quiet, metrics_before=before)
    out_meta = {k: meta[k] for k in ("classes", "attack", "poison", "train") if k in meta}
    out_meta["dataset"] = setup.dataset.describe() if args.dataset else recorded_dataset(meta)
    if setup.attack is not None and (args.attack or args.attack_opt):  # what the metrics were measured with
        out_meta["attack"] = setup.attack.describe()
    out_meta.update({"kind": "defended", "parent": str(args.model), **record,
                     "timings": result.timings})
    if args.out:
        save_model(args.out, result.model, out_meta, overwrite=args.overwrite)
    if args.json:
        common.emit_json({"defense": args.defense, **record["metrics"], "before": record["metrics_before"],
                    "stages": record["defense"].get("stages", {}), "timings": result.timings, "info": result.info,
                    "model": args.out})
    else:
        stages = [(f"  after {name.replace('after_', '').replace('_', ' ')}", dict(m))
                  for name, m in record["defense"].get("stages", {}).items() if name != "after_finetune"]
        common.print_metrics_table([("no defense", dict(record["metrics_before"])), *stages,
                              (args.defense, dict(record["metrics"], time=result.timings.get("total")))], console)
        if args.out:
            console.print(f"saved to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from tsbd.artifacts import load_model
    from tsbd.metrics import evaluate

    console = common.console(args)
    runtime = common.runtime(args)
    model, meta = load_model(args.model, runtime.device)
    if args.test_data:
        test, poisoned = _test_images(args, meta), None
    else:
        setup = common.setup_from_meta(meta, args, runtime)
        test, poisoned = setup.dataset.test, setup.poisoned_test
    t0 = time.perf_counter()
    metrics = evaluate(model, test, poisoned, runtime)
    metrics["time"] = time.perf_counter() - t0
    if args.json:
        common.emit_json({"model": str(args.model), **metrics})
    else:
        common.print_metrics_table([(str(args.model), metrics)], console)
        if poisoned is None:
            console.print("no attack known for this model: ACC only (pass --attack NAME to measure ASR)")
    return 0


def _test_images(args, meta: dict):
    """`tsbd eval --test-data`: clean test images from a folder or an array file, checked against the model."""
    from tsbd.artifacts import recorded_dataset
    from tsbd.interop.images import check_images, check_labels, load_images

    if args.attack or args.dataset:
        raise TsbdError("--test-data measures ACC only; for ASR pass --dataset NAME and --attack NAME instead")
    shape = recorded_dataset(meta).get("image_shape")
    loaded = load_images(args.test_data, labels=args.test_labels, image_size=shape[1] if shape else None,
                         seed=args.seed, data_root=args.data_root, cache_dir=args.cache_dir)
    test = loaded.test if loaded.dataset is not None else loaded.images  # a data set name: its test split
    check_images(test, shape, "test images")
    check_labels(test, int(meta["arch"]["num_classes"]), "test")
    return test


def cmd_demo(args) -> int:
    from tsbd.artifacts import check_model_output, save_model
    from tsbd.attacks import build_attack
    from tsbd.data import load_dataset
    from tsbd.pipeline import defend_model, setup_attack, train_attacked_model
    from tsbd.train.presets import train_config

    if args.out:
        for sub in DEMO_OUTPUTS:
            check_model_output(Path(args.out) / sub, overwrite=args.overwrite)
    if not 0 < args.poison_ratio < 1:
        raise TsbdError(f"--poison-ratio must be in (0, 1), got {args.poison_ratio}")
    if not 0 < args.clean_ratio <= 1:
        raise TsbdError(f"--clean-ratio must be in (0, 1], got {args.clean_ratio}")
    tsbd_opts, _ = common.defense_options("tsbd", None, args.opt, common.flag_options(args, "unlearn_lr"))
    with options_given_by(*common.flag_options(args, "epochs")):
        cfg = train_config("cpu", {"epochs": args.epochs})
    console = common.console(args)
    runtime = common.runtime(args)
    t_start = time.perf_counter()
    dataset = load_dataset("demo")
    attack = build_attack("badnets", {"poison_ratio": args.poison_ratio})
    setup = setup_attack(dataset, attack, args.seed, runtime)
    console.print(f"[bold]tsbd demo[/]: BadNets ({args.poison_ratio:.0%} poisoned) on {len(dataset.train)} "
                  f"embedded CIFAR-10 images, "
                  f"airbench model, {cfg.epochs} epochs, then TSBD ({runtime.precision} on {runtime.device}, "
                  f"{runtime.threads} threads)")
    model, meta = train_attacked_model(setup, "airbench", cfg, runtime, progress=not args.quiet)
    before = dict(meta["metrics"], time=meta["timings"]["train"])
    result, record = defend_model(model, setup, "tsbd", tsbd_opts, args.clean_ratio, runtime, seed=args.seed,
                                  progress=not args.quiet, metrics_before=meta["metrics"])
    after = dict(record["metrics"], time=result.timings["total"])
    total = time.perf_counter() - t_start
    if args.out:
        out = Path(args.out)
        save_model(out / DEMO_OUTPUTS[0], model, meta, overwrite=args.overwrite)
        save_model(out / DEMO_OUTPUTS[1], result.model,
                   {k: meta[k] for k in ("classes", "dataset", "attack", "poison")} |
                   {"kind": "defended", **record, "timings": result.timings}, overwrite=args.overwrite)
    if args.json:
        common.emit_json({"before": meta["metrics"], "after": record["metrics"],
                    "acc_drop": meta["metrics"]["acc"] - record["metrics"]["acc"],
                    "attack_train_seconds": meta["timings"]["train"], "defense_timings": result.timings,
                    "defense_info": {k: v for k, v in result.info.items()}, "total_seconds": total,
                    "runtime": runtime.describe(), "seed": args.seed, "poison_ratio": args.poison_ratio,
                    "clean_ratio": args.clean_ratio, "dataset_fingerprint": dataset.fingerprint})
    else:
        common.print_metrics_table([("backdoored (BadNets)", before), ("after TSBD", after)], console)
        info = result.info
        console.print(f"TSBD: unlearning {info['unlearn']['epochs']} epochs, "
                      f"{info['reinit']['neurons_selected']}/{info['reinit']['neurons_total']} neurons selected, "
                      f"{info['reinit']['subweights_zeroed']} subweights zeroed; "
                      f"stage times " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
        console.print(f"total {total:.0f} s")
    return 0


LIST_TOPICS = ("attacks", "defenses", "models", "datasets", "training")


def cmd_list(args) -> int:
    from tsbd.attacks import ATTACKS
    from tsbd.data import DATASETS
    from tsbd.defenses import DEFENSES
    from tsbd.models import MODELS
    from tsbd.train.presets import TRAIN_PRESETS

    topics = {  # topic -> (registry, the lines on one registered name)
        "attacks": (ATTACKS, lambda name: common.method_help(ATTACKS, name, "--attack", "--attack-opt")),
        "defenses": (DEFENSES, lambda name: common.method_help(DEFENSES, name, "--defense", "--opt")),
        "models": (MODELS, lambda name: common.factory_help(MODELS, name, "--model-opt KEY=VALUE")),
        "datasets": (DATASETS, lambda name: common.factory_help(
            DATASETS, name, "KEY = VALUE under [dataset_opts.NAME] in a bench grid"))}
    if args.topic is None:  # the overview: names and one line each
        lines = [*common.overview(DATASETS, "datasets (--dataset NAME):"),
                 *common.overview(MODELS, "models (--model NAME):"),
                 *common.overview(ATTACKS, "attacks (--attack NAME):"),
                 *common.overview(DEFENSES, "defenses (--defense NAME):"),
                 "training presets (--preset NAME): " + ", ".join(TRAIN_PRESETS),
                 "", "options and defaults: tsbd list attacks|defenses|models|datasets|training [NAME ...]"]
    elif args.topic == "training":
        lines = common.training_help(None)
    else:
        registry, show = topics[args.topic]
        for name in args.names:
            registry.get(name)  # an unknown name: one line naming the registered ones
        lines = [line for name in [n.lower() for n in args.names] or registry.names() for line in show(name)]
    print("\n".join(lines))
    return 0


# ------------------------------------------------------------------------------------------
# parsers
def configure_attack(p: argparse.ArgumentParser) -> None:
    from tsbd.attacks import ATTACKS  # lazy, as the commands: only `tsbd attack` needs the registries
    from tsbd.data import DATASETS
    from tsbd.models import MODELS
    from tsbd.train.presets import TRAIN_PRESETS

    help_ = common.HelpSections(
        p, attack=lambda name: common.method_help(ATTACKS, name, "--attack", "--attack-opt"),
        model=lambda name: common.factory_help(MODELS, name if name and name in MODELS else "airbench",
                                                "--model-opt KEY=VALUE"),
        preset=common.training_help)
    p.add_argument("--attack", default="badnets", action=common.SelectsHelp, sections=help_,
                   help=f"attack: {', '.join(ATTACKS.names())} (default: badnets; `--attack NAME --help` lists "
                        "its options)")
    p.add_argument("--dataset", default="demo",
                   help=f"dataset: {', '.join(DATASETS.names())} (default: demo, the embedded CIFAR-10 subset)")
    common.add_data_root(p)
    p.add_argument("--model", default="airbench", action=common.SelectsHelp, sections=help_,
                   help=f"architecture: {', '.join(MODELS.names())} (default: airbench, the CPU-scale model)")
    p.add_argument("--model-opt", action="append", metavar="KEY=VALUE",
                   help="architecture option, e.g. widths=[16,32,64] (airbench) or width=16 (preact_resnet18); "
                        "repeatable; `tsbd list models` lists them")
    p.add_argument("--preset", default=common.DEFAULT_PRESET, choices=sorted(TRAIN_PRESETS), action=common.SelectsHelp,
                   sections=help_, help=f"training preset (default: {common.DEFAULT_PRESET})")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--target", type=int, default=None, help="target label (default: 0, BackdoorBench)")
    p.add_argument("--poison-ratio", type=float, default=None, help="poisoned fraction (default: 0.1, paper)")
    p.add_argument("--trigger-image", default=None, help="trigger image file (BadNets patch / Blended image)")
    p.add_argument("--attack-opt", action="append", metavar="KEY=VALUE", help="attack option (repeatable)")
    p.add_argument("--train-opt", action="append", metavar="KEY=VALUE", help="training option (repeatable)")
    p.add_argument("--config", default=None, help="TOML file with [attack] and [train] tables")
    p.add_argument("--out", required=True, help="output model folder (new or empty)")
    common.add_overwrite_arg(p, "a model folder")
    p.add_argument("--json", action="store_true", help="print metrics as one JSON object")
    common.add_runtime_args(p)
    p.set_defaults(func=cmd_attack)


def configure_defend(p: argparse.ArgumentParser) -> None:
    from tsbd.defenses import DEFENSES  # lazy: only `tsbd defend` needs the registry

    help_ = common.HelpSections(p, defense=lambda name: common.method_help(DEFENSES, name, "--defense", "--opt"))
    p.add_argument("model", help="model folder (from `tsbd attack`)")
    p.add_argument("--defense", default="tsbd", action=common.SelectsHelp, sections=help_,
                   help=f"defense: {', '.join(DEFENSES.names())} (default: tsbd; `--defense NAME --help` lists "
                        "its options)")
    p.add_argument("--clean-ratio", type=float, default=0.05,
                   help="fraction of the training set given to the defender as clean data (default: 0.05, paper)")
    common.add_defense_output_args(p, "output folder for the purified model (new or empty)")
    common.add_data_root(p)
    common.add_setup_args(p)
    common.add_runtime_args(p)
    p.set_defaults(func=cmd_defend)


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder (from `tsbd attack`, `defend` or `purify`)")
    p.add_argument("--json", action="store_true", help="print metrics as one JSON object")
    common.add_data_root(p)
    common.add_setup_args(p)
    p.add_argument("--test-data", default=None,
                   help="clean test images from a class-per-folder image folder, a .npz (x, y) or a .npy with "
                        "--test-labels, instead of the data set's test split (ACC only)")
    p.add_argument("--test-labels", default=None, help="labels .npy for a .npy --test-data")
    common.add_runtime_args(p)
    p.set_defaults(func=cmd_eval)


def configure_demo(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--out", default=None, help="also save both models under this folder (as backdoored/ and "
                                                "purified/)")
    common.add_overwrite_arg(p, "the model folders")
    p.add_argument("--json", action="store_true", help="print metrics as one JSON object")
    common.add_runtime_args(p)
    p.set_defaults(func=cmd_demo)


def configure_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("topic", nargs="?", choices=LIST_TOPICS,
                   help="list these with their options and defaults (default: every name, one line each)")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these attacks, defenses, models or data sets")
    p.set_defaults(func=cmd_list)


COMMANDS = [
    common.Command("attack", "train a backdoored model", configure_attack),
    common.Command("defend", "purify a model with a defense", configure_defend),
    common.Command("eval", "ACC / ASR / RA of a model on its dataset and attack", configure_eval),
    common.Command("demo", "BadNets then TSBD on the embedded data, in minutes on a CPU", configure_demo),
    common.Command("list", "registered datasets, models, attacks and defenses; `tsbd list attacks` etc. for "
                           "their options", configure_list),
]
