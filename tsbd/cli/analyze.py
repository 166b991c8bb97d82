"""``tsbd analyze NAME MODEL``: the paper's observations and sweeps on a saved attacked model.

Each analysis rebuilds the model's dataset and attack from its ``meta.json`` (checking the data
fingerprint), draws the defender's clean set as ``tsbd defend`` does, and writes into ``--out``:
the numbers as CSV, a figure as PNG and SVG, ``result.json`` (with seed, config, versions and
data fingerprint) and ``section.md``, a Markdown section for the docs or a report.

Each analysis is registered (:mod:`tsbd.analysis.registry`) by the module that defines it.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from tsbd.cli import common
from tsbd.errors import TsbdError

OUTPUTS = ("result.json", "section.md")  # always written; result.json marks a folder as an analysis's

SHARED_FLAGS = ("--values", "--no-finetune")  # declared once here for every analysis that reads them


# ------------------------------------------------------------------------------------------
# command (its imports are lazy: they keep `tsbd --help` fast and free of torch)
def analyses() -> dict:
    """Every analysis by name, in the order ``tsbd analyze --help`` lists them: the paper's
    observations and sweeps, then the neuron-ranking studies, then the ablations. Importing a
    module registers its analyses."""
    from tsbd.analysis import ablations, neurons, paper
    from tsbd.analysis.registry import ANALYSES

    order = [paper.__name__, neurons.__name__, ablations.__name__]
    return dict(sorted(ANALYSES.items(), key=lambda kv: order.index(kv[1].measure.__module__)
                       if kv[1].measure.__module__ in order else len(order)))


def option_flags(analysis) -> list[tuple[dataclasses.Field, str, str]]:
    """(field, flag, argparse dest) of each field of the analysis's options that a flag sets."""
    out = []
    for f in dataclasses.fields(analysis.options):
        cli = f.metadata.get("cli")
        if cli is not None:
            out.append((f, cli["flag"] or "--" + f.name.replace("_", "-"), cli["dest"] or f.name))
    return out


def build_options(analysis, args):
    """The analysis's options from the parsed command line: each flag given, read by its field's
    ``parse``; the fields whose flags were not given keep their defaults."""
    given = {}
    for f, _, dest in option_flags(analysis):
        raw = getattr(args, dest, None)
        if raw is not None:
            parse = f.metadata["cli"]["parse"]
            given[f.name] = parse(raw) if parse else raw
    return analysis.options(**given)


def cmd_analyze(args) -> int:
    from tsbd.analysis.registry import AnalysisContext
    from tsbd.artifacts import (
        check_output_folder,
        load_model,
        provenance,
        recorded_dataset,
        write_bytes_atomic,
        write_json_atomic,
    )
    from tsbd.config import to_dict

    out = check_output_folder(args.out, OUTPUTS, overwrite=args.overwrite)  # before any work
    cfg = common.defense_options("tsbd", None, args.opt)[1].config  # a bad option: fail before loading anything
    console = common.console(args)
    analysis = analyses()[args.name]
    options = build_options(analysis, args)
    runtime = common.runtime(args)
    model, meta = load_model(args.model, runtime.device)
    if meta.get("kind") not in (None, "attacked"):
        console.print(f"[yellow]note[/]: {args.model} is a {meta.get('kind')} model; analyses expect an attacked one")
    setup = common.setup_from_meta(meta, args, runtime, progress=not args.quiet)
    if setup.attack is None:
        raise TsbdError(f"{args.model} records no attack, and the analyses measure one; pass --attack NAME "
                        "(with --attack-opt for its options)")
    clean, clean_info = setup.clean_set(args.clean_ratio)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ctx = AnalysisContext(model=model, setup=setup, clean=clean, cfg=cfg, runtime=runtime, meta=meta, seed=args.seed,
                          progress=not args.quiet, clean_ratio=args.clean_ratio, cache_dir=args.cache_dir)
    result, md = analysis.run(ctx, options, out)
    record = {"analysis": args.name, "model": str(args.model), "attack": setup.attack.describe(),
              "dataset": setup.dataset.describe() if args.dataset else recorded_dataset(meta),
              "clean": clean_info, "tsbd_config": to_dict(cfg), "seed": args.seed,
              "runtime": runtime.describe(), "seconds": time.perf_counter() - t0, "provenance": provenance(),
              "result": result}
    write_json_atomic(out / "result.json", record)
    command = " ".join(["tsbd analyze", args.name, str(args.model), f"--clean-ratio {args.clean_ratio:g}"]
                       + [f"--opt {o}" for o in args.opt or []]
                       + ([f"--dataset {args.dataset}"] if args.dataset else [])
                       + ([f"--attack {args.attack}"] if args.attack else [])
                       + [f"--attack-opt {o}" for o in args.attack_opt or []]
                       + ([f"--values {args.values}"] if args.values else [])
                       + (["--no-finetune"] if args.no_finetune else []) + _own_options(analysis, args)
                       + [f"--seed {args.seed}", f"--out {args.out}"])
    write_bytes_atomic(out / "section.md", (md + f"\n\nCommand: `{command}`\n").encode())
    console.print(md)
    console.print(f"\nwritten to {out}/ (CSV, PNG/SVG, result.json, section.md)")
    return 0


def _own_options(analysis, args) -> list[str]:
    """The analysis's own options as they were given (unless at their defaults), for the recorded command."""
    words = []
    for f, flag, dest in option_flags(analysis):
        value = getattr(args, dest, None)
        if flag in SHARED_FLAGS or value is None or value is False or value == f.default:
            continue
        for v in value if isinstance(value, list) else [value]:  # action="append" options repeat
            words.append(flag if v is True else f"{flag} {v}")
    return words


# ------------------------------------------------------------------------------------------
# parser
def configure_analyze(p: argparse.ArgumentParser) -> None:
    from tsbd.analysis.paper import DEFAULT_M, DEFAULT_N  # lazy: the analyses load torch

    found = analyses()
    listing = "\n".join(f"  {a.name:<18} {a.help}" for a in found.values())
    p.description = f"{__doc__}\nanalyses:\n{listing}"
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("name", choices=list(found), help="which analysis")
    p.add_argument("model", help="attacked model folder (from `tsbd attack` or a `tsbd bench` attack cell)")
    common.add_data_root(p)
    p.add_argument("--clean-ratio", type=float, default=0.05, help="defender's clean fraction (default: 0.05, paper)")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="TSBD option (unlearning lr, threshold, ratios, fine-tuning; see `tsbd list`)")
    p.add_argument("--values", default=None,
                   help=f"sweep values, comma-separated (default: n {DEFAULT_N}; m {DEFAULT_M}, the paper's ranges); "
                        "tac: the neuron ratios (default: as n)")
    p.add_argument("--no-finetune", action="store_true", help="sweeps: evaluate after zero reinit only (fast)")
    p.add_argument("--out", required=True, help="output folder (CSV, PNG/SVG, result.json, section.md): new, "
                                                "empty, or an earlier analysis's with --overwrite")
    common.add_overwrite_arg(p, "an earlier analysis's files")
    common.add_setup_args(p)
    seen = {*SHARED_FLAGS, "--out", "--overwrite", "--opt", "--clean-ratio", "--dataset", "--attack", "--attack-opt"}
    for a in found.values():
        for f, flag, dest in option_flags(a):
            if flag in seen:
                continue  # two analyses may share an option; declare it once
            seen.add(flag)
            p.add_argument(flag, dest=dest, default=None, help=f"{a.name}: {f.metadata['help']}",
                           **f.metadata["cli"]["argparse"])
    common.add_runtime_args(p)
    p.set_defaults(func=cmd_analyze)


COMMANDS = [common.Command("analyze", "the paper's observations and TSBD sweeps on a saved attacked model",
                           configure_analyze)]
