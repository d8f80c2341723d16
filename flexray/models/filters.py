"""Kept-filter sub-networks of plain chain CNNs: DISTREAL's structured dropout and REFT's pruning.

A keep set picks, per droppable layer (every Conv2d and hidden Linear), which output filters
stay; the next layer keeps the matching input channels (in groups of ``H x W`` after a Flatten).
``slim`` builds the physically smaller network and ``index`` says where each of its entries lives
in the full state, so the compute of a step (and the bytes of a pruned model) really fall. The
global <-> sub-model plumbing (``Index``, ``extract``, ``aggregate``, ``scaled``, ``Scaler``)
is ``flexray.models.elastic``'s; here only the keep sets differ (any positions per layer,
random or by L1 norm, rather than one leading or rolling window per width).

Only plain chains are supported: a residual block's sum would need the branches' keep sets
tied together, which neither paper specifies for arbitrary nets.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from flexray.errors import FlexrayError
from flexray.models import elastic

Keep = dict[str, torch.Tensor]
"""Per droppable layer: sorted positions of the filters kept."""

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Layer:
    """A weighted layer of the chain: its output width and what feeds it."""

    name: str
    channels: int  # output filters / features
    droppable: bool  # False for the classifier, whose outputs are the labels
    source: str | None  # droppable layer whose filters are this layer's inputs
    group: int  # input entries per source filter (H x W after a Flatten)


def chain(model: nn.Module) -> list[Layer]:
    """The Conv2d/Linear layers of a plain chain model, in execution order."""
    for name, m in model.named_modules():
        if list(m.children()) and not isinstance(m, nn.Sequential):
            raise FlexrayError(
                f"config error: model.name: filter dropout/pruning (distreal, uniform_dropout, reft) needs a plain "
                f"chain model; {name or 'model'} ({type(m).__name__}) has branches; use cnn, lenet or vgg"
            )
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise FlexrayError(f"config error: model.name: filter dropout/pruning (distreal, uniform_dropout, reft) does not "
                               f"support grouped convolution {name}; use cnn, lenet or vgg")
    weighted = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not weighted:
        raise FlexrayError("config error: model.name: filter dropout/pruning needs a model with Conv2d or Linear layers; "
                           "use cnn, lenet or vgg")
    out: list[Layer] = []
    prev: Layer | None = None
    for i, (name, m) in enumerate(weighted):
        fan_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        if prev is not None and fan_in % prev.channels:
            raise FlexrayError(f"filter dropout: cannot relate {name}'s {fan_in} inputs to {prev.channels} filters")
        group = fan_in // prev.channels if prev is not None else 1
        channels = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        layer = Layer(name, channels, i < len(weighted) - 1, prev.name if prev else None, group)
        out.append(layer)
        prev = layer
    return out


def droppable(model: nn.Module) -> list[Layer]:
    return [layer for layer in chain(model) if layer.droppable]


def widths(layers: list[Layer], rates: Mapping[str, float]) -> dict[str, int]:
    """Kept filters per droppable layer for dropout/pruning ``rates``: ``ceil((1 - d) * C)``."""
    return {la.name: elastic.scaled(la.channels, 1.0 - float(rates.get(la.name, 0.0))) for la in layers if la.droppable}


def _owner(model: nn.Module) -> dict[str, tuple[str | None, str | None, int]]:
    """Per module name: (layer owning its outputs, layer owning its inputs, input group)."""
    layers = {la.name: la for la in chain(model)}
    out: dict[str, tuple[str | None, str | None, int]] = {}
    last: Layer | None = None
    for name, m in model.named_modules():
        if name in layers:
            last = layers[name]
            out[name] = (last.name if last.droppable else None, last.source, last.group)
        elif isinstance(m, _BN) and last is not None:
            out[name] = (last.name if last.droppable else None, None, 1)
    return out


def index(model: nn.Module, keep: Keep) -> elastic.Index:
    """Where every state entry of the kept sub-network lives in the full state (None: whole dim)."""
    owners = _owner(model)
    out: elastic.Index = {}
    for name, m in model.named_modules():
        if name not in owners:
            continue
        rows, cols, group = owners[name]
        r = keep.get(rows) if rows else None
        c = keep.get(cols) if cols else None
        if c is not None and group > 1:
            c = (c[:, None] * group + torch.arange(group)).reshape(-1)
        for key, t in m.state_dict().items():
            full = f"{name}.{key}"
            if t.dim() == 0:
                out[full] = ()
            elif isinstance(m, _BN) or key == "bias":
                out[full] = (r,)
            else:
                out[full] = (r, c, *([None] * (t.dim() - 2)))
    return out


def kept_fraction(model: nn.Module, rates: Mapping[str, float]) -> dict[str, float]:
    """Per state entry: the fraction of mini-batches that train it under dropout ``rates``
    (its filter kept, and for a weight also its input channel), as ``index`` lays entries out."""
    layers = chain(model)
    width = widths(layers, rates)
    frac = {la.name: width[la.name] / la.channels for la in layers if la.droppable}
    owners = _owner(model)
    out: dict[str, float] = {}
    for name, m in model.named_modules():
        if name not in owners:
            continue
        rows, cols, _ = owners[name]
        for key in m.state_dict():
            f = frac.get(rows, 1.0) if rows else 1.0
            if cols and not (isinstance(m, _BN) or key == "bias"):
                f *= frac.get(cols, 1.0)
            out[f"{name}.{key}"] = f
    return out


def slim(model: nn.Module, width: Mapping[str, int]) -> nn.Module:
    """A physically smaller copy of ``model`` with ``width[layer]`` filters per droppable layer."""
    out = copy.deepcopy(model)
    layers = {la.name: la for la in chain(model)}
    owners = _owner(model)
    for name, m in list(out.named_modules()):
        if name not in owners:
            continue
        rows, cols, group = owners[name]
        n_out = width.get(rows, 0) if rows else 0
        n_in = width.get(cols, layers[cols].channels) * group if cols else 0
        if isinstance(m, nn.Conv2d):
            new: nn.Module = nn.Conv2d(n_in or m.in_channels, n_out or m.out_channels, m.kernel_size, m.stride,
                                       m.padding, m.dilation, bias=m.bias is not None, padding_mode=m.padding_mode)
        elif isinstance(m, nn.Linear):
            new = nn.Linear(n_in or m.in_features, n_out or m.out_features, bias=m.bias is not None)
        else:
            new = type(m)(n_out or m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent), attr, new)
    return out


def random_keep(layers: list[Layer], width: Mapping[str, int], generator: torch.Generator) -> Keep:
    """DISTREAL: a uniformly random set of ``width[l]`` filters per layer (fresh per mini-batch)."""
    return {
        la.name: torch.randperm(la.channels, generator=generator)[: width[la.name]].sort().values
        for la in layers if la.droppable and width[la.name] < la.channels
    }


def l1_keep(model: nn.Module, state: Mapping[str, torch.Tensor], width: Mapping[str, int]) -> Keep:
    """REFT: per layer, the ``width[l]`` filters of largest L1 norm (Li et al. 2017), in order."""
    out: Keep = {}
    for la in chain(model):
        if la.droppable and width[la.name] < la.channels:
            w = state[f"{la.name}.weight"]
            norms = w.abs().reshape(w.shape[0], -1).sum(1)
            out[la.name] = norms.topk(width[la.name]).indices.sort().values
    return out


def dead_inputs(model: nn.Module, alive: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per weight key: the input columns fed by filters not ``alive`` (bool per droppable layer)."""
    out: dict[str, torch.Tensor] = {}
    for la in chain(model):
        live = alive.get(la.source) if la.source else None
        if live is not None and not bool(live.all()):
            cols = (~live).nonzero().flatten()
            out[f"{la.name}.weight"] = (cols[:, None] * la.group + torch.arange(la.group)).reshape(-1)
    return out


def silence(state: Mapping[str, torch.Tensor], dead: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero the ``dead_inputs`` columns, so the network computes exactly its alive sub-network:
    REFT's never-trained filters would otherwise feed their init noise forward. The filters keep
    their own weights, so a later device that trains them recruits them."""
    out = dict(state)
    for key, cols in dead.items():
        out[key] = out[key].index_fill(1, cols, 0.0)
    return out


def grid(ix: tuple[torch.Tensor | None, ...], shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """Broadcast index tensors selecting the sub-block ``ix`` of a tensor of ``shape``."""
    full = [i if i is not None else torch.arange(shape[d]) for d, i in enumerate(ix)]
    return tuple(t.view([-1 if j == d else 1 for j in range(len(full))]) for d, t in enumerate(full))


def gather(t: torch.Tensor, ix: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    for dim, i in enumerate(ix):
        if i is not None:
            t = t.index_select(dim, i)
    return t


def scatter_(t: torch.Tensor, ix: tuple[torch.Tensor | None, ...], value: torch.Tensor) -> None:
    """Write the sub-block ``value`` back into ``t`` at ``ix`` (in place)."""
    if all(i is None for i in ix):
        t.copy_(value)
    else:
        t.index_put_(grid(ix, t.shape), value.to(t.dtype))


@contextmanager
def masked(model: nn.Module, keep: Keep) -> Iterator[nn.Module]:
    """The full network with dropped filters' outputs zeroed: what a kept sub-network must equal."""
    owners = _owner(model)
    handles = []
    for name, m in model.named_modules():
        rows = owners.get(name, (None, None, 1))[0]
        if rows is None or rows not in keep:
            continue
        width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features if isinstance(m, nn.Linear) else m.num_features
        mask = torch.zeros(width)
        mask[keep[rows]] = 1.0

        def hook(_m: nn.Module, _i: tuple, out: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
            return out * mask.view(1, -1, *([1] * (out.dim() - 2)))

        handles.append(m.register_forward_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def add_scalers(model: nn.Module, width: Mapping[str, int], full: list[Layer]) -> nn.Module:
    """Inverted dropout: scale a kept layer's outputs by ``C / kept`` while training (in place)."""
    channels = {la.name: la.channels for la in full}
    for name, k in width.items():
        if k < channels[name]:
            model.get_submodule(name).register_forward_hook(elastic.Scaler(k / channels[name]))
    return model


class DropoutSGD:
    """SGD where every mini-batch trains a fresh random kept-filter sub-network of ``full``.

    The sub-network is physically slim (its step costs its own FLOPs); its weights are gathered
    from ``full`` before the step and the SGD step (momentum, weight decay) is applied to the
    kept entries of ``full`` only, so dropped filters receive no update in that step.
    """

    def __init__(self, full: nn.Module, width: Mapping[str, int], sub: nn.Module | None = None,
                 scaler: bool = True) -> None:
        self.full, self.width = full, dict(width)
        self.layers = chain(full)
        if sub is None:
            sub = slim(full, self.width)
            if scaler:
                add_scalers(sub, self.width, self.layers)
        self.sub = sub
        self.buffers: dict[str, torch.Tensor] = {}
        self.loss = nn.CrossEntropyLoss()

    def step(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator, lr: float,
             momentum: float = 0.0, weight_decay: float = 0.0) -> float:
        keep = random_keep(self.layers, self.width, generator)
        ix = index(self.full, keep)
        state = self.full.state_dict()
        with torch.no_grad():
            for k, t in self.sub.state_dict().items():
                t.copy_(gather(state[k], ix[k]))
        self.sub.train()
        self.sub.zero_grad(set_to_none=True)
        loss = self.loss(self.sub(xb), yb)
        loss.backward()
        with torch.no_grad():
            for k, p in self.sub.named_parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                if weight_decay:
                    g = g + weight_decay * p
                if momentum:
                    buf = self.buffers.setdefault(k, torch.zeros_like(state[k]))
                    g = gather(buf, ix[k]) * momentum + g
                    scatter_(buf, ix[k], g)
                scatter_(state[k], ix[k], p - lr * g)
            for k, b in self.sub.named_buffers():
                scatter_(state[k], ix[k], b)
        return float(loss.detach())


__all__ = [
    "DropoutSGD", "Keep", "Layer", "add_scalers", "chain", "dead_inputs", "droppable", "gather", "grid", "index",
    "kept_fraction", "l1_keep", "masked", "random_keep", "scatter_", "silence", "slim", "widths",
]
