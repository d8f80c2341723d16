"""A small Vision Transformer (Dosovitskiy et al., 2021) as zoo stages, for CIFAR-sized inputs.

Stages: ``stem`` (patch embedding, class token, position embedding), ``block1..blockN`` (pre-norm
transformer encoder blocks) and ``head`` (layer norm, class token, linear). Every block maps
``(batch, tokens, width)`` to the same shape with residual connections, so a depth prefix
(FlexTrain, ``flexray.models.depth``) skips blocks as identities. Patches are 4x4 on inputs of
16 px and more (64 tokens on CIFAR), 2x2 below (16 tokens on 8x8 digits); 4 heads when the width
divides by 4. The position embedding is interpolated when an input's patch grid differs from the
one built for, so a model profiled at another size (FlexTrain's planning probe) still runs.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from flexray.models.blocks import Head, Shape


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens, a learned class token and position embedding."""

    def __init__(self, channels: int, width: int, patch: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, width, patch, stride=patch)
        self.grid = grid
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, grid[0] * grid[1] + 1, width) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        pos = self.pos
        if tuple(x.shape[-2:]) != self.grid:
            cls_pos, patch_pos = pos[:, :1], pos[:, 1:].transpose(1, 2).reshape(1, -1, *self.grid)
            patch_pos = F.interpolate(patch_pos, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
            pos = torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], 1)
        tokens = x.flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], 1) + pos


class EncoderBlock(nn.Module):
    """Pre-norm encoder block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (MLP 2x width, GELU)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ClassToken(nn.Module):
    """The class token's features: ``x[:, 0]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def vit(input_shape: Shape, num_classes: int, width: int = 32, depth: int = 6) -> nn.Sequential:
    """ViT of ``depth`` encoder blocks at ``width`` (stages: stem, block1..blockN, head)."""
    c, h, w = input_shape
    patch = 4 if min(h, w) >= 16 else 2 if min(h, w) >= 2 else 1
    heads = 4 if width % 4 == 0 else 1
    layers: list[tuple[str, nn.Module]] = [("stem", PatchEmbed(c, width, patch, (h // patch, w // patch)))]
    layers += [(f"block{i}", EncoderBlock(width, heads)) for i in range(1, depth + 1)]
    layers.append(("head", Head(nn.LayerNorm(width), ClassToken(), nn.Linear(width, num_classes))))
    return nn.Sequential(OrderedDict(layers))


__all__ = ["ClassToken", "EncoderBlock", "PatchEmbed", "vit"]
