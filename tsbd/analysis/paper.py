"""The paper's analyses that ``tsbd analyze`` runs on a saved attacked model: observation 1 (NWC of
clean vs poison unlearning), observation 2 (gradient norms under clean unlearning, backdoored vs
clean model) and the TSBD sweeps over the neuron ratio n and the weight ratio m. Each is a
``measure_*`` function returning the numbers and a ``render_*`` function writing its CSV, figure and
Markdown, registered with :func:`tsbd.analysis.registry.register`."""

from __future__ import annotations

import dataclasses

import torch

from tsbd.analysis.observations import attacker_poison_set, gradient_norms_during_unlearning, nwc_comparison
from tsbd.analysis.registry import (
    AnalysisContext,
    Measurement,
    NoOptions,
    cli_option,
    register,
    values_option,
    write_csv,
)
from tsbd.analysis.sweeps import largest_ratio_within_acc, ratio_sweep
from tsbd.artifacts import pyplot, save_figure
from tsbd.errors import TsbdError

DEFAULT_N = "0.01,0.05,0.1,0.15,0.2,0.3,0.5,0.7,0.9"  # paper Fig. 5: 1% to 90%
DEFAULT_M = "0.4,0.5,0.6,0.7,0.8"  # paper Fig. 5: 40% to 80%


def _finetune_option() -> bool:
    return cli_option(True, "fine-tune after the zero reinit; --no-finetune evaluates after the reinit only (fast)",
                      "paper Fig. 5", flag="--no-finetune", dest="no_finetune", parse=lambda given: not given,
                      action="store_true")


@dataclasses.dataclass(frozen=True)
class SweepNOptions:
    values: tuple[float, ...] = values_option(DEFAULT_N, "neuron ratios n", "paper Fig. 5")
    finetune: bool = _finetune_option()
    max_acc_drop: float = cli_option(2.0, "the suggested n is the largest whose ACC after TSBD (with "
                                          "--no-finetune: after the reinit, BN statistics recomputed) stays within "
                                          "this many points of the backdoored model's (default: 2)", type=float)

    def __post_init__(self):
        if self.max_acc_drop is None or self.max_acc_drop < 0:
            raise TsbdError(f"--max-acc-drop must be >= 0 (ACC points), got {self.max_acc_drop}")


@dataclasses.dataclass(frozen=True)
class SweepMOptions:
    values: tuple[float, ...] = values_option(DEFAULT_M, "weight ratios m", "paper Fig. 5")
    finetune: bool = _finetune_option()


# ------------------------------------------------------------------------------------------
def measure_observation1(ctx: AnalysisContext, options: NoOptions) -> Measurement:
    cfg = ctx.cfg
    poisoned = attacker_poison_set(ctx.setup, len(ctx.clean), ctx.seed)
    comp = nwc_comparison(ctx.model, ctx.clean, poisoned, cfg, ctx.runtime, seed=ctx.seed, progress=ctx.progress)
    per_layer = comp.per_layer_correlation()
    overall = comp.overall_correlation()
    result = {"pearson_overall": overall, "pearson_per_layer": per_layer,
              f"top_{cfg.neuron_ratio:g}_overlap": comp.top_overlap(cfg.neuron_ratio),
              "clean_unlearning": comp.clean_info, "poison_unlearning": comp.poison_info,
              "poison_images": len(poisoned)}
    return Measurement(result, {"comparison": comp})


def render_observation1(ctx: AnalysisContext, options: NoOptions, measured: Measurement, out) -> str:
    comp, result, cfg = measured.records["comparison"], measured.result, ctx.cfg
    per_layer, overall = result["pearson_per_layer"], result["pearson_overall"]
    overlap, poisoned = result[f"top_{cfg.neuron_ratio:g}_overlap"], result["poison_images"]
    write_csv(out / "nwc.csv", comp.rows())
    write_csv(out / "correlation.csv", [{"layer": k, "pearson": v} for k, v in per_layer.items()]
              + [{"layer": "all", "pearson": overall}])
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in comp.clean:
        ax1.scatter(comp.clean[name].numpy(), comp.poison[name].numpy(), s=6, alpha=0.6, label=name)
    ax1.set_xlabel("NWC, clean unlearning")
    ax1.set_ylabel("NWC, poison unlearning")
    ax1.set_title(f"{ctx.setup.attack.name}: Pearson {overall:.3f} over all neurons", fontsize=9)
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
    md = [f"### Observation 1 ({ctx.setup.attack.name})", "",
          f"Clean unlearning stopped after {comp.clean_info['epochs']} epochs (clean acc "
          f"{comp.clean_info['clean_acc_per_epoch'][-1]:.3f}); poison unlearning on {poisoned} poisoned "
          f"training images after {comp.poison_info['epochs']} epochs (ASR on them "
          f"{comp.poison_info['clean_acc_per_epoch'][-1]:.3f}).", "",
          f"Pearson correlation of the two NWC vectors over all {sum(len(v) for v in comp.clean.values())} neurons: "
          f"**{overall:.3f}**; the top {cfg.neuron_ratio:.0%} neurons by clean NWC share {overlap:.0%} with the "
          f"top {cfg.neuron_ratio:.0%} by poison NWC.", "", "| layer | Pearson |", "|---|---|"]
    md += [f"| {k} | {v:.3f} |" for k, v in per_layer.items()]
    md += ["", "![observation 1](observation1.png)"]
    return "\n".join(md)


def measure_observation2(ctx: AnalysisContext, options: NoOptions) -> Measurement:
    cfg = ctx.cfg
    clean_model, clean_meta = ctx.clean_reference_model()
    bd = gradient_norms_during_unlearning(ctx.model, ctx.clean, cfg.unlearn_lr, ctx.runtime,
                                          batch_size=cfg.batch_size, seed=ctx.seed, progress=ctx.progress)
    cl = gradient_norms_during_unlearning(clean_model, ctx.clean, cfg.unlearn_lr, ctx.runtime,
                                          batch_size=cfg.batch_size, seed=ctx.seed, progress=ctx.progress)
    per_layer = {n: {"backdoored": float(bd[n].mean()), "clean": float(cl[n].mean())} for n in bd}
    all_bd, all_cl = torch.cat(list(bd.values())), torch.cat(list(cl.values()))
    higher = sum(v["backdoored"] > v["clean"] for v in per_layer.values())
    result = {"mean_backdoored": float(all_bd.mean()), "mean_clean": float(all_cl.mean()),
              "ratio": float(all_bd.mean() / all_cl.mean()), "layers_higher_in_backdoored": higher,
              "layers": len(per_layer), "per_layer": per_layer, "clean_model_metrics": clean_meta.get("metrics")}
    return Measurement(result, {"backdoored": bd, "clean": cl})


def render_observation2(ctx: AnalysisContext, options: NoOptions, measured: Measurement, out) -> str:
    bd, cl, result = measured.records["backdoored"], measured.records["clean"], measured.result
    per_layer, ratio = result["per_layer"], result["ratio"]
    rows = [{"layer": n, "neuron": k, "grad_norm_backdoored": float(bd[n][k]), "grad_norm_clean": float(cl[n][k])}
            for n in bd for k in range(len(bd[n]))]
    write_csv(out / "grad_norms.csv", rows)
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
    fig.suptitle(f"{ctx.setup.attack.name}: backdoored / clean mean = {ratio:.2f}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "observation2")
    plt.close(fig)
    clean_metrics = result["clean_model_metrics"] or {}
    md = [f"### Observation 2 ({ctx.setup.attack.name})", "",
          f"Mean gradient norm per neuron over one epoch of clean unlearning (lr {ctx.cfg.unlearn_lr:g}): backdoored "
          f"{result['mean_backdoored']:.4g}, clean model {result['mean_clean']:.4g} (ratio **{ratio:.2f}**); higher in "
          f"the backdoored model in {result['layers_higher_in_backdoored']} of {len(names)} layers. Clean model: ACC "
          f"{clean_metrics.get('acc', float('nan')):.2%}.", "",
          "| layer | backdoored | clean |", "|---|---|---|"]
    md += [f"| {n} | {v['backdoored']:.4g} | {v['clean']:.4g} |" for n, v in per_layer.items()]
    md += ["", "![observation 2](observation2.png)"]
    return "\n".join(md)


def measure_sweep(ctx: AnalysisContext, parameter: str, values, finetune: bool) -> Measurement:
    """TSBD over ``parameter`` (``neuron_ratio`` or ``weight_ratio``) at ``values`` (:func:`ratio_sweep`)."""
    return Measurement(ratio_sweep(ctx.model, ctx.clean, ctx.cfg, ctx.runtime, ctx.evaluate, parameter=parameter,
                                   values=list(values), finetune=finetune, seed=ctx.seed, progress=ctx.progress))


def sweep_readout(res: dict, finetune: bool) -> tuple[str, str, str]:
    """(ACC column, ASR column, what they measure) a sweep's summary reads: after fine-tuning when it
    ran, else after the reinit with the BN statistics recomputed on the clean set where the rows have
    them and the sweep has their baseline (``bn_control``) -- the statistics left from before the
    reinit no longer match the weights and can hide a backdoor (docs/analysis/README.md), so a
    reading taken with them would suggest too large an n."""
    rows = res["rows"]
    if finetune:
        return "acc", "asr", "after TSBD"
    if res.get("bn_control") and rows and all("reinit_bn_acc" in r for r in rows):
        return "reinit_bn_acc", "reinit_bn_asr", "after the reinit, BN statistics recomputed"
    return "reinit_acc", "reinit_asr", "after the reinit"


def measure_sweep_n(ctx: AnalysisContext, options: SweepNOptions) -> Measurement:
    """The n sweep, and the n a defender would pick: the largest whose ACC (:func:`sweep_readout`)
    stays within ``options.max_acc_drop`` points of the backdoored model's."""
    res = measure_sweep(ctx, "neuron_ratio", options.values, options.finetune).result
    acc_key, _, _ = sweep_readout(res, options.finetune)
    # recomputed columns compare with the backdoored model under the same recompute
    acc_before = res["bn_control"]["acc"] if acc_key == "reinit_bn_acc" else ctx.evaluate(ctx.model)["acc"]
    pick = largest_ratio_within_acc(res["rows"], acc_before, options.max_acc_drop / 100, acc_key=acc_key)
    res["suggestion"] = {"max_acc_drop": options.max_acc_drop, "acc_before": acc_before, "acc_column": acc_key,
                         "neuron_ratio": pick and pick["neuron_ratio"]}
    return Measurement(res, {"pick": pick})


def measure_sweep_m(ctx: AnalysisContext, options: SweepMOptions) -> Measurement:
    return measure_sweep(ctx, "weight_ratio", options.values, options.finetune)


def render_sweep(ctx: AnalysisContext, options: SweepNOptions | SweepMOptions, measured: Measurement, out) -> str:
    res, finetune = measured.result, options.finetune
    parameter, rows = res["parameter"], res["rows"]
    short = "n" if parameter == "neuron_ratio" else "m"
    write_csv(out / f"sweep_{short}.csv", rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r[parameter] * 100 for r in rows]
    ax.plot(xs, [r["reinit_acc"] * 100 for r in rows], "o--", color="C0", label="ACC after reinit")
    ax.plot(xs, [r["reinit_asr"] * 100 for r in rows], "s--", color="C3", label="ASR after reinit")
    recomputed = all("reinit_bn_asr" in r for r in rows)
    if recomputed:
        ax.plot(xs, [r["reinit_bn_asr"] * 100 for r in rows], "^:", color="C1",
                label="ASR after reinit, BN statistics recomputed")
        if res.get("bn_control"):  # the baseline of that curve
            ax.axhline(res["bn_control"]["asr"] * 100, color="C1", lw=0.8, ls="-.",
                       label="ASR of the backdoored model, BN statistics recomputed")
    if finetune:
        ax.plot(xs, [r["acc"] * 100 for r in rows], "o-", color="C0", label="ACC after TSBD")
        ax.plot(xs, [r["asr"] * 100 for r in rows], "s-", color="C3", label="ASR after TSBD")
    ax.axvline(res["default"] * 100, color="grey", lw=0.8, ls=":", label=f"paper default {res['default']:.0%}")
    ax.set_xlabel(f"{parameter.replace('_', ' ')} {short} (%)")
    ax.set_ylabel("%")
    ax.set_title(f"{ctx.setup.attack.name}: TSBD over {short}", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    save_figure(fig, out / f"sweep_{short}")
    plt.close(fig)
    acc_key, key, readout = sweep_readout(res, finetune)
    best = min(rows, key=lambda r: (r[key], -r[acc_key]))
    md = [f"### TSBD over {parameter.replace('_', ' ')} ({ctx.setup.attack.name})", "",
          f"Clean unlearning once ({res['unlearn']['epochs']} epochs), then for each {short}: zero reinit "
          + ("and activeness-aware fine-tuning." if finetune else "only (no fine-tuning)."), "",
          f"| {short} | neurons | subweights zeroed | ACC after reinit | ASR after reinit |"
          + (" ACC / ASR, BN recomputed |" if recomputed else "") + (" ACC | ASR | RA |" if finetune else ""),
          "|---|---|---|---|---|" + ("---|" if recomputed else "") + ("---|---|---|" if finetune else "")]
    for r in rows:
        line = (f"| {r[parameter]:g} | {r['neurons_selected']} | {r['subweights_zeroed']} | {r['reinit_acc']:.2%} | "
                f"{r['reinit_asr']:.2%} |")
        if recomputed:
            line += f" {r['reinit_bn_acc']:.2%} / {r['reinit_bn_asr']:.2%} |"
        if finetune:
            line += f" {r['acc']:.2%} | {r['asr']:.2%} | {r['ra']:.2%} |"
        md.append(line)
    md += ["", f"Paper default {short} = {res['default']:g}; on this model the lowest ASR {readout} "
           f"comes at {short} = {best[parameter]:g} ({best[acc_key]:.2%} ACC, {best[key]:.2%} ASR). "
           f"Choosing {short} by ASR needs poisoned data a defender does not have; the sweep shows how "
           "sensitive the result is."]
    control = res.get("bn_control")
    if recomputed and control:
        md += ["", f"Control for the recomputed columns: the backdoored model itself, its BN statistics recomputed "
               f"the same way, reads {control['acc']:.2%} ACC / {control['asr']:.2%} ASR. Statistics of clean, "
               "unaugmented images differ from those the model was trained with (poisoned images and augmentation "
               "included) and move ACC and ASR on their own, so a reinit's effect is its distance from this row."]
    if "suggestion" in res:
        max_drop, acc_before = res["suggestion"]["max_acc_drop"], res["suggestion"]["acc_before"]
        pick = measured.records["pick"]
        at_default = next((r for r in rows if abs(r[parameter] - res["default"]) < 1e-9), None)
        md += ["", f"**Choosing n for your model.** ACC / ASR {readout} by n: "
               + ", ".join(f"{r[parameter]:g}: {r[acc_key]:.2%} / {r[key]:.2%}" for r in rows) + ". "
               + (f"The paper's default n = {res['default']:g} gives {at_default[acc_key]:.2%} ACC and "
                  f"{at_default[key]:.2%} ASR here. " if at_default else
                  f"The paper's default n = {res['default']:g} is not among the values. ")
               + "A defender knows no ASR (it needs the trigger), but can measure ACC on clean data, and more "
               f"neurons reinitialized remove more of the backdoor; so take the largest n whose ACC stays within "
               f"{max_drop:g} points of the backdoored model's ({acc_before:.2%}"
               + (", statistics recomputed likewise" if acc_key == "reinit_bn_acc" else "")
               + "): "
               + (f"**n = {pick[parameter]:g}** ({pick[acc_key]:.2%} ACC, {pick[key]:.2%} ASR)." if pick else
                  "no n here does; try smaller values or a larger --max-acc-drop.")
               + " ACC here is measured on the test set as a stand-in for a held-out split of the defender's "
               "clean data."]
    md += ["", f"![sweep](sweep_{short}.png)"]
    return "\n".join(md)


register("observation1", "NWC of clean vs poison unlearning: Pearson correlation per layer and overall", NoOptions,
         measure_observation1, render_observation1)
register("observation2", "gradient norm per neuron in one epoch of clean unlearning, backdoored vs clean model",
         NoOptions, measure_observation2, render_observation2)
register("sweep-n", "TSBD over neuron ratios n (after reinit and after fine-tuning)", SweepNOptions, measure_sweep_n,
         render_sweep)
register("sweep-m", "TSBD over weight ratios m", SweepMOptions, measure_sweep_m, render_sweep)
