"""Markdown table of defense results written by ``benchmarks/cifar10_tsbd.py``.

Merges any number of its JSON files (later files add variants, never overwrite earlier ones) and
prints, per attack: the no-defense row, then each variant's ACC / ASR / RA / DER, wall time and
its own diagnostic (what it pruned, flagged or unlearned), read from the recorded ``info``.

    python benchmarks/defense_table.py benchmarks/results/cifar10_tsbd.json benchmarks/results/cifar10_defenses.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAMES = {"per-tensor": "TSBD (per-tensor norm, authors' code)", "global": "TSBD (global norm, paper Eq. 5)",
         "vanilla-ft": "vanilla 20-epoch FT (TSBD's stage-2 optimizer)", "ft": "FT", "fp": "FP", "nad": "NAD",
         "nc": "NC", "anp": "ANP", "clp": "CLP", "ibau": "i-BAU", "rnp": "RNP"}


def diagnostic(variant: str, info: dict) -> str:
    """One short line of what the defense did, from its recorded info."""
    if variant in ("per-tensor", "global"):
        u, r = info.get("unlearn", {}), info.get("reinit", {})
        return (f"unlearning {u.get('epochs')} epochs; {r.get('neurons_selected')}/{r.get('neurons_total')} neurons, "
                f"{r.get('subweights_zeroed')} subweights zeroed")
    if variant in ("ft", "vanilla-ft"):
        return f"{info.get('finetune', {}).get('epochs')} epochs"
    if variant == "fp":
        return (f"{info.get('pruned')}/{info.get('channels')} last-layer channels pruned "
                f"(held-out acc {info.get('holdout_acc_kept', float('nan')):.3f})") \
            if "holdout_acc_kept" in info else f"{info.get('pruned')}/{info.get('channels')} last-layer channels pruned"
    if variant == "nad":
        return (f"teacher clean-set acc {info.get('teacher_clean_acc', float('nan')):.3f}; "
                f"layers {', '.join(info.get('layers', []))}")
    if variant == "clp":
        return f"{info.get('pruned')}/{info.get('channels')} BN channels pruned (u = 3)"
    if variant == "anp":
        return f"{info.get('pruned_total')}/{info.get('mask_stats', {}).get('channels')} BN channels pruned " \
               f"at mask threshold {info.get('threshold')} (chosen on held-out clean data)"
    if variant == "rnp":
        return f"{info.get('pruned_total')}/{info.get('mask_stats', {}).get('channels')} BN channels pruned at mask " \
               f"threshold {info.get('threshold')}; unlearning {info.get('unlearn', {}).get('epochs')} epochs"
    if variant == "nc":
        index = info.get("anomaly_index", [])
        flagged = info.get("flagged", [])
        ranked = sorted(range(len(index)), key=lambda k: -index[k])[:2]
        return (f"flagged classes {flagged or 'none'}; anomaly index "
                + ", ".join(f"class {k}: {index[k]:.2f}" for k in ranked) + " (largest two)")
    if variant == "ibau":
        return f"{len(info.get('rounds', []))} rounds" if isinstance(info.get("rounds"), list) else ""
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    args = ap.parse_args()
    attacks: dict[str, dict] = {}
    for file in args.results:
        data = json.loads(Path(file).read_text())
        for attack, row in data["attacks"].items():
            merged = attacks.setdefault(attack, {"no_defense": row["no_defense"], "defenses": {}})
            for variant, rec in row["defenses"].items():
                merged["defenses"].setdefault(variant, rec)
    print("| attack | defense | ACC % | ASR % | RA % | DER % | wall s | what it did |")
    print("|---|---|---|---|---|---|---|---|")
    for attack, row in attacks.items():
        m = row["no_defense"]
        print(f"| {attack} | no defense | {m['acc'] * 100:.2f} | {m['asr'] * 100:.2f} | {m['ra'] * 100:.2f} "
              f"| - | - | |")
        for variant, rec in row["defenses"].items():
            m = rec["metrics"]
            print(f"| {attack} | {NAMES.get(variant, variant)} | {m['acc'] * 100:.2f} | {m['asr'] * 100:.2f} | "
                  f"{m['ra'] * 100:.2f} | {m['der'] * 100:.2f} | {rec['timings'].get('total', 0):.1f} | "
                  f"{diagnostic(variant, rec.get('info', {}))} |")


if __name__ == "__main__":
    main()
