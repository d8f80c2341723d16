"""The device host (the actor's logic) in-process: throttle modes, reports, pre-summing."""

from __future__ import annotations

import time

import pytest
import torch

from flexray.data import load_dataset
from flexray.fleet.fleet import ActorSpec, build_fleet
from flexray.fleet.report import RoundRequest
from flexray.methods.base import weighted_mean
from flexray.models import state_bytes
from flexray.protocol import Task, energy_j
from flexray.runtime.actor import DeviceHost
from flexray.runtime.assembly import parse_config
from tests.conftest import job_tree

SLOW = {"flops": 5.0e6, "memory_bytes": 1e9, "uplink_bps": 1e6, "downlink_bps": 2e6,
        "power_active_w": 4.0, "power_idle_w": 1.0, "power_radio_w": 0.5}


def make_host(throttle: str = "virtual", **kw) -> tuple[DeviceHost, dict]:
    tree = job_tree(fleet__throttle=throttle, fleet__profiles={"slow": SLOW},
                    fleet__groups=[{"profile": "slow", "count": 2, "trace": {"kind": "constant", "speed": 0.5}}],
                    data__samples_per_device=64, **kw)
    cfg = parse_config(tree)
    ds = load_dataset(cfg.data)
    devices = build_fleet(cfg, ds.y_train)
    host = DeviceHost(cfg, ActorSpec(0, (0, 1), 1.0, {}), devices, ds)
    return host, host.method.init(host.ctx.model())


def request(*devices: int, deadline: float | None = None, drop: bool = False, rnd: int = 0) -> RoundRequest:
    return RoundRequest(rnd, 10.0, deadline, drop, tuple(Task(d, rnd) for d in devices))


def test_virtual_throttle_turns_counted_flops_into_time_without_sleeping():
    host, state = make_host("virtual")
    t0 = time.perf_counter()
    (rep,), (upd,) = host.run_round(request(0), state)
    elapsed = time.perf_counter() - t0
    assert rep.samples == 64 and rep.status == "ok"
    assert rep.flops == pytest.approx(64 * host.model_profile.train_flops_per_sample)
    assert rep.compute_s == pytest.approx(rep.flops / (SLOW["flops"] * 0.5))
    assert rep.download_s == pytest.approx(8 * state_bytes(state) / SLOW["downlink_bps"])
    assert rep.upload_s == pytest.approx(8 * rep.bytes_up / SLOW["uplink_bps"])
    assert rep.start_s == 10.0 and rep.end_s == pytest.approx(10.0 + rep.download_s + rep.compute_s + rep.upload_s)
    assert rep.energy_j == pytest.approx(energy_j(host.devices[0].profile, rep.compute_s, rep.comm_s))
    assert rep.busy_s > 1.0 and elapsed < rep.busy_s  # simulated time is not slept
    assert set(upd.tensors) == set(state)


def test_sleep_throttle_makes_wall_clock_follow_simulated_time():
    host, state = make_host("sleep", fleet__time_scale=0.5)
    t0 = time.perf_counter()
    (rep,), _ = host.run_round(request(0), state)
    elapsed = time.perf_counter() - t0
    assert elapsed >= 0.5 * rep.busy_s - 0.01
    assert elapsed < 0.5 * rep.busy_s + 5.0


def test_none_throttle_measures_real_compute_time():
    host, state = make_host("none")
    (rep,), _ = host.run_round(request(0), state)
    assert rep.compute_s == rep.wall_s > 0


def test_actor_presums_linear_updates_exactly():
    host, state = make_host()
    (_, _), (combined,) = host.run_round(request(0, 1), state)
    _, (u0,) = host.run_round(request(0), state)
    _, (u1,) = host.run_round(request(1), state)
    assert combined.weight == u0.weight + u1.weight
    expect = weighted_mean([u0, u1])
    for k in state:
        torch.testing.assert_close(combined.tensors[k], expect[k], rtol=0, atol=1e-12)


def test_same_task_same_update_and_rounds_differ():
    host, state = make_host()
    _, (a,) = host.run_round(request(0), state)
    _, (b,) = host.run_round(request(0), state)
    _, (c,) = host.run_round(request(0, rnd=1), state)
    key = next(k for k, v in state.items() if v.is_floating_point())
    assert torch.equal(a.tensors[key], b.tensors[key])
    assert not torch.equal(a.tensors[key], c.tensors[key])  # a new round reshuffles


def test_sure_straggler_is_not_trained_when_dropped():
    host, state = make_host()
    (rep,), ups = host.run_round(request(0, deadline=0.5, drop=True), state)
    assert rep.status == "straggler" and rep.samples == 0 and ups == []
    assert rep.bytes_up == 0 and rep.busy_s == pytest.approx(0.5)  # worked until the deadline, sent nothing
    (late,), (kept,) = host.run_round(request(0, deadline=0.5, drop=False), state)
    assert late.status == "late" and late.samples == 64
