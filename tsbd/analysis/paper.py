"""The paper's analyses that ``tsbd analyze`` runs on a saved attacked model: observation 1 (NWC of
clean vs poison unlearning), observation 2 (gradient norms under clean unlearning, backdoored vs
clean model) and the TSBD sweeps over the neuron ratio n and the weight ratio m. Each is registered
with :func:`tsbd.analysis.registry.analysis` and writes its CSV and figures into the context's folder."""

from __future__ import annotations

import torch

from tsbd.analysis.observations import attacker_poison_set, gradient_norms_during_unlearning, nwc_comparison
from tsbd.analysis.registry import AnalysisContext, analysis, write_csv
from tsbd.analysis.sweeps import largest_ratio_within_acc, ratio_sweep
from tsbd.artifacts import pyplot, save_figure
from tsbd.errors import TsbdError

DEFAULT_N = "0.01,0.05,0.1,0.15,0.2,0.3,0.5,0.7,0.9"  # paper Fig. 5: 1% to 90%
DEFAULT_M = "0.4,0.5,0.6,0.7,0.8"  # paper Fig. 5: 40% to 80%


# ------------------------------------------------------------------------------------------
@analysis("observation1", "NWC of clean vs poison unlearning: Pearson correlation per layer and overall")
def run_observation1(ctx: AnalysisContext) -> tuple[dict, str]:
    model, setup, clean, cfg, runtime, out = ctx.model, ctx.setup, ctx.clean, ctx.cfg, ctx.runtime, ctx.out
    seed, progress = ctx.seed, ctx.progress
    poisoned = attacker_poison_set(setup, len(clean), seed)
    comp = nwc_comparison(model, clean, poisoned, cfg, runtime, seed=seed, progress=progress)
    per_layer = comp.per_layer_correlation()
    overall = comp.overall_correlation()
    overlap = comp.top_overlap(cfg.neuron_ratio)
    write_csv(out / "nwc.csv", comp.rows())
    write_csv(out / "correlation.csv", [{"layer": k, "pearson": v} for k, v in per_layer.items()]
               + [{"layer": "all", "pearson": overall}])
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in comp.clean:
        ax1.scatter(comp.clean[name].numpy(), comp.poison[name].numpy(), s=6, alpha=0.6, label=name)
    ax1.set_xlabel("NWC, clean unlearning")
    ax1.set_ylabel("NWC, poison unlearning")
    ax1.set_title(f"{setup.attack.name}: Pearson {overall:.3f} over all neurons", fontsize=9)
    ax1.legend(fontsize=6, frameon=False, markerscale=2)
    names = list(per_layer)
    ax2.bar(range(len(names)), [per_layer[n] for n in names])
    ax2.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
    ax2.set_ylabel("Pearson correlation")
    ax2.set_ylim(min(0.0, min(per_layer.values(), default=0)) - 0.05, 1.0)
    ax2.set_title("per layer", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "observation1")
    plt.close(fig)
    result = {"pearson_overall": overall, "pearson_per_layer": per_layer,
              f"top_{cfg.neuron_ratio:g}_overlap": overlap, "clean_unlearning": comp.clean_info,
              "poison_unlearning": comp.poison_info, "poison_images": len(poisoned)}
    md = [f"### Observation 1 ({setup.attack.name})", "",
          f"Clean unlearning stopped after {comp.clean_info['epochs']} epochs (clean acc "
          f"{comp.clean_info['clean_acc_per_epoch'][-1]:.3f}); poison unlearning on {len(poisoned)} poisoned "
          f"training images after {comp.poison_info['epochs']} epochs (ASR on them "
          f"{comp.poison_info['clean_acc_per_epoch'][-1]:.3f}).", "",
          f"Pearson correlation of the two NWC vectors over all {sum(len(v) for v in comp.clean.values())} neurons: "
          f"**{overall:.3f}**; the top {cfg.neuron_ratio:.0%} neurons by clean NWC share {overlap:.0%} with the "
          f"top {cfg.neuron_ratio:.0%} by poison NWC.", "", "| layer | Pearson |", "|---|---|"]
    md += [f"| {k} | {v:.3f} |" for k, v in per_layer.items()]
    md += ["", "![observation 1](observation1.png)"]
    return result, "\n".join(md)


@analysis("observation2", "gradient norm per neuron in one epoch of clean unlearning, backdoored vs clean model")
def run_observation2(ctx: AnalysisContext) -> tuple[dict, str]:
    model, setup, clean, cfg, runtime, out = ctx.model, ctx.setup, ctx.clean, ctx.cfg, ctx.runtime, ctx.out
    seed, progress = ctx.seed, ctx.progress
    clean_model, clean_meta = ctx.clean_reference_model()
    bd = gradient_norms_during_unlearning(model, clean, cfg.unlearn_lr, runtime, batch_size=cfg.batch_size,
                                          seed=seed, progress=progress)
    cl = gradient_norms_during_unlearning(clean_model, clean, cfg.unlearn_lr, runtime, batch_size=cfg.batch_size,
                                          seed=seed, progress=progress)
    rows = [{"layer": n, "neuron": k, "grad_norm_backdoored": float(bd[n][k]), "grad_norm_clean": float(cl[n][k])}
            for n in bd for k in range(len(bd[n]))]
    write_csv(out / "grad_norms.csv", rows)
    per_layer = {n: {"backdoored": float(bd[n].mean()), "clean": float(cl[n].mean())} for n in bd}
    all_bd, all_cl = torch.cat(list(bd.values())), torch.cat(list(cl.values()))
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(per_layer)
    xs = torch.arange(len(names)).float()
    ax1.bar(xs - 0.2, [per_layer[n]["backdoored"] for n in names], 0.4, label="backdoored")
    ax1.bar(xs + 0.2, [per_layer[n]["clean"] for n in names], 0.4, label="clean")
    ax1.set_xticks(xs.tolist(), names, rotation=60, ha="right", fontsize=6)
    ax1.set_ylabel("mean gradient norm per neuron")
    ax1.legend(fontsize=7, frameon=False)
    ax2.hist([all_bd.numpy(), all_cl.numpy()], bins=40, label=["backdoored", "clean"], alpha=0.7)
    ax2.set_xlabel("gradient norm per neuron (one epoch of clean unlearning)")
    ax2.legend(fontsize=7, frameon=False)
    fig.suptitle(f"{setup.attack.name}: backdoored / clean mean = {float(all_bd.mean() / all_cl.mean()):.2f}",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "observation2")
    plt.close(fig)
    ratio = float(all_bd.mean() / all_cl.mean())
    higher = sum(per_layer[n]["backdoored"] > per_layer[n]["clean"] for n in names)
    result = {"mean_backdoored": float(all_bd.mean()), "mean_clean": float(all_cl.mean()), "ratio": ratio,
              "layers_higher_in_backdoored": higher, "layers": len(names), "per_layer": per_layer,
              "clean_model_metrics": clean_meta.get("metrics")}
    md = [f"### Observation 2 ({setup.attack.name})", "",
          f"Mean gradient norm per neuron over one epoch of clean unlearning (lr {cfg.unlearn_lr:g}): backdoored "
          f"{float(all_bd.mean()):.4g}, clean model {float(all_cl.mean()):.4g} (ratio **{ratio:.2f}**); higher in the "
          f"backdoored model in {higher} of {len(names)} layers. Clean model: ACC "
          f"{clean_meta.get('metrics', {}).get('acc', float('nan')):.2%}.", "",
          "| layer | backdoored | clean |", "|---|---|---|"]
    md += [f"| {n} | {v['backdoored']:.4g} | {v['clean']:.4g} |" for n, v in per_layer.items()]
    md += ["", "![observation 2](observation2.png)"]
    return result, "\n".join(md)


@analysis("sweep-n", "TSBD over neuron ratios n (after reinit and after fine-tuning)",
          options=[(("--max-acc-drop",), {"type": float, "default": 2.0,
                                          "help": "the suggested n is the largest whose ACC after TSBD stays within "
                                                  "this many points of the backdoored model's (default: 2)"})])
def run_sweep_n(ctx: AnalysisContext) -> tuple[dict, str]:
    return run_sweep(ctx, "neuron_ratio", ctx.values(DEFAULT_N))


@analysis("sweep-m", "TSBD over weight ratios m")
def run_sweep_m(ctx: AnalysisContext) -> tuple[dict, str]:
    return run_sweep(ctx, "weight_ratio", ctx.values(DEFAULT_M))


def run_sweep(ctx: AnalysisContext, parameter: str, values: list[float]) -> tuple[dict, str]:
    model, setup, clean, cfg, runtime, out = ctx.model, ctx.setup, ctx.clean, ctx.cfg, ctx.runtime, ctx.out
    seed, progress, finetune = ctx.seed, ctx.progress, not ctx.args.no_finetune
    res = ratio_sweep(model, clean, cfg, runtime, ctx.evaluate, parameter=parameter, values=values,
                      finetune=finetune, seed=seed, progress=progress)
    rows = res["rows"]
    short = "n" if parameter == "neuron_ratio" else "m"
    write_csv(out / f"sweep_{short}.csv", rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r[parameter] * 100 for r in rows]
    ax.plot(xs, [r["reinit_acc"] * 100 for r in rows], "o--", color="C0", label="ACC after reinit")
    ax.plot(xs, [r["reinit_asr"] * 100 for r in rows], "s--", color="C3", label="ASR after reinit")
    if finetune:
        ax.plot(xs, [r["acc"] * 100 for r in rows], "o-", color="C0", label="ACC after TSBD")
        ax.plot(xs, [r["asr"] * 100 for r in rows], "s-", color="C3", label="ASR after TSBD")
    ax.axvline(res["default"] * 100, color="grey", lw=0.8, ls=":", label=f"paper default {res['default']:.0%}")
    ax.set_xlabel(f"{parameter.replace('_', ' ')} {short} (%)")
    ax.set_ylabel("%")
    ax.set_title(f"{setup.attack.name}: TSBD over {short}", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    save_figure(fig, out / f"sweep_{short}")
    plt.close(fig)
    key = "asr" if finetune else "reinit_asr"
    acc_key = "acc" if finetune else "reinit_acc"
    best = min(rows, key=lambda r: (r[key], -r[acc_key]))
    md = [f"### TSBD over {parameter.replace('_', ' ')} ({setup.attack.name})", "",
          f"Clean unlearning once ({res['unlearn']['epochs']} epochs), then for each {short}: zero reinit "
          + ("and activeness-aware fine-tuning." if finetune else "only (no fine-tuning)."), "",
          f"| {short} | neurons | subweights zeroed | ACC after reinit | ASR after reinit |"
          + (" ACC | ASR | RA |" if finetune else ""),
          "|---|---|---|---|---|" + ("---|---|---|" if finetune else "")]
    for r in rows:
        line = (f"| {r[parameter]:g} | {r['neurons_selected']} | {r['subweights_zeroed']} | {r['reinit_acc']:.2%} | "
                f"{r['reinit_asr']:.2%} |")
        if finetune:
            line += f" {r['acc']:.2%} | {r['asr']:.2%} | {r['ra']:.2%} |"
        md.append(line)
    md += ["", f"Paper default {short} = {res['default']:g}; on this model the lowest ASR comes at {short} = "
           f"{best[parameter]:g} ({best[acc_key]:.2%} ACC, {best[key]:.2%} ASR). Choosing {short} by ASR needs "
           "poisoned data a defender does not have; the sweep shows how sensitive the result is."]
    if parameter == "neuron_ratio":
        max_drop = ctx.args.max_acc_drop
        if max_drop is None or max_drop < 0:
            raise TsbdError(f"--max-acc-drop must be >= 0 (ACC points), got {max_drop}")
        acc_before = ctx.evaluate(model)["acc"]
        pick = largest_ratio_within_acc(rows, acc_before, max_drop / 100, acc_key=acc_key)
        at_default = next((r for r in rows if abs(r[parameter] - res["default"]) < 1e-9), None)
        res["suggestion"] = {"max_acc_drop": max_drop, "acc_before": acc_before,
                             "neuron_ratio": pick and pick[parameter]}
        md += ["", "**Choosing n for your model.** ACC / ASR after TSBD by n: "
               + ", ".join(f"{r[parameter]:g}: {r[acc_key]:.2%} / {r[key]:.2%}" for r in rows) + ". "
               + (f"The paper's default n = {res['default']:g} gives {at_default[acc_key]:.2%} ACC and "
                  f"{at_default[key]:.2%} ASR here. " if at_default else
                  f"The paper's default n = {res['default']:g} is not among the values. ")
               + "A defender knows no ASR (it needs the trigger), but can measure ACC on clean data, and more "
               f"neurons reinitialized remove more of the backdoor; so take the largest n whose ACC stays within "
               f"{max_drop:g} points of the backdoored model's ({acc_before:.2%}): "
               + (f"**n = {pick[parameter]:g}** ({pick[acc_key]:.2%} ACC, {pick[key]:.2%} ASR)." if pick else
                  "no n here does; try smaller values or a larger --max-acc-drop.")
               + " ACC here is measured on the test set as a stand-in for a held-out split of the defender's "
               "clean data."]
    md += ["", f"![sweep](sweep_{short}.png)"]
    return res, "\n".join(md)
