"""The building blocks every zoo model is made of: named stage classes and stage helpers.

Every model is an ``nn.Sequential`` of stages (see ``flexray.models.zoo``). The stage classes
live here, below the zoo and the model families that use them (``resnet_cifar``, ``tv``,
``depth``), so the zoo can import every family without a cycle.
"""

from __future__ import annotations

import torch
from torch import nn

Shape = tuple[int, int, int]


class ConvBlock(nn.Sequential):
    """conv - relu - (max)pool: one cut point per resolution."""


class FCBlock(nn.Sequential):
    """(flatten -) linear - relu: a fully-connected stage in front of the classifier."""


class Head(nn.Sequential):
    """Pooling / flatten / final linear: the classifier stage, always last."""


def with_input(model: nn.Module, input_shape: Shape) -> nn.Module:
    """Record the (C, H, W) a model was built for: tracing its channel groups feeds it one input."""
    model.input_shape = tuple(int(s) for s in input_shape)
    return model


def stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) stages of a model; a non-Sequential model is a single stage."""
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    return [(type(model).__name__.lower(), model)]


def run_stages(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each stage's output in order, for checking cuts and measuring activations."""
    outs = []
    for _, stage in stages(model):
        x = stage(x)
        outs.append(x)
    return outs
