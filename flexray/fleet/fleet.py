"""Expand the config's device groups into devices and pack them onto actors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flexray.config import JobConfig
from flexray.data.partition import partition
from flexray.fleet.placement import ActorSpec, check_selector
from flexray.fleet.profiles import resolve_profile
from flexray.fleet.traces import Trace, build_trace
from flexray.protocol import DeviceProfile

__all__ = ["ActorSpec", "Device", "assign_actors", "build_fleet", "derive_seed"]


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from (job seed, round, device, ...): results never depend on order."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Device:
    id: int
    name: str
    profile: DeviceProfile
    trace: Trace
    indices: np.ndarray  # rows of the training set this device holds
    resources: dict[str, float] = field(default_factory=dict)
    node_labels: dict[str, str] = field(default_factory=dict)  # Ray label selector, e.g. {"flexray.io/device": "rpi4"}


def build_fleet(cfg: JobConfig, labels: np.ndarray) -> list[Device]:
    """Devices in config order, each with its data shard, profile and seeded trace; the samples the
    method holds out for the server (``cfg.method.held_out``) go to none of them."""
    groups = cfg.fleet.groups
    total = sum(g.count for g in groups)
    shards = partition(labels, total, cfg.data.partition, seed=cfg.seed, cap=cfg.data.samples_per_device,
                       hold_out=cfg.method.held_out(len(labels)))
    devices: list[Device] = []
    for gi, g in enumerate(groups):
        check_selector(g.node_labels, f"fleet.groups.{gi}.node_labels")
        profile = resolve_profile(g.profile, cfg.fleet.profiles)
        for _ in range(g.count):
            i = len(devices)
            trace = build_trace(g.trace, seed=derive_seed(cfg.seed, 7, i))
            devices.append(Device(i, f"{g.profile}-{i}", profile, trace, shards[i], dict(g.resources), dict(g.node_labels)))
    return devices


def assign_actors(cfg: JobConfig, devices: list[Device]) -> list[ActorSpec]:
    """Pinned devices (custom resources or node labels) and ``sleep``-throttled devices get an actor each,
    because their wall clock must be theirs alone; the rest share ``fleet.actors`` actors."""
    cpus, gpus = cfg.fleet.num_cpus_per_actor, cfg.fleet.num_gpus_per_actor
    specs: list[ActorSpec] = []
    shared: list[Device] = []
    for d in devices:
        if d.resources or d.node_labels or cfg.fleet.throttle == "sleep":
            specs.append(ActorSpec(len(specs), (d.id,), cpus, d.resources, dict(d.node_labels), gpus))
        else:
            shared.append(d)
    n = min(cfg.fleet.actors, len(shared))
    for k in range(n):
        ids = tuple(d.id for d in shared[k::n])
        specs.append(ActorSpec(len(specs), ids, cpus, {}, num_gpus=gpus))
    return specs
