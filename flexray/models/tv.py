"""torchvision classification models, re-cut into stages.

torchvision is imported here only, and only when a ``torchvision:<name>`` model is built, so
actors that never use it do not pay for the import. A model is split into stages only when
its architecture is a known family (ResNet-like, or ``.features`` + ``.classifier``), and the
split is then checked against the original forward on one input; anything else, or a split
that does not reproduce the original, stays one stage.

Stages are residual blocks, not torchvision's block groups: a ResNet's ``layer2`` becomes
``layer2_0``, ``layer2_1``, ..., an EfficientNet's ``features3`` becomes ``features3_0``, ...
(MobileNetV2's ``features`` already holds one block per child). Split learning cuts and FlexTrain
depth prefixes work at stage granularity, so finer stages are finer cuts; the group survives as
the name's prefix before ``_``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from flexray.errors import FlexrayError
from flexray.models.blocks import Head, Shape, with_input

LIST_HINT = "python -c 'import torchvision; print(torchvision.models.list_models(module=torchvision.models))'"

# Layers that belong with the block before them rather than starting a stage of their own.
_LIGHT = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.BatchNorm2d, nn.MaxPool2d,
    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity,
)


class ToRGB(nn.Module):
    """Repeat a grey channel to three, because torchvision stems expect RGB."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


class Stage(nn.Sequential):
    """A group of consecutive torchvision layers run as one stage."""


def _resnet_stages(m: nn.Module) -> list[tuple[str, nn.Module]]:
    stem = Stage(m.conv1, m.bn1, m.relu, m.maxpool)
    blocks = [(f"layer{i}_{j}", b) for i in range(1, 5) for j, b in enumerate(getattr(m, f"layer{i}"))]
    return [("stem", stem), *blocks, ("head", Head(m.avgpool, nn.Flatten(1), m.fc))]


def _block_group(child: nn.Module) -> bool:
    """A plain ``nn.Sequential`` of composite blocks (an EfficientNet stage of MBConvs), whose
    blocks can be stages of their own; a conv-norm-act (a subclass) or a run of single layers cannot."""
    return type(child) is nn.Sequential and len(child) > 0 and all(any(True for _ in b.children()) for b in child)


def _group_features(features: nn.Module) -> list[tuple[str, nn.Module]]:
    """One stage per block/conv; activations, norms and pools join the stage before them."""
    groups: list[tuple[str, list[nn.Module]]] = []
    k = 0  # the stage's number before block groups were split, so other models keep their names
    for child in features.children():
        if groups and isinstance(child, _LIGHT):
            groups[-1][1].append(child)
            continue
        if _block_group(child):
            groups.extend((f"features{k}_{j}", [b]) for j, b in enumerate(child))
        else:
            groups.append((f"features{k}", [child]))
        k += 1
    return [(name, g[0] if len(g) == 1 else Stage(*g)) for name, g in groups]


def _features_head(m: nn.Module) -> Head:
    kind = type(m).__name__
    if kind == "DenseNet":  # forward: relu, adaptive pool, flatten, classifier
        return Head(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), m.classifier)
    if kind == "SqueezeNet":  # classifier already pools; flatten comes after
        return Head(m.classifier, nn.Flatten(1))
    if kind == "ConvNeXt":  # classifier holds its own norm + flatten
        return Head(m.avgpool, m.classifier)
    pool = getattr(m, "avgpool", None)
    if pool is None:  # MobileNetV2 pools functionally in forward
        pool = nn.AdaptiveAvgPool2d(1)
    return Head(pool, nn.Flatten(1), m.classifier)


def _staged(m: nn.Module) -> list[tuple[str, nn.Module]] | None:
    if all(hasattr(m, a) for a in ("conv1", "bn1", "relu", "maxpool", "layer4", "avgpool", "fc")):
        return _resnet_stages(m)
    if isinstance(getattr(m, "features", None), nn.Sequential) and isinstance(getattr(m, "classifier", None), nn.Module):
        return [*_group_features(m.features), ("head", _features_head(m))]
    return None


def _same_function(original: nn.Module, staged: nn.Module, x: torch.Tensor) -> bool:
    try:
        return torch.allclose(original(x), staged(x), rtol=1e-4, atol=1e-5)
    except Exception:  # noqa: BLE001 - any failure just means "do not split"
        return False


def _builder_kwargs(name: str, input_shape: Shape) -> dict[str, Any]:
    if name in ("inception_v3", "googlenet"):
        # Auxiliary heads make forward return a tuple in training; a stage must return a tensor.
        return {"aux_logits": False, "init_weights": True}
    if name.startswith("vit_") and input_shape[1] == input_shape[2]:
        return {"image_size": input_shape[1]}
    return {}


def torchvision_model(name: str, input_shape: Shape, num_classes: int) -> nn.Sequential:
    """``torchvision.models.get_model(name)`` with random weights, as an ``nn.Sequential``."""
    import torchvision

    valid = torchvision.models.list_models(module=torchvision.models)
    if name not in valid:
        raise FlexrayError(
            f"model.name: unknown torchvision classification model {name!r}; list valid names with {LIST_HINT}"
        )
    c, h, w = input_shape
    if c not in (1, 3):
        raise FlexrayError(f"model.name: torchvision:{name} takes 1- or 3-channel images, got {c} channels")
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_builder_kwargs(name, input_shape))
    except Exception as err:  # noqa: BLE001 - builders raise assorted types
        raise FlexrayError(f"model.name: torchvision:{name} could not be built: {err}".replace("\n", " ")) from None

    # A fixed local generator so building never disturbs the global RNG (reproducible init).
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                model(x)
            except Exception as err:  # noqa: BLE001
                msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise FlexrayError(
                    f"config error: model.name: torchvision:{name} cannot take {h}x{w} inputs ({msg}); "
                    "use a model that down-samples less (resnet20, torchvision:resnet18) or larger images"
                ) from None
            parts = _staged(model)
            staged = nn.Sequential(OrderedDict(parts)) if parts else None
            if staged is None or not _same_function(model, staged, x):
                parts = [("model", model)]
    finally:
        model.train(was_training)

    if c == 1:
        first_name, first = parts[0]
        parts[0] = (first_name, Stage(ToRGB(), *(first if isinstance(first, Stage) else [first])))
    return with_input(nn.Sequential(OrderedDict(parts)).train(was_training), input_shape)  # type: ignore[return-value]
