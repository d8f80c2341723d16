"""FlexTrain, federated mode: depth tiers, cost, local update, validate, uniform aggregation (fast, no Ray)."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from torch import nn

from flexray.config import DataConfig, ModelConfig
from flexray.data.datasets import load_dataset, to_tensor
from flexray.errors import FlexrayError
from flexray.fleet.profiles import CATALOG
from flexray.methods import METHODS, flextrain
from flexray.methods.base import DeviceContext
from flexray.methods.flextrain import FlexTrain
from flexray.models import build_model, depth, profile_model, state_bytes
from flexray.protocol import DeviceView, LocalData, SubModel, Task, Update, compute_seconds
from flexray.runtime.assembly import parse_config
from flexray.methods.flextrain import Depth, depth_of
from tests.conftest import host_round

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Single-threaded torch for the whole module (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def digits() -> tuple[LocalData, LocalData, tuple[int, int, int]]:
    ds = load_dataset(DataConfig(name="digits"))
    x = to_tensor(ds.x_train, ds.mean, ds.std)
    y = torch.as_tensor(ds.y_train.copy(), dtype=torch.long)
    return LocalData(x[:96], y[:96]), LocalData(x[200:296], y[200:296]), ds.input_shape


def make(shape: tuple[int, int, int], model: str = "resnet8", stage_heads: bool = False,
         **opts: object) -> tuple[FlexTrain, dict, object]:
    cfg = FlexTrain.Config.model_validate(
        {"name": "flextrain", "local_epochs": 1, "batch_size": 32, "lr": 0.05, **opts}
    )

    def model_fn() -> nn.Module:
        return build_model(ModelConfig(name=model, width=16, stage_heads=stage_heads), shape, 10)

    torch.manual_seed(0)
    method = FlexTrain(cfg, model_fn)
    return method, method.init(model_fn()), model_fn


def view(i: int, profile: str, n: int = 96) -> DeviceView:
    return DeviceView(i, CATALOG[profile], 1.0, n)


def train(method: FlexTrain, task: Task, state: dict, data: LocalData, model_fn) -> Update:
    ctx = DeviceContext(model_fn)
    ctx.seed(task.device)
    update = method.local_update(task, state, data, ctx)
    update.device = task.device
    return update


def random_state(state: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in state.items()}


def test_registered_and_config_errors() -> None:
    assert METHODS["flextrain"] is FlexTrain and not FlexTrain.linear
    assert depth.HEAD_RULE == "zero_pad" and "zero_pad" in (flextrain.__doc__ or "") and "stage_heads" in (flextrain.__doc__ or "")
    base = {"fleet": {"groups": [{"profile": "rpi4"}]}}
    for bad, field in [({"beta": -1}, "beta"), ({"depths": {"rpi4": 0}}, "depths"),
                       ({"full_depth_flops": 0}, "full_depth_flops")]:
        with pytest.raises(FlexrayError, match=f"method.{field}") as err:
            parse_config({**base, "method": {"name": "flextrain", **bad}})
        assert "\n" not in str(err.value)
    cfg = parse_config({**base, "method": {"name": "flextrain"}}).method
    assert cfg.beta == 0.2 and cfg.depths == {} and cfg.aggregation == "paper"


def test_plan_gives_faster_devices_deeper_prefixes(digits) -> None:
    _, _, shape = digits
    method, state, _ = make(shape, "resnet20")  # K = 9
    names = ["rpi3", "rpi4", "phone_mid", "jetson_nano", "laptop_cpu", "cloud_gpu"]
    tasks = method.plan(2, [view(i, n) for i, n in enumerate(names)], state)
    ks = [depth_of(t.spec) for t in tasks]
    json.dumps([t.spec.log() for t in tasks])  # lands in the event log
    assert set(tasks[0].spec.log()) == {"k"} and all(isinstance(k, int) for k in ks)
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] == method.max_k == 9 and len(set(ks)) >= 3
    # the rule: the largest k whose step takes the device (per-layer clock) at most flops /
    # full_depth_flops of its own full-depth step
    probe, batch = method._probe_shape(), method.cfg.batch_size
    for name, k in zip(names, ks):
        budget = (CATALOG[name].flops / method.fcfg.full_depth_flops
                  * compute_seconds(CATALOG[name], method.step_of(9, probe).step(batch)))
        took = {c: compute_seconds(CATALOG[name], method.step_of(c, probe).step(batch)) for c in (k, k + 1) if c <= 9}
        if k < 9:
            assert took[k + 1] > budget
        if k > 1:
            assert took[k] <= budget * (1 + 1e-9)
    pinned, _, _ = make(shape, "resnet20", depths={"rpi3": 7})
    assert pinned.plan(0, [view(0, "rpi3")], state)[0].spec == SubModel(Depth(7, flextrain.LABELS))  # weakest tier
    too_deep, _, _ = make(shape, "resnet20", depths={"rpi3": 10})
    with pytest.raises(FlexrayError, match="depths"):
        too_deep.plan(0, [view(0, "rpi3")], state)


def test_cost_grows_with_k(digits) -> None:
    _, _, shape = digits
    method, _, model_fn = make(shape)
    prof = profile_model(model_fn(), shape)
    dev = view(0, "rpi4")
    costs = [method.cost(Task(0, 0, SubModel(Depth(k))), dev, prof) for k in method.configs]
    assert all(a.flops < b.flops and a.bytes_down < b.bytes_down for a, b in pairwise(costs))
    assert costs[-1].bytes_up == costs[-1].bytes_down == prof.param_bytes
    no_distill, _, _ = make(shape, beta=0.0)
    last = method.configs[-1]
    assert no_distill.cost(Task(0, 0, SubModel(Depth(last))), dev, prof).flops == pytest.approx(
        method.cfg.local_epochs * dev.num_samples * prof.train_flops_per_sample
    )  # the full prefix alone is the full model


@pytest.mark.parametrize("k", [1, 2, 3])
def test_local_update_returns_the_prefix_and_validates(k: int, digits) -> None:
    local, _, shape = digits
    method, state, model_fn = make(shape)
    dev = view(0, "rpi4", n=len(local))
    task = Task(0, 0, SubModel(Depth(k)))
    u = train(method, task, state, local, model_fn)
    assert list(u.tensors) == depth.prefix_keys(model_fn(), k)
    assert u.metrics["k"] == k and u.weight == 1.0 and u.samples == len(local)
    assert method.validate(u, state) is None
    assert any(not torch.equal(u.tensors[key], state[key]) for key in u.tensors)  # it trained
    cost = method.cost(task, dev, profile_model(model_fn(), shape))
    assert cost.flops == pytest.approx(u.flops) and cost.bytes_down == u.bytes_down == state_bytes(u.tensors)


def test_distillation_only_above_the_smallest_configuration(digits) -> None:
    local, _, shape = digits
    plain, state, model_fn = make(shape, beta=0.0)
    distil, _, _ = make(shape)  # beta = 0.2
    for k, differs in [(1, False), (2, True), (3, True)]:
        a = train(plain, Task(0, 0, SubModel(Depth(k))), state, local, model_fn)
        b = train(distil, Task(0, 0, SubModel(Depth(k))), state, local, model_fn)
        same = all(torch.equal(a.tensors[key], b.tensors[key]) for key in a.tensors)
        assert same is not differs, k
        assert (a.metrics["train_loss"] != b.metrics["train_loss"]) is differs, k
        assert (b.flops > a.flops) is differs, k  # the student's pass is counted


def test_stage_heads_give_each_stage_its_own_classifier(digits) -> None:
    """resnet8 has one block per stage (16, 32, 64 channels): k = 1 and k = 2 end in narrower stages."""
    local, _, shape = digits
    method, state, model_fn = make(shape, stage_heads=True, aggregation="coverage")
    plain, plain_state, plain_fn = make(shape)
    assert (method.head_rule, plain.head_rule) == ("stage_heads", "zero_pad")
    exits = {f"head.exits.{c}.{p}" for c in (16, 32) for p in ("weight", "bias")}
    assert set(state) - set(plain_state) == exits and all(torch.equal(plain_state[k], state[k]) for k in plain_state)
    a, b = model_fn(), plain_fn()
    a.load_state_dict(state)
    b.load_state_dict(plain_state)
    assert torch.equal(a.eval()(local.x[:8]), b.eval()(local.x[:8]))  # the full model is unchanged
    heads = {k: {key for key in method.keys(k) if key.startswith("head.")} for k in (1, 2, 3)}
    assert heads == {1: {"head.exits.16.weight", "head.exits.16.bias"},
                     2: {"head.exits.32.weight", "head.exits.32.bias"}, 3: {"head.2.weight", "head.2.bias"}}

    # k = 2 distils into k = 1, whose head is stage 1's: the device trains and returns it too
    u2 = train(method, Task(1, 0, SubModel(Depth(2))), state, local, model_fn)
    assert set(u2.tensors) == set(method.keys(2)) | heads[1] and method.validate(u2, state) is None
    assert not torch.equal(u2.tensors["head.exits.16.weight"], state["head.exits.16.weight"])
    assert method.cost(Task(1, 0, SubModel(Depth(2))), view(1, "rpi4", len(local)), profile_model(model_fn(), shape)).bytes_up \
        == state_bytes(u2.tensors)
    nodistil, _, _ = make(shape, stage_heads=True, beta=0.0)
    assert set(train(nodistil, Task(1, 0, SubModel(Depth(2))), state, local, model_fn).tensors) == set(nodistil.keys(2))

    u1 = train(method, Task(0, 0, SubModel(Depth(1))), state, local, model_fn)
    merged = method.aggregate(0, state, [u1, u2])
    key = "head.exits.16.weight"
    assert torch.allclose(merged[key], (u1.tensors[key] + u2.tensors[key]) / 2)
    assert torch.equal(merged["head.exits.32.bias"], u2.tensors["head.exits.32.bias"])
    assert torch.equal(merged["head.2.weight"], state["head.2.weight"])  # no device trained the full model


def test_anchor_adds_ce_at_k1_on_deeper_devices_only(digits) -> None:
    local, _, shape = digits
    for stage_heads in (False, True):
        paper, state, model_fn = make(shape, stage_heads=stage_heads)
        anchored, _, _ = make(shape, stage_heads=stage_heads, anchor=0.5)
        for k in (1, 2, 3):
            a = train(paper, Task(0, 0, SubModel(Depth(k))), state, local, model_fn)
            b = train(anchored, Task(0, 0, SubModel(Depth(k))), state, local, model_fn)
            same = set(a.tensors) <= set(b.tensors) and all(torch.equal(a.tensors[q], b.tensors[q]) for q in a.tensors)
            assert same is (k == 1), (stage_heads, k)  # k = 1 is its own anchor
            assert anchored.validate(b, state) is None
            # k = 2's student is k = 1 (one pass, no extra FLOPs); k = 3 also trains and returns k = 1
            extra = set(b.tensors) - set(a.tensors)
            assert extra == ({"head.exits.16.weight", "head.exits.16.bias"} if stage_heads and k == 3 else set())
            assert (b.flops > a.flops) is (k == 3)


def test_stage_heads_only_for_resnets() -> None:
    with pytest.raises(FlexrayError, match="model.*stage_heads") as err:
        parse_config({"fleet": {"groups": [{"profile": "rpi4"}]}, "model": {"name": "cnn", "stage_heads": True}})
    assert "\n" not in str(err.value)


def test_validate_rejects_nan_and_wrong_keys(digits) -> None:
    local, _, shape = digits
    method, state, model_fn = make(shape)
    good = train(method, Task(0, 0, SubModel(Depth(2))), state, local, model_fn)
    key = next(k for k, v in good.tensors.items() if v.dim() > 1)
    extra = next(k for k in state if k not in good.tensors)
    cases = [
        ({**good.tensors, key: torch.full_like(good.tensors[key], float("nan"))}, good.metrics, "NaN"),
        ({**good.tensors, extra: state[extra]}, good.metrics, "unknown"),
        ({k: v for k, v in good.tensors.items() if k != key}, good.metrics, "missing"),
        (good.tensors, {**good.metrics, "k": 3.0}, "missing"),  # claims a deeper configuration
        ({**good.tensors, key: torch.zeros(good.tensors[key].numel())}, good.metrics, "shape"),
        (good.tensors, {"train_loss": 1.0}, "depth configuration"),
        (good.tensors, {**good.metrics, "k": 0.0}, "depth configuration"),
        (good.tensors, {**good.metrics, "k": float("nan")}, "depth configuration"),
    ]
    for tensors, metrics, why in cases:
        bad = Update(tensors, good.weight, good.samples, metrics=metrics, device=0,
                     trained=SubModel(Depth(metrics["k"])) if "k" in metrics else None)
        assert why in (method.validate(bad, state) or ""), why


def test_aggregate_is_an_exact_uniform_mean_and_keeps_untouched(digits) -> None:
    """The ``coverage`` rule; the paper's is in test_elastic_depth.py."""
    _, _, shape = digits
    method, _, model_fn = make(shape, aggregation="coverage")
    full = model_fn()
    state = random_state(full.state_dict(), 0)
    k1, k2 = depth.prefix_keys(full, 1), depth.prefix_keys(full, 2)
    a = {key: v for key, v in random_state(state, 1).items() if key in k1}
    b = {key: v for key, v in random_state(state, 2).items() if key in k2}

    def upd(t: dict, k: int, samples: int) -> Update:
        return Update(t, 1.0, samples, metrics={"k": float(k)}, trained=SubModel(Depth(k)))

    same = method.aggregate(0, state, [upd(a, 1, 10), upd(a, 1, 500)])
    for key, v in state.items():
        assert torch.equal(same[key], a.get(key, v)), key
    merged = method.aggregate(0, state, [upd(a, 1, 10), upd(b, 2, 1000)])  # sample counts must not matter
    untouched = [key for key in state if key not in k2]
    assert untouched
    for key, v in state.items():
        want = (a[key].double() + b[key].double()) / 2 if key in a else b.get(key, v)
        if v.is_floating_point():
            assert torch.equal(merged[key], want.to(v.dtype)), key
        else:
            assert torch.equal(merged[key], want.double().round().to(v.dtype)), key
        assert merged[key].dtype == v.dtype
    assert all(torch.equal(merged[key], state[key]) for key in untouched)
    assert method.aggregate(0, state, []) is state


def test_evaluate_reports_every_configuration(digits) -> None:
    local, other, shape = digits
    method, state, model_fn = make(shape)
    tasks = method.plan(0, [view(0, "rpi3"), view(1, "laptop_cpu")], state)
    new = method.aggregate(0, state, [train(method, t, state, local, model_fn) for t in tasks])
    metrics = method.evaluate(new, model_fn(), other)
    assert {f"acc_k{k}" for k in method.configs} <= set(metrics) and "acc_k0" not in metrics
    assert all(0 <= metrics[f"acc_k{k}"] <= 1 for k in method.configs)
    assert metrics[f"acc_k{method.max_k}"] == metrics["accuracy"]  # the deepest prefix is the full model
    assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] > 0


def test_non_residual_model_is_a_one_line_error(digits) -> None:
    _, _, shape = digits
    method, state, _ = make(shape, "cnn")
    with pytest.raises(FlexrayError, match="residual"):
        method.plan(0, [view(0, "rpi4")], state)


def test_round_through_the_device_host_in_process() -> None:
    """The actor's own path (cost, local_update, byte counts, validate) without starting Ray."""
    method, state, tasks, reports, updates = host_round(["method.name=flextrain", "model.name=resnet8"])
    assert [r.status for r in reports] == ["ok"] * 4 and len(updates) == 4  # never pre-summed
    assert [r.spec["k"] for r in reports] == [depth_of(t.spec) for t in tasks]
    assert [int(u.metrics["k"]) for u in updates] == [depth_of(t.spec) for t in tasks]
    assert all(method.validate(u, state) is None for u in updates)
    new = method.aggregate(0, state, updates)
    assert all(torch.isfinite(v.float()).all() and v.shape == state[k].shape for k, v in new.items())


# ---------------------------------------------------------------- centralised mode, FedClass, deployment


def test_centralised_mode_samples_k_and_distills_from_k_plus_one(digits) -> None:
    train_data, test_data, shape = digits
    method, state, model_fn = make(shape, mode="centralised", pi=[0.0, 1.0, 0.0])  # always k = 2
    assert method.options() == []  # no knob for the scheduler: every device trains the whole model
    task = method.plan(0, [view(0, "rpi4")], state)[0]
    update = train(method, task, state, train_data, model_fn)
    assert set(update.tensors) == set(state) and method.validate(update, state) is None
    # Only weights up to k=2 learned (block 3 only fed the no-grad teacher; its BN statistics move).
    k2 = set(depth.prefix_keys(method.full, 2))
    params = {name for name, _ in method.full.named_parameters()}
    changed = {k for k in params if not torch.equal(state[k], update.tensors[k])}
    assert changed and changed <= k2
    per = method.prefix_profile(2, shape).train_flops_per_sample + method.prefix_profile(3, shape).fwd_flops_per_sample
    assert update.flops == pytest.approx(len(train_data) * per)
    again = train(method, task, state, train_data, model_fn)
    assert all(torch.equal(update.tensors[k], again.tensors[k]) for k in state)  # seeded
    merged = method.aggregate(0, state, [update, again])
    assert all(torch.allclose(merged[k].double(), update.tensors[k].double()) for k in state if k in k2)


def test_centralised_pi_must_match_the_model(digits) -> None:
    _, _, shape = digits
    method, _, _ = make(shape, mode="centralised", pi=[1.0, 1.0])
    with pytest.raises(FlexrayError, match="method.pi"):
        _ = method.pi
    with pytest.raises(Exception, match="pi"):
        make(shape, mode="centralised", pi=[-1.0, 1.0, 1.0])


def test_scheduler_choice_overrides_the_tier_and_feeds_mean_device_acc(digits) -> None:
    train_data, test_data, shape = digits
    method, state, model_fn = make(shape)
    views = [replace_choice(view(0, "rpi3"), SubModel(Depth(3))), replace_choice(view(1, "laptop_cpu"), SubModel(Depth(1)))]
    tasks = method.plan(0, views, state)
    assert [depth_of(t.spec) for t in tasks] == [3, 1]
    metrics = method.evaluate(state, model_fn(), test_data)
    assert metrics["mean_device_acc"] == pytest.approx((metrics["acc_k3"] + metrics["acc_k1"]) / 2)
    deployed = method.device_model(state, model_fn(), SubModel(Depth(1)))
    assert set(deployed.state_dict()) == set(depth.prefix_keys(method.full, 1))
    forced, _, _ = make(shape, k=1)
    assert forced.options() == [SubModel(Depth(1))] and forced.tier_depth(CATALOG["laptop_cpu"]) == 1


def replace_choice(v: DeviceView, choice: SubModel) -> DeviceView:
    from dataclasses import replace

    return replace(v, choice=choice)


def test_fedclass_keeps_one_model_per_class(digits) -> None:
    from flexray.methods.fedclass import FedClass

    train_data, test_data, shape = digits
    cfg = FedClass.Config.model_validate({"name": "fedclass", "local_epochs": 1, "batch_size": 32, "lr": 0.05})

    def model_fn() -> nn.Module:
        return build_model(ModelConfig(name="resnet8", width=16), shape, 10)

    method = FedClass(cfg, model_fn)
    state = method.init(model_fn())
    assert set(state) == {f"k{k}/{key}" for k in (1, 2, 3) for key in depth.prefix_keys(method.full, k)}
    tasks = method.plan(0, [replace_choice(view(0, "rpi3"), SubModel(Depth(1))), replace_choice(view(1, "rpi3"), SubModel(Depth(1)))], state)
    ups = [train(method, t, state, d, model_fn) for t, d in zip(tasks, (train_data, test_data))]
    assert all(method.validate(u, state) is None for u in ups)
    merged = method.aggregate(0, state, ups)
    for key, value in merged.items():  # class 1 moved (a sample-weighted mean); classes 2, 3 untouched
        if key.startswith("k1/") and value.is_floating_point():
            want = (ups[0].tensors[key[3:]].double() + ups[1].tensors[key[3:]].double()) / 2
            assert torch.allclose(value.double(), want, atol=1e-6), key
        elif not key.startswith("k1/"):
            assert torch.equal(value, state[key]), key
    metrics = method.evaluate(merged, model_fn(), test_data)
    assert metrics["accuracy"] == metrics["acc_k1"] == metrics["mean_device_acc"]
    bad = Update({"stem.0.weight": ups[0].tensors["stem.0.weight"] if "stem.0.weight" in ups[0].tensors else torch.ones(1)},
                 1.0, 1, metrics={"k": 1.0}, trained=SubModel(Depth(1)))
    assert method.validate(bad, state) is not None


@pytest.mark.parametrize("opts", [{"k": 7}, {"depths": {"rpi3": 4}}, {"mode": "centralised", "pi": [1.0]}])
def test_check_catches_a_model_mismatch_before_any_cluster_starts(digits, opts) -> None:
    _, _, shape = digits
    method, _, _ = make(shape, **opts)
    with pytest.raises(FlexrayError, match="config error: method"):
        method.check()
    make(shape)[0].check()  # resnet8 with defaults is fine
    with pytest.raises(FlexrayError, match="residual"):
        make(shape, model="cnn")[0].check()
