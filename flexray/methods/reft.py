"""REFT (Desai et al., arXiv 2308.13662): capability-driven structured pruning on the devices and
server-side ensemble distillation.

- Each device trains a physically smaller model: every Conv2d / hidden Linear keeps its
  ``ceil((1 - r) * C)`` filters of largest L1 norm in the current global model (Li et al. 2017),
  so it computes fewer FLOPs and downloads and uploads fewer bytes. The server plans ``r`` per
  device: the smallest ratio on ``ratios`` whose round (download + local epochs + upload of the
  pruned model) fits the deadline at the device's profile FLOP/s x trace speed.
- Server: the pruned updates are first averaged into the global tensors where they sit (each
  entry over the devices that hold it, as HeteroFL). Filters no device has trained yet (every
  device prunes them) still hold their random init; their outputs are cut off from the next layer
  (``filters.silence``), else that noise costs the global model ~6 points (measured on CIFAR-10:
  26.6% -> 32.9% without distillation). They stay in the model, so a device that later trains
  them recruits them. Then the global model is distilled from the
  ensemble: the mean softmax of the client models at temperature ``T`` on an unlabeled held-out
  proxy set (``proxy_samples`` training samples no device holds; labels unused) teaches it by KL
  divergence (x ``T^2``, Hinton et al. 2015). The teachers and the student run on the driver's
  device (``ServerData.compute``); the proxy batches are drawn on the CPU, so a GPU driver
  distils on the batches a CPU one does, and the distilled state comes back on the CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from flexray.config import MethodConfig, SampleCount, fractions, sample_count
from flexray.errors import FlexrayError
from flexray.methods.base import DeviceContext, Method, ServerData, cast_like, check_tensors, copy_state, sgd_train
from flexray.models import elastic, filters
from flexray.models.profile import ModelProfile, ProfileCache, state_bytes
from flexray.protocol import Cost, DeviceView, Knob, LocalData, State, SubModel, Task, Update, predict_times


@dataclass(frozen=True)
class Pruned(Knob):
    """REFT's knob: the structured pruning ratio a device trains at."""

    ratio: float


class ReftConfig(MethodConfig):
    ratios: list[float] = Field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8], min_length=1,
                                description="structured pruning ratios a device may get")
    ratio: float | None = Field(None, ge=0, lt=1, description="every device prunes this ratio (overrides ratios)")
    deadline_s: float | None = Field(None, gt=0, description="deadline to fit when the round has none")
    proxy_samples: SampleCount = Field(
        0.1, gt=0, description="unlabeled samples held out from the devices for distillation: a count, or a "
        "fraction (< 1) of the training set"
    )
    temperature: float = Field(1.0, gt=0, description="distillation temperature T (3 flattened the skewed clients' "
                               "biases into the targets: 1.7 points below T = 1 on CIFAR-10)")
    distill_steps: int = Field(50, ge=0, description="server KL steps per round (0: plain averaging)")
    distill_batch: int = Field(64, ge=1)
    distill_lr: float = Field(1e-4, gt=0, description="Adam learning rate of the distillation (1e-3 cost ~3 points)")

    @field_validator("ratios")
    @classmethod
    def _ratios_ok(cls, v: list[float]) -> list[float]:
        return fractions(v, "pruning ratios")

    def held_out(self, n_train: int) -> int:
        return sample_count(self.proxy_samples, n_train, "proxy_samples") if self.distill_steps else 0


class Reft(Method):
    name = "reft"
    Config = ReftConfig
    cfg: ReftConfig
    linear = False

    def __init__(self, cfg: MethodConfig, model_fn: Callable[[], nn.Module]) -> None:
        super().__init__(cfg, model_fn)
        self.proxy: torch.Tensor | None = None
        self.input_shape: tuple[int, ...] | None = None
        self._models: dict[float, nn.Module] = {}
        self._profiles = ProfileCache()
        self._student: nn.Module | None = None
        self._teachers: dict[float, nn.Module] = {}  # per ratio: a pruned model on the server's device
        self.compute = torch.device("cpu")  # where distillation runs (setup sets the driver's device)
        self._trained: dict[str, torch.Tensor] = {}  # per droppable layer: filters some device has trained

    def check(self) -> None:
        """Refuse a model that is no plain chain of Conv2d/Linear layers, before Ray starts."""
        filters.chain(self.full)

    @property
    def rcfg(self) -> ReftConfig:
        return self.cfg

    def setup(self, data: ServerData, workdir: Path) -> list[Path]:
        self.input_shape, self.compute = data.dataset.input_shape, data.compute
        if self.rcfg.distill_steps:  # labels unused; moved once to where the distillation runs
            count = self.rcfg.held_out(len(data.dataset.y_train))
            self.proxy = data.take(count, "method.proxy_samples").x.to(self.compute)
        return []

    # ---- pruned models
    def width(self, ratio: float) -> dict[str, int]:
        layers = filters.droppable(self.full)
        return filters.widths(layers, {la.name: ratio for la in layers})

    def pruned(self, ratio: float) -> nn.Module:
        """A pruned-shape model (server copy, cached); weights come from a state."""
        if ratio not in self._models:
            with torch.random.fork_rng(devices=[]):
                self._models[ratio] = filters.slim(self.full, self.width(ratio))
        return self._models[ratio]

    def profile(self, ratio: float, input_shape: tuple[int, ...]) -> ModelProfile:
        return self._profiles.get(ratio, input_shape, lambda: self.pruned(ratio))

    def keep(self, state: State, ratio: float) -> filters.Keep:
        """The filters a device pruned to ``ratio`` keeps: largest L1 norm in ``state``."""
        return filters.l1_keep(self.full, state, self.width(ratio))

    def keep_index(self, state: State, ratio: float) -> elastic.Index:
        return filters.index(self.full, self.keep(state, ratio))

    # ---- server side
    def ratio_for(self, device: DeviceView) -> float:
        """Smallest ratio whose round fits the deadline on this device now; the largest if none does."""
        cfg = self.rcfg
        if cfg.ratio is not None:
            return cfg.ratio
        deadline = device.deadline_s if device.deadline_s is not None else cfg.deadline_s
        if deadline is None:
            return cfg.ratios[0]
        if self.input_shape is None:
            raise FlexrayError("method reft: no input shape; the driver calls setup() before planning")
        for r in cfg.ratios:
            prof = self.profile(r, self.input_shape)
            work = prof.step.epochs(device.num_samples, cfg.batch_size, cfg.local_epochs)
            if sum(predict_times(device.profile, device.speed, work, prof.param_bytes, prof.param_bytes)) <= deadline:
                return r
        return cfg.ratios[-1]

    def plan(self, rnd: int, devices: Sequence[DeviceView], state: State) -> list[Task]:
        return [Task(device=d.id, round=rnd, spec=SubModel(Pruned(self.ratio_for(d)))) for d in devices]

    def cost(self, task: Task, device: DeviceView, profile: ModelProfile) -> Cost:
        prof = self.profile(ratio_of(task.spec), profile.input_shape or self.input_shape or ())
        work = prof.step.epochs(device.num_samples, self.cfg.batch_size, self.cfg.local_epochs)
        return Cost(work, prof.param_bytes, prof.param_bytes)

    def validate(self, update: Update, state: State, planned: SubModel | None = None) -> str | None:
        trained = update.trained.of(Pruned) if update.trained is not None else None
        ratio = trained.ratio if trained is not None else None
        if ratio is None or (self.rcfg.ratio is None and float(ratio) not in self.rcfg.ratios):
            return f"update has no allowed pruning ratio (got {ratio!r})"
        want = planned.of(Pruned) if planned is not None else None
        if want is not None and want.ratio != float(ratio):
            return f"update pruned ratio {ratio}, planned {want.ratio}"
        expected = {k: v.shape for k, v in self.pruned(float(ratio)).state_dict().items()}
        return check_tensors(update.tensors, expected, f"ratio {ratio}")

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        if not updates:
            return state
        ratios = {ratio_of(u.trained) for u in updates}
        keeps = {r: self.keep(state, r) for r in ratios}
        parts = [elastic.Part(u.tensors, filters.index(self.full, keeps[ratio_of(u.trained)]), u.weight)
                 for u in updates]
        merged = cast_like(elastic.aggregate(state, parts), state)
        self._mark_trained(keeps.values())
        dead = filters.dead_inputs(self.full, self._trained)
        merged = filters.silence(merged, dead)
        if self.proxy is None or not self.rcfg.distill_steps:
            return merged
        return self.distill(merged, self.teacher(updates), rnd, dead)

    def _mark_trained(self, keeps: Iterable[filters.Keep]) -> None:
        """Remember which filters a device has trained; a layer a keep set omits was kept whole."""
        if not self._trained:
            self._trained = {la.name: torch.zeros(la.channels, dtype=torch.bool) for la in filters.droppable(self.full)}
        for keep in keeps:
            for name, seen in self._trained.items():
                if name in keep:
                    seen[keep[name]] = True
                else:
                    seen.fill_(True)

    @torch.no_grad()
    def teacher(self, updates: Sequence[Update]) -> torch.Tensor:
        """The ensemble: mean over client models of softmax(logits / T) on the proxy set."""
        assert self.proxy is not None
        probs: torch.Tensor | None = None
        for u in updates:
            ratio = ratio_of(u.trained)
            if ratio not in self._teachers:  # not the shape reference self.pruned(), which stays on the CPU
                self._teachers[ratio] = copy.deepcopy(self.pruned(ratio)).to(self.compute)
            model = self._teachers[ratio]
            model.load_state_dict(u.tensors)
            model.eval()
            p = torch.cat([F.softmax(model(xb) / self.rcfg.temperature, 1) for xb in self.proxy.split(512)])
            probs = p if probs is None else probs + p
        assert probs is not None
        return probs / len(updates)

    def distill(self, state: State, teacher: torch.Tensor, rnd: int,
                dead: dict[str, torch.Tensor] | None = None) -> State:
        """KL(teacher || student) at temperature T on proxy mini-batches, starting from the average;
        ``dead`` input columns stay zero (the student learns in the sub-network the devices train)."""
        assert self.proxy is not None
        cfg = self.rcfg
        if self._student is None:
            with torch.random.fork_rng(devices=[]):
                self._student = self.model_fn().to(self.compute)
        student = self._student
        student.load_state_dict(state)
        student.train()
        opt = torch.optim.Adam(student.parameters(), lr=cfg.distill_lr)
        g = torch.Generator().manual_seed(rnd)
        n, t = len(self.proxy), cfg.temperature
        for _ in range(cfg.distill_steps):
            idx = torch.randint(n, (min(cfg.distill_batch, n),), generator=g)
            log_p = F.log_softmax(student(self.proxy[idx]) / t, 1)
            loss = F.kl_div(log_p, teacher[idx], reduction="batchmean") * t * t
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for key, cols in (dead or {}).items():
                    student.get_parameter(key).index_fill_(1, cols.to(self.compute), 0.0)
        return cast_like(copy_state(student), state)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "trained": dict(self._trained)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._trained = dict(state.get("trained", {}))

    # ---- device side
    def local_update(self, task: Task, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        ratio = ratio_of(task.spec)
        sub_state = elastic.extract(state, self.keep_index(state, ratio))
        model = ctx.model(f"reft:{ratio}", lambda: copy.deepcopy(self.pruned(ratio)))
        model.load_state_dict(sub_state)
        samples, loss = sgd_train(model, data, self.cfg, ctx.generator)
        step = self.profile(ratio, tuple(data.x.shape[1:])).step
        return Update(copy_state(model), weight=len(data), samples=samples,
                      work=step.trained(len(data), self.cfg.batch_size, samples),
                      bytes_down=state_bytes(sub_state), metrics={"train_loss": loss, "ratio": ratio},
                      trained=SubModel(Pruned(ratio)))


def ratio_of(spec: SubModel) -> float:
    knob = spec.of(Pruned)
    if knob is None:
        raise FlexrayError(f"reft: a task without a pruning ratio ({spec.log()}); plan sets it")
    return float(knob.ratio)
