"""Model zoo: every model is an ``nn.Sequential`` of stages.

Stages are the unit that split learning cuts at and that the scheduler profiles, so each
top-level child must take exactly the previous child's output and nothing else, and the last
child is the classifier. Stage classes are small named ``nn.Sequential`` subclasses so that a
profile's ``kind`` says what a stage is, and so models pickle cleanly to Ray workers.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from flexray.config import ModelConfig
from flexray.errors import FlexrayError
from flexray.models import resnet_cifar
from flexray.models.blocks import ConvBlock, FCBlock, Head, Shape, run_stages, stages, with_input
from flexray.models.depth import with_stage_heads
from flexray.models.tv import torchvision_model
from flexray.models.vit import vit

__all__ = ["ConvBlock", "FCBlock", "Head", "Shape", "build_model", "cnn", "darknet19", "he_init", "lenet", "run_stages", "stages", "vgg", "vit"]

def _pool(size: tuple[int, int]) -> tuple[nn.Module, tuple[int, int]]:
    """2x2 max-pool along each dim that still has >= 2 pixels, so tiny inputs never hit 0."""
    k = tuple(2 if s >= 2 else 1 for s in size)
    if k == (1, 1):
        return nn.Identity(), size
    return nn.MaxPool2d(k), (size[0] // k[0], size[1] // k[1])  # type: ignore[arg-type]


def he_init(model: nn.Module) -> nn.Module:
    """He (fan-in) init with zero biases for un-normalised ReLU nets.

    torch's default init shrinks activations layer by layer; without BatchNorm that leaves
    cnn slow and LeNet stuck at chance for many FedAvg rounds at lr 0.05.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _check_shape(input_shape: Shape, num_classes: int) -> None:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise FlexrayError(f"model input shape must be (channels, height, width), got {input_shape!r}")
    if num_classes < 1:
        raise FlexrayError(f"model needs at least one class, got num_classes={num_classes}")


def cnn(input_shape: Shape, num_classes: int, width: int = 32) -> nn.Sequential:
    """Small two-conv CNN that works on any input size (digits 8x8 up to CIFAR 32x32).

    The head pools adaptively to 2x2 rather than globally: on 8x8 digits the remaining spatial
    layout is much of the signal, and 2x2 keeps the head size independent of the input.
    """
    c, h, w = input_shape
    size = (h, w)
    pool1, size = _pool(size)
    pool2, size = _pool(size)
    out = (min(size[0], 2), min(size[1], 2))
    layers = OrderedDict(
        conv1=ConvBlock(nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), pool1),
        conv2=ConvBlock(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), pool2),
        head=Head(nn.AdaptiveAvgPool2d(out), nn.Flatten(1), nn.Linear(2 * width * out[0] * out[1], num_classes)),
    )
    return with_input(he_init(nn.Sequential(layers)), input_shape)  # type: ignore[return-value]


def lenet(input_shape: Shape, num_classes: int) -> nn.Sequential:
    """LeNet-5 (conv 6@5x5, conv 16@5x5, fc 120-84-classes); classic layout on 32x32.

    Below 32 px the first conv is padded by 2 (the usual MNIST variant: 28x28 -> 16x5x5 like
    the original); if even that leaves the second conv too little room (8x8 digits) it is
    padded by 2 too, so the network stays LeNet-shaped rather than failing.
    """
    c, h, w = input_shape
    pad1 = 2 if min(h, w) < 32 else 0
    size = (h + 2 * pad1 - 4, w + 2 * pad1 - 4)
    pool1, size = _pool(size)
    pad2 = 2 if min(size) - 4 < 2 else 0
    size = (size[0] + 2 * pad2 - 4, size[1] + 2 * pad2 - 4)
    pool2, size = _pool(size)
    flat = 16 * size[0] * size[1]
    layers = OrderedDict(
        conv1=ConvBlock(nn.Conv2d(c, 6, 5, padding=pad1), nn.ReLU(), pool1),
        conv2=ConvBlock(nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), pool2),
        fc1=FCBlock(nn.Flatten(1), nn.Linear(flat, 120), nn.ReLU()),
        fc2=FCBlock(nn.Linear(120, 84), nn.ReLU()),
        head=Head(nn.Linear(84, num_classes)),
    )
    return with_input(he_init(nn.Sequential(layers)), input_shape)  # type: ignore[return-value]


def vgg(input_shape: Shape, num_classes: int, width: int = 16) -> nn.Sequential:
    """VGG-style: three (conv3x3 - relu - conv3x3 - relu - maxpool) stages of width, 2x, 4x
    channels, then global average pooling and a linear classifier. No BatchNorm, so the three
    feature-map-heavy stages can be trained tiled (``method.name: tiled``)."""
    c, h, w = input_shape
    size, blocks, cin = (h, w), OrderedDict(), c
    for i, cout in enumerate((width, 2 * width, 4 * width)):
        pool, size = _pool(size)
        blocks[f"conv{i + 1}"] = ConvBlock(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                                           nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(), pool)
        cin = cout
    blocks["head"] = Head(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(cin, num_classes))
    return with_input(he_init(nn.Sequential(blocks)), input_shape)  # type: ignore[return-value]


def _cbl(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True)]


def darknet19(input_shape: Shape, num_classes: int, width: int = 32) -> nn.Sequential:
    """Darknet-19, YOLOv2's backbone (Redmon & Farhadi 2016): 3x3 convs with 1x1 bottlenecks,
    each conv - BatchNorm - LeakyReLU(0.1), five 2x2 max-pools, and a 1x1 conv classifier with
    global average pooling. ``width`` is the first conv's channels (32 in the paper; the rest
    scale with it), so tests can train a narrow one. Pools skip dims already at 1 pixel."""
    c, h, w = input_shape
    size, blocks, cin = (h, w), OrderedDict(), c
    plan = [(1, 1), (2, 1), (4, 3), (8, 3), (16, 5), (32, 5)]  # (channels / width, convs) per stage
    for i, (mult, convs) in enumerate(plan):
        cout, layers = mult * width, []
        for j in range(convs):  # 3x3 at full width, 1x1 bottlenecks at half in between
            k, co = (3, cout) if j % 2 == 0 else (1, cout // 2)
            layers += _cbl(cin, co, k)
            cin = co
        if i < len(plan) - 1:
            pool, size = _pool(size)
            layers.append(pool)
        blocks[f"conv{i + 1}"] = ConvBlock(*layers)
    blocks["head"] = Head(nn.Conv2d(cin, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    return nn.Sequential(blocks)


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build ``cfg.name`` for inputs of shape (C, H, W); weights come from torch's global RNG.

    Returns an ``nn.Sequential`` whose top-level children are the stages (see module doc).
    """
    input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
    _check_shape(input_shape, num_classes)
    model = _build(cfg, input_shape, num_classes)
    if cfg.stage_heads:
        model = with_stage_heads(model)
    return with_input(model, input_shape)


def _build(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    name = cfg.name
    if name == "cnn":
        return cnn(input_shape, num_classes, width=cfg.width)
    if name == "lenet":
        return lenet(input_shape, num_classes)
    if name == "vgg":
        return vgg(input_shape, num_classes, width=cfg.width)
    if name == "darknet19":
        return darknet19(input_shape, num_classes, width=cfg.width)
    if name == "vit":
        return vit(input_shape, num_classes, width=cfg.width, depth=cfg.depth)
    if name in ("resnet8", "resnet20", "resnet56", "preresnet18"):
        return getattr(resnet_cifar, name)(input_shape, num_classes)
    if name.startswith("torchvision:"):
        return torchvision_model(name.removeprefix("torchvision:"), input_shape, num_classes)
    raise FlexrayError(f"model.name: unknown model {name!r}")
