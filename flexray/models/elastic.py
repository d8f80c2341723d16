"""Sub-model plumbing shared by every method that trains part of a global model.

An ``Index`` says, per state entry and dimension, which global positions a sub-model's entries
come from; ``extract`` gathers a sub-model's state and ``aggregate`` averages sub-model updates
back into the global state (each entry over the parts that cover it). Which positions a method
keeps is decided elsewhere: width slices (``flexray.models.slices``), kept filters
(``flexray.models.filters``), depth prefixes (``whole_index``), all on the channel groups of
``flexray.models.channels``. HeteroFL's training-time modules (scaler, masked classifier, static
BatchNorm) live here too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from flexray.errors import FlexrayError

State = dict[str, torch.Tensor]
Index = dict[str, tuple[torch.Tensor | None, ...]]
"""Per state key, per dimension: the global positions the sub-model's entries come from (None: all)."""


_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def scaled(channels: int, rate: float) -> int:
    """``ceil(rate * channels)``, at least 1 (rounded first so 0.1 * 30 is 3, not 4)."""
    return max(1, math.ceil(round(rate * channels, 9)))


def check_rate(rate: float) -> float:
    if not 0 < rate <= 1:
        raise FlexrayError(f"width rate must be in (0, 1], got {rate}")
    return float(rate)


# ---------------------------------------------------------------- indices, extraction, aggregation


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
                t = t.index_select(dim, ix.to(t.device))
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
    """Output hook dividing a layer's output by ``rate`` in training (DISTREAL's inverted
    dropout over kept output channels; identity at evaluation)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        return output / self.rate if module.training and self.rate != 1 else None


def normalised(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers (which cancel a scaler's effect on step sizes)."""
    return any(isinstance(m, _BN) for m in model.modules())


class FanInScaler:
    """Input pre-hook multiplying a layer's input by ``full fan-in / kept fan-in``.

    HeteroFL's scaler (sec. 3.2) exists so a width-``p`` sub-model's pre-activations have the full
    model's scale: a layer that sums over ``ceil(p * C)`` of its ``C`` inputs sums ~``p`` times as
    much. The paper divides every conv's *output* by ``p`` and lets the BatchNorm after it absorb
    the error; without BatchNorm that also scales the first layer (whose input is never narrowed)
    and the biases, ``1/p`` more per layer, and a no-BN network diverges (the quickstart's cnn
    stayed at chance). Scaling each layer's input by its own fan-in ratio is exact where the paper
    is approximate, is 1 for the first layer and depthwise convs, and leaves the full model alone.
    It stays on at evaluation: it is part of the function the sub-model trained.

    Scaling a layer's input by ``f`` also scales its weight gradient by ``f`` and its output's
    sensitivity to the weights by ``f``: the layer's effective learning rate grows ``f^2``
    (x256 at p = 1/16), and a network without normalisation diverges at the learning rate the full
    model trains at. A layer followed by BatchNorm in training mode is scale-invariant, so there the
    factor changes neither the forward pass nor the gradients (as the paper's output scaler does
    not in the paper's BatchNorm models); what remains is the classifier's input, which then has the
    full model's scale. Hence the width methods' ``scaler: auto``: on for BatchNorm models, where it
    is the paper's setting and harmless, off for the others, where it diverges.
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, _module: nn.Module, inputs: tuple) -> tuple:
        return (inputs[0] * self.factor, *inputs[1:])


def fan_in(module: nn.Module) -> int:
    """Inputs one output of a Conv2d (per group) or Linear sums over."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups
    return int(module.in_features)  # nn.Linear


def add_scalers(sub: nn.Module, full: nn.Module) -> nn.Module:
    """Give every Conv2d and Linear of the sub-model ``sub`` whose fan-in is narrower than in
    ``full`` (same module names) a ``FanInScaler`` (in place)."""
    wide = dict(full.named_modules())
    for name, m in sub.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name in wide:
            factor = fan_in(wide[name]) / fan_in(m)
            if factor != 1:
                m.register_forward_pre_hook(FanInScaler(factor))
    return sub


@contextmanager
def mask_logits(model: nn.Module, labels: torch.Tensor | None) -> Iterator[None]:
    """Zero the logits of labels a device does not hold while it trains (HeteroFL's masked
    classifier), so their rows get no gradient."""
    keys = classifier_keys(model)
    if labels is None or not keys:
        yield
        return
    head = model.get_submodule(keys[0].rpartition(".")[0])
    keep = labels.to(device=next(head.parameters()).device, dtype=torch.bool)  # where the logits are

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


@contextmanager
def batch_statistics(*models: nn.Module) -> Iterator[None]:
    """Evaluation mode except BatchNorm, which normalises with the batch's statistics: the
    comparison of a sub-network with its masked full network then sees activations of order one
    (running statistics of a fresh deep net shrink them towards zero) and no random dropout or
    stochastic depth. BatchNorm buffers are restored afterwards."""
    saved = []
    for model in models:
        saved.append((model, model.training, {k: v.clone() for k, v in model.named_buffers()}))
        model.eval()
        for m in model.modules():
            if isinstance(m, _BN):
                m.train()
    try:
        yield
    finally:
        for model, was, buffers in saved:
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])
            model.train(was)


def is_bn_stat(key: str) -> bool:
    return key.rpartition(".")[2] in BN_STATS


__all__ = [
    "BN_STATS", "FanInScaler", "Index", "Part", "Scaler", "add_scalers", "aggregate", "batch_stat_bn",
    "batch_statistics", "check_rate", "classifier_keys", "extract", "fan_in", "is_bn_stat", "leading_view",
    "mask_logits", "normalised", "scaled", "whole_index",
]
