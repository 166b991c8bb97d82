"""Per-neuron analyses: activations (paper Fig. 3), TAC coverage (Fig. 4) and FP with NWC order (App. F).

A *neuron* is an output channel of a prunable convolution (:func:`tsbd.models.surgery.prunable_units`),
the unit NWC is computed on. Its *activation* (:func:`neuron_activations`) on an image is the
spatial mean of ReLU(x_k), x_k channel k of the output of the BatchNorm the conv feeds, or of the
conv itself when no BN is fed by it alone (:func:`activation_points`). Why this tensor: the paper
reads "the last convolutional layer with an additional ReLU" (Fig. 3). Where a BN follows the
conv (VGG, airbench, a pre-activation block's ``conv1``), that BN sets the scale and sign the
nonlinearity sees, so the conv's raw output would be an arbitrary affine rescaling of it; the BN
is paired by data flow (:func:`tsbd.models.surgery.bn_conv_pairs`), so channel k still depends on
filter k alone. A conv feeding a residual sum (a PreActResNet18 block's ``conv2``, the paper's
last layer) has no such BN and is read directly, as in the paper. The ReLU is the paper's, not the
model's own activation (airbench uses GELU), so every architecture follows one definition.

* ``tsbd analyze activations`` -- per neuron of one layer (default the last), the mean activation on
  N clean test images and on the same images with the trigger (*clean* / *poison activation*), for
  a clean model of the architecture, the backdoored model and the backdoored model after every epoch
  of TSBD's clean unlearning; checks the paper's answers [A1] (unlearning changes poison activations
  far more than clean ones, and NWC follows that change) and [A2] (the clean model is less active).
* ``tsbd analyze tac`` -- Trigger-Activated Change (CLP paper) per neuron of every prunable layer as
  the ground truth of backdoor strength; the coverage of its top-k by the top-k of each defense's
  neuron ranking (NWC, FP, CLP, ANP, RNP; :func:`ranking_scores`, :func:`coverage`).
* ``tsbd analyze fp-nwc`` -- Fine-Pruning with its own order and with the NWC order (``order=nwc``
  of :class:`tsbd.defenses.fp.FPConfig`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tsbd.analysis.observations import pearson
from tsbd.analysis.registry import (
    AnalysisContext,
    Measurement,
    cli_option,
    fractions,
    register,
    values_option,
    write_csv,
)
from tsbd.artifacts import pyplot, save_figure
from tsbd.config import parse_key_values
from tsbd.data.base import ImageSet
from tsbd.data.poison import sample_indices
from tsbd.defenses import build_defense
from tsbd.defenses.anp import optimize_anp_masks
from tsbd.defenses.clp import channel_lipschitz
from tsbd.defenses.rnp import recover_masks, unlearn
from tsbd.defenses.tsbd import TSBDConfig, clean_unlearn
from tsbd.errors import TsbdError
from tsbd.models.surgery import bn_conv_pairs, neuron_weight_change, prunable_units, rank_neurons
from tsbd.train.engine import to_model_input
from tsbd.train.runtime import Runtime

METRICS = ("nwc", "fp", "clp", "anp", "rnp")  # paper Fig. 4's rankings
DEFAULT_RATIOS = "0.01,0.05,0.1,0.15,0.2,0.3,0.5,0.7,0.9"  # neuron ratios, as TSBD's n in Fig. 5


# ------------------------------------------------------------------------------------------
# Activations and TAC
def activation_points(model: nn.Module, input_shape: Sequence[int] = (3, 32, 32)) -> dict[str, str]:
    """Prunable conv name -> the module whose output channel k is that conv's neuron k before the ReLU:
    the BatchNorm2d fed by the conv alone (data-flow pairing), else the conv."""
    fed: dict[str, str] = {}
    for bn, conv in bn_conv_pairs(model, input_shape):
        if conv is not None:
            fed.setdefault(conv, bn)
    return {name: fed.get(name, name) for name, _ in prunable_units(model)}


@torch.no_grad()
def neuron_activations(model: nn.Module, images: torch.Tensor, runtime: Runtime, layers: Sequence[str] | None = None,
                       *, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per layer (prunable conv name; default all), an N x K float32 CPU tensor: for each uint8 image,
    the spatial mean of ReLU at every neuron's activation point (:func:`activation_points`). Eval mode,
    one forward pass per batch for all layers; each map is reduced inside its hook."""
    points = activation_points(model, tuple(images.shape[1:]))
    layers = list(points) if layers is None else list(layers)
    unknown = [n for n in layers if n not in points]
    if unknown:
        raise TsbdError(f"{unknown[0]!r} is not a prunable conv of {type(model).__name__}; choose one of "
                        f"{', '.join(points)}")
    mods = dict(model.named_modules())
    store: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def hook(name: str):
        return lambda _m, _args, out: store[name].append(torch.relu(out.float()).mean((2, 3)).cpu())

    handles = [mods[points[n]].register_forward_hook(hook(n)) for n in layers]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            with runtime.autocast():
                model(to_model_input(images[start:start + batch_size], runtime))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    out = {n: torch.cat(v) if v else torch.zeros(0) for n, v in store.items()}
    if any(len(v) != len(images) for v in out.values()):
        raise TsbdError("a layer was called a different number of times than there are images; "
                        "neuron activations need each prunable conv called once per forward pass")
    return out


def trigger_activated_change(model: nn.Module, clean_x: torch.Tensor, poisoned_x: torch.Tensor, runtime: Runtime,
                             layers: Sequence[str] | None = None, *, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """TAC (Zheng et al., CLP, ECCV 2022) per neuron: the mean over image pairs of |activation on the
    poisoned image - activation on its clean version| (row i of both tensors is one image)."""
    if clean_x.shape != poisoned_x.shape:
        raise TsbdError(f"TAC needs pairs: {tuple(clean_x.shape)} clean vs {tuple(poisoned_x.shape)} poisoned images")
    a = neuron_activations(model, clean_x, runtime, layers, batch_size=batch_size)
    b = neuron_activations(model, poisoned_x, runtime, layers, batch_size=batch_size)
    return {n: (b[n] - a[n]).abs().mean(0) for n in a}


def paired_test_images(setup, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, poisoned) uint8 images, row i the same test image without and with the trigger: a seeded
    sample of ``count`` non-target test images. ``setup.poisoned_test`` triggers exactly
    ``test[test.y != target]``, in order (:meth:`tsbd.attacks.base.Attack.poison_test`)."""
    test, ptest = setup.dataset.test, setup.poisoned_test
    keep = torch.nonzero(test.y != setup.attack.config.target).flatten()
    if len(keep) != len(ptest) or not torch.equal(test.y[keep].cpu(), ptest.y_true.cpu()):
        raise TsbdError("the poisoned test set does not pair with the non-target clean test images; "
                        "rebuild it with the attack's poison_test")
    if count < 1:
        raise TsbdError(f"--images must be >= 1, got {count}")
    pick = sample_indices(torch.arange(len(keep)), min(count, len(keep)), seed)
    return test.x[keep[pick]], ptest.x[pick]


def resolve_layer(model: nn.Module, name: str | None) -> str:
    """``name`` if it is a prunable conv of ``model``, the last prunable conv when None."""
    names = [n for n, _ in prunable_units(model)]
    if name is None:
        return names[-1]
    if name not in names:
        raise TsbdError(f"--layer {name!r} is not a prunable conv of {type(model).__name__}; choose one of "
                        f"{', '.join(names)}")
    return name


# ------------------------------------------------------------------------------------------
# Neuron rankings of the defenses, and their coverage of TAC
def ranking_scores(model: nn.Module, clean: ImageSet, cfg: TSBDConfig, runtime: Runtime, *,
                   metrics: Sequence[str] = METRICS, defense_opts: dict[str, dict] | None = None, seed: int = 0,
                   progress: bool = False) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Raw per-neuron score of each metric, per prunable layer (NaN where a method scores no neuron),
    all on the defender's ``clean`` set, and each method's info:

    * ``nwc``: NWC of TSBD's clean unlearning with ``cfg`` (stage 1a-b);
    * ``fp``: mean activation (:func:`neuron_activations`) on the clean set;
    * ``clp``: the channel Lipschitz upper bound of BN(conv) (data-free);
    * ``anp``: ANP's learned BN mask (:func:`tsbd.defenses.anp.optimize_anp_masks`);
    * ``rnp``: RNP's recovered BN mask after its unlearning (:mod:`tsbd.defenses.rnp`).

    BN-channel scores (CLP, ANP, RNP) belong to the conv feeding the BN (data-flow pairing; CLP's
    own ``pairing`` option for CLP); a conv that feeds no BN of its own gets NaN, as those methods
    never touch it. ``defense_opts[name]`` overrides that defense's config (e.g. ``nb_iter``).
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise TsbdError(f"unknown ranking metric {sorted(unknown)[0]!r}; choose from {', '.join(METRICS)}")
    opts = defense_opts or {}
    units = prunable_units(model)
    mods = dict(model.named_modules())

    def by_conv(by_bn: dict[str, torch.Tensor], pairs) -> dict[str, torch.Tensor]:
        out = {name: torch.full((conv.out_channels,), float("nan")) for name, conv in units}
        for bn, conv in pairs:
            if conv in out and bn in by_bn and out[conv].isnan().all():
                out[conv] = by_bn[bn].float().cpu()
        return out

    dataflow = bn_conv_pairs(model, clean.image_shape)
    scores: dict[str, dict[str, torch.Tensor]] = {}
    info: dict[str, dict] = {}
    for metric in metrics:
        t0 = time.perf_counter()
        if metric == "nwc":
            unlearned, info["nwc"] = clean_unlearn(model, clean, cfg, runtime, seed=seed, progress=progress)
            scores["nwc"] = neuron_weight_change(model, unlearned)
            del unlearned
        elif metric == "fp":
            scores["fp"] = {n: a.mean(0) for n, a in neuron_activations(model, clean.x, runtime).items()}
            info["fp"] = {"images": len(clean)}
        elif metric == "clp":
            clp_cfg = build_defense("clp", opts.get("clp")).config
            pairs = bn_conv_pairs(model, clean.image_shape, rule=clp_cfg.pairing)
            uclc = {bn: channel_lipschitz(mods[conv], mods[bn]) for bn, conv in pairs if conv is not None}
            scores["clp"] = by_conv(uclc, pairs)
            info["clp"] = {"pairing": clp_cfg.pairing, "paired_bn": len(uclc)}
        elif metric == "anp":
            masks, info["anp"], _ = optimize_anp_masks(model, clean, build_defense("anp", opts.get("anp")).config,
                                                       runtime, seed=seed, progress=progress)
            scores["anp"] = by_conv(masks, dataflow)
        elif metric == "rnp":
            rnp_cfg = build_defense("rnp", opts.get("rnp")).config
            unlearned, unlearn_info = unlearn(model, clean, rnp_cfg, runtime, seed=seed, progress=progress)
            masks, recover_info = recover_masks(unlearned, clean, rnp_cfg, runtime, seed=seed, progress=progress)
            scores["rnp"] = by_conv(masks, dataflow)
            info["rnp"] = {"unlearn": unlearn_info, "recover": recover_info}
        info[metric]["seconds"] = time.perf_counter() - t0
    return scores, info


def selection_scores(metric: str, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``raw`` turned so that larger = selected (pruned / reinitialized) first, comparably across layers,
    each by the rule its method applies:

    * ``tac``, ``nwc``: as they are, one global ranking (TSBD ranks NWC over all layers);
    * ``fp``: the least active first *within each layer* (score -rank / K of the layer): FP prunes only
      the last layer; over all layers we prune every layer's least active neurons in equal fractions,
      as activation scales differ between layers;
    * ``clp``: per-layer z-score (UCLC - mean) / std: CLP prunes UCLC > mean + u std, so lowering u
      selects in this order;
    * ``anp``, ``rnp``: -mask (one global threshold prunes masks <= t).

    NaN (no score) becomes -inf: selected last. Ties keep module order (:func:`rank_neurons`)."""
    out = {}
    for name, v in raw.items():
        v = v.double()
        if metric in ("tac", "nwc"):
            s = v.clone()
        elif metric == "fp":
            s = torch.empty_like(v)
            order = torch.argsort(torch.nan_to_num(v, nan=float("inf")), stable=True)
            s[order] = -torch.arange(len(v), dtype=torch.float64) / len(v)
            s[v.isnan()] = float("nan")
        elif metric == "clp":
            ok = ~v.isnan()
            s = torch.full_like(v, float("nan"))
            if ok.sum() > 1:
                std = v[ok].std()
                s[ok] = (v[ok] - v[ok].mean()) / std if std > 0 else torch.zeros_like(v[ok])
            elif ok.any():
                s[ok] = 0.0
        elif metric in ("anp", "rnp"):
            s = -v
        else:
            raise TsbdError(f"unknown ranking metric {metric!r}; choose from tac, {', '.join(METRICS)}")
        out[name] = torch.nan_to_num(s, nan=float("-inf"))
    return out


def coverage(selected: dict[str, torch.Tensor], truth: dict[str, torch.Tensor], ratio: float) -> float:
    """|top-k by ``selected`` & top-k by ``truth``| / k over all neurons of all layers, k = ratio x neurons
    (at least 1); both are larger-first scores (:func:`selection_scores`)."""
    fractions([ratio], "--values", "neuron ratio")
    a, b = rank_neurons(selected), rank_neurons(truth)
    if set(a) != set(b):
        raise TsbdError("coverage needs scores for the same neurons (one model's layers)")
    k = max(1, round(ratio * len(a)))
    return len(set(a[:k]) & set(b[:k])) / k


def parse_skip(text: str | None) -> set[str]:
    """``--skip``: comma-separated metric names to leave out."""
    names = {s.strip() for s in (text or "").split(",") if s.strip()}
    unknown = sorted(names - set(METRICS))
    if unknown:
        raise TsbdError(f"--skip {unknown[0]!r} is not a metric; choose from {', '.join(METRICS)} "
                        "(e.g. --skip anp,rnp)")
    return names


def parse_defense_opts(pairs: Sequence[str] | None, allowed: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--defense-opt DEFENSE.KEY=VALUE`` (repeatable) -> {defense: {key: value}}: the KEY=VALUE syntax
    of ``tsbd defend --opt`` (:func:`tsbd.config.parse_key_values`) with a defense before the dot; keys
    are checked when the defense's config is built."""
    out: dict[str, dict[str, Any]] = {}
    for head, value in parse_key_values(pairs, "--defense-opt option").items():
        defense, dot, key = head.partition(".")
        if not dot or not key.strip():
            raise TsbdError(f"--defense-opt {head}={value} must look like DEFENSE.KEY=VALUE, e.g. anp.nb_iter=200")
        if defense.strip() not in allowed:
            raise TsbdError(f"--defense-opt {head}={value}: this analysis runs {', '.join(allowed)}; "
                            f"name one of them before the dot")
        out.setdefault(defense.strip(), {})[key.strip()] = value
    return out


# ------------------------------------------------------------------------------------------
def _images_option() -> int:
    return cli_option(1000, "(also tac) clean test images (non-target) and their poisoned versions to average over "
                            "(default: 1000)", type=int)


def _defense_opts_option(allowed: tuple[str, ...]) -> dict | None:
    return cli_option(None, "(also fp-nwc) config of a compared defense (repeatable), e.g. anp.nb_iter=200, "
                            "fp.epochs=20; see `tsbd list`", flag="--defense-opt", dest="defense_opt",
                      parse=lambda pairs: parse_defense_opts(pairs, allowed), action="append",
                      metavar="DEFENSE.KEY=VALUE")


@dataclasses.dataclass(frozen=True)
class ActivationsOptions:
    layer: str | None = cli_option(None, "prunable conv whose neurons to read (default: the last)",
                                   "paper Fig. 3: the last convolutional layer")
    images: int = _images_option()


@dataclasses.dataclass(frozen=True)
class TACOptions:
    values: tuple[float, ...] = values_option(DEFAULT_RATIOS, "neuron ratios", "paper Fig. 4")
    images: int = _images_option()
    metrics: tuple[str, ...] = cli_option(
        METRICS, f"rankings to leave out, comma-separated, from {','.join(METRICS)} (e.g. anp,rnp: the slow ones)",
        "paper Fig. 4", flag="--skip", dest="skip", parse=lambda text: tuple(m for m in METRICS
                                                                           if m not in parse_skip(text)))
    defense_opts: dict | None = _defense_opts_option(("clp", "anp", "rnp"))  # defense -> config overrides

    def __post_init__(self):
        fractions(list(self.values), "--values", "neuron ratio")
        unknown = set(self.metrics) - set(METRICS)
        if unknown:
            raise TsbdError(f"unknown ranking metric {sorted(unknown)[0]!r}; choose from {', '.join(METRICS)}")


@dataclasses.dataclass(frozen=True)
class FPNWCOptions:
    defense_opts: dict | None = _defense_opts_option(("fp",))  # {"fp": FP config overrides}

    def __post_init__(self):
        if "order" in (self.defense_opts or {}).get("fp", {}):
            raise TsbdError("fp-nwc runs both orders; drop --defense-opt fp.order")


def measure_activations(ctx: AnalysisContext, options: ActivationsOptions) -> Measurement:
    model, cfg, runtime = ctx.model, ctx.cfg, ctx.runtime
    layer = resolve_layer(model, options.layer)
    clean_x, poison_x = paired_test_images(ctx.setup, options.images, ctx.seed)
    both = torch.cat([clean_x, poison_x])

    def acts(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        a = neuron_activations(m, both, runtime, [layer])[layer]  # clean rows, then poisoned rows
        return a[: len(clean_x)].mean(0), a[len(clean_x):].mean(0)

    clean_model, clean_meta = ctx.clean_reference_model()
    per_model = {"clean": acts(clean_model), "backdoored": acts(model)}
    del clean_model
    unlearned, unlearn_info = clean_unlearn(
        model, ctx.clean, cfg, runtime, seed=ctx.seed, progress=ctx.progress,
        on_epoch=lambda epoch, m, acc: per_model.__setitem__(f"unlearn_epoch_{epoch}", acts(m)))
    nwc = neuron_weight_change(model, unlearned)[layer]
    del unlearned

    c_bd, p_bd = per_model["backdoored"]
    epochs = [key for key in per_model if key.startswith("unlearn_epoch_")]
    d_clean = [(per_model[e][0] - c_bd) for e in epochs]
    d_poison = [(per_model[e][1] - p_bd) for e in epochs]
    nan = float("nan")
    final_dc = d_clean[-1].abs() if epochs else torch.full_like(c_bd, nan)
    final_dp = d_poison[-1].abs() if epochs else torch.full_like(p_bd, nan)
    peak = {key: float(torch.maximum(*per_model[key]).max()) for key in ("clean", "backdoored")}
    result = {
        "layer": layer, "neurons": len(nwc), "images": len(clean_x),
        "max_activation": peak,
        "max_poison_activation": {key: float(per_model[key][1].max()) for key in ("clean", "backdoored")},
        "mean_activation": {key: {"clean": float(per_model[key][0].mean()), "poison": float(per_model[key][1].mean())}
                            for key in ("clean", "backdoored")},
        "unlearn_epochs": len(epochs),
        "mean_abs_delta_clean": float(final_dc.mean()), "mean_abs_delta_poison": float(final_dp.mean()),
        "mean_delta_poison": float(d_poison[-1].mean()) if epochs else nan,
        "mean_abs_delta_per_epoch": [{"epoch": i + 1, "clean": float(dc.abs().mean()), "poison": float(dp.abs().mean())}
                                     for i, (dc, dp) in enumerate(zip(d_clean, d_poison))],
        "pearson_nwc_abs_delta_poison": pearson(nwc, final_dp) if epochs else nan,
        "pearson_nwc_abs_delta_clean": pearson(nwc, final_dc) if epochs else nan,
        "pearson_nwc_abs_delta_sum": pearson(nwc, final_dc + final_dp) if epochs else nan,
        "clean_unlearning": unlearn_info,
        "clean_model_metrics": clean_meta.get("metrics"),
    }
    result["claim_A1"] = bool(result["mean_abs_delta_poison"] > result["mean_abs_delta_clean"]
                              and result["pearson_nwc_abs_delta_poison"] > 0)
    result["claim_A2"] = bool(peak["clean"] < peak["backdoored"])
    return Measurement(result, {"per_model": per_model, "nwc": nwc, "d_clean": d_clean, "d_poison": d_poison})


def render_activations(ctx: AnalysisContext, options: ActivationsOptions, measured: Measurement, out) -> str:
    result, records = measured.result, measured.records
    per_model, nwc, d_clean, d_poison = (records[k] for k in ("per_model", "nwc", "d_clean", "d_poison"))
    layer, peak, images, epochs = result["layer"], result["max_activation"], result["images"], result["unlearn_epochs"]
    write_csv(out / "activations.csv", [{"model": key, "neuron": k, "clean_act": float(c[k]), "poison_act": float(p[k])}
                                         for key, (c, p) in per_model.items() for k in range(len(c))])

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    order = torch.argsort(per_model["backdoored"][1], descending=True, stable=True)
    xs = range(len(order))
    top = 1.05 * max(peak.values()) if max(peak.values()) > 0 else 1.0
    for ax, key, title in zip(axes[:2], ("clean", "backdoored"), ("(a) clean model", "(b) backdoored model")):
        c, p = per_model[key]
        ax.bar(xs, p[order].numpy(), width=1.0, color="C3", alpha=0.6, label="poison activation")
        ax.bar(xs, c[order].numpy(), width=1.0, color="C0", alpha=0.6, label="clean activation")
        ax.set_ylim(0, top)
        ax.set_xlabel("neuron (sorted by the backdoored model's poison activation)")
        ax.set_title(f"{title}: max {peak[key]:.3f}", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
    axes[0].set_ylabel(f"mean ReLU activation, {layer}")
    ax = axes[2]
    ep = list(range(epochs + 1))
    ax.plot(ep, [0.0] + [float(d.abs().mean()) for d in d_clean], "o-", color="C0", ms=3, label="mean |Δ clean act|")
    ax.plot(ep, [0.0] + [float(d.abs().mean()) for d in d_poison], "s-", color="C3", ms=3, label="mean |Δ poison act|")
    for i, k in enumerate(torch.topk(nwc, min(3, len(nwc))).indices.tolist()):
        ax.plot(ep, [0.0] + [float(d[k]) for d in d_poison], ":", color="C3", lw=0.8,
                label="Δ poison act, top-3 NWC neurons" if i == 0 else None)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("clean-unlearning epoch")
    ax.set_ylabel("activation change from the backdoored model")
    ax.set_title(f"(c) clean unlearning: Pearson(NWC, |Δ poison|) = {result['pearson_nwc_abs_delta_poison']:.3f}",
                 fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"{ctx.setup.attack.name}: activations of {layer} on {images} test images", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "activations")
    plt.close(fig)

    holds = {True: "holds", False: "does not hold"}
    md = [f"### Neuron activations ({ctx.setup.attack.name}, layer {layer})", "",
          f"Mean ReLU activation of each of the {len(nwc)} neurons on {images} non-target test images (clean) "
          f"and the same images with the trigger (poison).", "",
          "| model | max activation | mean clean act | mean poison act |", "|---|---|---|---|"]
    md += [f"| {key} | {peak[key]:.4f} | {result['mean_activation'][key]['clean']:.4f} | "
           f"{result['mean_activation'][key]['poison']:.4f} |" for key in ("clean", "backdoored")]
    accs = result["clean_unlearning"]["clean_acc_per_epoch"] or [float("nan")]
    md += ["", f"Clean unlearning ran {epochs} epochs (clean acc {accs[-1]:.3f} at the end). Mean |Δ| from "
           f"the backdoored model: clean activation {result['mean_abs_delta_clean']:.4f}, "
           f"poison activation {result['mean_abs_delta_poison']:.4f} (signed mean Δ poison "
           f"{result['mean_delta_poison']:+.4f}). Pearson of the neurons' NWC with |Δ poison act| "
           f"{result['pearson_nwc_abs_delta_poison']:.3f}, with |Δ clean act| "
           f"{result['pearson_nwc_abs_delta_clean']:.3f}, "
           f"with their sum {result['pearson_nwc_abs_delta_sum']:.3f}.", "",
           f"- [A1] clean unlearning changes poison activations more than clean ones, and NWC follows |Δ poison act| "
           f"(paper: yes): **{holds[result['claim_A1']]}** here.",
           f"- [A2] the clean model is less active (paper: max 0.5676 vs 1.7053): max {peak['clean']:.4f} vs "
           f"{peak['backdoored']:.4f}, **{holds[result['claim_A2']]}** here.", "", "![activations](activations.png)"]
    return "\n".join(md)


def measure_tac(ctx: AnalysisContext, options: TACOptions) -> Measurement:
    ratios, metrics = list(options.values), [m for m in METRICS if m in options.metrics]
    clean_x, poison_x = paired_test_images(ctx.setup, options.images, ctx.seed)
    tac = trigger_activated_change(ctx.model, clean_x, poison_x, ctx.runtime)
    raw, info = ranking_scores(ctx.model, ctx.clean, ctx.cfg, ctx.runtime, metrics=metrics,
                               defense_opts=options.defense_opts, seed=ctx.seed, progress=ctx.progress)
    truth = selection_scores("tac", tac)
    chosen = {m: selection_scores(m, raw[m]) for m in metrics}
    total = sum(len(v) for v in tac.values())
    cov = {m: {r: coverage(chosen[m], truth, r) for r in ratios} for m in metrics}
    cov["random"] = {r: max(1, round(r * total)) / total for r in ratios}  # E|A & B| / k = k / N
    others = [m for m in metrics if m != "nwc"]
    not_best = {r: max(others, key=lambda m: cov[m][r]) for r in ratios
                if "nwc" in cov and others and max(cov[m][r] for m in others) > cov["nwc"][r]}
    result = {"coverage": {m: {f"{r:g}": v for r, v in c.items()} for m, c in cov.items()}, "neurons": total,
              "layers": len(tac), "images": len(clean_x), "metrics": metrics,
              "nwc_best_everywhere": ("nwc" in metrics and not not_best) if others else None,
              "nwc_not_best_at": {f"{r:g}": m for r, m in not_best.items()}, "info": info}
    return Measurement(result, {"tac": tac, "scores": raw, "coverage": cov, "ratios": ratios, "not_best": not_best})


def render_tac(ctx: AnalysisContext, options: TACOptions, measured: Measurement, out) -> str:
    result, records = measured.result, measured.records
    tac, raw, cov, ratios, not_best = (records[k] for k in ("tac", "scores", "coverage", "ratios", "not_best"))
    metrics, total, images = result["metrics"], result["neurons"], result["images"]
    write_csv(out / "tac.csv", [{"ratio": r, "metric": m, "coverage": cov[m][r]} for r in ratios for m in cov])
    write_csv(out / "tac_scores.csv", [
        {"layer": name, "neuron": k, "tac": float(tac[name][k]),
         **{m: (float(raw[m][name][k]) if m in raw else "") for m in METRICS}}
        for name in tac for k in range(len(tac[name]))])

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, m in enumerate(metrics):
        ax.plot(ratios, [cov[m][r] for r in ratios], "o-", ms=3, color=f"C{i}", lw=2 if m == "nwc" else 1,
                label=m.upper())
    ax.plot(ratios, [cov["random"][r] for r in ratios], "--", color="grey", lw=1, label="random")
    ax.set_xlabel("neuron ratio")
    ax.set_ylabel("coverage of TAC's top neurons")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{ctx.setup.attack.name}: {total} neurons, TAC on {images} image pairs", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    save_figure(fig, out / "tac")
    plt.close(fig)

    others = [m for m in metrics if m != "nwc"]
    md = [f"### Coverage of TAC by neuron rankings ({ctx.setup.attack.name})", "",
          f"TAC per neuron on {images} test images and their poisoned versions, over {total} neurons in "
          f"{len(tac)} layers; coverage = share of the top-k by TAC that a metric's top-k also selects.", "",
          "| ratio | " + " | ".join(m.upper() for m in metrics) + " | random |",
          "|---" * (len(metrics) + 2) + "|"]
    md += [f"| {r:g} | " + " | ".join(f"{cov[m][r]:.3f}" for m in metrics) + f" | {cov['random'][r]:.3f} |"
           for r in ratios]
    md.append("")
    if "nwc" not in metrics or not others:
        md.append("NWC is compared with nothing here (skipped metrics); the paper finds it best at every ratio.")
    elif not not_best:
        md.append("NWC covers TAC at least as well as every other metric at every ratio, as the paper finds.")
    else:
        md.append("NWC is not the best everywhere, unlike the paper: " + "; ".join(
            f"at {r:g}, {m.upper()} {cov[m][r]:.3f} vs NWC {cov['nwc'][r]:.3f}" for r, m in not_best.items()) + ".")
    md += ["", "FP ranks each layer's least active neurons first (in equal fractions per layer), CLP by its "
           "per-layer UCLC z-score, ANP/RNP by lowest mask, NWC and TAC globally; neurons a method cannot score "
           "(a conv feeding no BN of its own, for CLP/ANP/RNP) come last.", "", "![tac](tac.png)"]
    return "\n".join(md)


def measure_fp_nwc(ctx: AnalysisContext, options: FPNWCOptions) -> Measurement:
    model, cfg = ctx.model, ctx.cfg
    fp_opts = (options.defense_opts or {}).get("fp", {})
    before = ctx.evaluate(model)
    rows = [{"order": "none", "acc": before["acc"], "asr": before.get("asr"), "ra": before.get("ra"),
             "channels_pruned": 0, "seconds": 0.0}]
    infos = {}
    for order in ("activation", "nwc"):
        # the NWC comes from TSBD's clean unlearning as configured for this analysis (--opt)
        fp_cfg = {"nwc_unlearn_lr": cfg.unlearn_lr, "nwc_unlearn_max_epochs": cfg.unlearn_max_epochs, **fp_opts,
                  "order": order}
        res = build_defense("fp", fp_cfg).purify(model, ctx.clean, runtime=ctx.runtime, seed=ctx.seed,
                                                 progress=ctx.progress)
        after = ctx.evaluate(res.model)
        rows.append({"order": order, "acc": after["acc"], "asr": after.get("asr"), "ra": after.get("ra"),
                     "channels_pruned": res.info["pruned"], "seconds": res.timings["total"]})
        infos[order] = {"config": res.config, "pruned_channels": res.info["pruned_channels"],
                        "channels": res.info["channels"], "unlearn": res.info.get("unlearn")}
    act, nwc = rows[1], rows[2]
    overlap = len(set(infos["activation"]["pruned_channels"]) & set(infos["nwc"]["pruned_channels"]))
    return Measurement({"rows": rows, "runs": infos, "pruned_overlap": overlap,
                        "nwc_lower_asr": (nwc["asr"] < act["asr"]) if act["asr"] is not None else None})


def render_fp_nwc(ctx: AnalysisContext, options: FPNWCOptions, measured: Measurement, out) -> str:
    result = measured.result
    rows, overlap = result["rows"], result["pruned_overlap"]
    write_csv(out / "fp_nwc.csv", rows)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = ["acc", "asr", "ra"]
    labels = {"none": "no defense", "activation": "FP (activation order)", "nwc": "FP (NWC order)"}
    for i, row in enumerate(rows):
        ax.bar([j + 0.27 * (i - 1) for j in range(3)], [100 * (row[k] or 0) for k in keys], 0.27,
               label=labels[row["order"]])
    ax.set_xticks(range(3), [k.upper() for k in keys])
    ax.set_ylabel("%")
    ax.set_title(f"{ctx.setup.attack.name}: Fine-Pruning order", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    save_figure(fig, out / "fp_nwc")
    plt.close(fig)

    act, nwc = rows[1], rows[2]
    pct = lambda v: "n/a" if v is None else f"{v:.2%}"  # noqa: E731
    md = [f"### Fine-Pruning with NWC order ({ctx.setup.attack.name})", "",
          "FP prunes the last layer's channels in steps while held-out clean accuracy stays within its budget, "
          "then fine-tunes; only the order differs: least clean activation first (FP) or largest NWC of TSBD's "
          f"clean unlearning first (lr {ctx.cfg.unlearn_lr:g}).", "",
          "| order | ACC | ASR | RA | channels pruned | seconds |", "|---|---|---|---|---|---|"]
    md += [f"| {r['order']} | {pct(r['acc'])} | {pct(r['asr'])} | {pct(r['ra'])} | {r['channels_pruned']} | "
           f"{r['seconds']:.1f} |" for r in rows]
    if result["nwc_lower_asr"] is not None:
        md += ["", f"The NWC order {'lowers' if result['nwc_lower_asr'] else 'does not lower'} FP's ASR "
               f"({pct(act['asr'])} -> {pct(nwc['asr'])}; ACC {pct(act['acc'])} -> {pct(nwc['acc'])}); the two runs "
               f"prune {overlap} channels in common."]
    md += ["", "![fp-nwc](fp_nwc.png)"]
    return "\n".join(md)


register("activations", "clean / poison activation per neuron: clean, backdoored and clean-unlearning models (Fig. 3)",
         ActivationsOptions, measure_activations, render_activations)
register("tac", "coverage of TAC's top neurons by NWC, FP, CLP, ANP and RNP rankings over neuron ratios (Fig. 4)",
         TACOptions, measure_tac, render_tac)
register("fp-nwc", "Fine-Pruning with its activation order and with the NWC order (App. F)", FPNWCOptions,
         measure_fp_nwc, render_fp_nwc)
