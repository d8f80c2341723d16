"""Width-elastic sub-models, HeteroFL / FjORD / FedRolex, and FlexTrain's depth prefixes (fast, no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from flexray.config import DataConfig, MethodConfig, ModelConfig
from flexray.data.datasets import load_dataset, to_tensor
from flexray.errors import FlexrayError
from flexray.fleet.profiles import CATALOG
from flexray.methods import METHODS, method_class
from flexray.methods.base import DeviceContext
from flexray.methods.fedavg import FedAvg
from flexray.methods.width import LABELS, WidthMethod, tier_rate
from flexray.models import build_model, elastic, profile_model, slices, state_bytes
from flexray.models.channels import channel_groups
from flexray.protocol import DeviceView, LocalData, SubModel, Task, Update
from flexray.runtime.assembly import parse_config
from flexray.methods.width import Width, rate_of
from tests.conftest import host_round

REPO = Path(__file__).resolve().parents[1]
DIGITS, CIFAR = (1, 8, 8), (3, 32, 32)
RATES = (1.0, 0.5, 0.25, 0.125, 0.0625)
MODELS = [("cnn", DIGITS), ("lenet", DIGITS), ("resnet8", DIGITS), ("resnet20", CIFAR), ("preresnet18", DIGITS),
          ("torchvision:mobilenet_v2", CIFAR)]
WIDTH = ("heterofl", "fjord", "fedrolex")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Single-threaded torch for the whole module (see conftest.one_torch_thread)."""


def build(name: str, shape: tuple[int, int, int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name=name, width=16), shape, 10)


def random_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- building blocks


@pytest.mark.parametrize("name,shape", MODELS, ids=[m for m, _ in MODELS])
def test_narrow_matches_index_and_is_the_masked_full_network(name: str, shape: tuple[int, int, int]) -> None:
    full = build(name, shape).eval()
    state = full.state_dict()
    x = torch.randn(2, *shape)
    for rate in RATES:
        for offset in (None, int(rate * 16) + 3):
            sub = slices.narrow(full, rate, offset).eval()
            assert {k: v.shape for k, v in sub.state_dict().items()} == slices.sub_shapes(full, rate)
            sub.load_state_dict(elastic.extract(state, slices.sub_index(full, rate, offset)))
            with torch.no_grad(), channel_groups(full).masked(full, slices.window(full, rate, offset)):
                want = full(x)
            got = sub(x)
            assert got.shape == (2, 10)  # classifier keeps every label
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (rate, offset, float((got - want).abs().max()))
    # first layer keeps its inputs, hidden channels shrink to ceil(p*C)
    first = next(m for m in slices.narrow(full, 0.25).modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    orig = next(m for m in full.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert first.weight.shape[1] == orig.weight.shape[1]
    assert first.weight.shape[0] == math.ceil(0.25 * orig.weight.shape[0])


@pytest.mark.parametrize("name,shape", MODELS, ids=[m for m, _ in MODELS])
def test_leading_sub_model_is_a_prefix_slice_of_global(name: str, shape: tuple[int, int, int]) -> None:
    full = build(name, shape)
    state = full.state_dict()
    for rate in RATES[1:]:
        sub = elastic.extract(state, slices.sub_index(full, rate))
        for k, v in sub.items():
            assert torch.equal(v, state[k][tuple(slice(0, n) for n in v.shape)]), k


def test_rolling_window_wraps_and_keeps_groups() -> None:
    full = build("cnn", DIGITS)  # groups: conv1 (16 channels), conv2 (32)
    keep = slices.window(full, 0.25, offset=30)
    assert keep["conv2.0"].tolist() == [0, 1, 2, 3, 4, 5, 30, 31]  # wraps around, sorted
    assert keep["conv1.0"].tolist() == [0, 1, 14, 15]  # offset 30 mod 16 = 14
    assert slices.window(full, 0.25)["conv1.0"].tolist() == [0, 1, 2, 3]  # leading
    assert slices.window(full, 1.0, offset=5) == {}  # whole groups: never permuted
    # cnn head: its input window covers the same channels as the last conv's output window
    index = slices.sub_index(full, 0.25, offset=30)
    conv = index["conv2.0.weight"][0]
    head = index["head.2.weight"][1]
    group = full.head[2].in_features // full.conv2[0].out_channels
    assert torch.equal(head.view(-1, group)[:, 0] // group, conv)


@pytest.mark.parametrize("offset", [None, 5])
def test_aggregate_identical_updates_is_exact_and_untouched_keep_value(offset: int | None) -> None:
    full = build("resnet8", DIGITS)
    state = random_state(full, 1)
    index = slices.sub_index(full, 0.5, offset)
    update = elastic.extract(random_state(full, 2), index)  # what two devices both send
    parts = [elastic.Part(update, index, 3.0), elastic.Part(update, index, 7.0)]
    merged = elastic.aggregate(state, parts)
    untouched = 0
    for k, v in merged.items():
        got = v.to(state[k].dtype)
        ids = torch.arange(got.numel()).view(got.shape)  # where each sub-model entry comes from
        mine = elastic.extract({k: ids}, index, [k])[k].flatten()
        assert torch.equal(got.flatten()[mine], update[k].flatten()), k  # covered: exactly the update
        rest = ~torch.isin(ids, mine)
        assert torch.equal(got[rest], state[k][rest]), k  # nobody covered: the global value
        untouched += int(rest.sum())
    assert untouched > 0


def test_aggregate_weighted_mean_and_masked_rows() -> None:
    full = build("cnn", DIGITS)
    state = random_state(full, 0)
    big, small = slices.sub_index(full, 1.0), slices.sub_index(full, 0.5)
    a = {k: torch.full(v.shape, 1.0) for k, v in state.items() if v.is_floating_point()}
    b = {k: torch.full(s, 4.0) for k, s in slices.sub_shapes(full, 0.5).items()}
    rows = torch.arange(10) < 3
    head = elastic.classifier_keys(full)
    merged = elastic.aggregate(state, [elastic.Part(a, big, 1.0), elastic.Part(b, small, 2.0, rows)], head)
    w, bias = merged["conv1.0.weight"], merged[head[1]]
    assert (w[:8] == 3).all() and (w[8:] == 1).all()  # (1*1 + 2*4) / 3; only the full model covers the rest
    assert (bias[:3] == 3).all() and (bias[3:] == 1).all()  # masked rows: labels b never saw
    only_b = elastic.aggregate(state, [elastic.Part(b, small, 2.0, rows)], head)
    assert torch.equal(only_b[head[1]][3:].float(), state[head[1]][3:])  # nobody covered: unchanged


def test_fan_in_scaler_and_batch_stat_bn_helpers() -> None:
    full = build("cnn", DIGITS)
    sub = elastic.add_scalers(slices.narrow(full, 0.5), full)
    plain = slices.narrow(full, 0.5)
    plain.load_state_dict(sub.state_dict())
    x = torch.randn(4, *DIGITS)
    conv1, conv2 = sub.conv1[0], sub.conv2[0]
    assert not conv1._forward_pre_hooks  # the first layer's input is never narrowed: no factor
    h = torch.randn(4, conv2.in_channels, 8, 8)
    want = torch.nn.functional.conv2d(2 * h, conv2.weight, conv2.bias, padding=conv2.padding)
    for mode in (sub.train(), sub.eval()):  # part of the function in training and at evaluation
        assert torch.allclose(mode.conv2[0](h), want)
    assert not torch.allclose(sub(x), plain.eval()(x))
    same = elastic.add_scalers(slices.narrow(full, 1.0), full)
    assert not any(m._forward_pre_hooks for m in same.modules())  # the full model is left alone
    net, y = build("resnet8", DIGITS).eval(), torch.randn(8, *DIGITS)
    with elastic.batch_stat_bn(net):
        batch = net(y)
    assert torch.allclose(batch, net.train()(y), atol=1e-5) and not torch.allclose(batch, net.eval()(y))


def test_unsupported_layer_is_a_one_line_error() -> None:
    with pytest.raises(FlexrayError, match="input shape"):  # not built by the zoo: nothing to trace it with
        channel_groups(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(2)))
    with pytest.raises(FlexrayError, match="width rate"):
        slices.narrow(build("cnn", DIGITS), 1.5)


# ---------------------------------------------------------------- methods


@pytest.fixture(scope="module")
def digits() -> tuple[LocalData, LocalData, tuple[int, int, int]]:
    ds = load_dataset(DataConfig(name="digits"))
    x = to_tensor(ds.x_train, ds.mean, ds.std)
    y = torch.as_tensor(ds.y_train.copy(), dtype=torch.long)
    keep = y < 6  # a device that lacks labels 6..9
    local = LocalData(x[keep][:96], y[keep][:96])
    other = LocalData(x[200:296], y[200:296])
    return local, other, ds.input_shape


def make(name: str, model: str, shape: tuple[int, int, int], **opts: object):  # noqa: ANN201
    cfg = method_class(name).Config.model_validate(
        {"name": name, "local_epochs": 1, "batch_size": 32, "lr": 0.05, **opts}
    )

    def model_fn() -> nn.Module:
        return build_model(ModelConfig(name=model, width=16), shape, 10)

    torch.manual_seed(0)
    method = method_class(name)(cfg, model_fn)
    return method, method.init(model_fn()), model_fn


def view(i: int, profile: str, n: int = 96) -> DeviceView:
    return DeviceView(i, CATALOG[profile], 1.0, n)


def train(method, task: Task, state: dict, data: LocalData, model_fn) -> Update:  # noqa: ANN001
    """Run a task as an actor would: a fresh context seeded by the device."""
    ctx = DeviceContext(model_fn)
    ctx.seed(task.device)
    update = method.local_update(task, state, data, ctx)
    update.device = task.device
    return update


@pytest.mark.parametrize("name", WIDTH)
@pytest.mark.parametrize("model", ["cnn", "resnet8"])
def test_method_round_validates_and_aggregates(name: str, model: str, digits) -> None:  # noqa: ANN001
    local, other, shape = digits
    extra = {"distill": True, "rates": list(RATES)} if name == "fjord" else {}  # one rate set for all three
    method, state, model_fn = make(name, model, shape, **extra)
    devices = [view(0, "rpi3"), view(1, "laptop_cpu"), view(2, "phone_mid")]
    tasks = method.plan(3, devices, state)
    assert [rate_of(t.spec) for t in tasks] == [0.0625, 1.0, 0.25]
    json.dumps([t.spec.log() for t in tasks])  # lands in the event log
    prof = profile_model(model_fn(), shape)
    costs = [method.cost(t, d, prof) for t, d in zip(tasks, devices)]
    assert costs[0].flops < costs[2].flops < costs[1].flops and costs[0].bytes_down < costs[1].bytes_down
    updates = []
    for task, data in zip(tasks, [local, other, local]):
        u = train(method, task, state, data, model_fn)
        assert method.validate(u, state) is None
        assert u.flops and u.flops > 0 and u.bytes_down and u.samples == len(data)
        updates.append(u)
    assert updates[0].flops < updates[1].flops
    assert_rejects_bad(method, updates[0], state, tasks[0].spec)
    new = method.aggregate(3, state, updates)
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in state.items()}
    assert all(torch.isfinite(v.float()).all() for v in new.values())
    assert any(not torch.equal(new[k], state[k]) for k in state)
    metrics = method.evaluate(new, model_fn(), other)
    assert 0 <= metrics["accuracy"] <= 1 and {f"acc_p{r:g}" for r in RATES[1:]} <= set(metrics)


def assert_rejects_bad(method: WidthMethod, good: Update, state: dict, planned: SubModel) -> None:
    """Shapes must be the task's sub-model's; NaN is refused; the planned rate is enforced."""
    key = next(k for k, v in good.tensors.items() if v.is_floating_point() and v.dim() > 1)
    for value, metrics, device, why in [
        (torch.zeros(good.tensors[key].numel() + 1), good.metrics, good.device, "shape"),
        (torch.full_like(good.tensors[key], float("nan")), good.metrics, good.device, "NaN"),
        (good.tensors[key], {**good.metrics, "rate": 1.0}, good.device, "planned"),
        (good.tensors[key], {**good.metrics, "rate": 1.0}, 99, "shape"),  # unplanned: shapes give it away
    ]:
        bad = Update({**good.tensors, key: value}, good.weight, good.samples, metrics=metrics, device=device,
                     trained=SubModel(Width(metrics["rate"])))
        assert why in (method.validate(bad, state, planned if device == good.device else None) or ""), why


def test_heterofl_at_rate_one_equals_fedavg(digits) -> None:  # noqa: ANN001
    local, other, shape = digits
    opts = {"rate": 1.0, "scaler": True, "static_bn": False, "masked_classifier": False}
    hetero, state, model_fn = make("heterofl", "resnet8", shape, **opts)
    fedavg = FedAvg(MethodConfig(name="fedavg", local_epochs=1, batch_size=32, lr=0.05), model_fn)
    devices = [view(0, "rpi3"), view(1, "laptop_cpu")]
    outs: dict[str, list[Update]] = {"h": [], "f": []}
    for key, method in (("h", hetero), ("f", fedavg)):
        for task, data in zip(method.plan(0, devices, state), [local, other]):
            outs[key].append(train(method, task, state, data, model_fn))
    assert all(torch.equal(h.tensors[k], f.tensors[k]) for h, f in zip(outs["h"], outs["f"]) for k in f.tensors)
    got, want = hetero.aggregate(0, state, outs["h"]), fedavg.aggregate(0, state, outs["f"])
    for k in want:
        assert torch.allclose(got[k].double(), want[k].double(), rtol=1e-6, atol=1e-7), k


def test_static_bn_ships_no_running_stats_and_masked_classifier(digits) -> None:  # noqa: ANN001
    local, _, shape = digits
    method, state, model_fn = make("heterofl", "resnet8", shape)
    task = method.plan(0, [view(0, "jetson_nano")], state)[0]
    u = train(method, task, state, local, model_fn)
    assert not any(elastic.is_bn_stat(k) for k in u.tensors)
    assert u.tensors[LABELS].tolist() == [True] * 6 + [False] * 4
    head = elastic.classifier_keys(model_fn())
    new = method.aggregate(0, state, [u])
    assert torch.equal(new[head[0]][6:], state[head[0]][6:])  # rows of labels the device lacks
    assert not torch.equal(new[head[0]][:6], state[head[0]][:6])
    assert all(torch.equal(new[k], state[k]) for k in state if elastic.is_bn_stat(k))


def test_fedrolex_window_moves_each_round(digits) -> None:  # noqa: ANN001
    local, _, shape = digits
    method, state, model_fn = make("fedrolex", "cnn", shape, rate=0.25)
    assert method.plan(5, [view(0, "rpi4")], state)[0].spec == SubModel(Width(0.25, 5))
    i5, i6 = method.index(0.25, 5), method.index(0.25, 6)
    assert i5["conv1.0.weight"][0].tolist() == [5, 6, 7, 8] and i6["conv1.0.weight"][0].tolist() == [6, 7, 8, 9]
    task = method.plan(15, [view(0, "rpi4")], state)[0]
    new = method.aggregate(15, state, [train(method, task, state, local, model_fn)])
    changed = [c for c in range(16) if not torch.equal(new["conv1.0.weight"][c], state["conv1.0.weight"][c])]
    assert changed == [0, 1, 2, 15]  # window 15, 16 mod 16 = 0, 1, 2


def test_fjord_samples_nested_widths_and_updates_only_its_prefix(digits) -> None:  # noqa: ANN001
    local, _, shape = digits
    method, state, model_fn = make("fjord", "cnn", shape)  # the paper's uniform-5 widths 0.2 ... 1
    task = method.plan(0, [view(0, "jetson_nano")], state)[0]
    assert rate_of(task.spec) == 0.4  # p_max: 0.4^2 <= 35/100 GFLOP/s < 0.6^2
    u = train(method, task, state, local, model_fn)
    per = {p: method.sub_profile(p, shape).train_flops_per_sample for p in (0.2, 0.4)}
    assert min(per.values()) * u.samples < u.flops < max(per.values()) * u.samples  # mixed widths ran
    new = method.aggregate(0, state, [u])
    w, kept = new["conv1.0.weight"], math.ceil(0.4 * 16)
    assert not torch.equal(w[:kept], state["conv1.0.weight"][:kept])
    assert torch.equal(w[kept:], state["conv1.0.weight"][kept:])


def test_tiers_and_config_errors() -> None:
    cfg = method_class("heterofl").Config.model_validate({"name": "heterofl", "tiers": {"rpi4": 0.5}})
    assert tier_rate(cfg, CATALOG["rpi4"]) == 0.5 and tier_rate(cfg, CATALOG["rpi3"]) == 0.0625
    assert tier_rate(cfg, CATALOG["jetson_nano"]) == 0.5 and tier_rate(cfg, CATALOG["cloud_gpu"]) == 1.0
    base = {"fleet": {"groups": [{"profile": "rpi4"}]}, "method": {"name": "heterofl"}}
    for bad, msg in [({"rates": [1.0, 1.5]}, "in \\(0, 1\\]"), ({"rate": 0.3}, "not one of rates"),
                     ({"tiers": {"rpi4": 0.2}}, "not one of rates")]:
        with pytest.raises(FlexrayError, match=msg) as err:
            parse_config({**base, "method": {"name": "heterofl", **bad}})
        assert "\n" not in str(err.value)
    assert {"heterofl", "fjord", "fedrolex"} <= set(METHODS) and not any(METHODS[n].linear for n in WIDTH)


@pytest.mark.parametrize("name", WIDTH)
def test_cost_predicts_what_the_device_sends(name: str, digits) -> None:  # noqa: ANN001
    local, _, shape = digits
    method, state, model_fn = make(name, "resnet8", shape)
    dev = view(0, "jetson_nano", n=len(local))
    task = method.plan(0, [dev], state)[0]
    cost = method.cost(task, dev, profile_model(model_fn(), shape))
    u = train(method, task, state, local, model_fn)
    assert cost.bytes_down == u.bytes_down and cost.bytes_up == state_bytes(u.tensors)
    if name != "fjord":  # FjORD's cost is the expectation over its randomly drawn widths
        assert cost.flops == pytest.approx(u.flops)


def test_fjord_bn_statistics_reach_the_pmax_model(digits) -> None:  # noqa: ANN001
    local, _, shape = digits
    method, state, model_fn = make("fjord", "resnet8", shape, static_bn=False, rates=[1.0, 0.5], rate=0.5)
    task = method.plan(0, [view(0, "rpi4")], state)[0]
    u = train(method, task, state, local, model_fn)
    assert "stem.1.running_mean" in u.tensors and u.tensors["stem.1.num_batches_tracked"] == len(local) // 32
    new = method.aggregate(0, state, [u])
    assert not torch.equal(new["stem.1.running_mean"][:8], state["stem.1.running_mean"][:8])
    assert torch.equal(new["stem.1.running_mean"][8:], state["stem.1.running_mean"][8:])


@pytest.mark.parametrize("name", WIDTH)
def test_round_through_the_device_host_in_process(name: str) -> None:
    """The actor's own path (cost, local_update, byte counts, validate) without starting Ray."""
    method, state, tasks, reports, updates = host_round([f"method.name={name}"])
    assert [r.status for r in reports] == ["ok"] * 4 and len(updates) == 4  # never pre-summed
    assert [r.spec["rate"] for r in reports] == [rate_of(t.spec) for t in tasks]
    assert all(method.validate(u, state) is None for u in updates)
    new = method.aggregate(0, state, updates)
    assert all(torch.isfinite(v.float()).all() and v.shape == state[k].shape for k, v in new.items())


# ---------------------------------------------------------------- depth prefixes (FlexTrain)


@pytest.mark.parametrize("name,shape", [("resnet8", DIGITS), ("resnet20", CIFAR), ("preresnet18", DIGITS)])
def test_depth_prefixes_share_the_global_tensors(name: str, shape: tuple[int, int, int]) -> None:
    from flexray.models import depth

    full = build(name, shape).eval()
    blocks = depth.block_names(full)
    assert depth.num_configs(full) == len(blocks)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.equal(depth.depth_prefix(full, len(blocks))(x), full(x))  # deepest = the full model
        for k in range(len(blocks) + 1):
            prefix = depth.depth_prefix(full, k).eval()
            assert prefix(x).shape == (4, 10)
            keys = depth.prefix_keys(full, k)
            expected = [key for key in full.state_dict() if key.split(".")[0] not in blocks[k:]]
            assert keys == expected  # stem, blocks 1..k, head: a prefix of the stages
            glob = full.state_dict()
            assert all(v.data_ptr() == glob[key].data_ptr() for key, v in prefix.state_dict().items())
    assert sum(p.numel() for p in depth.depth_prefix(full, 0).parameters()) < sum(p.numel() for p in full.parameters())


def test_depth_prefix_trains_only_its_blocks_and_aggregates() -> None:
    from flexray.models import depth

    full = build("resnet8", DIGITS)
    state = {k: v.clone() for k, v in full.state_dict().items()}
    prefix = depth.depth_prefix(full, 1).train()
    prefix(torch.randn(4, *DIGITS)).sum().backward()
    grads = {n for n, p in full.named_parameters() if p.grad is not None}
    assert grads == {n for n, _ in prefix.named_parameters()} and not any(n.startswith("layer3") for n in grads)
    upd = depth.prefix_state(random_state(full, 5), full, 1)
    merged = elastic.aggregate(state, [elastic.Part(upd, elastic.whole_index(upd), 1.0)] * 2)
    for k, v in state.items():
        assert torch.equal(merged[k].to(v.dtype), upd[k] if k in upd else v), k
    with pytest.raises(FlexrayError, match="residual"):
        depth.block_names(build("cnn", DIGITS))
    with pytest.raises(FlexrayError, match="out of range"):
        depth.depth_prefix(full, 4)
