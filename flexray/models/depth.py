"""Depth-elastic prefixes of residual networks: FlexTrain's configurations (Unsal et al.,
arXiv 2310.20457).

Configuration ``k`` runs the stem, the first ``k`` residual blocks and a classifier; the blocks
after ``k`` act as identity. The blocks are the stages between stem and head: a CIFAR ResNet's
basic blocks, a torchvision ResNet's basic or bottleneck blocks (``flexray.models.tv`` makes each
one a stage) and a ViT's encoder blocks (``flexray.models.vit``, shape-preserving, so skipping one
is the identity). Two rules for the classifier of a prefix that ends inside a narrower
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
from flexray.models.vit import EncoderBlock

HEAD_RULE = "zero_pad"
"""The default way a shallow prefix meets the classifier: skipped blocks' shortcuts zero-pad channels."""

_BLOCKS = (BasicBlock, PreActBlock, EncoderBlock)
_TV_BLOCKS = ("BasicBlock", "Bottleneck")  # torchvision.models.resnet, one stage each (flexray.models.tv)
RESIDUAL_MODELS = "resnet8, resnet20, resnet56, preresnet18, vit or torchvision:resnet18/34/50"


class Skip(nn.Sequential):
    """The identity shortcuts of the skipped blocks that change shape (parameter-free)."""


def _residual(block: nn.Module) -> bool:
    kind = type(block)
    torchvision = kind.__module__ == "torchvision.models.resnet" and kind.__name__ in _TV_BLOCKS
    return isinstance(block, _BLOCKS) or torchvision


def block_names(model: nn.Module) -> list[str]:
    """Names of the residual blocks between the stem (first stage) and the head (last stage)."""
    named = stages(model)
    middle = named[1:-1]
    if len(named) < 3 or not all(_residual(m) for _, m in middle):
        raise FlexrayError("config error: model.name: depth prefixes (flextrain, fedclass) skip residual blocks, and "
                           "this model's stages are not all residual (a skipped one would cut the path to the "
                           f"classifier); use {RESIDUAL_MODELS}")
    return [n for n, _ in middle]


def num_configs(model: nn.Module) -> int:
    """The deepest configuration ``k`` (every block); configurations are ``0..num_configs``."""
    return len(block_names(model))


def _io(block: nn.Module) -> tuple[int, int, int]:
    """(input channels, output channels, stride) of a residual conv block: its first and last
    convolution outside the shortcut; (0, 0, 1) for a shape-preserving block without convs (ViT)."""
    convs = [m for n, m in block.named_modules()
             if isinstance(m, nn.Conv2d) and not n.startswith(("shortcut", "downsample"))]
    if not convs:
        return 0, 0, 1
    return convs[0].in_channels, convs[-1].out_channels, max(int(c.stride[0]) for c in convs)


def shortcut(block: nn.Module) -> nn.Module | None:
    """The parameter-free path a skipped block leaves (None: identity). A block that changes the
    shape (stride 2, more channels) leaves option-A's subsampling with zero-padded channels, also
    where the full model projects (preresnet18, torchvision's ``downsample``), so a prefix holds
    exactly its blocks' parameters and a shallow device never trains a deeper block's projection."""
    cin, cout, stride = _io(block)
    return ShortcutA(cin, cout, stride) if stride > 1 or cout != cin else None


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
    return depth_subnet(model, [i < k for i in range(len(names))])


def depth_subnet(model: nn.Module, keep: list[bool]) -> nn.Sequential:
    """The model with block ``i`` run only where ``keep[i]``; a dropped block leaves its
    parameter-free ``shortcut``. ``depth_prefix`` keeps a prefix; stochastic depth any subset."""
    names = block_names(model)
    named = dict(stages(model))
    first, last = stages(model)[0][0], stages(model)[-1][0]
    layers: list[tuple[str, nn.Module]] = [(first, named[first])]
    head = named[last]
    if isinstance(head, StageHead):  # global pooling: the skipped blocks' subsampling changes nothing
        kept = [n for n, on in zip(names, keep) if on]
        layers += [(n, named[n]) for n in kept]
        channels = _io(named[kept[-1]])[1] if kept else _io(named[names[0]])[0]
        layers.append((last, ExitView(head, channels)))
        return nn.Sequential(OrderedDict(layers))
    skips: list[nn.Module] = []
    for n, on in zip(names, keep):
        if on:
            if skips:
                layers.append((f"skip_{n}", Skip(*skips)))
                skips = []
            layers.append((n, named[n]))
        elif (s := shortcut(named[n])) is not None:
            skips.append(s)
    if skips:
        layers.append(("skip", Skip(*skips)))
    layers.append((last, head))
    return nn.Sequential(OrderedDict(layers))


def drop_probs(num_blocks: int, p_max: float) -> torch.Tensor:
    """Stochastic depth's drop probability of block ``l = 1..L``: ``l / L x p_max`` (Huang et al.
    2016: survival falls linearly from 1 at the input to ``1 - p_max`` at the last block)."""
    return torch.arange(1, num_blocks + 1, dtype=torch.float32) / num_blocks * p_max


def prefix_keys(model: nn.Module, k: int) -> list[str]:
    """The global state keys configuration ``k`` holds (a prefix of the stages)."""
    return list(depth_prefix(model, k).state_dict())


def prefix_state(state: dict[str, torch.Tensor], model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """Configuration ``k``'s entries of a global state (copies)."""
    return {key: state[key].detach().clone() for key in prefix_keys(model, k)}


__all__ = [
    "HEAD_RULE", "RESIDUAL_MODELS", "ExitView", "Skip", "StageHead", "block_names", "depth_prefix", "depth_subnet",
    "drop_probs", "head_rule", "num_configs", "prefix_keys", "prefix_state", "shortcut", "with_stage_heads",
]
