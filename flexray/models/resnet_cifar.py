"""CIFAR ResNets (He et al. 2016, sec. 4.2) and pre-activation ResNet-18, one stage per block.

``resnet8/20/56`` use the paper's CIFAR shortcut, option A (identity; on down-sampling,
stride-2 subsampling plus zero-padded channels), so they have no projection parameters and
match the paper's counts (ResNet-20 0.27M, ResNet-56 0.85M). ``preresnet18`` follows
"Identity Mappings in Deep Residual Networks" with 1x1 projection shortcuts (option B) where
the shape changes, and a final BN-ReLU before pooling as in that paper.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from flexray.models.blocks import Head, Shape, with_input


class Stem(nn.Sequential):
    """Input convolution; its own stage so a cut right after it is possible."""


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample spatially, zero-pad the new channels.

    ``source`` (set when channels are pruned, ``flexray.models.channels``) says which input
    channel each output channel copies (-1: zero); None is the centred zero-pad.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra, self.cin = stride, cout - cin, cin
        self.source: list[int] | None = None

    def channel_map(self) -> list[int]:
        if self.source is not None:
            return list(self.source)
        lo = self.extra // 2
        return [-1] * lo + list(range(self.cin)) + [-1] * (self.extra - lo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.source is not None:
            src = torch.tensor(self.source, device=x.device)
            out = x.new_zeros(x.shape[0], len(self.source), *x.shape[2:])
            live = src >= 0
            out[:, live] = x[:, src[live]]
            return out
        lo = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.extra - lo)) if self.extra else x


class BasicBlock(nn.Module):
    """Post-activation basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = ShortcutA(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block: conv(relu(bn(conv(relu(bn(x)))))) + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        # Projection sees the pre-activated input (as in the paper); identity sees raw x.
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + skip


def _init(model: nn.Module) -> nn.Module:
    """He init for convs (the papers' choice); BN and Linear keep torch defaults."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def _blocks(block: type[nn.Module], widths: list[int], depths: list[int], cin: int) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for s, (width, n) in enumerate(zip(widths, depths), start=1):
        for b in range(1, n + 1):
            stride = 2 if s > 1 and b == 1 else 1
            out.append((f"layer{s}_{b}", block(cin, width, stride)))
            cin = width
    return out


def cifar_resnet(depth: int, input_shape: Shape, num_classes: int) -> nn.Sequential:
    """ResNet-(6n+2): stem, 3x n basic blocks at 16/32/64 channels, global-pool head."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    c = input_shape[0]
    layers: list[tuple[str, nn.Module]] = [
        ("stem", Stem(_conv3x3(c, 16), nn.BatchNorm2d(16), nn.ReLU())),
        *_blocks(BasicBlock, [16, 32, 64], [n, n, n], 16),
        ("head", Head(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(64, num_classes))),
    ]
    return with_input(_init(nn.Sequential(OrderedDict(layers))), input_shape)  # type: ignore[return-value]


def resnet8(input_shape: Shape, num_classes: int) -> nn.Sequential:
    return cifar_resnet(8, input_shape, num_classes)


def resnet20(input_shape: Shape, num_classes: int) -> nn.Sequential:
    return cifar_resnet(20, input_shape, num_classes)


def resnet56(input_shape: Shape, num_classes: int) -> nn.Sequential:
    return cifar_resnet(56, input_shape, num_classes)


def preresnet18(input_shape: Shape, num_classes: int) -> nn.Sequential:
    """Pre-activation ResNet-18 for CIFAR: 3x3 stem (no pooling), [2,2,2,2] at 64..512."""
    c = input_shape[0]
    layers: list[tuple[str, nn.Module]] = [
        ("stem", Stem(_conv3x3(c, 64))),
        *_blocks(PreActBlock, [64, 128, 256, 512], [2, 2, 2, 2], 64),
        (
            "head",
            Head(nn.BatchNorm2d(512), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(512, num_classes)),
        ),
    ]
    return with_input(_init(nn.Sequential(OrderedDict(layers))), input_shape)  # type: ignore[return-value]
