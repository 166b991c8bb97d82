"""``tsbd inspect PATH`` and ``tsbd purify MODEL_FILE --clean-data DATA``: models from elsewhere
(BackdoorBench files, state dicts, safetensors, your own architecture)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from tsbd.cli import common
from tsbd.errors import TsbdError

log = logging.getLogger(__name__)

PURIFY_EPILOG = """\
MODEL_FILE is a BackdoorBench attack_result.pt (architecture, classes and normalization are read
from it), a PyTorch state dict (.pt/.pth, weights only), a .safetensors file, or a tsbd model folder.
Files are never unpickled beyond tensors, plain containers and numeric arrays.

--clean-data is a data set name (then --clean-ratio of its training set is the clean set and its
test split measures ACC), a class-per-folder image folder (<class>/* or train/<class>/* with test/),
a .npz file (arrays x, y and optionally x_test, y_test) or a .npy image array with --labels.
Triggered test images stored in a BackdoorBench file measure ASR and RA. See docs/interop.md.
"""


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace("(", "").replace(")", "").split(",") if v.strip())
    except ValueError:
        raise TsbdError(f"{flag} must be comma-separated numbers like 0.4914,0.4822,0.4465; got {text!r}") from None
    if len(values) != 3:
        raise TsbdError(f"{flag} needs 3 numbers (one per RGB channel), got {len(values)}")
    return values


# ------------------------------------------------------------------------------------------
# commands (their imports are lazy: they keep `tsbd --help` fast and free of torch)
def cmd_inspect(args) -> int:
    from tsbd.interop.inspect import describe_path

    info = describe_path(args.path)
    if args.json:
        sys.stdout.write(json.dumps(info, default=str) + "\n")
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in value.items() if v is not None)
        elif isinstance(value, list) and len(value) > 12:
            value = ", ".join(map(str, value[:12])) + f", ... ({len(value)} in all)"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        print(f"{key:>20}: {value}")
    return 0


def _metrics(model, test, poisoned, runtime) -> dict[str, float]:
    from tsbd.metrics import attack_success_rate, evaluate, robust_accuracy
    from tsbd.train.engine import predict

    out: dict[str, float] = {}
    if test is not None:
        out.update(evaluate(model, test, None, runtime))
    if poisoned is not None and len(poisoned):
        preds = predict(model, poisoned.x, runtime)
        out["asr"] = attack_success_rate(preds, poisoned.y_target)
        if bool((poisoned.y_true >= 0).all()):
            out["ra"] = robust_accuracy(preds, poisoned.y_true)
    return out


def cmd_purify(args) -> int:
    from tsbd.artifacts import check_model_output, provenance, save_model
    from tsbd.interop.architectures import NormalizedModel
    from tsbd.interop.checkpoints import load_model_file
    from tsbd.interop.images import check_images, check_labels, load_images
    from tsbd.interop.purify import purify
    from tsbd.metrics import der

    if args.out:
        check_model_output(args.out, overwrite=args.overwrite)  # before any work: never replace what is not ours
    opts, _ = common.defense_options(args.defense, args.config, args.opt)  # a bad option: fail before reading anything
    arch_opts = common.parse_opts(args.model_opt, "model")
    mean, std = _floats(args.mean, "--mean"), _floats(args.std, "--std")
    console = common.console(args)
    runtime = common.runtime(args)

    imported = load_model_file(args.model, arch=args.arch, num_classes=args.num_classes, options=arch_opts,
                               mean=mean, std=std, device=runtime.device)
    shape = imported.image_shape
    if args.image_size:
        shape = (shape[0] if shape else 3, args.image_size, args.image_size)
    size = shape[1] if shape else None
    clean = load_images(args.clean_data, labels=args.labels, image_size=size, ratio=args.clean_ratio,
                        seed=args.seed, data_root=args.data_root, cache_dir=args.cache_dir)
    if args.flip is not None:  # the defense's augmentation mirrors the clean images only where they allow it
        clean.images.hflip = args.flip
    if imported.stats_source == "none" and clean.mean is not None:
        imported.set_stats(clean.mean, clean.std, f"data set {clean.dataset.name}")
    test = clean.test
    if args.test_data:
        test = load_images(args.test_data, labels=args.test_labels, image_size=size, seed=args.seed,
                           data_root=args.data_root, cache_dir=args.cache_dir).images
    check_images(clean.images, shape, "clean images")
    if test is not None:
        check_images(test, shape, "test images")
    poisoned = imported.poisoned_test
    if poisoned is not None:
        check_images(poisoned, shape, "BackdoorBench's poisoned test images")
    n_cls = imported.num_classes
    for what, data in (("clean", clean.images), ("test", test)):
        check_labels(data, n_cls, what, " (or the matching --num-classes)")
    console.print(f"[bold]purify[/] {imported.path} ({imported.format}, {imported.arch}, {n_cls} classes, "
                  f"normalization: {imported.stats_source}) with {args.defense} on {len(clean.images)} clean images; "
                  f"{runtime.precision} on {runtime.device}")
    before = _metrics(imported.model, test, poisoned, runtime)
    result = purify(imported.model, clean.images, args.defense, image_shape=shape, runtime=runtime, seed=args.seed,
                    progress=not args.quiet, **opts)
    after = _metrics(result.model, test, poisoned, runtime)
    if {"acc", "asr"} <= set(before) and {"acc", "asr"} <= set(after):
        after["der"] = der(before["acc"], before["asr"], after["acc"], after["asr"])
    record: dict[str, Any] = {
        "kind": "defended", "parent": str(args.model), "source": imported.describe(),
        "defense": result.record(), "clean": clean.describe(), "metrics_before": before, "metrics": after,
        "runtime": runtime.describe(), "seed": args.seed, "timings": result.timings, "provenance": provenance()}
    if clean.classes:
        record["classes"] = clean.classes
    # the data set, for `tsbd eval`/`defend`/`analyze` of the purified model; the attack only when
    # the source recorded it (a tsbd model folder): an imported model's attack is never guessed
    if clean.dataset is not None:
        record["dataset"] = clean.dataset.describe()
    elif shape:
        record["dataset"] = {"name": imported.dataset, "image_shape": list(shape)}
    if imported.format == "tsbd":
        record.update({k: imported.meta[k] for k in ("attack", "poison") if imported.meta.get(k)})
    if args.out:
        model = result.model
        if isinstance(model, NormalizedModel):  # save the user's own module, with its own keys
            model.net.arch_spec = model.arch_spec
            model = model.net
        save_model(args.out, model, record, overwrite=args.overwrite)
    if args.json:
        sys.stdout.write(json.dumps({"defense": args.defense, **after, "before": before, "timings": result.timings,
                                     "info": result.info, "source": imported.describe(), "model": args.out},
                                    default=str) + "\n")
    else:
        common.print_metrics_table([("before", before), (args.defense, dict(after, time=result.timings.get("total")))],
                             console)
        if not before:
            console.print("no test data: pass --test-data to measure ACC (a BackdoorBench file's bd_test gives ASR)")
        if args.out:
            console.print(f"saved to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------
# parsers
def configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="tsbd model folder, .safetensors, .pt/.pth state dict or BackdoorBench "
                                "attack_result.pt")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)


def configure_purify(p: argparse.ArgumentParser) -> None:
    from tsbd.defenses import DEFENSES  # lazy: only `tsbd purify` needs the registry

    help_ = common.HelpSections(p, about=lambda _: PURIFY_EPILOG.rstrip("\n").splitlines(),
                                defense=lambda name: common.method_help(DEFENSES, name, "--defense", "--opt"))
    p.add_argument("model", help="model file or folder (see below)")
    p.add_argument("--clean-data", required=True, help="the defender's clean images (see below)")
    p.add_argument("--labels", default=None, help="labels .npy for a .npy --clean-data")
    p.add_argument("--clean-ratio", type=float, default=0.05,
                   help="fraction of a named data set's training set used as clean data (default: 0.05, paper)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror clean images in the defense's augmentation (default: as the named data set does "
                        "-- CIFAR-10 yes, GTSRB no -- and yes for files and folders; pass --no-flip for images that "
                        "mirroring changes, such as traffic signs or text)")
    p.add_argument("--test-data", default=None, help="clean test images for ACC (same forms as --clean-data; "
                                                     "default: the clean data's test split, if it has one)")
    p.add_argument("--test-labels", default=None, help="labels .npy for a .npy --test-data")
    p.add_argument("--arch", default=None, help="registered model name or package.module:factory "
                                                "(imported only because you name it; default: from the file)")
    p.add_argument("--num-classes", type=int, default=None, help="class count (default: from the file)")
    p.add_argument("--model-opt", action="append", metavar="KEY=VALUE", help="architecture option (repeatable)")
    p.add_argument("--mean", default=None, help="normalization the model was trained with, e.g. 0.4914,0.4822,0.4465 "
                                                "(default: BackdoorBench's for its data set, else the clean data "
                                                "set's, else none)")
    p.add_argument("--std", default=None, help="normalization std, e.g. 0.247,0.243,0.261")
    p.add_argument("--image-size", type=int, default=None,
                   help="pixels per side the model was trained on (default: from the file; folders are resized to it)")
    p.add_argument("--defense", default="tsbd", action=common.SelectsHelp, sections=help_,
                   help=f"defense: {', '.join(DEFENSES.names())} (default: tsbd; `--defense NAME --help` lists "
                        "its options)")
    common.add_defense_output_args(p, "output model folder for the purified model (new or empty)")
    common.add_data_root(p)
    common.add_runtime_args(p)
    p.set_defaults(func=cmd_purify)


COMMANDS = [
    common.Command("inspect", "what a model file or folder holds (architecture, classes, provenance, metrics)",
                   configure_inspect),
    common.Command("purify", "defend a model file from elsewhere (BackdoorBench, state dict, safetensors, your own "
                             "architecture)", configure_purify),
]
