"""A method from outside flexray that brings its own server actor (tests/test_plugin_service.py).

``SplitHead``: every device trains the model's body; one server actor holds the classifier head
(the last stage) and runs a server loop of its own, unlike flexray's split server: it only
*accumulates* the head's gradients while the devices train, and steps the head once per round
(sync) or once per landing device (async) on the mean gradient -- a large-batch server. Nothing
under ``flexray/`` knows it: the method names it through ``round_service()``, the runtime calls
the ``RoundService`` hooks, and the device's link is the method's own type.
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

from flexray.config import JobConfig
from flexray.methods.base import DeviceContext, LocalData, State, Task, Update, cast_like, local_batches
from flexray.methods.fedavg import FedAvg
from flexray.methods.service import RoundService, ServiceActor, ServiceEnv, Traffic
from flexray.models import build_model
from flexray.models.split import keys_of_stages, split_model, stage_names


class HeadHost:
    """The server actor: the head and its gradient accumulators (one per device in flight)."""

    def __init__(self, cfg: JobConfig, input_shape: tuple[int, ...], num_classes: int) -> None:
        torch.set_num_threads(1)
        self.lr = cfg.method.lr
        self.model = build_model(cfg.model, input_shape, num_classes)  # type: ignore[arg-type]
        self.cut = len(stage_names(self.model)) - 1
        self.lock = threading.Lock()
        self.grads: dict[int, list[Any]] = {}  # device -> [summed head grads, batches, samples]
        self.steps = 0

    def load(self, state: State) -> int:
        with self.lock:
            self.model.load_state_dict(state)
        return self.cut

    def step(self, device: int, smashed: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Forward and backward through the head; its gradients are kept, not applied."""
        with self.lock:
            _, head = split_model(self.model, self.cut)
            h = smashed.requires_grad_(True)
            loss = nn.functional.cross_entropy(head(h), labels)
            params = list(head.parameters())
            grads = torch.autograd.grad(loss, [h, *params])
            acc = self.grads.setdefault(device, [[torch.zeros_like(p) for p in params], 0, 0])
            for a, g in zip(acc[0], grads[1:]):
                a += g
            acc[1] += 1
            acc[2] += len(labels)
            return grads[0].detach(), float(loss.detach())

    def apply(self, devices: Sequence[int]) -> tuple[dict[str, torch.Tensor], int]:
        """One SGD step on the mean head gradient of ``devices``' batches; the head's tensors."""
        with self.lock:
            got = [self.grads.pop(d) for d in devices if d in self.grads]
            samples = sum(g[2] for g in got)
            if got:
                _, head = split_model(self.model, self.cut)
                batches = sum(g[1] for g in got)
                with torch.no_grad():
                    for i, p in enumerate(head.parameters()):
                        p -= self.lr * sum(g[0][i] for g in got) / batches
                self.steps += 1
            sd = self.model.state_dict()
            names = stage_names(self.model)[self.cut:]
            return {k: sd[k].detach().clone() for k in keys_of_stages(list(sd), names)}, samples

    def drop(self, device: int) -> None:
        with self.lock:
            self.grads.pop(device, None)

    def info(self) -> dict[str, int]:
        return {"steps": self.steps}


@dataclass
class HeadLink:
    """A device's end: ``grad, loss = link(smashed, labels)``, counting what crosses."""

    handle: Any
    device: int
    traffic: Traffic

    def __call__(self, smashed: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        smashed = smashed.detach().float().contiguous()
        t0 = time.perf_counter()
        grad, loss = ray.get(self.handle.step.remote(self.device, smashed, labels))
        t = self.traffic
        t.wall_s += time.perf_counter() - t0
        t.bytes_up += smashed.numel() * 4 + labels.numel() * 8
        t.bytes_down += grad.numel() * 4
        t.round_trips += 1
        return grad, loss


@dataclass(frozen=True)
class HeadClient:
    handle: Any

    def connect(self, device: int) -> HeadLink:
        return HeadLink(self.handle, device, Traffic())


class HeadServer(RoundService):
    """The round service: the head actor, refreshed from the global state when work starts."""

    def __init__(self) -> None:
        self.handle: Any = None

    def actors(self, cfg: JobConfig) -> list[ServiceActor]:
        return [ServiceActor("head server", num_cpus=0.0, max_concurrency=8)]

    def start(self, env: ServiceEnv) -> None:
        (actor,) = self.actors(env.cfg)
        self.handle = env.spawn(HeadHost, actor, (env.cfg, env.input_shape, env.num_classes))
        ray.get(self.handle.info.remote(), timeout=120)

    def client(self) -> HeadClient:
        return HeadClient(self.handle)

    def begin_round(self, rnd: int, state: Any, tasks: Sequence[Task]) -> None:
        ray.get(self.handle.load.remote(state))

    def end_round(self, kept: Sequence[int]) -> list[Update]:
        return self._head(list(kept))

    def launch(self, task: Task, state: Any) -> None:
        ray.get(self.handle.load.remote(state))

    def land(self, device: int, keep: bool) -> list[Update]:
        if not keep:
            ray.get(self.handle.drop.remote(device))
            return []
        return self._head([device])

    def _head(self, devices: list[int]) -> list[Update]:
        tensors, samples = ray.get(self.handle.apply.remote(devices))
        return [Update(tensors, weight=samples, samples=samples, device=-1)] if samples else []

    def stop(self) -> None:
        if self.handle is not None:
            ray.kill(self.handle)
            self.handle = None


class SplitHead(FedAvg):
    """Devices train the body; the server actor trains the head (see module doc)."""

    name = "split_head"

    def round_service(self) -> RoundService:
        return HeadServer()

    def local_update(self, task: Task, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        if not isinstance(ctx.service, HeadLink):
            raise RuntimeError("split_head: a task without its head server link")
        model = ctx.model()
        model.load_state_dict(state)
        cut = len(stage_names(model)) - 1
        body, _ = split_model(model, cut)
        body.train()
        cfg = self.cfg
        opt = torch.optim.SGD(body.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        seen, loss_sum = 0, 0.0
        for idx in local_batches(len(data), cfg, ctx.generator):
            opt.zero_grad(set_to_none=True)
            h = body(data.x[idx])
            grad, loss = ctx.service(h, data.y[idx])
            h.backward(grad)
            opt.step()
            seen += len(idx)
            loss_sum += loss * len(idx)
        sd = model.state_dict()
        tensors = {k: sd[k].detach().clone() for k in keys_of_stages(list(sd), stage_names(model)[:cut])}
        return Update(tensors, weight=len(data), samples=seen, metrics={"train_loss": loss_sum / max(seen, 1)})

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        """Per tensor, the weighted mean over the updates holding it (bodies, and the head)."""
        acc: dict[str, torch.Tensor] = {}
        weight: dict[str, float] = {}
        for u in updates:
            for k, v in u.tensors.items():
                acc[k] = acc.get(k, 0) + v.double() * u.weight
                weight[k] = weight.get(k, 0.0) + u.weight
        return cast_like({k: acc[k] / weight[k] if k in acc else state[k].double() for k in state}, state)
