"""DeviceActor: a persistent Ray actor hosting one real device or many simulated ones.

It loads its devices' data once, keeps models cached across rounds, runs the method's
``local_update`` for each task and turns the work into simulated time and energy according to
the throttle mode:

- ``virtual``: no sleeping; compute time = counted FLOPs / (profile FLOP/s x trace speed).
- ``sleep``: as virtual, then the actor sleeps so its wall clock matches (x ``time_scale``).
- ``none``: real hardware; compute time is the measured wall time.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from flexray.config import JobConfig
from flexray.data.datasets import Dataset
from flexray.fleet import placement
from flexray.fleet.fleet import ActorSpec, Device, derive_seed
from flexray.fleet.report import DeviceReport, RoundRequest
from flexray.methods.base import DeviceContext
from flexray.methods.capabilities import BatchesClients
from flexray.models import state_bytes
from flexray.protocol import DeviceView, State, Task, Update, Workload, cost_times, energy_j, predict_times
from flexray.compute import clients_per_stack, compute_device, on_device
from flexray.methods.service import Link
from flexray.runtime.job import Job


@dataclass(frozen=True)
class _Started:
    """A task about to train: its device, its view (speed now, deadline), the predicted time, its seed."""

    dev: Device
    view: DeviceView
    predicted: float
    seed: int


class DeviceHost:
    """The actor's logic, kept free of Ray so it can be unit-tested and profiled in-process."""

    def __init__(self, cfg: JobConfig, spec: ActorSpec, devices: Sequence[Device], dataset: Dataset) -> None:
        torch.set_num_threads(max(1, int(spec.num_cpus)))
        self.cfg, self.spec = cfg, spec
        self.compute = compute_device(cfg.fleet.compute_device, spec.num_gpus)
        self.chunk = clients_per_stack(cfg.fleet.batch_clients, self.compute)
        job = Job(cfg, dataset, list(devices))  # the same assembly as the driver's, for these devices
        self.devices = {d.id: d for d in devices}
        self.data = {d.id: on_device(job.local_data(d), self.compute) for d in devices}  # moved once, used every round
        self.method = job.method()
        self.ctx = DeviceContext(job.model, self.compute)
        self.ctx.model()  # built now: inside the first task it would draw from that task's seeded RNG
        self.model_profile = job.model_profile
        self.node = _node_id()

    def __repr__(self) -> str:  # Ray shows it in logs, the dashboard and the state API
        names = ",".join(d.name for d in self.devices.values())
        return f"DeviceHost({self.spec.label}: {names[:200]})"

    def info(self) -> dict[str, object]:
        return {"pid": os.getpid(), "node": self.node, "devices": list(self.devices)}

    def run_round(self, req: RoundRequest, state: State) -> tuple[list[DeviceReport], list[Update]]:
        """Train every task of this actor (same-shaped ones stacked, ``fleet.batch_clients``);
        pre-sum accepted updates when the method allows."""
        shipped = state_bytes(state)
        done: dict[int, tuple[DeviceReport, Update | None]] = {}
        stacks: dict[Hashable, list[int]] = {}
        for i, task in enumerate(req.tasks):
            key = self._batch_key(req, task)
            if key is None:
                done[i] = self._run_task(req, task, state, shipped)
            else:
                stacks.setdefault(key, []).append(i)
        for members in stacks.values():  # every task is seeded by its device: the order does not matter
            for start in range(0, len(members), self.chunk):
                part = members[start : start + self.chunk]
                done.update(zip(part, self._run_stack(req, [req.tasks[i] for i in part], state, shipped)))
        reports: list[DeviceReport] = []
        accepted: list[Update] = []
        for i in range(len(req.tasks)):
            report, update = done[i]
            reports.append(report)
            if update is not None:
                accepted.append(update)
        if req.presum and self.method.linear and len(accepted) > 1:
            accepted = [self.method.combine(accepted)]
        return reports, accepted

    def _batch_key(self, req: RoundRequest, task: Task) -> Hashable | None:
        if self.chunk < 2 or req.service is not None or not isinstance(self.method, BatchesClients):
            return None
        return self.method.batch_key(task, self.ctx)

    def _run_task(self, req: RoundRequest, task: Task, state: State, shipped: int) -> tuple[DeviceReport, Update | None]:
        pre = self._start(req, task)
        if isinstance(pre, DeviceReport):
            return pre, None
        self.ctx.seed(pre.seed)
        self.ctx.device = pre.view
        link = self.ctx.service = req.service.connect(task.device) if req.service is not None else None
        t0 = time.perf_counter()
        try:
            update = self.method.local_update(task, state, self.data[task.device], self.ctx)
        finally:
            self.ctx.service = None
        return self._finish(req, task, state, pre, update, time.perf_counter() - t0, shipped, link)

    def _run_stack(self, req: RoundRequest, tasks: list[Task], state: State, shipped: int) -> list[tuple[DeviceReport, Update | None]]:
        """Tasks of one shape trained together; each keeps the generator its device's seed gives,
        so the updates equal ``_run_task``'s. The chunk's wall time is shared evenly."""
        assert isinstance(self.method, BatchesClients)
        pres = [self._start(req, t) for t in tasks]
        out: dict[int, tuple[DeviceReport, Update | None]] = {
            i: (p, None) for i, p in enumerate(pres) if isinstance(p, DeviceReport)}
        live = [(i, p) for i, p in enumerate(pres) if not isinstance(p, DeviceReport)]
        if live:
            gens = [torch.Generator().manual_seed(p.seed) for _, p in live]
            self.ctx.device = None
            t0 = time.perf_counter()
            updates = self.method.local_updates(
                [tasks[i] for i, _ in live], state, [self.data[tasks[i].device] for i, _ in live], gens, self.ctx)
            wall = (time.perf_counter() - t0) / len(live)
            for (i, p), update in zip(live, updates):
                out[i] = self._finish(req, tasks[i], state, p, update, wall, shipped)
        return [out[i] for i in range(len(tasks))]

    def _start(self, req: RoundRequest, task: Task) -> _Started | DeviceReport:
        """The task's device, cost and seed, or the report of a sure straggler (not trained)."""
        dev = self.devices[task.device]
        speed = dev.trace.speed(req.start_s)
        view = DeviceView(dev.id, dev.profile, speed, len(self.data[task.device]), req.deadline_s)
        deadline = req.deadline_s if req.drop_stragglers else None
        cost = self.method.cost(task, view, self.model_profile)
        predicted = sum(cost_times(dev.profile, speed, cost)) + cost.server_s
        if self.cfg.fleet.throttle == "virtual" and deadline is not None and predicted > deadline:
            # Virtual time is exact, so a sure straggler's training would be thrown away anyway.
            dl, comp, ul = cost_times(dev.profile, speed, cost)
            rep = self._report(req, task, dev, speed, 0, cost.flops, 0.0, dl, comp, ul, cost.bytes_down, 0, {}, "straggler")
            rep.predicted_s = predicted
            return rep
        return _Started(dev, view, predicted, derive_seed(self.cfg.seed, req.round, task.device, req.draw))

    def _finish(
        self, req: RoundRequest, task: Task, state: State, pre: _Started, update: Update, wall: float, shipped: int,
        link: Link | None = None,
    ) -> tuple[DeviceReport, Update | None]:
        """Simulated time and energy of a trained task, its status, and the update if kept."""
        dev, speed, throttle = pre.dev, pre.view.speed, self.cfg.fleet.throttle
        work = update.work if update.work is not None else self._steps(task.device, update.samples)
        flops = work.counted
        bytes_down = update.bytes_down if update.bytes_down is not None else shipped
        bytes_up = state_bytes(update.tensors)
        server_s, round_trips = 0.0, 0.0
        if link is not None:  # what the task exchanged with the method's round service (split: per batch)
            t = link.traffic
            bytes_up, bytes_down, server_s, round_trips = bytes_up + t.bytes_up, bytes_down + t.bytes_down, t.server_s, t.round_trips
        dl, comp, ul = predict_times(dev.profile, speed, work, bytes_down, bytes_up, round_trips)
        if throttle == "none":  # real hardware: measured, the service's round trips apart
            server_s = link.traffic.wall_s if link is not None else 0.0
            comp = max(0.0, wall - server_s)
        if throttle == "sleep":
            time.sleep(max(0.0, (dl + comp + ul + server_s) * self.cfg.fleet.time_scale - wall))
        total = dl + comp + ul + server_s
        update.device = task.device
        self._inject_faults(req.round, update)
        status, note = "ok", ""
        if not dev.trace.available_between(req.start_s, req.start_s + total):
            status, note = "lost", "went offline mid-task"
        elif req.deadline_s is not None and total > req.deadline_s:
            status = "straggler" if req.drop_stragglers else "late"
        if status in ("ok", "late") and (reason := self.method.validate(update, state, task.spec)):
            status, note = "rejected", reason
        report = self._report(
            req, task, dev, speed, update.samples, flops, wall, dl, comp, ul, bytes_down, bytes_up, update.metrics, status,
            server_s,
        )
        report.note, report.predicted_s = note, pre.predicted
        return report, (update if status in ("ok", "late") else None)

    def _steps(self, device: int, samples: int) -> Workload:
        """The model's SGD steps over ``samples``, in mini-batches of the device's data (the default
        ``Update.work``: what ``Method.cost`` predicts for full local epochs)."""
        return self.model_profile.step.trained(len(self.data[device]), self.cfg.method.batch_size, samples)

    def _inject_faults(self, rnd: int, update: Update) -> None:
        """Corrupt an update on purpose (config ``faults``) to prove the server rejects it."""
        faults = self.cfg.faults
        key = next(k for k, v in update.tensors.items() if v.is_floating_point())
        if (rnd, update.device) in faults.nan_updates:
            update.tensors[key] = torch.full_like(update.tensors[key], float("nan"))
        if (rnd, update.device) in faults.bad_shape_updates:
            update.tensors[key] = torch.zeros(update.tensors[key].numel() + 1)

    def _report(
        self, req: RoundRequest, task: Task, dev: Device, speed: float, samples: int, flops: float, wall: float,
        dl: float, comp: float, ul: float, bytes_down: int, bytes_up: int, metrics: dict[str, float], status: str,
        server_s: float = 0.0,
    ) -> DeviceReport:
        if status == "straggler" and req.deadline_s is not None:
            # Dropped at the deadline: it downloaded, computed until then, never uploaded.
            comp = max(0.0, min(comp, req.deadline_s - dl))
            server_s = max(0.0, min(server_s, req.deadline_s - dl - comp))
            ul, bytes_up = 0.0, 0
        if status == "lost":
            ul, bytes_up = 0.0, 0  # offline: nothing reached the server
        busy = dl + comp + ul + server_s
        return DeviceReport(
            round=req.round, device=dev.id, name=dev.name, profile=dev.profile.name, actor=self.spec.label,
            node=self.node, status=status, samples=samples, flops=flops, speed=speed, wall_s=wall,
            download_s=dl, compute_s=comp, upload_s=ul, start_s=req.start_s, end_s=req.start_s + busy,
            energy_j=energy_j(dev.profile, comp, dl + ul, idle_s=server_s), bytes_down=bytes_down, bytes_up=bytes_up,
            metrics=dict(metrics), spec=task.spec.log(), server_s=server_s,
        )


def _node_id() -> str:
    # Asking for the runtime context outside Ray would start a local Ray instance.
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


@dataclass(frozen=True)
class ActorInputs:
    """What an actor hosts for one job: object-store refs held by the driver for the job.

    ``job`` tells a warm actor (kept from the driver's previous job, see ``release_actors``) that
    it must rebuild its host."""

    job: str
    setup: ray.ObjectRef  # (JobConfig, ActorSpec, list[Device]) of this actor
    dataset: ray.ObjectRef  # Dataset, shared zero-copy by every actor on a node


@ray.remote
class DeviceActor:
    """The Ray actor around a :class:`DeviceHost`, built from its inputs on first use.

    Its constructor takes only the label Ray shows, so one process can serve job after job of
    the same devices (importing torch is most of an actor's start-up), and because Ray cannot
    promise to restart an actor whose constructor arguments live in the object store
    (ray-project/ray#53727). Every call brings the refs instead (nested in ``ActorInputs``, so Ray
    does not resolve them per call); a fresh, restarted or reused actor loads them once per job.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.host: DeviceHost | None = None
        self.job = ""

    def _host(self, inputs: ActorInputs) -> DeviceHost:
        if self.host is None or self.job != inputs.job:
            self.host = None  # the previous job's models and data go before the next ones load
            (cfg, spec, devices), dataset = ray.get([inputs.setup, inputs.dataset])
            self.host, self.job = DeviceHost(cfg, spec, devices, dataset), inputs.job
        return self.host

    def __repr__(self) -> str:  # Ray shows it in logs, the dashboard and the state API
        return f"DeviceActor({self.label[:200]})"

    def ping(self) -> bool:
        return True

    def info(self, inputs: ActorInputs) -> dict[str, object]:
        return self._host(inputs).info()

    def run_round(self, req: RoundRequest, state: State, inputs: ActorInputs) -> tuple[list[DeviceReport], list[Update]]:
        return self._host(inputs).run_round(req, state)


@dataclass(frozen=True)
class DeviceActorHandle:
    """The driver's side of a device actor: the Ray handle and the refs every call carries."""

    actor: Any  # ray.actor.ActorHandle of DeviceActor
    inputs: ActorInputs
    key: str = ""  # resource request and devices: a warm actor serves the next job whose key is equal

    def info(self) -> ray.ObjectRef:
        return self.actor.info.remote(self.inputs)

    def run_round(self, req: RoundRequest, state: ray.ObjectRef) -> ray.ObjectRef:
        return self.actor.run_round.remote(req, state, self.inputs)


# Device actors of this driver's finished jobs, by resource request and devices, for its next job
# inside ``warm_actors()`` (like Ray Tune's ``reuse_actors``). Only this process holds them.
_WARM: dict[str, list[Any]] = {}
_WARM_SESSION = [""]  # the Ray job id the warm actors belong to
_SCOPES = [0]  # open ``warm_actors()`` blocks


@contextlib.contextmanager
def warm_actors() -> Iterator[None]:
    """Keep device actors alive between the jobs run inside this block (a sweep, a benchmark, a
    test session): the next job hosting the same devices with the same resources takes them
    instead of starting processes that import torch again. They are killed when the block ends,
    so they never hold the cluster's CPUs past it."""
    _SCOPES[0] += 1
    try:
        yield
    finally:
        _SCOPES[0] -= 1
        if not _SCOPES[0] and ray.is_initialized():
            drop_warm()


def _session() -> str:
    return ray.get_runtime_context().get_job_id()


def _take_warm(keys: list[str]) -> list[Any | None]:
    """A live warm actor for each key where there is one (None elsewhere); every other warm
    actor is killed, so the new job's actors find the CPUs they need."""
    if _WARM_SESSION[0] != _session():
        _WARM.clear()  # a new Ray session: the old handles went with the old one
    taken = [_WARM[k].pop() if _WARM.get(k) else None for k in keys]
    drop_warm()
    pings = {i: h.ping.remote() for i, h in enumerate(taken) if h is not None}
    ready, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=10) if pings else ([], [])
    for i, ref in pings.items():  # a warm actor whose node left, or that is restarting, is replaced
        ok = ref in ready
        if ok:
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                ok = False
        if not ok:
            ray.kill(taken[i])
            taken[i] = None
    return taken


def release_actors(actors: list[tuple[ActorSpec, Any]], ok: bool) -> None:
    """End a job's actors: inside ``warm_actors()`` the device actors of a job that ended ``ok``
    wait for the next job; everything else (tile actors, any actor of a failed job) is killed."""
    for _, handle in actors:
        if ok and _SCOPES[0] and isinstance(handle, DeviceActorHandle):
            _WARM_SESSION[0] = _session()
            _WARM.setdefault(handle.key, []).append(handle.actor)
        else:
            ray.kill(handle.actor if isinstance(handle, DeviceActorHandle) else handle)


def drop_warm() -> None:
    """Kill the warm actors (before this process shuts its Ray session down)."""
    for h in (h for hs in _WARM.values() for h in hs):
        ray.kill(h)
    _WARM.clear()


def start_actors(
    cfg: JobConfig, specs: list[ActorSpec], devices: list[Device], dataset: Dataset
) -> tuple[list[tuple[ActorSpec, Any]], Any]:
    """Create the actors (or take warm ones) without waiting: they import torch and load data
    while the driver sets up MLflow. ``wait_ready`` surfaces their start-up errors before the
    first round."""
    labels = [f"{s.label}: {','.join(devices[i].name for i in s.devices)}" for s in specs]
    keys = [f"{sorted(placement.actor_options(s).items())!r} {label}" for s, label in zip(specs, labels)]
    warm = _take_warm(keys)
    job = uuid.uuid4().hex
    data_ref = ray.put(dataset)  # once; actors on this node read it zero-copy
    actors = []
    for s, label, key, actor in zip(specs, labels, keys, warm):
        hosted = [devices[i] for i in s.devices]
        inputs = ActorInputs(job, ray.put((cfg, s, hosted)), data_ref)
        if actor is None:
            actor = DeviceActor.options(**placement.actor_options(s), max_restarts=3).remote(label)
        actors.append((s, DeviceActorHandle(actor, inputs, key)))
        actors[-1][1].info()  # start loading now; wait_ready's call queues behind it
    return actors, data_ref  # the handles hold their refs for the job: a restarted actor reloads from them


def wait_ready(actors: list[tuple[ActorSpec, Any]]) -> list[dict[str, Any]]:
    """Every actor's ``info`` (device actors load their inputs first; tile actors have none)."""
    return ray.get([h.info() if isinstance(h, DeviceActorHandle) else h.info.remote() for _, h in actors])
