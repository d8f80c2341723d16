"""Width-elastic sub-models: the building blocks HeteroFL, FjORD and FedRolex share.

A width-``p`` sub-model is the same architecture with every hidden channel count ``C`` cut to
``ceil(p * C)``; the first layer's inputs and the classifier's outputs keep their size. It is
built generically from the full model (``narrow``): Conv2d, Linear and BatchNorm modules are
replaced by narrower ones, so it works for every CNN of the zoo (``cnn``, ``lenet``,
``resnet8/20/56``, ``preresnet18``) without a width knob per architecture.

Which global entries a sub-model holds is a per-dimension channel index (``Index``): the leading
``ceil(p * C)`` channels (HeteroFL, Diao et al. ICLR 2021; FjORD's ordered dropout, Horvath et al.
NeurIPS 2021) or a window rolling by one channel per round and wrapping around (FedRolex, Alam et
al. NeurIPS 2022). A dimension is identified by its global size ``C``, so layers of equal width
share a window and consecutive layers stay aligned. A Linear after a Flatten sees ``C x H x W``
features; its input is indexed in groups of ``H x W`` per channel.

Caveat: the parameter-free CIFAR shortcut (option A) zero-pads ``ceil(p*C_out) - ceil(p*C_in)``
channels in the sub-model, so a sub-model is the width-``p`` network, not an exact subnetwork of
the full one (HeteroFL builds its sub-models the same way).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from flexray.errors import FlexrayError
from flexray.models.resnet_cifar import BasicBlock, ShortcutA

State = dict[str, torch.Tensor]
Index = dict[str, tuple[torch.Tensor | None, ...]]
"""Per state key, per dimension: the global positions the sub-model's entries come from (None: all)."""


@dataclass(frozen=True)
class Axis:
    """A tensor dimension that scales with width: ``channels`` global channels of ``group`` entries."""

    channels: int
    group: int = 1

    def size(self, rate: float) -> int:
        return scaled(self.channels, rate) * self.group


Layout = dict[str, tuple[Axis | None, ...]]
"""Per state key, per dimension: its width axis, or None where the size is fixed."""

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def scaled(channels: int, rate: float) -> int:
    """``ceil(rate * channels)``, at least 1 (rounded first so 0.1 * 30 is 3, not 4)."""
    return max(1, math.ceil(round(rate * channels, 9)))


def check_rate(rate: float) -> float:
    if not 0 < rate <= 1:
        raise FlexrayError(f"width rate must be in (0, 1], got {rate}")
    return float(rate)


# ---------------------------------------------------------------- layout and narrowing


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, bool, bool, int]]:
    """(name, module, is_first, is_classifier, channels of the previous layer) for every layer.

    Registration order is execution order for the zoo's Sequential stages and blocks; the
    first Conv2d/Linear consumes the input and the last Linear is the classifier.
    """
    for name, m in model.named_modules():
        own = list(m.parameters(recurse=False)) + [b for b in m.buffers(recurse=False)]
        if own and not isinstance(m, (nn.Conv2d, nn.Linear, *_BN)):
            raise FlexrayError(f"config error: model.name: width scaling (heterofl, fjord, fedrolex) does not support "
                               f"layer {name or 'model'} ({type(m).__name__}); use a model of Conv2d, Linear and "
                               "BatchNorm layers (cnn, vgg, resnet20, torchvision:resnet18)")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise FlexrayError(f"config error: model.name: width scaling (heterofl, fjord, fedrolex) does not support "
                               f"grouped convolution {name}; use a model without grouped or depthwise convolutions "
                               "(cnn, vgg, resnet20, torchvision:resnet18)")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, *_BN))]
    weighted = [n for n, m in layers if isinstance(m, (nn.Conv2d, nn.Linear))]
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    if not weighted:
        raise FlexrayError("config error: model.name: width scaling needs a model with Conv2d or Linear layers; "
                           "use cnn, vgg or resnet20")
    first, last = weighted[0], (linears[-1] if linears else None)
    prev = 0
    for name, m in layers:
        yield name, m, name == first, name == last, prev
        if isinstance(m, nn.Conv2d):
            prev = m.out_channels
        else:
            prev = m.out_features if isinstance(m, nn.Linear) else m.num_features


def _linear_in_axis(m: nn.Linear, prev: int, first: bool) -> Axis | None:
    if first:
        return None
    if prev <= 0 or m.in_features % prev:
        raise FlexrayError(f"width scaling: cannot relate Linear input {m.in_features} to {prev} channels")
    return Axis(prev, m.in_features // prev)


def width_layout(model: nn.Module) -> Layout:
    """The width axis of every dimension of every state entry of ``model`` (the full model)."""
    out: Layout = {}
    for name, m, first, classifier, prev in _walk(model):
        pre = f"{name}." if name else ""
        if isinstance(m, nn.Conv2d):
            axes: dict[str, tuple[Axis | None, ...]] = {
                "weight": (Axis(m.out_channels), None if first else Axis(m.in_channels), None, None),
                "bias": (Axis(m.out_channels),),
            }
        elif isinstance(m, nn.Linear):
            rows = None if classifier else Axis(m.out_features)
            axes = {"weight": (rows, _linear_in_axis(m, prev, first)), "bias": (rows,)}
        else:
            c = Axis(m.num_features)
            axes = {"weight": (c,), "bias": (c,), "running_mean": (c,), "running_var": (c,), "num_batches_tracked": ()}
        for key, value in m.state_dict().items():
            out[pre + key] = axes[key]
    return out


def _narrow_module(m: nn.Module, first: bool, classifier: bool, prev: int, rate: float) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        cin = m.in_channels if first else scaled(m.in_channels, rate)
        return nn.Conv2d(cin, scaled(m.out_channels, rate), m.kernel_size, m.stride, m.padding, m.dilation,
                         bias=m.bias is not None, padding_mode=m.padding_mode)
    if isinstance(m, nn.Linear):
        ax = _linear_in_axis(m, prev, first)
        fin = m.in_features if ax is None else ax.size(rate)
        return nn.Linear(fin, m.out_features if classifier else scaled(m.out_features, rate), bias=m.bias is not None)
    return type(m)(scaled(m.num_features, rate), m.eps, m.momentum, m.affine, m.track_running_stats)


def narrow(model: nn.Module, rate: float) -> nn.Module:
    """The width-``rate`` copy of ``model`` (fresh weights; load a sub-state into it)."""
    check_rate(rate)
    out = copy.deepcopy(model)
    for name, m, first, classifier, prev in list(_walk(out)):
        parent_name, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent_name), attr, _narrow_module(m, first, classifier, prev, rate))
    for block in out.modules():  # parameter-free shortcuts pad to the narrowed widths
        if isinstance(block, BasicBlock) and isinstance(block.shortcut, ShortcutA):
            block.shortcut.extra = block.conv1.out_channels - block.conv1.in_channels
    return out


def sub_shapes(layout: Layout, rate: float, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Size]:
    """Shapes of the width-``rate`` sub-model's state (``like``: the global state)."""
    return {
        k: torch.Size(ax.size(rate) if ax else like[k].shape[d] for d, ax in enumerate(axes))
        for k, axes in layout.items()
    }


# ---------------------------------------------------------------- indices, extraction, aggregation


def channel_index(axis: Axis, rate: float, offset: int | None = None) -> torch.Tensor | None:
    """Global positions of a width-``rate`` dimension: leading (``offset`` None) or rolling.

    The rolling window starts at ``offset mod C`` and wraps around (FedRolex); a dimension the
    sub-model keeps whole is returned as None (all positions, in order).
    """
    c = scaled(axis.channels, rate)
    if c == axis.channels:
        return None
    chans = torch.arange(c) if offset is None else (int(offset) + torch.arange(c)) % axis.channels
    if axis.group == 1:
        return chans
    return (chans[:, None] * axis.group + torch.arange(axis.group)).reshape(-1)


def sub_index(layout: Layout, rate: float, offset: int | None = None) -> Index:
    """Where every entry of the width-``rate`` sub-model lives in the global state."""
    return {k: tuple(channel_index(ax, rate, offset) if ax else None for ax in axes) for k, axes in layout.items()}


def whole_index(state: Mapping[str, torch.Tensor]) -> Index:
    """Every entry at its own position: the index of depth prefixes, which keep whole tensors."""
    return {k: (None,) * v.dim() for k, v in state.items()}


def extract(state: Mapping[str, torch.Tensor], index: Index, keys: Sequence[str] | None = None) -> State:
    """The sub-model's state: ``state`` gathered at ``index`` (a copy, never a view)."""
    out: State = {}
    for k in keys if keys is not None else index:
        t = state[k]
        for dim, ix in enumerate(index[k]):
            if ix is not None:
                t = t.index_select(dim, ix)
        out[k] = t.detach().clone()
    return out


def leading_view(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The leading ``shape`` block of ``t`` as a view, so gradients and in-place BN updates reach ``t``."""
    for dim, size in enumerate(shape):
        if size != t.shape[dim]:
            t = t.narrow(dim, 0, size)
    return t


def _positions(ix: tuple[torch.Tensor | None, ...], shape: torch.Size) -> tuple[torch.Tensor, ...]:
    full = [i if i is not None else torch.arange(shape[d]) for d, i in enumerate(ix)]
    return tuple(t.view([-1 if j == d else 1 for j in range(len(full))]) for d, t in enumerate(full))


@dataclass
class Part:
    """One device's sub-model update for ``aggregate``: its tensors, where they go, and its weight.

    ``rows``: for the classifier keys, which output rows (labels) count (HeteroFL's masked
    classifier aggregation); None counts all.
    """

    tensors: Mapping[str, torch.Tensor]
    index: Index
    weight: float
    rows: torch.Tensor | None = None


def aggregate(state: Mapping[str, torch.Tensor], parts: Sequence[Part], classifier: Sequence[str] = ()) -> State:
    """Each global entry becomes the weighted mean of the parts that cover it; the rest keep their value.

    Accumulated in float64; returns float64 tensors (cast back with ``cast_like``).
    """
    num = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in state.items()}
    den = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in state.items()}
    for part in parts:
        for k, v in part.tensors.items():
            w = torch.full(v.shape, float(part.weight), dtype=torch.float64)
            if part.rows is not None and k in classifier:
                w = w * part.rows.to(torch.float64).view(-1, *([1] * (v.dim() - 1)))
            ix = part.index[k]
            if all(i is None for i in ix):
                num[k] += w * v.to(torch.float64)
                den[k] += w
            else:
                pos = _positions(ix, state[k].shape)
                num[k].index_put_(pos, w * v.to(torch.float64), accumulate=True)
                den[k].index_put_(pos, w, accumulate=True)
    return {
        k: torch.where(den[k] > 0, num[k] / den[k].clamp_min(1e-300), state[k].to(torch.float64)) for k in state
    }


# ---------------------------------------------------------------- HeteroFL's training-time modules


def classifier_keys(model: nn.Module) -> list[str]:
    """State keys of the last Linear (the classifier whose rows are labels)."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not name:
        return []
    return [f"{name[-1]}.{k}" for k in model.get_submodule(name[-1]).state_dict()]


class Scaler:
    """HeteroFL's scaler: divide a layer's output by ``rate`` in training, so a width-``p``
    sub-model's activations match the full model's in scale (identity at evaluation)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return output / self.rate if module.training and self.rate != 1 else None


def add_scalers(model: nn.Module, rate: float) -> nn.Module:
    """Scale every Conv2d and hidden Linear output by 1/``rate`` during training (in place)."""
    last = classifier_keys(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) or (isinstance(m, nn.Linear) and f"{name}.weight" not in last):
            m.register_forward_hook(Scaler(rate))
    return model


@contextmanager
def mask_logits(model: nn.Module, labels: torch.Tensor | None) -> Iterator[None]:
    """Zero the logits of labels a device does not hold while it trains (HeteroFL's masked
    classifier), so their rows get no gradient."""
    keys = classifier_keys(model)
    if labels is None or not keys:
        yield
        return
    head = model.get_submodule(keys[0].rpartition(".")[0])
    keep = labels.to(torch.bool)

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return output.masked_fill(~keep, 0.0) if module.training else None

    handle = head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def batch_stat_bn(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Static BN at evaluation: normalise with the batch's own statistics, not running ones.

    Devices never ship running statistics under static BN (HeteroFL), so the global model has
    none worth using; hiding the buffers makes BN use batch statistics even in eval mode.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN)] if enabled else []
    saved = [(m.running_mean, m.running_var) for m in bns]
    for m in bns:
        m.running_mean, m.running_var = None, None
    try:
        yield
    finally:
        for m, (mean, var) in zip(bns, saved):
            m.running_mean, m.running_var = mean, var


def is_bn_stat(key: str) -> bool:
    return key.rpartition(".")[2] in BN_STATS


__all__ = [
    "Axis", "BN_STATS", "Index", "Layout", "Part", "Scaler", "add_scalers", "aggregate", "batch_stat_bn",
    "channel_index", "check_rate", "classifier_keys", "extract", "is_bn_stat", "leading_view", "mask_logits",
    "narrow", "scaled", "sub_index", "sub_shapes", "whole_index", "width_layout",
]
