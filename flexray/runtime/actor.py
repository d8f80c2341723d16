"""DeviceActor: a persistent Ray actor hosting one real device or many simulated ones.

It loads its devices' data once, keeps models cached across rounds, runs the method's
``local_update`` for each task and turns the work into simulated time and energy according to
the throttle mode:

- ``virtual``: no sleeping; compute time = counted FLOPs / (profile FLOP/s x trace speed).
- ``sleep``: as virtual, then the actor sleeps so its wall clock matches (x ``time_scale``).
- ``none``: real hardware; compute time is the measured wall time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
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
from flexray.models import state_bytes
from flexray.protocol import DeviceView, State, Task, Update, energy_j, predict_times
from flexray.runtime.job import Job
from flexray.runtime.split_server import make_port


class DeviceHost:
    """The actor's logic, kept free of Ray so it can be unit-tested and profiled in-process."""

    def __init__(self, cfg: JobConfig, spec: ActorSpec, devices: Sequence[Device], dataset: Dataset) -> None:
        torch.set_num_threads(max(1, int(spec.num_cpus)))
        self.cfg, self.spec = cfg, spec
        job = Job(cfg, dataset, list(devices))  # the same assembly as the driver's, for these devices
        self.devices = {d.id: d for d in devices}
        self.data = {d.id: job.local_data(d) for d in devices}
        self.method = job.method()
        self.ctx = DeviceContext(job.model)
        self.ctx.model()  # built now: inside the first task it would draw from that task's seeded RNG
        self.model_profile = job.model_profile
        self.node = _node_id()

    def __repr__(self) -> str:  # Ray shows it in logs, the dashboard and the state API
        names = ",".join(d.name for d in self.devices.values())
        return f"DeviceHost({self.spec.label}: {names[:200]})"

    def info(self) -> dict[str, object]:
        return {"pid": os.getpid(), "node": self.node, "devices": list(self.devices)}

    def run_round(self, req: RoundRequest, state: State) -> tuple[list[DeviceReport], list[Update]]:
        """Train every task of this actor; pre-sum accepted updates when the method allows."""
        shipped = state_bytes(state)
        reports: list[DeviceReport] = []
        accepted: list[Update] = []
        for task in req.tasks:
            report, update = self._run_task(req, task, state, shipped)
            reports.append(report)
            if update is not None:
                accepted.append(update)
        if req.presum and self.method.linear and len(accepted) > 1:
            accepted = [self.method.combine(accepted)]
        return reports, accepted

    def _run_task(self, req: RoundRequest, task: Task, state: State, shipped: int) -> tuple[DeviceReport, Update | None]:
        dev = self.devices[task.device]
        data = self.data[task.device]
        speed = dev.trace.speed(req.start_s)
        view = DeviceView(dev.id, dev.profile, speed, len(data), req.deadline_s)
        throttle = self.cfg.fleet.throttle
        deadline = req.deadline_s if req.drop_stragglers else None

        cost = self.method.cost(task, view, self.model_profile)
        predicted = sum(predict_times(dev.profile, speed, cost.flops, cost.bytes_down, cost.bytes_up)) + cost.server_s
        if throttle == "virtual" and deadline is not None and predicted > deadline:
            # Virtual time is exact, so a sure straggler's training would be thrown away anyway.
            dl, comp, ul = predict_times(dev.profile, speed, cost.flops, cost.bytes_down, cost.bytes_up)
            rep = self._report(req, task, dev, speed, 0, cost.flops, 0.0, dl, comp, ul, cost.bytes_down, 0, {}, "straggler")
            rep.predicted_s = predicted
            return rep, None

        self.ctx.seed(derive_seed(self.cfg.seed, req.round, task.device, req.draw))
        self.ctx.device = view
        port = self.ctx.server = make_port(req.server, task.device) if req.server is not None else None
        t0 = time.perf_counter()
        try:
            update = self.method.local_update(task, state, data, self.ctx)
        finally:
            self.ctx.server = None
        wall = time.perf_counter() - t0

        flops = update.flops if update.flops is not None else update.samples * self.model_profile.train_flops_per_sample
        bytes_down = update.bytes_down if update.bytes_down is not None else shipped
        bytes_up = state_bytes(update.tensors)
        server_s = 0.0
        if port is not None:  # smashed activations up, their gradients down, time served
            bytes_up, bytes_down, server_s = bytes_up + port.bytes_up, bytes_down + port.bytes_down, port.server_s
        dl, comp, ul = predict_times(dev.profile, speed, flops, bytes_down, bytes_up)
        if throttle == "none":  # real hardware: measured, the server's round trips apart
            server_s = port.wall_s if port is not None else 0.0
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
        report.note, report.predicted_s = note, predicted
        return report, (update if status in ("ok", "late") else None)

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
    """An actor's devices and the dataset, as object-store refs held by the driver for the job."""

    devices: ray.ObjectRef  # list[Device] of this actor
    dataset: ray.ObjectRef  # Dataset, shared zero-copy by every actor on a node


@ray.remote
class DeviceActor:
    """The Ray actor around a :class:`DeviceHost`, built from its inputs on first use.

    Its constructor takes no object-store refs, because Ray cannot promise to restart an actor
    whose constructor arguments live in the object store (it logs an ERROR for every such actor,
    ray-project/ray#53727). Every call brings the refs instead (nested in ``ActorInputs``, so
    Ray does not resolve them per call); a fresh or restarted actor loads them once.
    """

    def __init__(self, cfg: JobConfig, spec: ActorSpec, names: tuple[str, ...]) -> None:
        self.cfg, self.spec, self.names = cfg, spec, names
        self.host: DeviceHost | None = None

    def _host(self, inputs: ActorInputs) -> DeviceHost:
        if self.host is None:
            devices, dataset = ray.get([inputs.devices, inputs.dataset])
            self.host = DeviceHost(self.cfg, self.spec, devices, dataset)
        return self.host

    def __repr__(self) -> str:  # Ray shows it in logs, the dashboard and the state API
        return f"DeviceActor({self.spec.label}: {','.join(self.names)[:200]})"

    def info(self, inputs: ActorInputs) -> dict[str, object]:
        return self._host(inputs).info()

    def run_round(self, req: RoundRequest, state: State, inputs: ActorInputs) -> tuple[list[DeviceReport], list[Update]]:
        return self._host(inputs).run_round(req, state)


@dataclass(frozen=True)
class DeviceActorHandle:
    """The driver's side of a device actor: the Ray handle and the refs every call carries."""

    actor: Any  # ray.actor.ActorHandle of DeviceActor
    inputs: ActorInputs

    def info(self) -> ray.ObjectRef:
        return self.actor.info.remote(self.inputs)

    def run_round(self, req: RoundRequest, state: ray.ObjectRef) -> ray.ObjectRef:
        return self.actor.run_round.remote(req, state, self.inputs)


def start_actors(
    cfg: JobConfig, specs: list[ActorSpec], devices: list[Device], dataset: Dataset
) -> tuple[list[tuple[ActorSpec, Any]], Any]:
    """Create the actors without waiting: they import torch and load data while the driver
    sets up MLflow. ``wait_ready`` surfaces their start-up errors before the first round."""
    placement.check_placement(specs)  # fail fast, naming the fix, instead of waiting forever
    data_ref = ray.put(dataset)  # once; actors on this node read it zero-copy
    actors = []
    for s in specs:
        hosted = [devices[i] for i in s.devices]
        inputs = ActorInputs(ray.put(hosted), data_ref)
        handle = DeviceActor.options(**placement.actor_options(s), max_restarts=3).remote(
            cfg, s, tuple(d.name for d in hosted))
        actors.append((s, DeviceActorHandle(handle, inputs)))
        actors[-1][1].info()  # start loading now; wait_ready's call queues behind it
    return actors, data_ref  # the handles hold their refs for the job: a restarted actor reloads from them


def wait_ready(actors: list[tuple[ActorSpec, Any]]) -> list[dict[str, Any]]:
    """Every actor's ``info`` (device actors load their inputs first; tile actors have none)."""
    return ray.get([h.info() if isinstance(h, DeviceActorHandle) else h.info.remote() for _, h in actors])
