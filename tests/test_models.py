"""Model zoo and per-stage profiling (fast, no Ray)."""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from flexray.config import BUILTIN_MODELS, ModelConfig
from flexray.errors import FlexrayError
from flexray.models import build_model, profile_model, run_stages, state_bytes, train_flops_per_sample

DIGITS, MNIST, CIFAR = (1, 8, 8), (1, 28, 28), (3, 32, 32)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return False
    return True


HAS_TORCHVISION = _importable("torchvision")
needs_torchvision = pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision not installed")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Single-threaded torch for the whole module (see conftest.one_torch_thread)."""


def build(name: str, shape: tuple[int, int, int], classes: int = 10, seed: int = 0, **kw: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name, **kw), shape, classes)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", BUILTIN_MODELS)
@pytest.mark.parametrize("shape", [DIGITS, MNIST, CIFAR], ids=["digits", "mnist", "cifar"])
def test_builtin_builds_and_stages_chain(name: str, shape: tuple[int, int, int]) -> None:
    model = build(name, shape, classes=7).eval()
    assert isinstance(model, nn.Sequential) and len(model) >= 3
    assert type(model[-1]).__name__ == "Head"
    x = torch.randn(3, *shape)
    with torch.no_grad():
        y = model(x)
        outs = run_stages(model, x)
        h = x
        for stage in model:  # chaining the stages by hand is what split learning does
            h = stage(h)
    assert y.shape == (3, 7)
    assert torch.equal(outs[-1], y) and torch.equal(h, y)


def test_resnet_parameter_counts_match_paper() -> None:
    # He et al. 2016, table 6: ResNet-20 0.27M, ResNet-56 0.85M (option A shortcuts).
    assert n_params(build("resnet20", CIFAR)) == 269_722
    assert n_params(build("resnet56", CIFAR)) == 853_018
    assert n_params(build("resnet8", CIFAR)) == 75_290
    assert len(build("resnet20", CIFAR)) == 1 + 9 + 1  # stem, 9 blocks, head
    assert len(build("resnet56", CIFAR)) == 1 + 27 + 1
    assert 11.1e6 < n_params(build("preresnet18", CIFAR)) < 11.2e6


def test_lenet_is_classic_on_cifar() -> None:
    model = build("lenet", CIFAR)
    assert n_params(model) == 62_006
    assert model.conv1[0].padding == (0, 0)
    assert build("lenet", MNIST).fc1[1].in_features == 16 * 5 * 5  # padded MNIST variant


def test_cnn_width_scales_channels() -> None:
    assert build("cnn", DIGITS, width=8).conv2[0].out_channels == 16
    assert n_params(build("cnn", DIGITS, width=8)) < n_params(build("cnn", DIGITS, width=16))


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_same_seed_same_weights(name: str) -> None:
    a, b, c = build(name, CIFAR, seed=3), build(name, CIFAR, seed=3), build(name, CIFAR, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_bad_input_shape_is_one_line_error() -> None:
    with pytest.raises(FlexrayError, match="shape"):
        build_model(ModelConfig(name="cnn"), (8, 8), 10)  # type: ignore[arg-type]


@needs_torchvision
@pytest.mark.parametrize("shape", [MNIST, CIFAR], ids=["mnist", "cifar"])
def test_torchvision_resnet18_stages_chain(shape: tuple[int, int, int]) -> None:
    model = build("torchvision:resnet18", shape).eval()
    blocks = [f"layer{i}_{j}" for i in range(1, 5) for j in range(2)]  # one stage per residual block
    assert [n for n, _ in model.named_children()] == ["stem", *blocks, "head"]
    x = torch.randn(2, *shape)
    with torch.no_grad():
        y = model(x)
        h = x
        for stage in model:
            h = stage(h)
    assert y.shape == (2, 10) and torch.equal(h, y)
    again = build("torchvision:resnet18", shape).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())


@needs_torchvision
def test_torchvision_unknown_name_is_flexray_error() -> None:
    with pytest.raises(FlexrayError, match=r"model\.name.*list_models") as info:
        build("torchvision:resnet_does_not_exist", CIFAR)
    assert "\n" not in str(info.value)


@needs_torchvision
def test_torchvision_too_small_input_is_flexray_error() -> None:
    with pytest.raises(FlexrayError, match="8x8"):
        build("torchvision:squeezenet1_1", DIGITS)


# ---------------------------------------------------------------- profiling


def whole_model_fwd_flops(model: nn.Module, shape: tuple[int, int, int]) -> float:
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, *shape))
    model.train(was)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize(("name", "shape"), [("cnn", DIGITS), ("lenet", CIFAR), ("resnet8", CIFAR)])
def test_profile_sums_and_shapes(name: str, shape: tuple[int, int, int]) -> None:
    model = build(name, shape)
    prof = profile_model(model, shape)
    assert [layer.name for layer in prof.layers] == [n for n, _ in model.named_children()]
    assert [layer.kind for layer in prof.layers] == [type(s).__name__ for s in model]
    assert [layer.index for layer in prof.layers] == list(range(len(model)))

    fwd = sum(layer.fwd_flops for layer in prof.layers)
    assert fwd > 0 and fwd == pytest.approx(whole_model_fwd_flops(model, shape), rel=1e-6)
    assert 2.0 * fwd <= prof.train_flops_per_sample <= 4.0 * fwd
    assert train_flops_per_sample(model, shape) == pytest.approx(prof.train_flops_per_sample)

    assert sum(layer.params for layer in prof.layers) == n_params(model)
    assert sum(layer.param_bytes for layer in prof.layers) == prof.param_bytes == state_bytes(model.state_dict())
    assert prof.input_bytes == 4 * shape[0] * shape[1] * shape[2]

    with torch.no_grad():
        outs = run_stages(model.eval(), torch.randn(1, *shape))
    assert [layer.activation_bytes for layer in prof.layers] == [4 * o.numel() for o in outs]
    assert prof.layers[-1].activation_bytes == 4 * 10


def test_profile_conv_flops_match_formula() -> None:
    model = build("lenet", CIFAR)
    conv1 = profile_model(model, CIFAR).layers[0]
    assert conv1.fwd_flops == 2 * (3 * 5 * 5) * 6 * 28 * 28  # 2 * MACs, bias and relu uncounted
    assert conv1.params == 456 and conv1.param_bytes == 456 * 4


def test_train_flops_count_depthwise_convs_correctly() -> None:
    # torch's stock backward formula ignores groups: this model would read ~5x, not ~2.4x.
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Flatten(1), nn.Linear(16 * 32 * 32, 10)
    )
    prof = profile_model(model, CIFAR)
    fwd = sum(layer.fwd_flops for layer in prof.layers)
    assert prof.layers[1].fwd_flops == 2 * 16 * 9 * 32 * 32
    assert 2.0 * fwd <= prof.train_flops_per_sample <= 3.0 * fwd


@pytest.mark.parametrize("training", [True, False])
def test_profile_leaves_model_and_rng_untouched(training: bool) -> None:
    model = build("resnet8", CIFAR).train(training)
    with torch.no_grad():  # non-default BN stats, so a reset would be noticed too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    profile_model(model, CIFAR)
    train_flops_per_sample(model, CIFAR)

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training == training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_state_bytes_counts_params_and_buffers() -> None:
    bn = nn.BatchNorm2d(4)  # weight, bias, running_mean, running_var float32 + int64 counter
    assert state_bytes(bn.state_dict()) == 4 * 4 * 4 + 8
    assert state_bytes({"a": torch.zeros(3, dtype=torch.float16)}) == 6


@pytest.mark.skipif(not _importable("sklearn"), reason="scikit-learn not installed")
def test_cnn_learns_digits_quickly() -> None:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x))
    x, y = x[perm], y[perm]
    model = build("cnn", DIGITS)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(4):  # seed 0 passes 90% after 2 epochs; margin for other platforms
        for i in range(0, 1400, 32):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model.eval()(x[1400:]).argmax(1) == y[1400:]).float().mean().item()
    assert acc >= 0.9
