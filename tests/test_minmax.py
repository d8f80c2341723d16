"""Sub-model assignment: capacity and strict min-max against brute force, memory respected,
traces matter, and only capacity trains the full model on a spread-out fleet (no Ray)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from flexray.config import ModelConfig, ScheduleConfig
from flexray.fleet.profiles import CATALOG
from flexray.methods.flextrain import FlexTrain
from flexray.methods.heterofl import HeteroFL
from flexray.models import build_model, profile_model
from flexray.protocol import DeviceView, SubModel
from flexray.schedule.minmax import SubModelScheduler, capacity_choice, minmax_choice, static_choice
from flexray.methods.width import Width, rate_of

SHAPE = (3, 32, 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread: None) -> None:
    """Single-threaded torch for the whole module."""


def brute_force(lat: np.ndarray, fits: np.ndarray) -> tuple[float, list[tuple[int, ...]]]:
    """Every memory-feasible assignment: the best max latency and all assignments reaching it."""
    feasible = [[j for j in range(lat.shape[1]) if fits[i, j]] for i in range(lat.shape[0])]
    best, winners = np.inf, []
    for combo in itertools.product(*feasible):
        worst = max(lat[i, j] for i, j in enumerate(combo))
        if worst < best - 1e-12:
            best, winners = worst, [combo]
        elif abs(worst - best) <= 1e-12:
            winners.append(combo)
    return best, winners


@pytest.mark.parametrize("seed", range(40))
def test_minmax_is_never_beaten_by_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    # Options largest first: latency falls with the option index on average, not always.
    speed = rng.uniform(0.1, 10, size=(n, 1))
    lat = np.sort(rng.uniform(1, 100, size=(n, m)), axis=1)[:, ::-1] / speed
    if seed % 3 == 0:
        lat = rng.uniform(1, 100, size=(n, m))  # no monotonicity at all
    fits = rng.random((n, m)) < 0.75
    fits[:, -1] |= rng.random(n) < 0.8  # most devices fit the smallest option
    idx, target = minmax_choice(lat, fits)
    best, winners = brute_force(lat, fits)
    feasible_rows = fits.any(axis=1)
    assert ((idx >= 0) == feasible_rows).all()
    chosen = [(i, j) for i, j in enumerate(idx) if j >= 0]
    assert all(fits[i, j] for i, j in chosen)  # memory is never exceeded
    if not chosen:
        return
    worst = max(lat[i, j] for i, j in chosen)
    assert worst == pytest.approx(best, rel=1e-9) and target == pytest.approx(best, rel=1e-9)
    for combo in winners:  # no optimal assignment gives any device a larger option
        for i, j in chosen:
            assert j <= combo[i]


@pytest.mark.parametrize("seed", range(40))
def test_capacity_matches_brute_force(seed: int) -> None:
    """Per device, over every option: the largest (lowest index) that fits and finishes by the
    target, else the fastest that fits; -1 when nothing fits."""
    rng = np.random.default_rng(100 + seed)
    n, m = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    lat = rng.uniform(1, 100, size=(n, m))
    fits = rng.random((n, m)) < 0.75
    target = float(rng.uniform(1, 100))
    idx = capacity_choice(lat, fits, target)
    for i in range(n):
        ok = [j for j in range(m) if fits[i, j]]
        within = [j for j in ok if lat[i, j] <= target]
        want = min(within) if within else (min(ok, key=lambda j: lat[i, j]) if ok else -1)
        assert idx[i] == want, (i, lat[i], fits[i], target)


def test_capacity_trains_the_full_model_where_strict_minmax_starves_it() -> None:
    """Strict min-max paces the round to the slowest device's smallest option (an rpi4 at p=1/16);
    when that is shorter than the fastest device's full model (a Jetson Nano's), nobody trains the
    full model. Capacity paces it to the fastest device's full model, which the fast devices train,
    and the slow ones take the largest option in time. (On the per-layer clock a 1/16 sub-model
    costs the rpi4 1/13 of its full model, not the 1/100+ its FLOPs say, so with laptops in the
    fleet even strict min-max trains them at full width.)"""
    method, profile = _method(HeteroFL)
    views = _views("rpi4", "rpi4", "jetson_nano", "jetson_nano")
    strict = SubModelScheduler(ScheduleConfig(mode="minmax"), method, profile, batch_size=32).assign(views)
    sched = SubModelScheduler(ScheduleConfig(mode="capacity"), method, profile, batch_size=32)
    plan = sched.assign(views)
    full = sched.options[0]
    assert full not in [v.choice for v in strict.views]
    rate = {v.id: rate_of(v.choice) for v in plan.views}
    assert rate[2] == rate[3] == 1.0 and rate[0] < 1.0
    assert plan.target_s == pytest.approx(max(sched.latency(views[2], full), strict.target_s))
    for v in plan.views:  # the largest option within the round time, or the fastest when none is
        j = sched.options.index(v.choice)
        if plan.predicted_s[v.id] <= plan.target_s * (1 + 1e-9):
            assert all(sched.latency(v, o) > plan.target_s for o in sched.options[:j])
        else:
            assert plan.predicted_s[v.id] == pytest.approx(min(sched.latency(v, o) for o in sched.options))


def test_capacity_round_time_is_never_below_the_slowest_devices_fastest_option() -> None:
    """When the slowest device's smallest sub-model takes longer than the fastest device's full
    model, the round lasts that long anyway: the others get the largest sub-model in that time,
    exactly strict min-max's choice."""
    method, profile = _method(HeteroFL)
    views = _views("rpi3", "laptop_cpu")
    views[0] = replace(views[0], speed=0.002)  # throttled to a crawl
    cap = SubModelScheduler(ScheduleConfig(mode="capacity"), method, profile, batch_size=32).assign(views)
    strict = SubModelScheduler(ScheduleConfig(mode="minmax"), method, profile, batch_size=32).assign(views)
    assert cap.target_s == pytest.approx(strict.target_s)
    assert [v.choice for v in cap.views] == [v.choice for v in strict.views]


def test_capacity_round_time_uses_the_largest_dataset_and_the_users_deadline() -> None:
    method, profile = _method(HeteroFL)
    views = [*_views("laptop_cpu", "laptop_cpu", n=100)]
    views[1] = replace(views[1], num_samples=400)  # same class, 4x the data
    sched = SubModelScheduler(ScheduleConfig(mode="capacity"), method, profile, batch_size=32)
    plan = sched.assign(views)
    assert [rate_of(v.choice) for v in plan.views] == [1.0, 1.0]  # a device of the fastest class: full model
    assert plan.target_s == pytest.approx(sched.latency(views[1], sched.options[0]))
    tight = SubModelScheduler(ScheduleConfig(mode="capacity"), method, profile, batch_size=32,
                              deadline_s=plan.target_s / 20)
    small = tight.assign(views)
    assert small.target_s == pytest.approx(plan.target_s / 20)
    assert all(rate_of(v.choice) < 1.0 for v in small.views)  # the user's deadline overrides


def test_slack_trades_latency_for_larger_submodels() -> None:
    lat = np.array([[10.0, 5.0, 2.0], [4.0, 2.0, 1.0]])
    fits = np.ones_like(lat, dtype=bool)
    tight, t1 = minmax_choice(lat, fits)
    loose, t2 = minmax_choice(lat, fits, slack=2.5)
    assert t1 == 2.0 and list(tight) == [2, 1]
    assert t2 == 5.0 and list(loose) == [1, 0]


def test_static_steps_down_to_what_fits() -> None:
    fits = np.array([[True, True, True], [False, False, True], [False, False, False]])
    assert list(static_choice(np.array([0, 0, 1]), fits)) == [0, 2, -1]


def _method(kind: type, **opts: object) -> tuple[object, object]:
    cfg = kind.Config.model_validate({"name": kind.name, "local_epochs": 1, "batch_size": 32, **opts})

    def model_fn() -> nn.Module:
        return build_model(ModelConfig(name="resnet8", width=16), SHAPE, 10)

    torch.manual_seed(0)
    return kind(cfg, model_fn), profile_model(model_fn(), SHAPE)


def _views(*names: str, n: int = 200) -> list[DeviceView]:
    return [DeviceView(i, CATALOG[p], 1.0, n) for i, p in enumerate(names)]


@pytest.mark.parametrize("kind", [HeteroFL, FlexTrain])
def test_scheduler_respects_memory_and_balances_the_round(kind: type) -> None:
    method, profile = _method(kind)
    sched = SubModelScheduler(ScheduleConfig(mode="minmax"), method, profile, batch_size=32)
    mem = sorted(sched._memory)
    # A device that only fits the smallest option, one that fits nothing, and a fast one.
    tiny = replace(CATALOG["laptop_cpu"], name="tiny", memory_bytes=int((mem[0] + mem[1]) / 2))
    none = replace(CATALOG["laptop_cpu"], name="none", memory_bytes=int(mem[0] / 2))
    views = [*_views("rpi3", "jetson_nano", "laptop_cpu"), DeviceView(3, tiny, 1.0, 200), DeviceView(4, none, 1.0, 200)]
    plan = sched.assign(views)
    got = {v.id: v.choice for v in plan.views}
    assert 4 not in got  # fits nothing: no task
    assert got[3] == sched.options[-1]
    for v in plan.views:
        j = sched.options.index(v.choice)
        assert sched._memory[j] <= v.profile.memory_bytes
        assert plan.predicted_s[v.id] <= plan.target_s * (1 + 1e-9)
        larger = sched.options[:j]  # every larger option that fits would miss the target
        for o in larger:
            if sched._memory[sched.options.index(o)] <= v.profile.memory_bytes:
                assert sched.latency(v, o) > plan.target_s
    # The slow rpi3 sets the pace: it gets the smallest option, the laptop a larger one.
    assert sched.options.index(got[0]) == len(sched.options) - 1
    assert sched.options.index(got[2]) < sched.options.index(got[0])


def test_minmax_follows_the_traces() -> None:
    method, profile = _method(HeteroFL)
    sched = SubModelScheduler(ScheduleConfig(mode="minmax"), method, profile, batch_size=32)
    views = _views("rpi4", "jetson_nano", "laptop_cpu")
    before = sched.assign(views)
    slow = [replace(views[0], speed=0.05), *views[1:]]  # the rpi4 throttles hard
    after = sched.assign(slow)
    assert after.target_s > before.target_s
    rate = {v.id: rate_of(v.choice) for v in before.views}
    rate_after = {v.id: rate_of(v.choice) for v in after.views}
    assert rate_after[1] >= rate[1] and rate_after[2] >= rate[2]
    assert rate_after != rate  # someone got a larger sub-model once the pace slowed


def test_static_mode_uses_the_methods_tiers() -> None:
    method, profile = _method(HeteroFL, tiers={"rpi3": 0.125, "laptop_cpu": 1.0})
    sched = SubModelScheduler(ScheduleConfig(mode="static"), method, profile, batch_size=32)
    plan = sched.assign(_views("rpi3", "laptop_cpu"))
    assert [v.choice for v in plan.views] == [SubModel(Width(0.125)), SubModel(Width(1.0))]
    tasks = method.plan(0, plan.views, method.init(method.full))
    assert [rate_of(t.spec) for t in tasks] == [0.125, 1.0]
    assert plan.predicted_s[0] == pytest.approx(sched.latency(plan.views[0], SubModel(Width(0.125))))


def test_methods_without_a_knob_pass_through() -> None:
    from flexray.methods.fedavg import FedAvg

    method, profile = _method(FedAvg)
    sched = SubModelScheduler(ScheduleConfig(), method, profile, batch_size=32)
    views = _views("rpi3", "laptop_cpu")
    plan = sched.assign(views)
    assert plan.views == views and not sched.options
    assert sched.latency(views[0], {}) > sched.latency(views[1], {}) > 0  # rpi3 slower than the laptop
