"""Kept-filter sub-networks: DISTREAL's structured dropout and REFT's pruning, on any CNN.

A keep set picks, per channel group (``flexray.models.channels``: the channels a conv, its
BatchNorm, a residual stream or a depthwise conv couple), which channels stay. ``slim`` builds the
physically smaller network and ``index`` says where each of its entries lives in the full state,
so the compute of a step (and the bytes of a pruned model) really fall. The global <-> sub-model
plumbing (``Index``, ``extract``, ``aggregate``, ``scaled``, ``Scaler``) is
``flexray.models.elastic``'s; here only the keep sets differ from the width methods' (any
positions per group, random or by L1 norm, rather than one leading or rolling window).

The functions take the full model and look its groups up (``channel_groups`` analyses a model
object once); the "layers" a dropout rate is given for are the groups, named by their root layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from flexray.models import elastic
from flexray.models.channels import Group, Keep, channel_groups

Layer = Group


def chain(model: nn.Module) -> list[Group]:
    """The channel groups of ``model`` (refuses, in one line, a model they cannot cover)."""
    return list(channel_groups(model).groups)


droppable = chain


def widths(layers: list[Group], rates: Mapping[str, float]) -> dict[str, int]:
    """Kept channels per group for dropout/pruning ``rates``: ``ceil((1 - d) * C)``."""
    return {g.name: elastic.scaled(g.channels, 1.0 - float(rates.get(g.name, 0.0))) for g in layers}


def index(model: nn.Module, keep: Keep) -> elastic.Index:
    """Where every state entry of the kept sub-network lives in the full state (None: whole dim)."""
    return channel_groups(model).index(keep)


def kept_fraction(model: nn.Module, rates: Mapping[str, float]) -> dict[str, float]:
    """Per state entry: the fraction of mini-batches that train it under dropout ``rates``
    (its filter kept, and for a weight also its input channel), as ``index`` lays entries out."""
    groups = channel_groups(model)
    return groups.kept_fraction(widths(list(groups.groups), rates))


def slim(model: nn.Module, width: Mapping[str, int]) -> nn.Module:
    """A physically smaller copy of ``model`` with ``width[group]`` channels per group."""
    groups = channel_groups(model)
    return groups.slim(model, groups.leading(width))


def rewire(model: nn.Module, sub: nn.Module, keep: Keep) -> None:
    """Point a slim network's parameter-free channel maps at ``keep`` (see ``ChannelGroups.rewire``)."""
    channel_groups(model).rewire(model, sub, keep)


def random_keep(layers: list[Group], width: Mapping[str, int], generator: torch.Generator) -> Keep:
    """DISTREAL: a uniformly random set of ``width[g]`` channels per group (fresh per mini-batch)."""
    return {g.name: torch.randperm(g.channels, generator=generator)[: width[g.name]].sort().values
            for g in layers if width[g.name] < g.channels}


def l1_keep(model: nn.Module, state: Mapping[str, torch.Tensor], width: Mapping[str, int]) -> Keep:
    """REFT: per group, the ``width[g]`` channels of largest filter L1 norm (Li et al. 2017), in order."""
    return channel_groups(model).l1(state, width)


def dead_inputs(model: nn.Module, alive: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per weight key: the input columns fed by channels not ``alive`` (bool per group)."""
    return channel_groups(model).dead_inputs(alive)


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
    """The sub-block ``ix`` of ``t``; the indices (CPU tensors, from the CPU-seeded keeps) go where ``t`` is."""
    for dim, i in enumerate(ix):
        if i is not None:
            t = t.index_select(dim, i.to(t.device))
    return t


def scatter_(t: torch.Tensor, ix: tuple[torch.Tensor | None, ...], value: torch.Tensor) -> None:
    """Write the sub-block ``value`` back into ``t`` at ``ix`` (in place)."""
    if all(i is None for i in ix):
        t.copy_(value)
    else:
        t.index_put_(grid(ix, t.shape), value.to(t.dtype))


@contextmanager
def masked(model: nn.Module, keep: Keep) -> Iterator[nn.Module]:
    """The full network with dropped channels zeroed: what a kept sub-network must equal."""
    with channel_groups(model).masked(model, keep) as m:
        yield m


def add_scalers(model: nn.Module, width: Mapping[str, int], full: nn.Module) -> nn.Module:
    """Inverted dropout: scale a kept layer's outputs by ``C / kept`` while training (in place);
    ``full`` is the model the groups were traced on."""
    return channel_groups(full).add_scalers(model, width)


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
                add_scalers(sub, self.width, full)
        self.sub = sub
        self.buffers: dict[str, torch.Tensor] = {}
        self.loss = nn.CrossEntropyLoss()

    def step(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator, lr: float,
             momentum: float = 0.0, weight_decay: float = 0.0) -> float:
        keep = random_keep(self.layers, self.width, generator)
        ix = index(self.full, keep)
        rewire(self.full, self.sub, keep)
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
    "kept_fraction", "l1_keep", "masked", "random_keep", "rewire", "scatter_", "silence", "slim", "widths",
]
