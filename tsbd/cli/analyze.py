"""``tsbd analyze NAME MODEL``: the paper's observations and sweeps on a saved attacked model.

Each analysis rebuilds the model's dataset and attack from its ``meta.json`` (checking the data
fingerprint), draws the defender's clean set as ``tsbd defend`` does, and writes into ``--out``:
the numbers as CSV, a figure as PNG and SVG, ``result.json`` (with seed, config, versions and
data fingerprint) and ``section.md``, a Markdown section for the docs or a report.

Each analysis is registered (:mod:`tsbd.analysis.registry`) by the module that defines it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tsbd.cli import common


# ------------------------------------------------------------------------------------------
# command (its imports are lazy: they keep `tsbd --help` fast and free of torch)
def analyses() -> dict:
    """Every analysis by name, in the order ``tsbd analyze --help`` lists them: the paper's
    observations and sweeps, then the neuron-ranking studies, then the ablations. Importing a
    module registers its analyses."""
    from tsbd.analysis import ablations, neurons, paper
    from tsbd.analysis.registry import ANALYSES

    order = [paper.__name__, neurons.__name__, ablations.__name__]
    return dict(sorted(ANALYSES.items(), key=lambda kv: order.index(kv[1].run.__module__)
                       if kv[1].run.__module__ in order else len(order)))


def cmd_analyze(args) -> int:
    from tsbd.analysis.registry import AnalysisContext
    from tsbd.artifacts import load_model, provenance, write_bytes_atomic, write_json_atomic
    from tsbd.config import to_dict
    from tsbd.pipeline import load_setup_from_meta

    cfg = common.defense_options("tsbd", None, args.opt)[1].config  # a bad option: fail before loading anything
    console = common.console(args)
    runtime = common.runtime(args)
    model, meta = load_model(args.model, runtime.device)
    if meta.get("kind") not in (None, "attacked"):
        console.print(f"[yellow]note[/]: {args.model} is a {meta.get('kind')} model; analyses expect an attacked one")
    setup = load_setup_from_meta(meta, runtime, data_root=args.data_root, cache_dir=args.cache_dir,
                                 progress=not args.quiet)
    clean, clean_info = setup.clean_set(args.clean_ratio)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    progress = not args.quiet
    ctx = AnalysisContext(model=model, setup=setup, clean=clean, cfg=cfg, runtime=runtime, out=out, seed=args.seed,
                          progress=progress, meta=meta, args=args, cache_dir=args.cache_dir)
    result, md = analyses()[args.name].run(ctx)
    record = {"analysis": args.name, "model": str(args.model), "attack": meta.get("attack"),
              "dataset": meta.get("dataset"), "clean": clean_info, "tsbd_config": to_dict(cfg), "seed": args.seed,
              "runtime": runtime.describe(), "seconds": time.perf_counter() - t0, "provenance": provenance(),
              "result": result}
    write_json_atomic(out / "result.json", record)
    command = " ".join(["tsbd analyze", args.name, str(args.model), f"--clean-ratio {args.clean_ratio:g}"]
                       + [f"--opt {o}" for o in args.opt or []]
                       + ([f"--values {args.values}"] if args.values else [])
                       + (["--no-finetune"] if args.no_finetune else []) + _own_options(args)
                       + [f"--seed {args.seed}", f"--out {args.out}"])
    write_bytes_atomic(out / "section.md", (md + f"\n\nCommand: `{command}`\n").encode())
    console.print(md)
    console.print(f"\nwritten to {out}/ (CSV, PNG/SVG, result.json, section.md)")
    return 0


def _own_options(args) -> list[str]:
    """The analysis's own options as they were given, for the recorded command."""
    words = []
    for flags, kw in analyses()[args.name].options:
        dest = kw.get("dest") or flags[0].lstrip("-").replace("-", "_")
        value = getattr(args, dest, None)
        if value is None or value is False or value == kw.get("default"):
            continue
        for v in value if isinstance(value, list) else [value]:  # action="append" options repeat
            words.append(flags[0] if v is True else f"{flags[0]} {v}")
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
    p.add_argument("--out", required=True, help="output folder (CSV, PNG/SVG, result.json, section.md)")
    seen = {"--values", "--no-finetune", "--out", "--opt", "--clean-ratio"}
    for a in found.values():
        for flags, kw in a.options:
            if flags[0] in seen:
                continue  # two analyses may share an option; declare it once
            seen.add(flags[0])
            p.add_argument(*flags, **{**kw, "help": f"{a.name}: {kw.get('help', '')}"})
    common.add_runtime_args(p)
    p.set_defaults(func=cmd_analyze)


COMMANDS = [common.Command("analyze", "the paper's observations and TSBD sweeps on a saved attacked model",
                           configure_analyze)]
