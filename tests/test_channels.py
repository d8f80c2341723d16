"""Channel groups (torch-pruning's DependencyGraph): the kept sub-network of every zoo model the
structured methods take is exactly its masked full network, in outputs and in gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flexray.config import ModelConfig
from flexray.errors import FlexrayError
from flexray.models import build_model, elastic, filters, slices
from flexray.models.channels import channel_groups
from flexray.models.profile import profile_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIGITS, CIFAR = (1, 8, 8), (3, 32, 32)
MODELS = [
    ("cnn", DIGITS), ("lenet", DIGITS), ("vgg", CIFAR), ("resnet20", CIFAR), ("preresnet18", DIGITS),
    ("torchvision:resnet18", CIFAR), ("torchvision:mobilenet_v2", CIFAR),
    # the zoo's vgg has vgg11_bn's pattern (conv-BN chains, Flatten into linears); its 4096-wide classifier costs 25 s
    pytest.param("torchvision:vgg11_bn", CIFAR, marks=pytest.mark.slow),
    ("torchvision:efficientnet_b0", CIFAR), ("darknet19", CIFAR),
]


def build(name: str, shape: tuple[int, int, int]) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, width=8), shape, 10)


def max_diff(full: nn.Module, sub: nn.Module, keep: filters.Keep, shape: tuple[int, int, int]) -> tuple[float, float]:
    """(outputs relative to their scale, gradients): largest |sub - masked full| on one batch, with
    BatchNorm on batch statistics and dropout off, in float64 (so the difference is the method's,
    not float32 rounding amplified by deep BatchNorm stacks)."""
    full.double(), sub.double()
    full.zero_grad(set_to_none=True)
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(8)
    with elastic.batch_statistics(full, sub):
        with filters.masked(full, keep):
            ref = full(x)
            nn.functional.cross_entropy(ref, y).backward()
        out = sub(x)
        nn.functional.cross_entropy(out, y).backward()
    ix = filters.index(full, keep)
    grads = {k: p.grad for k, p in full.named_parameters()}
    worst = max(float((p.grad - filters.gather(grads[k], ix[k])).abs().max())
                for k, p in sub.named_parameters() if p.grad is not None)
    scale = max(float(ref.detach().abs().max()), 1e-3)
    return float((out - ref).detach().abs().max()) / scale, worst


@pytest.mark.parametrize("name,shape", MODELS, ids=[m.values[0] if hasattr(m, "values") else m[0] for m in MODELS])
def test_kept_subnetwork_is_the_masked_full_network(name: str, shape: tuple[int, int, int]) -> None:
    full = build(name, shape)
    groups = channel_groups(full)
    assert len(groups.groups) >= 2
    width = {g.name: max(1, g.channels // 2) for g in groups.groups}
    keep = groups.random(width, torch.Generator().manual_seed(3))  # DISTREAL / uniform dropout
    sub = filters.slim(full, width)
    filters.rewire(full, sub, keep)
    sub.load_state_dict(elastic.extract(full.state_dict(), filters.index(full, keep)))
    # the slim network is really smaller: a step costs fewer FLOPs
    assert profile_model(sub, shape).train_flops_per_sample < 0.6 * profile_model(full, shape).train_flops_per_sample
    out, grad = max_diff(full, sub, keep, shape)
    assert out <= 1e-10 and grad <= 1e-10, (out, grad)
    # width slices (HeteroFL, FedRolex's rolling window) and L1 pruning (REFT) on the same groups
    for keep in (slices.window(full, 0.5, offset=5), filters.l1_keep(full, full.state_dict(), width)):
        sub = groups.slim(full, keep)
        sub.load_state_dict(elastic.extract(full.state_dict(), filters.index(full, keep)))
        out, grad = max_diff(full, sub, keep, shape)
        assert out <= 1e-10 and grad <= 1e-10, (out, grad)


def test_residual_streams_and_depthwise_convs_form_one_group_each() -> None:
    net = build("torchvision:resnet18", CIFAR)
    groups = {g.name: g for g in channel_groups(net).groups}
    # the stem and every block of layer1 add into one stream: one group holds all their outputs
    stream = next(g for g in groups.values() if any(s.key == "stem.0.weight" for s in g.slots))
    keys = {s.key for s in stream.slots}
    assert {"layer1_0.bn2.weight", "layer1_1.conv2.weight", "layer1_1.conv1.weight"} <= keys
    mobile = channel_groups(build("torchvision:mobilenet_v2", CIFAR))
    depthwise = [g for g in mobile.groups if any(s.key.endswith("conv.1.0.weight") and s.dim == 0 for s in g.slots)]
    assert depthwise and all(any(s.key.endswith("conv.0.0.weight") for s in g.slots) for g in depthwise)


def test_option_a_shortcut_maps_kept_channels_across_stages() -> None:
    net = build("resnet20", CIFAR)
    groups = {g.name: g for g in channel_groups(net).groups}
    # the zero-padding shortcut ends stage 1's stream (input) and starts stage 2's (output)
    one, two = groups["stem.0"], groups["layer2_1.conv2"]
    assert (one.channels, two.channels) == (16, 32)
    assert [m.out for m in one.members if m.module == "layer2_1.shortcut"] == [False]
    assert [m.out for m in two.members if m.module == "layer2_1.shortcut"] == [True]
    keep = {"stem.0": torch.tensor([1, 5]), "layer2_1.conv2": torch.tensor([0, 8, 9, 13])}
    sub = channel_groups(net).slim(net, keep)
    # stage 2 keeps padded channel 0 (zero) and 8, 9, 13 = stage-1 channels 0, 1, 5 (pad 8 each side)
    assert sub.layer2_1.shortcut.source == [-1, -1, 0, 1]


def test_a_model_the_groups_cannot_cover_is_refused_in_one_line() -> None:
    for name, why in [("torchvision:vit_b_16", "attention"), ("torchvision:regnet_x_400mf", "grouped convolutions")]:
        with pytest.raises(FlexrayError, match=rf"^config error: model\.name: .*{why}.*; use ") as err:
            channel_groups(build_model(ModelConfig(name=name), (3, 32, 32), 10))
        assert "\n" not in str(err.value)
