"""``tsbd show-attack``: an attack's poisoned test images beside the clean ones, and the residual.

For each attack: prepare its resources exactly as training would (cached, so a resource built by
``tsbd attack`` or ``tsbd bench`` is reused), poison a seeded choice of non-target test images
and draw three rows -- clean, poisoned, and the residual |poisoned - clean| stretched to the
figure's range (its true scale is printed beside it) -- into ``OUT/NAME.png`` and ``.svg``.
The residual statistics (mean L-inf, L2 and PSNR over every poisoned test image) are returned
and printed, so the stealth of triggers can be compared across attacks.
"""  # also the description of `tsbd show-attack --help`; drawn by tsbd.attacks.show

from __future__ import annotations

import argparse
import dataclasses

from tsbd.cli import common
from tsbd.config import options_given_by
from tsbd.errors import TsbdError


# ------------------------------------------------------------------------------------------
# command (its imports are lazy: they keep `tsbd --help` fast and free of torch)
def cmd_show_attack(args) -> int:
    from tsbd.artifacts import check_output_folder
    from tsbd.attacks import ATTACKS, build_attack
    from tsbd.attacks.show import FORMATS, show_attack
    from tsbd.data import load_dataset

    names = ATTACKS.names() if args.attack == "all" else [a.strip() for a in args.attack.split(",") if a.strip()]
    unknown = [n for n in names if n not in ATTACKS.names()]
    if unknown:
        raise TsbdError(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS.names())} or all")
    # the folder may hold other attacks' pictures; these attacks' are replaced only with --overwrite
    check_output_folder(args.out, [f"{n}.{ext}" for n in names for ext in FORMATS], overwrite=args.overwrite,
                        shared=True)
    opts = common.parse_opts(args.attack_opt, "attack")
    attacks = []
    with options_given_by(("--attack-opt", opts)):  # every attack's options checked before any work
        for name in names:
            fields = {f.name for f in dataclasses.fields(ATTACKS.get(name).config_class)}
            attacks.append(build_attack(name, {k: v for k, v in opts.items() if k in fields}))
    console = common.console(args)
    runtime = common.runtime(args)
    dataset = load_dataset(args.dataset, root=args.data_root, cache_dir=args.cache_dir)
    results = []
    for name, attack in zip(names, attacks):
        res = show_attack(attack, dataset, runtime, out=args.out, images=args.images, seed=args.seed, arch=args.model,
                          cache_dir=args.cache_dir, progress=not args.quiet)
        results.append(res)
        r = res["residual"]
        console.print(f"{name}: {res['png']}  (L-inf {r['linf'] * 255:.1f}/255, L2 {r['l2']:.2f}, "
                      f"PSNR {r['psnr_db']:.1f} dB)")
    if args.json:
        common.emit_json({"attacks": results})
    return 0


# ------------------------------------------------------------------------------------------
# parser
def configure_show_attack(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.add_argument("--attack", default="badnets",
                   help="attack name, comma-separated names, or 'all' (default: badnets)")
    p.add_argument("--dataset", default="demo", help="dataset (default: demo, the embedded CIFAR-10 subset)")
    common.add_data_root(p)
    p.add_argument("--model", default="airbench",
                   help="victim architecture, for attacks whose trigger depends on a model (LF, Trojan, "
                        "Input-aware; default: airbench)")
    p.add_argument("--attack-opt", action="append", metavar="KEY=VALUE",
                   help="attack option, applied to every named attack that has it (repeatable)")
    p.add_argument("--images", type=int, default=8, help="test images shown (default: 8)")
    p.add_argument("--out", default="runs/show-attack",
                   help="folder for NAME.png / NAME.svg (default: runs/show-attack)")
    common.add_overwrite_arg(p, "NAME.png / NAME.svg")
    p.add_argument("--json", action="store_true", help="print the residual statistics as one JSON object")
    common.add_runtime_args(p)
    p.set_defaults(func=cmd_show_attack)


COMMANDS = [common.Command("show-attack", "picture of an attack's poisoned images beside clean ones",
                           configure_show_attack)]
