"""Depth-elastic prefixes of residual networks: FlexTrain's configurations (Unsal et al.,
arXiv 2310.20457).

Configuration ``k`` runs the stem, the first ``k`` residual blocks and the classifier; the blocks
after ``k`` act as identity. Where a skipped block changes shape, "identity" is He et al.'s
option-A identity shortcut (stride-2 subsampling plus zero-padded channels, no parameters), so
a prefix that ends inside a narrower stage hands the classifier its features zero-padded to the
classifier's width: one shared head, no per-stage heads (``HEAD_RULE``, logged as a param).

``depth_prefix`` returns an ``nn.Sequential`` that *shares* the full model's modules under the
same stage names, so its state-dict keys are exactly the global keys of that prefix: extracting
a configuration is a key filter, and training it trains the global tensors in place.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from flexray.errors import FlexrayError
from flexray.models.resnet_cifar import BasicBlock, PreActBlock, ShortcutA
from flexray.models.zoo import stages

HEAD_RULE = "zero_pad"
"""How a shallow prefix meets the classifier: skipped blocks' identity shortcuts zero-pad channels."""

_BLOCKS = (BasicBlock, PreActBlock)


class Skip(nn.Sequential):
    """The identity shortcuts of the skipped blocks that change shape (parameter-free)."""


def block_names(model: nn.Module) -> list[str]:
    """Names of the residual blocks between the stem (first stage) and the head (last stage)."""
    named = stages(model)
    middle = named[1:-1]
    if len(named) < 3 or not all(isinstance(m, _BLOCKS) for _, m in middle):
        raise FlexrayError("depth configurations need a residual model (resnet8/20/56, preresnet18)")
    return [n for n, _ in middle]


def num_configs(model: nn.Module) -> int:
    """The deepest configuration ``k`` (every block); configurations are ``0..num_configs``."""
    return len(block_names(model))


def _io(block: nn.Module) -> tuple[int, int, int]:
    """(input channels, output channels, stride) of a basic or pre-activation block."""
    return block.conv1.in_channels, block.conv2.out_channels, block.conv1.stride[0]  # type: ignore[union-attr,index]


def depth_prefix(model: nn.Module, k: int) -> nn.Sequential:
    """Configuration ``k`` of ``model``: stem, first ``k`` blocks, identity for the rest, head.

    Shares modules (and so weights) with ``model``; ``k = num_configs(model)`` is the full model.
    """
    names = block_names(model)
    if not 0 <= k <= len(names):
        raise FlexrayError(f"depth configuration k={k} out of range 0..{len(names)}")
    named = dict(stages(model))
    first, last = stages(model)[0][0], stages(model)[-1][0]
    layers: list[tuple[str, nn.Module]] = [(first, named[first]), *((n, named[n]) for n in names[:k])]
    skips = [ShortcutA(cin, cout, stride) for cin, cout, stride in map(_io, (named[n] for n in names[k:]))]
    skips = [s for s in skips if s.stride > 1 or s.extra]
    if skips:
        layers.append(("skip", Skip(*skips)))
    layers.append((last, named[last]))
    return nn.Sequential(OrderedDict(layers))


def prefix_keys(model: nn.Module, k: int) -> list[str]:
    """The global state keys configuration ``k`` holds (a prefix of the stages)."""
    return list(depth_prefix(model, k).state_dict())


def prefix_state(state: dict[str, torch.Tensor], model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """Configuration ``k``'s entries of a global state (copies)."""
    return {key: state[key].detach().clone() for key in prefix_keys(model, k)}


__all__ = ["HEAD_RULE", "Skip", "block_names", "depth_prefix", "num_configs", "prefix_keys", "prefix_state"]
