"""TSBD's stage 2 as the authors run it, switch by switch, from one reinitialized model.

The authors' fine-tuning (linweiii/TSBD @ 3718c67, ``tsbd.py`` ``train_finetuning_reg`` and the
loop that calls it) differs from a plain reading of the paper in four ways. This benchmark
measures each one separately. Per (attack, seed) it trains the attacked model (cached under
--work), runs stage 1 once (clean unlearning, NWC, zero reinit), records ACC/ASR of the
reinitialized model with its stale BatchNorm statistics and with statistics recomputed on the
clean set, and then fine-tunes copies of that one reinitialized model with these stage-2 variants:

* ``authors``: all four as in the authors' code -- the two gradient passes leave the BN running
  statistics untouched, one train-mode forward after the step updates them, 21 epochs, clean
  set in dataset order (tsbd's defaults);
* ``authors-passes-update-bn``, ``authors-no-post-step-bn``, ``authors-20-epochs``,
  ``authors-shuffled``: the authors' stage 2 with one switch turned to the other value;
* ``live``: all four switched (both passes update the statistics, no post-step forward, 20
  epochs, shuffled) -- tsbd's stage 2 before it followed the authors' code;
* ``vanilla``: the authors' loop with plain cross-entropy steps instead of Aa-FT (the paper's
  Table 4 ablation);
* ``global-norm``: g1 divided by the norm of the whole gradient (paper Eq. 5) instead of each
  tensor's own norm (authors' code);
* ``authors-lr-x8``: labelled variant, fine-tuning lr 0.08 instead of 0.01 (airbench scales its
  logits by 1/8, so every gradient is 8x smaller; stage 1's lr is rescaled the same way with
  ``--tsbd-opt unlearn_lr=8e-4``).

``--attacked DIR`` takes an attacked model written by ``tsbd attack`` or a grid (its
``artifacts/ID`` folder) instead of training one: the data set, attack and seed come from its
meta.json, and ``--attacks``, ``--dataset``, ``--model`` and ``--epochs`` are ignored.

A rerun with the same --out skips the (attack, seed) rows already in it.

    python benchmarks/stage2_switches.py --data-root DATA_ROOT \
        --trigger-dir DATA_ROOT/backdoorbench-triggers --dataset demo --epochs 12 \
        --attacks lf,trojan,blended,badnets --seeds 0,1,2 --tsbd-opt unlearn_lr=8e-4 \
        --out benchmarks/results/stage2_switches.json

    python benchmarks/stage2_switches.py --data-root DATA_ROOT --trigger-dir DATA_ROOT/backdoorbench-triggers \
        --attacked RESULTS/artifacts/ID --seeds 0 --variants authors,vanilla,global-norm \
        --out benchmarks/results/stage2_r18_lf.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

from tsbd.artifacts import load_model, provenance, save_model, write_json_atomic
from tsbd.attacks import build_attack
from tsbd.attacks.resources import backdoorbench_trigger_options
from tsbd.bench.grid import parse_set
from tsbd.config import override, to_dict
from tsbd.data import load_dataset
from tsbd.defenses.tsbd import TSBDConfig, activeness_aware_finetune, clean_unlearn, zero_reinit
from tsbd.errors import TsbdError
from tsbd.metrics import der, evaluate
from tsbd.models.surgery import bn_recomputed_copy, subweight_change
from tsbd.pipeline import load_setup_from_meta, setup_attack, train_attacked_model, train_config
from tsbd.train.runtime import Runtime

AUTHORS = {"passes_update_bn": False, "post_step_bn": True, "finetune_epochs": 21, "finetune_shuffle": False}
# the models every row measures besides the variants: the attacked model as trained and with its BN
# statistics recomputed on the clean set (the control for the recompute: clean, unaugmented images
# give other statistics than the poisoned, augmented training set), and the reinit both ways
FIXED_ROWS = ("no_defense", "no_defense_bn_recomputed", "after_reinit", "after_reinit_bn_recomputed")
VARIANTS = {
    "authors": {},
    "authors-passes-update-bn": {"passes_update_bn": True},
    "authors-no-post-step-bn": {"post_step_bn": False},
    "authors-20-epochs": {"finetune_epochs": 20},
    "authors-shuffled": {"finetune_shuffle": True},
    "live": {"passes_update_bn": True, "post_step_bn": False, "finetune_epochs": 20, "finetune_shuffle": True},
    "authors-lr-x8": {"finetune_lr": 0.08},
    "vanilla": {"finetune_mode": "vanilla"},
    "global-norm": {"perturbation_norm": "global"},
}


def summarize(rows: dict) -> dict:
    """Mean and population std over seeds of each variant's ASR and ACC, per attack."""
    out: dict = {}
    for key, row in rows.items():
        attack = key.rsplit("-s", 1)[0]
        for name, rec in row["variants"].items():
            out.setdefault(attack, {}).setdefault(name, {"asr": [], "acc": []})
            out[attack][name]["asr"].append(rec["metrics"]["asr"])
            out[attack][name]["acc"].append(rec["metrics"]["acc"])
        for name in FIXED_ROWS:
            if name not in row:  # rows written before the control was recorded
                continue
            out[attack].setdefault(name, {"asr": [], "acc": []})
            out[attack][name]["asr"].append(row[name]["asr"])
            out[attack][name]["acc"].append(row[name]["acc"])
    return {a: {n: {m: {"mean": statistics.fmean(v), "std": statistics.pstdev(v), "n": len(v)} for m, v in d.items()}
                for n, d in by.items()} for a, by in out.items()}


def markdown(doc: dict) -> str:
    """The summary as a Markdown table: ASR / ACC (mean +- std over seeds, %) per attack and variant."""
    summary = doc.get("summary", {})
    names = [*FIXED_ROWS, *doc.get("variants", {})]
    lines = ["| variant | " + " | ".join(f"{a} ASR | {a} ACC" for a in summary) + " |",
             "|---|" + "---:|---:|" * len(summary)]
    for name in names:
        cells = []
        for attack in summary:
            s = summary[attack].get(name)
            cells += ([f"{100 * s[m]['mean']:.2f} ± {100 * s[m]['std']:.2f}" for m in ("asr", "acc")] if s
                      else ["-", "-"])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    seeds = {a: next(iter(v.values()))["asr"]["n"] for a, v in summary.items() if v}
    return "\n".join(lines) + f"\n\nSeeds per attack: {seeds}.\n"


def attacked(ds, attack, seed: int, rt: Runtime, args) -> tuple:
    """The attacked model for (attack, seed), trained once and cached under --work (resumable)."""
    setup = setup_attack(ds, attack, seed, rt, arch=args.model)
    folder = Path(args.work) / f"{args.dataset}-{attack.name}-{args.model}-e{args.epochs}-s{seed}"
    if folder.exists():
        return (setup, *load_model(folder, rt.device))
    ckpt = folder.with_name(folder.name + ".resume.pt")
    model, meta = train_attacked_model(setup, args.model, train_config("cpu", {"epochs": args.epochs}), rt,
                                       checkpoint=ckpt)
    save_model(folder, model, meta)
    ckpt.unlink(missing_ok=True)
    return setup, model, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--trigger-dir", default=None,
                    help="BackdoorBench's resource files (trigger_image.png, ...); needed unless --attacked")
    ap.add_argument("--dataset", default="demo")
    ap.add_argument("--model", default="airbench")
    ap.add_argument("--epochs", type=int, default=12, help="attack training epochs (cpu preset)")
    ap.add_argument("--attacks", default="lf,trojan,blended,badnets")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--clean-ratio", type=float, default=0.05)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tsbd-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="TSBD option for every variant, e.g. unlearn_lr=8e-4 for airbench")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default="runs/stage2_switches")
    ap.add_argument("--attacked", default=None, metavar="DIR",
                    help="an attacked model folder (tsbd attack / a grid's artifacts/ID) to use instead of training")
    ap.add_argument("--out", required=True)
    ap.add_argument("--markdown", action="store_true", help="print the summary of --out as a Markdown table and stop")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.out).read_text())))
        return
    if not args.attacked and not args.trigger_dir:
        ap.error("--trigger-dir is needed to train attacked models (or give one with --attacked DIR)")
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    rt = Runtime.create("cpu", args.precision, args.threads)
    try:  # a bad folder, data root or option: tsbd's one-line error, not a traceback
        given = load_model(args.attacked, rt.device) if args.attacked else None
        given_setup = load_setup_from_meta(given[1], rt, data_root=args.data_root) if given else None
        ds = given_setup.dataset if given else load_dataset(args.dataset, root=args.data_root)
        base = override(TSBDConfig(), {**AUTHORS, **parse_set(args.tsbd_opt)})
    except TsbdError as err:
        ap.error(str(err))
    prev = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    out = {"command": "python benchmarks/stage2_switches.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
               if v not in (None, [], False) and k != "tsbd_opt")
           + "".join(f" --tsbd-opt {o}" for o in args.tsbd_opt),
           "machine": {**rt.describe(), "cpu": platform.processor() or platform.machine()},
           "dataset": ds.describe(), "provenance": provenance(), "base_config": to_dict(base),
           "variants": {v: VARIANTS[v] for v in args.variants.split(",")}, "rows": dict(prev.get("rows", {}))}
    trig = backdoorbench_trigger_options(args.trigger_dir) if args.trigger_dir else {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in ([given[1]["attack"]["name"]] if given else args.attacks.split(",")):
            key = f"{name}-s{seed}"
            if key in out["rows"]:
                print(key, "already in", args.out, "- skipped", flush=True)
                continue
            t0 = time.perf_counter()
            if given:  # one model: the seed varies the defense only (batch order, augmentation)
                (model, meta), setup = given, given_setup
            else:
                setup, model, meta = attacked(ds, build_attack(name, trig.get(name, {})), seed, rt, args)
            before = meta["metrics"]
            clean, clean_info = setup.clean_set(args.clean_ratio)
            unlearned, ul_info = clean_unlearn(model, clean, base, rt, seed=seed)
            reinit, ri_info = zero_reinit(model, subweight_change(model, unlearned), base.neuron_ratio,
                                          base.weight_ratio, base.reinit_scheme)
            stale = evaluate(reinit, ds.test, setup.poisoned_test, rt)
            fresh = bn_recomputed_copy(reinit, clean.x, rt, batch_size=base.batch_size)
            control = bn_recomputed_copy(model, clean.x, rt, batch_size=base.batch_size)
            row = {"no_defense": before, "after_reinit": stale,
                   "no_defense_bn_recomputed": evaluate(model if control is None else control, ds.test,
                                                        setup.poisoned_test, rt),
                   "after_reinit_bn_recomputed": evaluate(reinit if fresh is None else fresh, ds.test,
                                                          setup.poisoned_test, rt),
                   "unlearn": {k: ul_info[k] for k in ("epochs", "reached_threshold")},
                   "reinit": {k: ri_info[k] for k in ("neurons_selected", "subweights_zeroed")},
                   "clean": clean_info, "variants": {}}
            for variant in args.variants.split(","):
                cfg = override(base, VARIANTS[variant])
                tuned = copy.deepcopy(reinit)
                t1 = time.perf_counter()
                ft = activeness_aware_finetune(tuned, clean, cfg, rt, seed=seed)
                m = evaluate(tuned, ds.test, setup.poisoned_test, rt)
                m["der"] = der(before["acc"], before["asr"], m["acc"], m["asr"])
                row["variants"][variant] = {"metrics": m, "final_loss": ft.get("final_loss"),
                                            "seconds": time.perf_counter() - t1}
                print(key, variant, {k: round(v * 100, 2) for k, v in m.items()}, flush=True)
            row["seconds"] = time.perf_counter() - t0
            print(key, "no defense", before, "reinit stale", stale, "recomputed", row["after_reinit_bn_recomputed"],
                  flush=True)
            out["rows"][key] = row
            out["summary"] = summarize(out["rows"])
            write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
