"""Synchronous rounds: sample, plan, fan out to actors, close the round on the simulated clock."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import ray

from flexray.config import JobConfig
from flexray.errors import FlexrayError
from flexray.fleet.fleet import ActorSpec, Device, derive_seed
from flexray.fleet.report import DeviceReport, RoundOutcome, RoundRequest
from flexray.methods.base import Method
from flexray.methods.policy import Arrivals, HasPolicy
from flexray.methods.service import RoundService
from flexray.models.profile import ModelProfile
from flexray.protocol import DeviceProfile, DeviceView, State, SubModel, Update, Workload, compute_seconds
from flexray.schedule.minmax import SubModelScheduler


class NodesLeft(FlexrayError):
    """No device can train: every one that could is on a node that left, and none came back in
    ``cluster.rejoin_timeout_s``. The driver checkpoints the last round before it stops."""


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def target_count(cfg: JobConfig, n_available: int) -> int:
    """Updates a round wants: ``clients_per_round`` or ``fraction`` of the available devices."""
    return min(cfg.rounds.clients_per_round or math.ceil(cfg.rounds.fraction * n_available), n_available)


def sample_devices(cfg: JobConfig, rnd: int, available: Sequence[Device]) -> list[Device]:
    """Seeded by (seed, round) alone, so sampling never depends on actors or host speed.
    Over-commit samples more than the target; the round keeps the first to finish."""
    n = len(available)
    k = min(n, math.ceil(target_count(cfg, n) * cfg.rounds.overcommit))
    rng = np.random.default_rng(derive_seed(cfg.seed, rnd, 1))
    picked = rng.choice(n, size=k, replace=False) if k < n else np.arange(n)
    return [available[i] for i in sorted(picked)]


class SyncRounds:
    """Runs one synchronous round at a time over persistent actors."""

    def __init__(
        self, cfg: JobConfig, devices: Sequence[Device], actors: Sequence[tuple[ActorSpec, object]],
        method: Method, server: DeviceProfile, model_profile: ModelProfile, service: RoundService | None = None,
    ) -> None:
        self.cfg, self.method, self.server = cfg, method, server
        self.profile = model_profile
        self.scheduler = SubModelScheduler(
            cfg.schedule, method, model_profile, method.cfg.batch_size, cfg.rounds.deadline_s)
        self.service = service or RoundService()  # what the method runs beside the rounds (started by the driver)
        self.devices = {d.id: d for d in devices}
        self.actors = list(actors)
        self.actor_of = {dev: i for i, (spec, _) in enumerate(self.actors) for dev in spec.devices}
        self.down: set[int] = set()  # actors that died mid-task and are being restarted by Ray
        self.dead: set[int] = set()  # actors out of restarts: their devices are gone for good
        self.offline: set[int] = set()  # actors whose node left: Ray restarts them when a node fits again
        # actor -> the node it last ran on; known from the start, so a node lost in round 1 counts
        self.node_of: dict[int, str] = {i: str(info["node"]) for i, info in enumerate(ray.get([h.info() for _, h in self.actors]))}
        self.lost_nodes: set[str] = set()
        self.lost_now = 0
        self.probes: dict[int, tuple[Any, float]] = {}  # offline actor -> its pending "where do you run?" call
        self.own_policy = Arrivals(method.policy(), method) if isinstance(method, HasPolicy) else None

    def _actor_failed(self, device: int, err: Exception) -> None:
        self.down.add(self.actor_of[device])  # await_recovery's probe tells restarting from dead or offline

    def await_recovery(self, timeout_s: float = 300.0, probe_s: float = 1.0) -> None:
        """Before handing out work: an actor that crashed on a live node is waited for (Ray
        restarts it in seconds); one whose node left goes offline until a node with its resources
        joins and Ray restarts it there (``_probe_offline``, given ``probe_s`` to answer)."""
        self.lost_now += self.check_nodes(probe_s)
        for idx in sorted(self.down - self.offline):
            handle = self.actors[idx][1]
            deadline = time.monotonic() + timeout_s
            while True:
                if self.node_left(idx):
                    self.offline.add(idx)
                    break
                try:
                    ray.get(handle.info(), timeout=2.0)
                    break
                except ray.exceptions.ActorDiedError:
                    self.dead.add(idx)
                    break
                except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                    if time.monotonic() > deadline:
                        self.dead.add(idx)
                        break
                    time.sleep(0.2)
        self.down.clear()
        self.lost_now += self._mark_lost(alive_nodes())  # a node found gone while waiting counts now

    def check_nodes(self, probe_s: float = 1.0) -> int:
        """Mark the actors of nodes that left offline, bring back the offline ones that answer
        again (restarted on a rejoined node); returns how many nodes left since the last call."""
        lost = self._mark_lost(alive_nodes())
        self._probe_offline(probe_s)
        return lost

    def node_left(self, idx: int) -> bool:
        """Whether actor ``idx``'s last known node has left the cluster."""
        node = self.node_of.get(idx)
        return bool(node) and node not in alive_nodes()

    def _mark_lost(self, alive: set[str]) -> int:
        """The actors last seen on a node that is not alive go offline; returns the nodes newly lost."""
        before = len(self.lost_nodes)
        for idx, node in self.node_of.items():
            if node and node not in alive and idx not in self.dead:
                self.offline.add(idx)
                self.lost_nodes.add(node)
        return len(self.lost_nodes) - before

    def _probe_offline(self, timeout_s: float = 1.0) -> None:
        """Ask every offline actor where it runs (a rejoined node has a new id); those that answer
        within ``timeout_s`` are back, those Ray gave up on are dead. An unanswered question is
        kept for a second, then asked anew (it may have gone to the node that left), so
        probing at every async landing, without waiting, does not pile calls up."""
        now = time.monotonic()
        for idx in self.offline:
            if idx not in self.probes or now - self.probes[idx][1] > 1.0:
                self.probes[idx] = (self.actors[idx][1].info(), now)
        refs = {idx: self.probes[idx][0] for idx in sorted(self.offline)}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        for idx, ref in refs.items():
            if ref not in ready:
                continue
            del self.probes[idx]
            try:
                info = ray.get(ref)
            except ray.exceptions.ActorUnavailableError:
                continue  # asked again next time
            except ray.exceptions.ActorDiedError:
                self.offline.discard(idx)
                self.dead.add(idx)
                continue
            except ray.exceptions.RayActorError:
                continue  # the call went to the node that left; the restarted actor is asked again
            self.offline.discard(idx)
            self.node_of[idx] = str(info["node"])

    def take_lost(self) -> int:
        """Nodes lost since the last round closed (the ``nodes_lost`` metric)."""
        lost, self.lost_now = self.lost_now, 0
        return lost

    def seen_on(self, reports: Sequence[DeviceReport]) -> None:
        """Remember where each actor ran, to tell when its node leaves."""
        for r in reports:
            if r.node and r.status != "offline":
                self.node_of[self.actor_of[r.device]] = r.node

    def usable(self, device: int) -> bool:
        actor = self.actor_of[device]
        return actor not in self.dead and actor not in self.offline

    def step(self, rnd: int, clock_s: float, state: State) -> tuple[State, RoundOutcome]:
        out = self.run(rnd, clock_s, state)
        if self.own_policy is not None:  # the method's own policy (HasPolicy) over a round of fresh updates
            return self.own_policy.round(rnd, state, out.updates), out
        return self.method.aggregate(rnd, state, out.updates), out

    def state_dict(self) -> dict[str, Any]:
        return {}  # a sync round leaves nothing in flight

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        return None

    def run(self, rnd: int, clock_s: float, state: State) -> RoundOutcome:
        self.await_recovery()
        available = [d for d in self.devices.values() if d.trace.available(clock_s) and self.usable(d.id)]
        if not available and self.offline:
            available = self.await_rejoin(clock_s)
        offline = self.offline_reports(rnd, clock_s)
        chosen = sample_devices(self.cfg, rnd, available)
        target = target_count(self.cfg, len(available))
        deadline = self.cfg.rounds.deadline_s
        views = [DeviceView(d.id, d.profile, d.trace.speed(clock_s), len(d.indices), deadline) for d in chosen]
        plan = self.scheduler.assign(views)
        tasks = self.method.plan(rnd, plan.views, state)
        planned = {t.device: t.spec for t in tasks}

        state_ref = ray.put(state)  # shipped once, read zero-copy by every actor on the node
        self.service.begin_round(rnd, state_ref, tasks)
        client = self.service.client()
        per_actor: dict[int, list] = defaultdict(list)
        for t in tasks:
            per_actor[self.actor_of[t.device]].append(t)
        rounds = self.cfg.rounds
        drop = rounds.stragglers == "drop" and rounds.deadline_s is not None
        presum = len(chosen) <= target and self.own_policy is None  # a policy weighs every update itself
        calls = [
            (ts, self.actors[a][1].run_round(
                RoundRequest(rnd, clock_s, rounds.deadline_s, drop, tuple(ts), presum, service=client), state_ref
            ))
            for a, ts in sorted(per_actor.items())
        ]
        reports: list[DeviceReport] = list(offline)
        updates: list[Update] = []
        for ts, future in calls:
            try:
                reps, ups = ray.get(future)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                # The actor died mid-round: its devices' work is lost; Ray restarts it for the next round.
                self._actor_failed(ts[0].device, err)
                reps, ups = [self.failed(rnd, clock_s, t.device, type(err).__name__) for t in ts], []
            reports.extend(reps)
            updates.extend(self.screen(reps, ups, state, planned))
        self.seen_on(reports)
        reports.sort(key=lambda r: r.device)
        if not presum:
            updates = keep_first(reports, updates, target)
        kept = [r.device for r in reports if r.status in ("ok", "late")]  # the service's updates for the work that counts
        updates.extend(self.screen(reports, self.service.end_round(kept), state, planned))
        return self._close(clock_s, state, reports, updates)

    def screen(
        self, reports: list[DeviceReport], updates: list[Update], state: State, planned: Mapping[int, SubModel],
    ) -> list[Update]:
        """Second line of defence after the actor's own check: never aggregate a bad tensor, nor
        one trained on another sub-model than its task's (``planned``: device -> task spec).
        A bad pre-summed update (device -1) condemns every device it summed."""
        kept = []
        for u in updates:
            reason = self.method.validate(u, state, planned.get(u.device))
            if reason is None:
                kept.append(u)
                continue
            for r in reports:
                if r.status in ("ok", "late") and u.device in (-1, r.device):
                    r.status, r.note = "rejected", reason
        return kept

    def await_rejoin(self, clock_s: float) -> list[Device]:
        """Nobody can train but devices on nodes that left: wait for a node to rejoin (their
        actors restart there), up to ``cluster.rejoin_timeout_s``, then stop (``NodesLeft``)."""
        limit = self.cfg.cluster.rejoin_timeout_s
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(1.0)
            self.lost_now += self.check_nodes()
            back = [d for d in self.devices.values() if d.trace.available(clock_s) and self.usable(d.id)]
            if back:
                return back
        nodes = ", ".join(sorted(n[:8] for n in self.lost_nodes))
        raise NodesLeft(f"cluster: every device that could train is on a node that left ({nodes}) and none rejoined "
                        f"within cluster.rejoin_timeout_s={limit:g} s; start the nodes again, then resume the run")

    def offline_reports(self, rnd: int, clock_s: float, busy: Collection[int] = ()) -> list[DeviceReport]:
        """One ``offline`` report per available device (not in ``busy``) whose actor's node left."""
        return [self.offline_report(rnd, clock_s, d) for d in self.devices.values()
                if d.id not in busy and d.trace.available(clock_s) and self.actor_of[d.id] in self.offline]

    def offline_report(self, rnd: int, clock_s: float, d: Device) -> DeviceReport:
        node = self.node_of.get(self.actor_of[d.id], "")
        rep = self.failed(rnd, clock_s, d.id, f"node {node[:8]} left; back when a node with its resources joins")
        rep.status, rep.node = "offline", node
        return rep

    def failed(self, rnd: int, clock_s: float, device: int, why: str) -> DeviceReport:
        d = self.devices[device]
        return DeviceReport.untrained(rnd, d.id, d.name, d.profile.name, self.actor_label(device), "failed", why,
                                      d.trace.speed(clock_s), clock_s)

    def actor_label(self, device: int) -> str:
        return self.actors[self.actor_of[device]][0].label

    def _close(self, clock_s: float, state: State, reports: list[DeviceReport], updates: list[Update]) -> RoundOutcome:
        """Round time = slowest kept participant (or the deadline when someone was dropped)."""
        deadline = self.cfg.rounds.deadline_s
        if any(r.status == "straggler" for r in reports) and deadline is not None:
            clients_s = deadline
        else:
            clients_s = max((r.end_s - clock_s for r in reports if r.status not in ("surplus", "offline")), default=0.0)
        n_params = sum(v.numel() for v in state.values())
        kept = sum(r.status in ("ok", "late") for r in reports)
        # one multiply-add per weight per update: FLOPs only, so one coarse kernel on the server's model
        server_s = compute_seconds(self.server, Workload.coarse(2.0 * n_params * kept))
        end = clock_s + clients_s
        for r in reports:  # participants idle (radio off) until the round closes
            if r.status == "offline":
                continue
            idle = max(0.0, end - r.end_s)
            r.energy_j += self.devices[r.device].profile.power_idle_w * idle
        return RoundOutcome(reports, updates, clients_s + server_s, server_s, self.take_lost())


def keep_first(reports: list[DeviceReport], updates: list[Update], target: int) -> list[Update]:
    """Over-commit: the first ``target`` usable updates by simulated completion win."""
    usable = sorted((r for r in reports if r.status in ("ok", "late")), key=lambda r: (r.end_s, r.device))
    winners = {r.device for r in usable[:target]}
    for r in usable[target:]:
        r.status, r.note = "surplus", "over-committed; not among the first to finish"
    return [u for u in updates if u.device in winners]
