"""Depth-elastic prefixes of residual networks: FlexTrain's configurations (Unsal et al.,
arXiv 2310.20457).

Configuration ``k`` runs the stem, the first ``k`` residual blocks and a classifier; the blocks
after ``k`` act as identity. Two rules for the classifier of a prefix that ends inside a narrower
stage (``head_rule(model)``; the model config's ``stage_heads`` picks one, logged as a param):

- ``zero_pad`` (default): the skipped blocks' option-A identity shortcuts (stride-2 subsampling
  plus zero-padded channels, no parameters) hand the one shared classifier the prefix's features
  zero-padded to its width. Cheap, but the classifier's columns then serve two meanings: a
  stage-1 feature and a stage-3 feature land on the same weights.
- ``stage_heads``: the model carries one extra linear classifier per narrower stage width
  (``StageHead.exits``, ~10 x width parameters each); a prefix is classified by the head of the
  stage it ends in, on its own pooled features. The full model's forward is unchanged.
  Experimental: FlexTrain with it diverged after 12 rounds on CIFAR-10 at 8 local steps per round
  (README, Elastic models), where ``zero_pad`` did not. Under ``zero_pad`` a prefix is the full
  network minus later residual branches, so shallow devices train what the full model reads;
  separate heads split that, which is the likely cause.

``depth_prefix`` returns an ``nn.Sequential`` that *shares* the full model's modules under the
same stage names, so its state-dict keys are exactly the global keys of that prefix: extracting
a configuration is a key filter, and training it trains the global tensors in place.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from flexray.errors import FlexrayError
from flexray.models.blocks import Head, stages
from flexray.models.resnet_cifar import BasicBlock, PreActBlock, ShortcutA

HEAD_RULE = "zero_pad"
"""The default way a shallow prefix meets the classifier: skipped blocks' shortcuts zero-pad channels."""

_BLOCKS = (BasicBlock, PreActBlock)


class Skip(nn.Sequential):
    """The identity shortcuts of the skipped blocks that change shape (parameter-free)."""


def block_names(model: nn.Module) -> list[str]:
    """Names of the residual blocks between the stem (first stage) and the head (last stage)."""
    named = stages(model)
    middle = named[1:-1]
    if len(named) < 3 or not all(isinstance(m, _BLOCKS) for _, m in middle):
        raise FlexrayError("config error: model.name: depth prefixes (flextrain, fedclass) need a residual model; "
                           "use resnet8, resnet20, resnet56 or preresnet18")
    return [n for n, _ in middle]


def num_configs(model: nn.Module) -> int:
    """The deepest configuration ``k`` (every block); configurations are ``0..num_configs``."""
    return len(block_names(model))


def _io(block: nn.Module) -> tuple[int, int, int]:
    """(input channels, output channels, stride) of a basic or pre-activation block."""
    return block.conv1.in_channels, block.conv2.out_channels, block.conv1.stride[0]  # type: ignore[union-attr,index]


class StageHead(Head):
    """Pool, flatten, the full-width linear classifier, plus one linear per narrower stage width
    (``exits``). Keys of the original head stay (``head.2.*``); the input's width picks the linear."""

    def __init__(self, head: Head, widths: list[int]) -> None:
        super().__init__(*head)
        linear: nn.Linear = head[2]  # type: ignore[assignment]
        self.exits = nn.ModuleDict({str(c): nn.Linear(c, linear.out_features) for c in widths})

    def linear(self, channels: int) -> nn.Linear:
        full: nn.Linear = self[2]  # type: ignore[assignment]
        return full if channels == full.in_features else self.exits[str(channels)]  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.shape[1])(self[1](self[0](x)))


class ExitView(Head):
    """A prefix's classifier: the pooling and only the one linear of its width, under the full
    head's key names, so a prefix's state keys never include the other stages' heads."""

    def __init__(self, head: StageHead, channels: int) -> None:
        super().__init__()
        self.add_module("0", head[0])
        self.add_module("1", head[1])
        if channels == head[2].in_features:  # type: ignore[union-attr]
            self.add_module("2", head[2])
        else:
            self.exits = nn.ModuleDict({str(channels): head.exits[str(channels)]})
        self._linear = [head.linear(channels)]  # a list: not registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear[0](self[1](self[0](x)))


def with_stage_heads(model: nn.Module) -> nn.Module:
    """Give a residual net one extra classifier per narrower stage width (``stage_heads``)."""
    blocks = [dict(stages(model))[n] for n in block_names(model)]
    last, head = stages(model)[-1]
    if not (isinstance(head, Head) and len(head) == 3 and isinstance(head[0], nn.AdaptiveAvgPool2d)
            and isinstance(head[2], nn.Linear)):
        raise FlexrayError("model.stage_heads: needs a pool-flatten-linear classifier (resnet8/20/56); "
                           "set stage_heads: false for this model")
    widths = sorted({c for b in blocks for c in _io(b)[:2]} - {head[2].in_features})
    setattr(model, last, StageHead(head, widths))
    return model


def head_rule(model: nn.Module) -> str:
    """``stage_heads`` if the model carries per-stage classifiers, else ``zero_pad``."""
    return "stage_heads" if isinstance(stages(model)[-1][1], StageHead) else HEAD_RULE


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
    head = named[last]
    if isinstance(head, StageHead):  # global pooling: the skipped blocks' subsampling changes nothing
        channels = _io(named[names[k - 1]])[1] if k else _io(named[names[0]])[0]
        layers.append((last, ExitView(head, channels)))
        return nn.Sequential(OrderedDict(layers))
    skips = [ShortcutA(cin, cout, stride) for cin, cout, stride in map(_io, (named[n] for n in names[k:]))]
    skips = [s for s in skips if s.stride > 1 or s.extra]
    if skips:
        layers.append(("skip", Skip(*skips)))
    layers.append((last, head))
    return nn.Sequential(OrderedDict(layers))


def prefix_keys(model: nn.Module, k: int) -> list[str]:
    """The global state keys configuration ``k`` holds (a prefix of the stages)."""
    return list(depth_prefix(model, k).state_dict())


def prefix_state(state: dict[str, torch.Tensor], model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """Configuration ``k``'s entries of a global state (copies)."""
    return {key: state[key].detach().clone() for key in prefix_keys(model, k)}


__all__ = [
    "HEAD_RULE", "ExitView", "Skip", "StageHead", "block_names", "depth_prefix", "head_rule", "num_configs",
    "prefix_keys", "prefix_state", "with_stage_heads",
]
