"""DISTREAL (Rapp, Khalili, Pfeiffer & Henkel, AAAI 2022, arXiv 2112.08761): resource-aware
structured filter dropout with design-space exploration and device-side online selection.

- Every mini-batch trains a random kept-filter sub-network: layer ``l`` keeps a random
  ``ceil((1 - d_l) * C_l)`` of its filters and the next layer the matching inputs; only the kept
  sub-tensors are computed (``flexray.models.filters.DropoutSGD``), so FLOPs and time fall.
- Before training, the server explores per-layer rates ``d`` with NSGA-II (``flexray.schedule.dse``)
  for (resource cost, convergence) and ships the Pareto front with every task. The search is
  cached per model and logged as artifacts (front JSON + cost-vs-loss plot).
- Online selection, on the device and without asking the server: each round a device reads its
  budget (profile FLOP/s x its trace's current speed, and the round deadline) and picks the
  best-converging front point whose local work still fits the deadline after download and upload.
- The grid's largest rate bounds how little of the network a device may train: on the CIFAR-10
  benchmark a grid up to 0.75 let the weakest devices send quarter-network steps that slowed the
  global model (target 2.62 s vs 1.97 s capped at 0.5, three seeds); a device that cannot afford
  the cheapest point trains it anyway and is dropped as a straggler.
- Server: FedAvg over full tensors where a device counts, per entry, only if it trained that entry,
  and with the samples that trained it: its sample weight x the fraction of its mini-batches that
  kept the entry (``filters.kept_fraction`` of the rates it reports: kept filter x kept input).
  Denominator = the sum of those over the devices whose value of the entry changed (a filter a
  device dropped in every mini-batch is unchanged). Counting every device instead would pull rarely
  kept filters back toward the old model in proportion to their dropout rate, so heavily dropped
  layers would learn slowest; counting a d = 0.75 device like a d = 0 one lets a quarter-network's
  step (trained without the rest of the layer) weigh as much as a whole one's. Measured on the
  CIFAR-10 benchmark (seed 0): +1.8 points final accuracy for DISTREAL, +0.9 for uniform dropout.
  No masks are shipped: an entry SGD touched and left bit-identical contributed no update anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from flexray.config import MethodConfig
from flexray.errors import FlexrayError
from flexray.methods.base import DeviceContext, Method, ServerData, cast_like, copy_state, local_batches
from flexray.models import filters
from flexray.models.profile import ModelProfile, ProfileCache, state_bytes
from flexray.protocol import (
    Cost, DeviceView, Knob, LocalData, State, StepProfile, SubModel, Task, Update, Workload, compute_seconds, predict_times,
)
from flexray.schedule import dse
from flexray.schedule.dse import DSEConfig



@dataclass(frozen=True)
class DesignPoint:
    """One point of a dropout design front: a rate per droppable layer, the training FLOPs per
    sample it costs and the error it is predicted to reach."""

    rates: tuple[float, ...]
    flops: float
    error: float


@dataclass(frozen=True)
class Front(Knob):
    """The filter-dropout methods' knob: the droppable layers and the front a device picks its
    dropout from (a trained update's holds the one point it picked)."""

    layers: tuple[str, ...]  # in ``DesignPoint.rates`` order
    points: tuple[DesignPoint, ...]

    def log(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "points": len(self.points)}  # the front by its size


class DropoutConfig(MethodConfig):
    scaler: bool = Field(False, description="inverted dropout: kept outputs x C/kept while training")
    deadline_s: float | None = Field(
        None, gt=0, description="budget deadline when the round has none (rounds.deadline_s wins)"
    )


class DistrealConfig(DropoutConfig):
    dse: DSEConfig = Field(default_factory=DSEConfig, description="design-space exploration")

    def held_out(self, n_train: int) -> int:
        return self.dse.proxy_count(n_train)


class FilterDropout(Method):
    """Shared by DISTREAL and uniform dropout: a set of dropout vectors (cost, convergence) is
    shipped with each task and the device picks one for its budget; they differ in the set."""

    Config: ClassVar[type[MethodConfig]] = DropoutConfig
    linear = False
    cfg: DropoutConfig

    def __init__(self, cfg: MethodConfig, model_fn: Callable[[], nn.Module]) -> None:
        super().__init__(cfg, model_fn)
        self.points: list[list[float]] | None = None  # per point: rates..., flops/sample, convergence
        self.layers: list[str] = []
        self._bytes: int | None = None
        self._profiles = ProfileCache()

    def point_step(self, layers: Sequence[str], rates: Sequence[float], input_shape: tuple[int, ...]) -> StepProfile:
        """One SGD step of the slim model a design point trains (its own traced kernels, cached)."""
        width = filters.widths(filters.chain(self.full), dict(zip(layers, rates)))
        key = tuple(sorted(width.items()))
        return self._profiles.get(key, input_shape, lambda: filters.slim(self.full, width)).step

    def check(self) -> None:
        """Refuse a model that is no plain chain of Conv2d/Linear layers, before Ray starts."""
        filters.chain(self.full)

    @property
    def dcfg(self) -> DropoutConfig:
        return self.cfg

    def candidates(self, data: ServerData, workdir: Path) -> tuple[list[str], list[list[float]], list[Path]]:
        raise NotImplementedError

    def setup(self, data: ServerData, workdir: Path) -> list[Path]:
        self.layers, self.points, artifacts = self.candidates(data, workdir)
        return artifacts

    def state_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "points": self.points}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layers, self.points = list(state.get("layers", [])), state.get("points")

    # ---- server side
    def plan(self, rnd: int, devices: Sequence[DeviceView], state: State) -> list[Task]:
        if self.points is None:
            raise FlexrayError(f"method {self.name}: no design points; the driver calls setup() before planning")
        spec = front_spec(self.layers, self.points)
        return [Task(device=d.id, round=rnd, spec=spec) for d in devices]

    def model_bytes(self) -> int:
        if self._bytes is None:
            self._bytes = state_bytes(self.full.state_dict())
        return self._bytes

    def point_work(self, spec: Front, i: int, num_samples: int) -> Workload:
        """The local epochs of design point ``i`` on ``num_samples`` (coarse, by its FLOPs, for a
        model that does not record its input shape)."""
        shape = getattr(self.full, "input_shape", None)
        if shape is None:
            return Workload.coarse(self.cfg.local_epochs * num_samples * spec.points[i].flops)
        step = self.point_step(spec.layers, spec.points[i].rates, tuple(shape))
        return step.epochs(num_samples, self.cfg.batch_size, self.cfg.local_epochs)

    def choose(self, spec: Front, view: DeviceView | None, num_samples: int) -> int:
        """The device's own pick for its current budget (see ``dse.select``)."""
        if view is None:
            return dse.select([(p.flops, p.error) for p in spec.points], None)
        deadline = view.deadline_s if view.deadline_s is not None else self.dcfg.deadline_s
        budget = None
        if deadline is not None:
            dl, _, ul = predict_times(view.profile, view.speed, Workload(), self.model_bytes(), self.model_bytes())
            budget = deadline - dl - ul
        pts = [(compute_seconds(view.profile, self.point_work(spec, i, num_samples), view.speed), p.error)
               for i, p in enumerate(spec.points)]
        return dse.select(pts, budget)

    def cost(self, task: Task, device: DeviceView, profile: ModelProfile) -> Cost:
        front = front_of(task.spec)
        i = self.choose(front, device, device.num_samples)
        return Cost(self.point_work(front, i, device.num_samples), self.model_bytes(), self.model_bytes())

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        if not updates:
            return state
        num = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in state.items()}
        den = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in state.items()}
        for u in updates:
            picked = u.trained.of(Front) if u.trained is not None else None  # the point it trained (None: nothing dropped)
            kept = filters.kept_fraction(self.full, dict(zip(picked.layers, picked.points[0].rates)) if picked else {})
            for k, v in u.tensors.items():
                trained = (v != state[k]) if v.is_floating_point() else torch.ones(v.shape, dtype=torch.bool)
                w = trained.to(torch.float64) * float(u.weight) * kept[k]
                num[k] += w * v.to(torch.float64)
                den[k] += w
        merged = {k: torch.where(den[k] > 0, num[k] / den[k].clamp_min(1e-300), state[k].to(torch.float64)) for k in state}
        return cast_like(merged, state)

    # ---- device side
    def local_update(self, task: Task, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        spec = front_of(task.spec)
        i = self.choose(spec, ctx.device, len(data))
        rates = dict(zip(spec.layers, spec.points[i].rates))
        full = ctx.model(f"{self.name}:full")
        full.load_state_dict(state)
        layers = filters.chain(full)
        width = filters.widths(layers, rates)
        key = f"{self.name}:" + ",".join(str(width[k]) for k in sorted(width))

        def build() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                sub = filters.slim(full, width)
            return filters.add_scalers(sub, width, full) if self.dcfg.scaler else sub

        trainer = filters.DropoutSGD(full, width, sub=ctx.model(key, build))
        cfg, n = self.cfg, len(data)
        seen, loss_sum = 0, 0.0
        for idx in local_batches(n, cfg, ctx.generator):
            loss = trainer.step(data.x[idx], data.y[idx], ctx.generator, cfg.lr, cfg.momentum, cfg.weight_decay)
            seen += len(idx)
            loss_sum += loss * len(idx)
        metrics = {"train_loss": loss_sum / max(seen, 1), "point": float(i)}
        metrics.update({f"drop.{k}": float(r) for k, r in rates.items()})
        if ctx.device is not None:
            metrics["budget_gflops"] = ctx.device.profile.flops * ctx.device.speed / 1e9
        work = self.point_work(spec, i, n) * (seen / max(self.cfg.local_epochs * n, 1))
        return Update(copy_state(full), weight=n, samples=seen, work=work, metrics=metrics,
                      trained=SubModel(Front(spec.layers, (spec.points[i],))))


class Distreal(FilterDropout):
    name = "distreal"
    Config = DistrealConfig
    cfg: DistrealConfig

    def candidates(self, data: ServerData, workdir: Path) -> tuple[list[str], list[list[float]], list[Path]]:
        cfg = self.cfg
        proxy = data.take(cfg.held_out(len(data.dataset.y_train)), "method.dse.proxy_samples")
        front = dse.explore(self.model_fn, proxy, cfg.dse.model_copy(update={"scaler": cfg.scaler}),
                            data.dataset.input_shape, device=data.compute, progress=data.progress)
        json_path = workdir / "distreal_front.json"
        json_path.write_text(front.to_json())
        paths = [json_path, dse.plot(front, workdir / "distreal_front.png")]
        points = [[*p.rates, p.flops, p.loss] for p in front.points]
        return list(front.layers), points, paths


def front_spec(layers: Sequence[str], points: Sequence[Sequence[float]]) -> SubModel:
    """The task of every device: the droppable layers and the front, each point stored (and
    checkpointed) as ``[rate per layer..., FLOPs per sample, predicted error]``."""
    front = tuple(DesignPoint(tuple(float(r) for r in p[:-2]), float(p[-2]), float(p[-1])) for p in points)
    return SubModel(Front(tuple(layers), front))


def front_of(spec: SubModel) -> Front:
    knob = spec.of(Front)
    if knob is None:
        raise FlexrayError(f"filter dropout: a task without a design front ({spec.log()}); plan sets it")
    return knob
