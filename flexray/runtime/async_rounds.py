"""Asynchronous training: each device trains on whatever model version is current when it starts;
the server applies updates as they arrive, never waiting for the slowest device.

With ``virtual`` throttling, arrivals are ordered by *simulated* completion time (an event queue):
the predicted finish of every in-flight task is exact, so the run does not depend on how fast the
host is and the same seed gives the same metrics. With ``sleep``/``none`` throttling, arrivals
are taken as the actors really finish (``ray.wait``), which is what a real deployment sees.

Every method runs here: a launching device gets its sub-model (width, depth, dropout vector,
pruning ratio, or cut and server share) from the min-max scheduler for the devices available at
that moment, and its landing update is applied by the run's aggregation policy
(``flexray.methods.policy``) against the model version it started from.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from flexray.config import JobConfig, RoundsConfig
from flexray.errors import FlexrayError
from flexray.fleet.fleet import ActorSpec, Device, derive_seed
from flexray.fleet.report import DeviceReport, RoundOutcome, RoundRequest
from flexray.methods.base import Method
from flexray.methods.policy import Arrivals, AsyncPolicy, HasPolicy
from flexray.methods.service import RoundService
from flexray.models.profile import ModelProfile
from flexray.protocol import DeviceView, State, SubModel, Task, Update, cost_times
from flexray.runtime.rounds import SyncRounds

_GIVE_UP_S = 365 * 86400.0  # a simulated year with no device online is a config problem


@dataclass(order=True)
class Flight:
    end_s: float  # predicted simulated completion: the event queue's key
    seq: int
    device: int = field(compare=False)
    version: int = field(compare=False)  # model version the device started from
    start_s: float = field(compare=False)
    future: Any = field(compare=False, default=None)
    spec: SubModel = field(compare=False, default=SubModel())  # the sub-model its task gave it


def policy_for(rounds: RoundsConfig, method: Method) -> AsyncPolicy:
    """The method's own policy (``HasPolicy``), else the one ``rounds`` configures."""
    if isinstance(method, HasPolicy):
        return method.policy()
    return AsyncPolicy(rounds.async_policy, alpha=rounds.alpha, staleness=rounds.staleness, a=rounds.staleness_a,
                       b=rounds.staleness_b, buffer_size=rounds.buffer_size, server_lr=rounds.server_lr,
                       max_staleness=rounds.max_staleness)


class AsyncRounds(SyncRounds):
    """``step`` runs until the server's model changes once (one "round" = one model version)."""

    def __init__(
        self, cfg: JobConfig, devices: Sequence[Device], actors: Sequence[tuple[ActorSpec, object]],
        method: Method, server: Any, model_profile: ModelProfile, service: RoundService | None = None,
    ) -> None:
        super().__init__(cfg, devices, actors, method, server, model_profile, service)
        self.arrivals = Arrivals(policy_for(cfg.rounds, method), method)
        self.concurrency = cfg.rounds.concurrency or len(self.devices)
        self.virtual = cfg.fleet.throttle == "virtual"
        self.flights: list[Flight] = []
        self.seq = 0
        self.states: dict[int, State] = {}  # base model of every version still in flight
        self.refs: dict[int, Any] = {}

    # ---- the event loop
    def step(self, rnd: int, clock_s: float, state: State) -> tuple[State, RoundOutcome]:
        start, clock = clock_s, clock_s
        self.states[rnd] = state
        reports: list[DeviceReport] = []
        while True:
            self.await_recovery(probe_s=0.0)  # a device's every landing: never wait on a lost node here
            self._drop_lost_flights()
            self._fill(rnd, clock)
            if not self.flights and self.offline and not self._usable_now(clock):
                self.await_rejoin(clock)  # only devices on nodes that left could train: wait for one
                continue
            if not self.flights:
                clock += self.cfg.rounds.idle_step_s  # nobody online: wait for someone
                if clock - start > _GIVE_UP_S:
                    raise FlexrayError("rounds: no device came online for a simulated year; check the fleet's traces")
                continue
            flight, reps, ups = self._land()
            self.seen_on(reps)
            clock = max(clock, max((r.end_s for r in reps), default=flight.end_s))
            staleness = rnd - flight.version
            for r in reps:
                r.metrics["staleness"] = float(staleness)
            for u in ups:
                u.staleness = staleness
            reports.extend(reps)
            ups = self.screen(reps, ups, state, {flight.device: flight.spec})
            new = self.arrivals.arrive(flight.version, self.states[flight.version], state, ups, staleness)
            self._forget_unused(rnd)
            if new is not None:
                reports.extend(self.offline_reports(rnd, clock, {f.device for f in self.flights}))  # a lost node's devices
                return new, RoundOutcome(reports, ups, clock - start, 0.0, self.take_lost())

    def _fill(self, version: int, clock: float) -> None:
        busy = {f.device for f in self.flights}
        idle = [d for d in self.devices.values()
                if d.id not in busy and d.trace.available(clock) and self.usable(d.id)]
        while idle and len(self.flights) < self.concurrency:
            rng = np.random.default_rng(derive_seed(self.cfg.seed, version, self.seq, 3))
            dev = idle.pop(int(rng.integers(len(idle))))
            self._launch(Flight(0.0, self.seq, dev.id, version, clock))
            self.seq += 1

    def _launch(self, f: Flight) -> None:
        dev = self.devices[f.device]
        state = self.states[f.version]
        view = DeviceView(dev.id, dev.profile, dev.trace.speed(f.start_s), len(dev.indices))
        task, view = self._plan(f.version, view, f.start_s, state)
        f.spec = task.spec
        cost = self.method.cost(task, view, self.profile)
        predicted = sum(cost_times(dev.profile, view.speed, cost))
        f.end_s = f.start_s + predicted + cost.server_s
        if f.version not in self.refs:
            self.refs[f.version] = ray.put(state)  # once per version, shared by every flight on it
        self.service.launch(task, self.refs[f.version])
        req = RoundRequest(f.version, f.start_s, None, False, (task,), presum=False, draw=f.seq,
                           service=self.service.client())
        f.future = self.actors[self.actor_of[f.device]][1].run_round(req, self.refs[f.version])
        heapq.heappush(self.flights, f)

    def _plan(self, version: int, view: DeviceView, t: float, state: State) -> tuple[Task, DeviceView]:
        """A launching device's task. With no round to balance, the min-max target is the one of
        every device available now, which keeps the slow devices' staleness bounded; a method
        that ``plans_pool`` plans them all, so the device's share of what they share (e.g. a
        server's compute) is its share among them."""
        pool = [view] + [
            DeviceView(d.id, d.profile, d.trace.speed(t), len(d.indices))
            for d in self.devices.values() if d.id != view.id and d.trace.available(t) and self.usable(d.id)
        ]
        if self.scheduler.options:
            chosen = {v.id: v for v in self.scheduler.assign(pool).views}
            if view.id not in chosen:
                raise FlexrayError(f"device {view.id} ({view.profile.name}): no sub-model fits its memory")
            view = chosen[view.id]
        if not self.method.plans_pool:
            return self.method.plan(version, [view], state)[0], view
        tasks = self.method.plan(version, pool, state)
        return next(tk for tk in tasks if tk.device == view.id), view

    def _land(self) -> tuple[Flight, list[DeviceReport], list[Update]]:
        if self.virtual:
            f = heapq.heappop(self.flights)  # earliest simulated arrival
        else:
            ready, _ = ray.wait([x.future for x in self.flights], num_returns=1)
            f = next(x for x in self.flights if x.future == ready[0])  # earliest real arrival
            self.flights.remove(f)
            heapq.heapify(self.flights)
        try:
            reps, ups = ray.get(f.future)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            self._actor_failed(f.device, err)
            reps = [self.offline_report(f.version, f.start_s, self.devices[f.device])  # its node left: offline
                    if self.node_left(self.actor_of[f.device])
                    else self.failed(f.version, f.start_s, f.device, type(err).__name__)]
            ups = []
        keep = any(r.status in ("ok", "late") for r in reps)  # the service's update for it, when its work counts
        ups = ups + self.service.land(f.device, keep)
        return f, reps, ups

    def _drop_lost_flights(self) -> None:
        """A flight whose node left has not reached the server in simulated time, even if its
        result reached the driver already: it is lost with the node (the version reports it offline)."""
        lost = [f for f in self.flights if self.actor_of[f.device] in self.offline]
        for f in lost:
            self.flights.remove(f)
            self.service.land(f.device, False)
        if lost:
            heapq.heapify(self.flights)

    def _usable_now(self, clock: float) -> bool:
        return any(d.trace.available(clock) and self.usable(d.id) for d in self.devices.values())

    def _forget_unused(self, current: int) -> None:
        live = {f.version for f in self.flights} | {current}
        for v in [v for v in self.states if v not in live]:
            self.states.pop(v)
            self.refs.pop(v, None)

    # ---- checkpoints: in-flight work is re-launched from the same inputs on resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "policy": self.arrivals.state_dict(),
            "flights": [[f.seq, f.device, f.version, f.start_s] for f in sorted(self.flights)],
            "states": {str(v): s for v, s in self.states.items()},
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.seq = int(saved["seq"])
        self.arrivals.load_state_dict(saved.get("policy", {}))
        self.states = {int(v): s for v, s in saved["states"].items()}
        for seq, device, version, start_s in saved["flights"]:
            self._launch(Flight(0.0, int(seq), int(device), int(version), float(start_s)))
