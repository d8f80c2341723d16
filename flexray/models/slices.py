"""Width slices on channel groups: the sub-models HeteroFL, FjORD and FedRolex train.

A width-``p`` sub-model keeps ``ceil(p * C)`` channels of every channel group
(``flexray.models.channels``): the leading ones (HeteroFL, Diao et al. ICLR 2021; FjORD's ordered
dropout, Horvath et al. NeurIPS 2021) or a window starting at ``offset mod C`` and wrapping
around (FedRolex, Alam et al. NeurIPS 2022). Because the groups come from the traced graph, the
channels a residual add, a BatchNorm or a depthwise conv couple move together, and the
sub-model is an exact sub-network of the full one (the masked full network), for any CNN the
groups cover: residual, BatchNorm, depthwise (MobileNet, EfficientNet). The first layer's inputs
and the classifier's outputs keep their size.
"""

from __future__ import annotations

import torch
from torch import nn

from flexray.models import elastic
from flexray.models.channels import ChannelGroups, Keep, channel_groups


def width_at(groups: ChannelGroups, rate: float) -> dict[str, int]:
    """Kept channels per group at width ``rate``."""
    elastic.check_rate(rate)
    return {g.name: elastic.scaled(g.channels, rate) for g in groups.groups}


def window(model: nn.Module, rate: float, offset: int | None = None) -> Keep:
    """The channels of each group a width-``rate`` sub-model holds (leading, or from ``offset``)."""
    groups = channel_groups(model)
    return groups.leading(width_at(groups, rate), offset)


def sub_index(model: nn.Module, rate: float, offset: int | None = None) -> elastic.Index:
    """Where every entry of the width-``rate`` sub-model lives in the global state."""
    return channel_groups(model).index(window(model, rate, offset))


def narrow(model: nn.Module, rate: float, offset: int | None = None) -> nn.Module:
    """The width-``rate`` copy of ``model`` (its weights are the kept slice of ``model``'s)."""
    return channel_groups(model).slim(model, window(model, rate, offset))


def rewire(model: nn.Module, sub: nn.Module, rate: float, offset: int | None) -> None:
    """Point a cached sub-model's parameter-free channel maps at this window (FedRolex moves it)."""
    channel_groups(model).rewire(model, sub, window(model, rate, offset))


def sub_shapes(model: nn.Module, rate: float) -> dict[str, torch.Size]:
    """Shapes of the width-``rate`` sub-model's state."""
    groups = channel_groups(model)
    index = sub_index(model, rate)
    return {k: torch.Size(len(ix) if ix is not None else n for ix, n in zip(index[k], shape))
            for k, shape in groups.shapes.items()}


__all__ = ["narrow", "rewire", "sub_index", "sub_shapes", "width_at", "window"]
