"""Model surgery shared by TSBD, the pruning baselines and the analyses.

A *neuron* is an output channel of a convolution (paper Sec. 3.1: row k of the layer's
K x I weight matrix); its *subweights* are the I = C_in * kh * kw weights of that row.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from tsbd.errors import TsbdError
from tsbd.train.engine import to_model_input
from tsbd.train.runtime import Runtime

# Shortcut / downsample convolutions are excluded, as in the authors' code (name lacks "shortcut").
SKIP_CONNECTION = re.compile(r"(^|\.)(shortcut|downsample|skip)(\.|$)")


def prunable_units(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """(name, conv) of every trainable Conv2d except shortcut/downsample convolutions, in module order."""
    units = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not SKIP_CONNECTION.search(name) and m.weight.requires_grad
    ]
    if not units:
        raise TsbdError(
            f"{type(model).__name__} has no trainable Conv2d layers outside shortcuts; "
            "TSBD and the pruning defenses need convolutional neurons"
        )
    return units


def subweight_change(before: nn.Module, after: nn.Module) -> dict[str, torch.Tensor]:
    """|w_after - w_before| of every prunable unit, reshaped K x I (neuron x subweight)."""
    mods_after = dict(after.named_modules())
    out = {}
    for name, conv in prunable_units(before):
        other = mods_after.get(name)
        if not isinstance(other, nn.Conv2d) or other.weight.shape != conv.weight.shape:
            raise TsbdError(f"layer {name!r} differs between the two models; compare models of one architecture")
        delta = (other.weight.detach().float().cpu() - conv.weight.detach().float().cpu()).abs()
        out[name] = delta.reshape(delta.shape[0], -1)
    return out


def neuron_weight_change(before: nn.Module, after: nn.Module) -> dict[str, torch.Tensor]:
    """NWC (paper Eq. 1): per layer, the L1 norm of each neuron's weight change."""
    return {name: d.sum(dim=1) for name, d in subweight_change(before, after).items()}


def rank_neurons(nwc: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """All (layer, channel) pairs, ranked globally across layers by descending value (stable)."""
    keys = [(name, k) for name, v in nwc.items() for k in range(len(v))]
    values = torch.cat([v.flatten().float() for v in nwc.values()])
    order = torch.argsort(values, descending=True, stable=True)
    return [keys[i] for i in order.tolist()]


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block no parameter of ``model`` requires a gradient (for optimizing something
    else through it: a trigger, masks); each parameter's flag is restored on exit."""
    own = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in own:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in own:
            p.requires_grad_(flag)


def batchnorm_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The running statistics (mean, var, batch count) of every BatchNorm layer of ``model``."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, images: torch.Tensor, runtime: Runtime, *, batch_size: int = 256,
                       seed: int = 0) -> int:
    """Replace every BatchNorm layer's running statistics, in place, by their average over the batches of
    ``images`` (uint8) at the present weights: one train-mode pass, weights untouched. The batches
    are drawn in a seeded random order, so each mixes classes even where ``images`` are stored class
    by class (each batch is normalized by its own statistics on the way). Returns the number of BN
    layers reset (0: nothing to do)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    model.train()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    try:
        for start in range(0, len(images), batch_size):
            with runtime.autocast():
                model(to_model_input(images[order[start:start + batch_size].to(images.device)], runtime))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return len(bns)


def bn_recomputed_copy(model: nn.Module, images: torch.Tensor, runtime: Runtime, *, batch_size: int = 256,
                       seed: int = 0) -> nn.Module | None:
    """A copy of ``model`` with its BatchNorm running statistics recomputed on ``images``
    (:func:`recompute_bn_stats`), ``model`` untouched; None, and no copy made, when it has no
    BatchNorm layer. Shows how much of a model's behaviour its statistics carry, e.g. a backdoor
    that a surgery only masks because the old statistics no longer match the new weights."""
    if not batchnorm_buffers(model):  # no BatchNorm layer that keeps running statistics
        return None
    fresh = copy.deepcopy(model)
    recompute_bn_stats(fresh, images, runtime, batch_size=batch_size, seed=seed)
    return fresh


def zero_subweights(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Set the conv weights where ``masks[name]`` (K x I bool) is True to 0, in place; returns the count."""
    mods = dict(model.named_modules())
    count = 0
    with torch.no_grad():
        for name, mask in masks.items():
            w = mods[name].weight
            # masked_fill_ works whatever the memory format (fit leaves weights channels_last)
            w.masked_fill_(mask.to(w.device).view(w.shape), 0)
            count += int(mask.sum())
    return count


# ------------------------------------------------------------------------------------------
# Reading activations.
#
# A *feature point* names a tensor inside a model's forward pass: ``"layer3"`` is the output of
# module ``layer3``; ``"linear:input"`` is the (first) input of module ``linear``. Inputs are
# needed where the tensor is made by a functional op (``F.relu``, ``x + shortcut``) that no
# module returns.


def _parse_point(model: nn.Module, point: str) -> tuple[nn.Module, str]:
    name, _, where = point.partition(":")
    where = where or "output"
    if where not in ("output", "input"):
        raise TsbdError(f"feature point {point!r}: write 'module' for its output or 'module:input' for its input")
    module = dict(model.named_modules()).get(name)
    if module is None or name == "":
        raise TsbdError(f"{type(model).__name__} has no module {name!r} (feature point {point!r}); "
                        "see model.named_modules() for valid names")
    return module, where


@contextlib.contextmanager
def capture_features(model: nn.Module, points: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While active, every forward pass of ``model`` stores the tensor at each feature point in the
    yielded dict (``dict[point] = tensor``, overwritten by the next pass). Tensors keep their graph,
    so a loss on them trains the model (NAD); hooks are removed on exit."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for point in points:
            module, where = _parse_point(model, point)
            if where == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, point=point: store.__setitem__(point, args[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda _m, _args, out, point=point: store.__setitem__(point, out)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def layer_activations(model: nn.Module, point: str, images: torch.Tensor, runtime: Runtime, *, batch_size: int = 256,
                      reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The tensor at ``point`` (see :func:`capture_features`) for uint8 ``images`` (N x C x H x W), eval
    mode, no grad, concatenated over batches on the CPU as float32. ``reduce`` maps each batch's
    tensor to a smaller one first (e.g. ``lambda a: a.mean((2, 3))`` for per-channel means)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with capture_features(model, [point]) as store:
            for start in range(0, len(images), batch_size):
                store.clear()
                with runtime.autocast():
                    model(to_model_input(images[start:start + batch_size], runtime))
                if point not in store:
                    raise TsbdError(f"feature point {point!r} was not reached in the forward pass")
                act = store[point].float()
                out.append((reduce(act) if reduce is not None else act).detach().cpu().contiguous())
    finally:
        model.train(was_training)
    if not out:
        raise TsbdError("layer_activations got no images")
    return torch.cat(out)


# ------------------------------------------------------------------------------------------
# Tracing the data flow of one forward pass (which module made which tensor).


@dataclasses.dataclass
class _Call:
    name: str
    module: nn.Module
    start: int  # event counter when the module was entered (pre-hook)
    end: int = -1  # event counter when it returned (forward hook)
    input: torch.Tensor | None = None  # its first tensor input
    input_makers: tuple[str, ...] = ()  # modules that had returned that tensor object when it was entered
    output: torch.Tensor | None = None


def _trace(model: nn.Module, input_shape: Sequence[int]) -> list[_Call]:
    """Run one eval-mode, no-grad forward pass on zeros of ``input_shape`` (C x H x W) and record, for every
    module call, its input and output tensors and which modules had returned that input. Tensors are
    matched by identity, so a module that returns its input (in-place ReLU, a Sequential) counts as one
    more maker of the same tensor; references are kept so ids stay unique."""
    try:
        param = next(model.parameters())
        device = param.device
    except StopIteration:
        device = torch.device("cpu")
    makers: dict[int, list[str]] = {}
    calls: list[_Call] = []
    open_calls: dict[str, list[_Call]] = {}
    counter = [0]

    def pre(name):
        def hook(module, args):
            counter[0] += 1
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
            call = _Call(name, module, counter[0], input=x,
                         input_makers=tuple(makers.get(id(x), ())) if x is not None else ())
            open_calls.setdefault(name, []).append(call)
        return hook

    def post(name):
        def hook(module, args, out):
            counter[0] += 1
            call = open_calls[name].pop()
            call.end = counter[0]
            if isinstance(out, torch.Tensor):
                call.output = out
                makers.setdefault(id(out), []).append(name)
            calls.append(call)
        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    except RuntimeError as err:
        raise TsbdError(f"cannot trace {type(model).__name__} on input of shape {tuple(input_shape)}: "
                        f"{str(err).splitlines()[0]}") from None
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return calls


def _own_maker(makers: Sequence[str]) -> str | None:
    """The module that really produced a tensor: the last maker that is not a container merely
    returning what one of its submodules (an earlier maker) returned."""
    for i in range(len(makers) - 1, -1, -1):
        if not any(m.startswith(makers[i] + ".") for m in makers[:i]):
            return makers[i]
    return None


def _spatial(t: torch.Tensor | None) -> tuple[int, int] | None:
    return tuple(t.shape[2:]) if isinstance(t, torch.Tensor) and t.ndim == 4 else None  # type: ignore[return-value]


def stage_outputs(model: nn.Module, input_shape: Sequence[int] = (3, 32, 32), min_size: int = 2) -> list[str]:
    """Feature points (see :func:`capture_features`) where the network's spatial stages end, in forward order.

    A stage ends where a module first reduces the spatial size: at every resolution, the input of
    the module call that downsamples it the least (the outermost one on ties, e.g. ``layer3`` rather
    than its first block). That input is named by the outermost module that returned it (passing
    over a container that spans several stages), else ``"<downsampler>:input"``. Stage ends smaller
    than ``min_size`` on a side (a 1x1 map after global pooling) are left out. PreActResNet18 ->
    ``layer1``, ``layer2``, ``layer3``, ``layer4`` (``layer4``
    as the input of ``avgpool``); VGG19-BN -> the ReLU before each max-pool at 32, 16, 8, 4 and 2
    pixels (``features.5`` ... ``features.51``); airbench -> ``normalize``, ``activ``, ``groups.0..2``.
    A final stage that ends in a functional pooling (no module) is not found; name it explicitly.
    """
    chosen: dict[tuple[int, int], _Call] = {}
    for call in _trace(model, input_shape):
        s_in, s_out = _spatial(call.input), _spatial(call.output)
        if s_in is None or s_out is None or not (s_out[0] < s_in[0] or s_out[1] < s_in[1]):
            continue
        ratio = (s_in[0] * s_in[1]) / max(1, s_out[0] * s_out[1])
        best = chosen.get(s_in)
        if best is None:
            chosen[s_in] = call
            continue
        best_ratio = (s_in[0] * s_in[1]) / max(1, _spatial(best.output)[0] * _spatial(best.output)[1])
        if ratio < best_ratio or (ratio == best_ratio and call.start < best.start):
            chosen[s_in] = call
    downsamplers = [c.name for c in chosen.values()]
    points = []
    for size, call in sorted(chosen.items(), key=lambda kv: kv[1].start):
        if min(size) < min_size:
            continue
        # the outermost module returning the tensor, but not a container spanning several stages
        # (airbench's ``groups`` returns ``groups.2``'s output; name it ``groups.2``)
        makers = [m for m in call.input_makers if not any(d.startswith(m + ".") for d in downsamplers)]
        points.append(makers[-1] if makers else f"{call.name}:input")
    return points


@dataclasses.dataclass(frozen=True)
class ClassifierLayout:
    """How the classifier reads the final feature map: the first ``nn.Linear`` called in the forward
    pass (``linear``) reads a flattened C x H x W map, so channel c is its input columns
    ``c * positions ... (c + 1) * positions - 1``."""

    linear: str
    channels: int
    positions: int

    def columns(self, channels: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Input columns of ``linear`` that carry the given feature channels."""
        ch = torch.as_tensor(channels, dtype=torch.int64).flatten()
        return (ch[:, None] * self.positions + torch.arange(self.positions)).flatten()


def classifier_layout(model: nn.Module, input_shape: Sequence[int] = (3, 32, 32)) -> ClassifierLayout:
    """Locate the classifier and the channel layout of the features it reads (see :class:`ClassifierLayout`).

    The channels are those of the last 4-D tensor a module returned before the classifier was
    called (PreActResNet18: ``avgpool`` -> 512 x 1 x 1; VGG19-BN: ``avgpool`` -> 512 x 7 x 7, 49
    columns per channel). When its size does not match the classifier's input, every input column
    is its own channel."""
    calls = _trace(model, input_shape)
    first = next((c for c in sorted(calls, key=lambda c: c.start) if isinstance(c.module, nn.Linear)), None)
    if first is None:
        raise TsbdError(f"{type(model).__name__} has no nn.Linear classifier; this method prunes its input features")
    n_in = first.module.in_features
    before = [c for c in calls if c.end < first.start and _spatial(c.output) is not None]
    if before:
        out = max(before, key=lambda c: c.end).output
        channels, positions = int(out.shape[1]), int(out.shape[2] * out.shape[3])
        if channels * positions == n_in:
            return ClassifierLayout(first.name, channels, positions)
    return ClassifierLayout(first.name, n_in, 1)


def bn_conv_pairs(model: nn.Module, input_shape: Sequence[int] = (3, 32, 32),
                  rule: str = "dataflow") -> list[tuple[str, str | None]]:
    """Every ``BatchNorm2d`` (module order) with the ``Conv2d`` that feeds it, or None.

    ``rule="dataflow"`` (default) traces one forward pass: the BN is paired with the conv whose output
    reaches it through channel-wise modules only (pooling, ReLU, Identity, Dropout), so that
    BN(conv(x)) channel k depends on conv filter k alone. A BN fed by anything else -- notably the
    residual sum ``conv2(.) + shortcut`` in front of a pre-activation block's ``bn1`` -- gets None:
    no single conv filter bounds that channel. PreActResNet18: every ``bn2`` <- the block's
    ``conv1``; ``layer1.0.bn1`` <- the stem ``conv1``; the other ``bn1`` -> None. Post-activation
    nets (VGG, airbench) pair every BN. ``rule="module-order"`` is BackdoorBench's CLP pairing (the
    most recent Conv2d before the BN in module order; wrong for pre-activation blocks, where it
    pairs ``bn1`` with the previous block's ``conv2`` or shortcut conv).
    """
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if rule == "module-order":
        pairs, last_conv = [], None
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                last_conv = (name, m)
            elif isinstance(m, nn.BatchNorm2d):
                ok = last_conv is not None and last_conv[1].out_channels == m.num_features
                pairs.append((name, last_conv[0] if ok else None))
        return pairs
    if rule != "dataflow":
        raise TsbdError(f"unknown BN-conv pairing rule {rule!r}; choose dataflow or module-order")
    calls = _trace(model, input_shape)
    made: dict[tuple[int, str], _Call] = {(id(c.output), c.name): c for c in calls if c.output is not None}
    first_call: dict[str, _Call] = {}
    for c in sorted(calls, key=lambda c: c.start):
        first_call.setdefault(c.name, c)
    mods = dict(model.named_modules())
    pairs = []
    for name, bn in bns:
        conv = None
        call = first_call.get(name)
        if call is not None and call.input is not None:
            tensor, makers = call.input, call.input_makers
            for _ in range(len(calls)):
                maker = _own_maker(makers)
                if maker is None:
                    break
                module = mods[maker]
                if isinstance(module, nn.Conv2d):
                    conv = maker if module.out_channels == bn.num_features else None
                    break
                if not isinstance(module, CHANNELWISE) or (id(tensor), maker) not in made:
                    break
                src = made[(id(tensor), maker)]
                tensor, makers = src.input, src.input_makers
                if tensor is None:
                    break
        pairs.append((name, conv))
    return pairs


# Modules that act on each channel separately (so a BN after them still sees one conv filter per channel).
CHANNELWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
               nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout, nn.Dropout2d)


# ------------------------------------------------------------------------------------------
# Pruning: zeroing channels in the weights themselves, so the state dict keeps its keys and shapes.


def zero_channels(module: nn.Module, channels: torch.Tensor | Sequence[int]) -> int:
    """Zero output channels in place: a Conv2d's filters (and bias), a BatchNorm's gamma and beta, or a
    Linear's rows (and bias). Returns the number of channels zeroed."""
    idx = torch.as_tensor(channels, dtype=torch.int64).flatten()
    if not isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
        raise TsbdError(f"cannot zero channels of a {type(module).__name__}; use a Conv2d, BatchNorm or Linear")
    if module.weight is None:
        raise TsbdError(f"{type(module).__name__} has no affine weight to zero (affine=False)")
    with torch.no_grad():
        module.weight[idx.to(module.weight.device)] = 0
        if module.bias is not None:
            module.bias[idx.to(module.bias.device)] = 0
    return len(idx)


def zero_linear_inputs(linear: nn.Linear, columns: torch.Tensor | Sequence[int]) -> int:
    """Zero a Linear's weight columns in place, cutting those input units off (pruning the features
    it reads). Returns the number of columns zeroed."""
    if not isinstance(linear, nn.Linear):
        raise TsbdError(f"zero_linear_inputs needs an nn.Linear, got {type(linear).__name__}")
    idx = torch.as_tensor(columns, dtype=torch.int64).flatten()
    with torch.no_grad():
        linear.weight[:, idx.to(linear.weight.device)] = 0
    return len(idx)
