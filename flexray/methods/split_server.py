"""The split-learning server: one Ray actor that trains the server part for many clients at once.

Per batch a client sends its smashed activations and labels; the server runs the rest of the
model forward and backward, steps its optimiser and returns the gradient of the activations so
the client can finish backward. SplitFed-V1 keeps a server copy per client (averaged with the
client parts after the round, so every client contributes one whole model); SplitFed-V2 keeps
one server model that serves clients in sequence (arrival order; with one device actor that is
client after client). The server's compute share theta_i of a client sets that client's
simulated service time, and in ``sleep`` mode the real one.

SplitFed's round service (``flexray.methods.service``): the runtime starts it with the job, calls
it around every round (sync) or flight (async) and ships its client to the device actors; a split
task gets a ``ServerPort`` (a callable) as ``ctx.service``, and the port's ``traffic`` -- bytes,
round trips, simulated server seconds -- is what the actor adds to the device's report.

The server asks Ray for its own GPU share (``method.server_gpus``, default the fleet's
``fleet.num_gpus_per_actor``) and computes on ``compute_device`` with it; activations, gradients
and weights cross the object store on the CPU and move to the server's device on arrival.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch
from torch import nn

from flexray.compute import compute_device
from flexray.config import JobConfig
from flexray.errors import FlexrayError
from flexray.methods.service import RoundService, ServiceActor, ServiceEnv, Traffic
from flexray.models import build_model
from flexray.models.split import keys_of_stages, split_model, stage_names
from flexray.protocol import DeviceProfile, Knob, StepProfile, State, Task, Update, compute_seconds


@dataclass(frozen=True)
class Split(Knob):
    """SplitFed's knob: the stages the client trains and its share of the split server."""

    cut: int  # the last stage: no split (the client trains the whole model)
    theta: float = 0.0  # the client's share of the server's compute


def split_of(task: Task) -> Split | None:
    """The task's split, when it has a server part (a cut before the last stage and a share)."""
    knob = task.spec.of(Split)
    return knob if knob is not None and knob.theta > 0 else None


@dataclass(frozen=True)
class ServerSpec:
    """The split server SplitFed asks for: its models, optimiser and resources."""

    shared: bool  # one server model for all clients (SplitFed-V2) or a copy per client (V1)
    server_steps: tuple[StepProfile, ...]  # the server part's SGD step per client batch, indexed by cut - 1
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    num_cpus: float = 1.0
    max_clients: int = 64  # clients served concurrently
    num_gpus: float | None = None  # its GPU share (Ray's num_gpus); None: the fleet's fleet.num_gpus_per_actor


class SplitServerHost:
    """The server's logic without Ray, so tests and profiling can run it in-process."""

    def __init__(self, cfg: JobConfig, spec: ServerSpec, input_shape: tuple[int, int, int], num_classes: int,
                 server: DeviceProfile) -> None:
        self.cfg, self.spec, self.server = cfg, spec, server
        share = server_gpus(cfg, spec)
        self.dev = compute_device(cfg.fleet.compute_device, share) if share else torch.device("cpu")
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.lock = threading.Lock()
        self.models: dict[int, nn.Module] = {}  # V1: one full-model copy per client; V2: key -1
        self.opts: dict[int, torch.optim.Optimizer] = {}
        self.locks: dict[int, threading.Lock] = {}
        self.assign: dict[int, tuple[int, float]] = {}  # device -> (cut, theta)
        self.served: dict[int, list[float]] = {}  # device -> [samples, simulated s, wall s]

    def info(self) -> dict[str, Any]:
        return {"device": str(self.dev), "shared": self.spec.shared}

    def _new_model(self, state: State) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = build_model(self.cfg.model, self.input_shape, self.num_classes)  # type: ignore[arg-type]
        model.load_state_dict(state)
        model.to(self.dev).train()
        s = self.spec
        return model, torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)

    def begin_round(self, rnd: int, state: State, tasks: Sequence[Task]) -> int:
        """Fresh server parts from the global state for this round's split clients."""
        with self.lock:
            for table in (self.models, self.opts, self.locks, self.served):
                table.clear()
            self.assign = {t.device: (s.cut, s.theta) for t in tasks if (s := split_of(t)) is not None}
            if self.spec.shared:
                keys = [-1] if self.assign else []
            else:
                keys = list(self.assign)
            for k in keys:
                self.models[k], self.opts[k] = self._new_model(state)
                self.locks[k] = threading.Lock()
            for d in self.assign:
                self.served[d] = [0.0, 0.0, 0.0]
        return len(self.assign)

    def begin(self, device: int, state: State, task: Task) -> bool:
        """Async rounds: a server part for one launching client, from the version it trained on
        (V1: its own copy; V2: the shared model, created once and trained on by every client)."""
        split = split_of(task)
        if split is None:
            return False
        cut, theta = split.cut, split.theta
        with self.lock:
            self.assign[device] = (cut, theta)
            self.served[device] = [0.0, 0.0, 0.0]
            key = -1 if self.spec.shared else device
            if key not in self.models:
                self.models[key], self.opts[key] = self._new_model(state)
                self.locks[key] = threading.Lock()
        return True

    def finish(self, device: int, keep: bool) -> list[Update]:
        """Async rounds: the landing client's server part (V1: its copy, then dropped; V2: the
        shared model's stages from the client's cut), or nothing when its work does not count."""
        with self.lock:
            if device not in self.assign:
                return []
            cut, _ = self.assign.pop(device)
            samples = int(self.served.pop(device)[0])
            key = -1 if self.spec.shared else device
            model = self.models[key]
            if not self.spec.shared or not self.assign:  # V2: re-read the global model once idle
                self.models.pop(key)
                self.opts.pop(key)
                self.locks.pop(key)
            if not keep or samples == 0:
                return []
            names = stage_names(model)[cut:]
            return [Update(self._tensors(model, names), weight=samples, samples=samples, device=device)]

    def step(self, device: int, smashed: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """Server forward/backward/step on one batch: (activation gradient, loss, simulated s)."""
        if device not in self.assign:
            raise RuntimeError(f"split server: device {device} has no server share this round")
        t0 = time.perf_counter()
        cut, theta = self.assign[device]
        key = -1 if self.spec.shared else device
        with self.locks[key]:
            _, part = split_model(self.models[key], cut)
            h = smashed.to(self.dev).requires_grad_(True)
            loss = nn.functional.cross_entropy(part(h), labels.to(self.dev))
            self.opts[key].zero_grad(set_to_none=True)
            loss.backward()
            self.opts[key].step()
            grad = h.grad.detach().cpu()  # type: ignore[union-attr]
        n = len(labels)
        sim = compute_seconds(self.server, self.spec.server_steps[cut - 1].step(n)) / theta
        wall = time.perf_counter() - t0
        if self.cfg.fleet.throttle == "sleep":
            time.sleep(max(0.0, sim * self.cfg.fleet.time_scale - wall))
        rec = self.served[device]
        rec[0] += n
        rec[1] += sim
        rec[2] += time.perf_counter() - t0
        return grad, float(loss.detach()), sim

    def end_round(self, keep: Sequence[int]) -> list[Update]:
        """Server-part updates of the kept clients: one per client (V1) or the shared model (V2)."""
        kept = [d for d in keep if d in self.assign and self.served[d][0] > 0]
        out: list[Update] = []
        with self.lock:
            if self.spec.shared and kept and -1 in self.models:
                model = self.models[-1]
                names = stage_names(model)[min(self.assign[d][0] for d in kept):]
                samples = int(sum(self.served[d][0] for d in kept))
                out.append(Update(self._tensors(model, names), weight=samples, samples=samples, device=-1))
            elif not self.spec.shared:
                for d in kept:
                    model = self.models[d]
                    names = stage_names(model)[self.assign[d][0]:]
                    samples = int(self.served[d][0])
                    out.append(Update(self._tensors(model, names), weight=samples, samples=samples, device=d))
            self.models.clear()
            self.opts.clear()
        return out

    def stats(self) -> dict[int, list[float]]:
        return {d: list(v) for d, v in self.served.items()}

    @staticmethod
    def _tensors(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        sd = model.state_dict()
        return {k: sd[k].detach().cpu().clone() for k in keys_of_stages(list(sd), names)}


class ServerPort:
    """What a split task calls per batch: ``grad, loss = port(smashed, labels)``. Counts the
    traffic and the simulated server time for the device's report."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.traffic = Traffic()

    def __call__(self, smashed: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        smashed = smashed.detach().to("cpu", torch.float32).contiguous()  # through the object store on the CPU
        labels = labels.cpu()
        t0 = time.perf_counter()
        grad, loss, sim = self._step(smashed, labels)
        t = self.traffic
        t.wall_s += time.perf_counter() - t0
        t.bytes_up += smashed.numel() * smashed.element_size() + labels.numel() * labels.element_size()
        t.bytes_down += grad.numel() * grad.element_size()
        t.server_s += sim
        t.round_trips += 1  # one per batch
        return grad, loss

    def _step(self, smashed: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        raise NotImplementedError


class LocalPort(ServerPort):
    """In-process port (tests, profiling)."""

    def __init__(self, host: SplitServerHost, device: int) -> None:
        super().__init__(device)
        self.host = host

    def _step(self, smashed: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        return self.host.step(self.device, smashed, labels)


class RayPort(ServerPort):
    """Port to the server actor: one round trip per batch."""

    def __init__(self, handle: Any, device: int) -> None:
        super().__init__(device)
        self.handle = handle

    def _step(self, smashed: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        return ray.get(self.handle.step.remote(self.device, smashed, labels))


@dataclass(frozen=True)
class ServerClient:
    """The service's client: the server actor's handle, or an in-process host (tests)."""

    server: Any

    def connect(self, device: int) -> ServerPort:
        if isinstance(self.server, SplitServerHost):
            return LocalPort(self.server, device)
        return RayPort(self.server, device)


def server_gpus(cfg: JobConfig, spec: ServerSpec) -> float:
    """The server's GPU share: its own (``method.server_gpus``), else the fleet's per-actor one."""
    return spec.num_gpus if spec.num_gpus is not None else cfg.fleet.num_gpus_per_actor


class SplitServer(RoundService):
    """The split server as a round service: one actor, fresh server parts per round (sync) or
    per flight (async), and the server parts' updates of the clients whose work counts."""

    role = "split server"

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.handle: Any = None

    def actors(self, cfg: JobConfig) -> list[ServiceActor]:
        gpus = server_gpus(cfg, self.spec)
        field = "method.server_gpus" if self.spec.num_gpus is not None else "fleet.num_gpus_per_actor"
        return [ServiceActor(self.role, self.spec.num_cpus, gpus, field, max(2, self.spec.max_clients))]

    def start(self, env: ServiceEnv) -> None:
        (actor,) = self.actors(env.cfg)
        self.handle = env.spawn(SplitServerHost, actor, (env.cfg, self.spec, env.input_shape, env.num_classes, env.server))
        try:
            ray.get(self.handle.info.remote(), timeout=120)
        except ray.exceptions.GetTimeoutError:
            self.stop()
            raise FlexrayError(
                f"the split server needs {actor.num_cpus:g} CPU(s) and {actor.num_gpus:g} GPU the cluster cannot give "
                "next to the device actors; lower method.server_cpus / method.server_gpus or fleet.actors / "
                "fleet.num_cpus_per_actor") from None

    def client(self) -> ServerClient:
        return ServerClient(self.handle)

    def begin_round(self, rnd: int, state: Any, tasks: Sequence[Task]) -> None:
        ray.get(self.handle.begin_round.remote(rnd, state, tasks))

    def end_round(self, kept: Sequence[int]) -> list[Update]:
        return list(ray.get(self.handle.end_round.remote(list(kept))))

    def launch(self, task: Task, state: Any) -> None:
        ray.get(self.handle.begin.remote(task.device, state, task))

    def land(self, device: int, keep: bool) -> list[Update]:
        return list(ray.get(self.handle.finish.remote(device, keep)))

    def stop(self) -> None:
        if self.handle is not None:
            ray.kill(self.handle)
            self.handle = None
