"""SplitFed (Thapa et al., AAAI 2022) with TLMP scheduling (Wen et al., arXiv 2307.11532), hybrid.

Each round the server plans every client's cut and server share with the TLMP min-max solver
from the clients' current trace speeds (or a baseline: FL only, one fixed cut, equal shares). A
client whose cut is the last stage trains the whole model locally (plain FL); the others train
their first ``cut`` stages and exchange smashed activations / gradients per batch with the
split server (its round service, ``flexray.methods.split_server``) through ``ctx.service``. SplitFed-V1 keeps a server copy per client,
SplitFed-V2 one shared server model. Aggregation is a per-tensor sample-weighted mean over every
update holding that tensor, so FL clients, client parts and server parts merge into one model.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from flexray.config import MethodConfig
from flexray.errors import FlexrayError
from flexray.methods.base import DeviceContext, Method, cast_like, copy_state, local_batches, sgd_train
from flexray.models.profile import ModelProfile
from flexray.models.split import SplitPoint, keys_of_stages, split_model, split_points, stage_names
from flexray.methods.service import RoundService
from flexray.methods.split_server import ServerPort, ServerSpec, Split, SplitServer
from flexray.protocol import Cost, DeviceProfile, DeviceView, LocalData, State, SubModel, Task, Update, compute_seconds
from flexray.schedule.tlmp import Clients, exact_minmax, fit_cuts, solve_shares, terms, tlmp

log = logging.getLogger("flexray")


class SplitFedConfig(MethodConfig):
    variant: Literal["v1", "v2"] = Field("v1", description="v1: server copy per client; v2: one shared server model")
    scheduler: Literal["tlmp", "exact", "fl", "fixed", "equal"] = Field(
        "tlmp", description="tlmp: min-max cuts and shares (Wen et al.); exact: bisection over all integer cuts; "
        "fl: no split; fixed: method.cut for all; equal: equal shares")
    cut: int | None = Field(None, ge=1, description="scheduler=fixed: stages every client trains")
    server_cpus: float = Field(
        0.0, ge=0, description="CPUs Ray reserves for the split server actor. 0 (default): it shares the device "
        "actors' cores, which wait for it on every step (a client's forward, the server's step and its backward "
        "run one after another), so a 2-core machine runs the quickstart; reserve cores (e.g. 1) where other work "
        "competes for them")
    server_gpus: float | None = Field(
        None, ge=0, description="GPU share of the split server actor (Ray's num_gpus; it computes on CUDA with one); "
        "default fleet.num_gpus_per_actor, so it computes where the devices do")

    @model_validator(mode="after")
    def _cut_for_fixed(self) -> SplitFedConfig:
        if self.scheduler == "fixed" and self.cut is None:
            raise ValueError("scheduler=fixed needs method.cut (the number of client stages)")
        return self


class SplitFed(Method):
    name = "splitfed"
    Config = SplitFedConfig
    plans_pool = True  # an async client's server share is its share among the devices available
    cfg: SplitFedConfig

    def attach(self, profile: ModelProfile, server: DeviceProfile) -> None:
        self.points: list[SplitPoint] = split_points(profile, self.cfg.batch_size)
        self.layer_names = [layer.name for layer in profile.layers]
        self.server, self.server_name = server, server.name
        L = len(self.points)
        if self.cfg.cut is not None and self.cfg.cut > L:
            raise FlexrayError(f"config error: method.cut: the model has {L} stages; use 1..{L} ({L} = no split)")
        fit = fit_cuts(self.points)
        self.fit_error = fit.error if fit else 0.0
        log.debug("splitfed: %d cuts, cut regression leave-one-out relative error %.3g", L, self.fit_error)

    def check(self) -> None:
        """A split needs two top-level stages to cut between (plain FL, ``scheduler=fl``, needs none)."""
        if self.cfg.scheduler == "fl":
            return
        stages = stage_names(self.model_fn())
        if len(stages) < 2:
            raise FlexrayError(
                f"config error: model.name: splitfed cuts between a model's top-level stages and this model has "
                f"{len(stages)} ({', '.join(stages) or 'none'}); use a staged model (cnn, lenet, resnet20, "
                "torchvision:resnet18, torchvision:mobilenet_v2) or method.scheduler=fl")

    def _points(self) -> list[SplitPoint]:
        if getattr(self, "points", None) is None:
            raise FlexrayError("splitfed: no model profile attached (the runtime calls Method.attach first)")
        return self.points

    def round_service(self) -> RoundService:
        """The split server (``flexray.methods.split_server``); plain FL needs none."""
        spec = self.server_spec()
        return SplitServer(spec) if spec is not None else RoundService()

    def server_spec(self) -> ServerSpec | None:
        if self.cfg.scheduler == "fl":
            return None
        c = self.cfg
        return ServerSpec(shared=c.variant == "v2", server_steps=tuple(p.server_step for p in self._points()),
                          lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, num_cpus=c.server_cpus,
                          num_gpus=c.server_gpus)

    # ---- server side
    def plan(self, rnd: int, devices: Sequence[DeviceView], state: State) -> list[Task]:
        """Re-planned every round from the devices' current speeds (their traces)."""
        if not devices:
            return []
        points = self._points()
        L = len(points)
        clients = Clients.of([d.profile for d in devices], [d.speed for d in devices],
                             [self.cfg.local_epochs * d.num_samples for d in devices],
                             [self.steps(d.num_samples) for d in devices])
        tm = terms(clients, points, self.server)
        rows = np.arange(len(devices))
        kind = self.cfg.scheduler
        if kind in ("tlmp", "exact"):
            plan = (tlmp if kind == "tlmp" else exact_minmax)(clients, points, self.server)
            cuts, theta = plan.cuts, plan.theta
        elif kind in ("fl", "fixed"):
            cut = L if kind == "fl" else int(self.cfg.cut or L)
            cuts = np.full(len(devices), cut)
            if not tm.feasible[:, cut - 1].all():
                bad = devices[int(np.flatnonzero(~tm.feasible[:, cut - 1])[0])]
                field = "method.scheduler" if kind == "fl" else "method.cut"
                raise FlexrayError(f"config error: {field}: device {bad.id} ({bad.profile.name}) cannot train {cut} "
                                   "stages in its memory; use scheduler=tlmp or a smaller cut")
            _, theta = solve_shares(tm.A[rows, cuts - 1], tm.B[rows, cuts - 1])
        else:  # equal shares; each client then takes its fastest feasible cut
            theta = np.full(len(devices), 1.0 / len(devices))
            lat = np.where(tm.B > 0, tm.A + tm.B / theta[:, None], tm.A)
            cuts = np.argmin(lat, axis=1) + 1
            theta = np.where(tm.B[rows, cuts - 1] > 0, theta, 0.0)
        latency = tm.latency(cuts, np.maximum(theta, 1e-300))
        return [
            Task(d.id, rnd, SubModel(Split(int(cuts[i]), float(theta[i])), predicted_s=float(latency[i]),
                                     memory_bytes=points[int(cuts[i]) - 1].client_memory_bytes))
            for i, d in enumerate(devices)
        ]

    def plan_notes(self, tasks: Sequence[Task]) -> list[str]:
        """What ``flexray plan`` prints under the table: the server shares and the cut regression."""
        splits = [s for t in tasks if (s := t.spec.of(Split)) is not None]
        shares = [s.theta for s in splits]
        notes = []
        if shares:
            notes.append(f"server shares: sum {sum(shares):.4f} over {sum(s > 0 for s in shares)} split clients "
                         f"(server {self.server_name})")
        cuts = Counter(s.cut for s in splits)
        if cuts:  # which stage each cut follows: torchvision models cut between blocks, not block groups
            L = len(self.layer_names)
            where = ", ".join(f"{c} after {self.layer_names[c - 1]} x{k}" if c < L else f"{c} no split x{k}"
                              for c, k in sorted(cuts.items()))
            notes.append(f"cuts (of {L} stages): {where}")
        if tasks:
            notes.append(f"cut regression: leave-one-out relative error {self.fit_error:.3g} (exact at the integer cuts)")
        return notes

    def cost(self, task: Task, device: DeviceView, profile: ModelProfile) -> Cost:
        p = self._points()[cut_of(task.spec) - 1]
        d = self.cfg.local_epochs * device.num_samples
        split = task.spec.of(Split)
        theta = split.theta if split is not None else 0.0
        epochs = (device.num_samples, self.cfg.batch_size, self.cfg.local_epochs)
        server_s = compute_seconds(self.server, p.server_step.epochs(*epochs)) / theta if p.split and theta > 0 else 0.0
        return Cost(p.client_step.epochs(*epochs), p.client_model_bytes + d * p.downlink_bytes_per_sample,
                    p.client_model_bytes + d * p.uplink_bytes_per_sample, server_s,
                    round_trips=self.steps(device.num_samples) if p.split else 0.0)

    def steps(self, num_samples: int) -> float:
        """Client steps of a round: each is one round trip to the server when split."""
        return self.cfg.local_epochs * math.ceil(num_samples / self.cfg.batch_size)

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        """Per tensor: the sample-weighted mean over the updates that hold it (client parts, FL
        models, server parts); a tensor nobody trained keeps its value."""
        if not updates:
            return state
        acc: dict[str, torch.Tensor] = {}
        weight: dict[str, float] = {}
        for u in updates:
            for k, v in u.tensors.items():
                acc[k] = acc.get(k, 0) + v.to(torch.float64) * u.weight
                weight[k] = weight.get(k, 0.0) + u.weight
        merged = {k: (acc[k] / weight[k] if k in acc and weight[k] > 0 else state[k].to(torch.float64)) for k in state}
        return cast_like(merged, state)

    # ---- device side
    def local_update(self, task: Task, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        points = self._points()
        cut = cut_of(task.spec)
        p = points[cut - 1]
        model = ctx.model()
        model.load_state_dict(state)
        if not p.split:  # the last stage: the device trains the whole model (plain FL)
            samples, loss = sgd_train(model, data, self.cfg, ctx.generator)
            return Update(copy_state(model), weight=len(data), samples=samples,
                          work=p.client_step.trained(len(data), self.cfg.batch_size, samples),
                          metrics={"train_loss": loss})
        if not isinstance(ctx.service, ServerPort):
            raise RuntimeError("splitfed: a split task ran without a server port (the split server's client gives one)")
        client, _ = split_model(model, cut)
        samples, loss = split_train(client, data, self.cfg, ctx.generator, ctx.service)
        names = stage_names(model)[:cut]
        sd = model.state_dict()
        tensors = {k: sd[k].detach().to("cpu", copy=True) for k in keys_of_stages(list(sd), names)}  # the object store's side
        return Update(tensors, weight=len(data), samples=samples,
                      work=p.client_step.trained(len(data), self.cfg.batch_size, samples),
                      bytes_down=p.client_model_bytes, metrics={"train_loss": loss})


def split_train(client: nn.Module, data: LocalData, cfg: MethodConfig, generator: torch.Generator,
                server: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, float]]) -> tuple[int, float]:
    """Local SGD on the client part: forward to the cut, the server returns the activation
    gradient, backward from it. Same batches and RNG use as ``sgd_train``."""
    client.train()
    opt = torch.optim.SGD(client.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    seen, loss_sum = 0, 0.0
    for idx in local_batches(len(data), cfg, generator):
        opt.zero_grad(set_to_none=True)
        h = client(data.x[idx])
        grad, loss = server(h.detach(), data.y[idx])
        h.backward(grad.to(h.device, h.dtype))  # the gradient comes back on the CPU
        opt.step()
        seen += len(idx)
        loss_sum += loss * len(idx)
    return seen, loss_sum / max(seen, 1)


def cut_of(spec: SubModel) -> int:
    knob = spec.of(Split)
    if knob is None:
        raise FlexrayError(f"splitfed: a task without a cut ({spec.log()}); plan sets it")
    return int(knob.cut)
