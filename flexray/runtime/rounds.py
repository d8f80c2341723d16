"""Synchronous rounds: sample, plan, fan out to actors, close the round on the simulated clock."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray

from flexray.config import JobConfig
from flexray.fleet.fleet import ActorSpec, Device, derive_seed
from flexray.fleet.profiles import DeviceProfile
from flexray.fleet.report import DeviceReport, RoundRequest
from flexray.methods.base import DeviceView, Method, State, Update


@dataclass
class RoundOutcome:
    reports: list[DeviceReport]
    updates: list[Update]
    duration_s: float  # simulated, incl. server time
    server_s: float

    def count(self, *statuses: str) -> int:
        return sum(r.status in statuses for r in self.reports)


def sample_devices(cfg: JobConfig, rnd: int, available: Sequence[Device]) -> list[Device]:
    """Seeded by (seed, round) alone, so sampling never depends on actors or host speed."""
    n = len(available)
    k = cfg.rounds.clients_per_round or math.ceil(cfg.rounds.fraction * n)
    k = min(k, n)
    rng = np.random.default_rng(derive_seed(cfg.seed, rnd, 1))
    picked = rng.choice(n, size=k, replace=False) if k < n else np.arange(n)
    return [available[i] for i in sorted(picked)]


class SyncRounds:
    """Runs one synchronous round at a time over persistent actors."""

    def __init__(
        self, cfg: JobConfig, devices: Sequence[Device], actors: Sequence[tuple[ActorSpec, object]],
        method: Method, server: DeviceProfile,
    ) -> None:
        self.cfg, self.method, self.server = cfg, method, server
        self.devices = {d.id: d for d in devices}
        self.actors = list(actors)
        self.actor_of = {dev: i for i, (spec, _) in enumerate(self.actors) for dev in spec.devices}

    def run(self, rnd: int, clock_s: float, state: State) -> RoundOutcome:
        available = [d for d in self.devices.values() if d.trace.available(clock_s)]
        chosen = sample_devices(self.cfg, rnd, available)
        views = [DeviceView(d.id, d.profile, d.trace.speed(clock_s), len(d.indices)) for d in chosen]
        tasks = self.method.plan(rnd, views, state)

        state_ref = ray.put(state)  # shipped once, read zero-copy by every actor on the node
        per_actor: dict[int, list] = defaultdict(list)
        for t in tasks:
            per_actor[self.actor_of[t.device]].append(t)
        rounds = self.cfg.rounds
        drop = rounds.stragglers == "drop" and rounds.deadline_s is not None
        futures = [
            self.actors[a][1].run_round.remote(  # type: ignore[attr-defined]
                RoundRequest(rnd, clock_s, rounds.deadline_s, drop, tuple(ts)), state_ref
            )
            for a, ts in sorted(per_actor.items())
        ]
        reports: list[DeviceReport] = []
        updates: list[Update] = []
        for reps, ups in ray.get(futures):
            reports.extend(reps)
            updates.extend(ups)
        reports.sort(key=lambda r: r.device)
        return self._close(clock_s, state, reports, updates)

    def _close(self, clock_s: float, state: State, reports: list[DeviceReport], updates: list[Update]) -> RoundOutcome:
        """Round time = slowest kept participant (or the deadline when someone was dropped)."""
        deadline = self.cfg.rounds.deadline_s
        if any(r.status == "straggler" for r in reports) and deadline is not None:
            clients_s = deadline
        else:
            clients_s = max((r.end_s - clock_s for r in reports), default=0.0)
        n_params = sum(v.numel() for v in state.values())
        kept = sum(r.status != "straggler" for r in reports)
        server_s = 2.0 * n_params * kept / self.server.flops  # one multiply-add per weight per update
        end = clock_s + clients_s
        for r in reports:  # participants idle (radio off) until the round closes
            idle = max(0.0, end - r.end_s)
            r.energy_j += self.devices[r.device].profile.power_idle_w * idle
        return RoundOutcome(reports, updates, clients_s + server_s, server_s)
