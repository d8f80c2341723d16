"""Shared server and device logic of the width-scaling methods (HeteroFL, FjORD, FedRolex).

Each device trains a width-``p`` sub-model of one global model (``flexray.models.elastic``);
the subclasses differ only in which channels a sub-model holds (leading or a rolling window)
and in how a device trains it. Sub-models of different shapes cannot be pre-summed on an
actor, so ``linear`` is False.

Static rate assignment (the papers' capability tiers): ``rate`` forces one rate on every device
(FedSmall); else ``tiers`` maps a device class to its rate; else a device gets the largest rate
``p`` with ``p^2 <= flops / full_rate_flops`` (a conv net's FLOPs scale with ``p^2``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from flexray.config import MethodConfig
from flexray.errors import FlexrayError
from flexray.methods.base import DeviceContext, Method, cast_like, check_tensors, copy_state, evaluate_model, sgd_train
from flexray.methods.batched import StepLoss, batched_sgd_train, why_not_batched
from flexray.models import elastic, slices
from flexray.models.channels import channel_groups
from flexray.models.profile import ModelProfile, ProfileCache, state_bytes, training_memory_bytes
from flexray.protocol import Cost, DeviceProfile, DeviceView, Knob, LocalData, State, StepProfile, SubModel, Task, Update, Workload

RATES = (1.0, 0.5, 0.25, 0.125, 0.0625)
LABELS = "_labels"
"""Update key of the bool vector of labels a device holds (masked classifier aggregation)."""


@dataclass(frozen=True)
class Width(Knob):
    """The width methods' knob (HeteroFL, FjORD, FedRolex)."""

    rate: float  # width fraction p
    offset: int | None = None  # FedRolex: where the rolling width window starts


class WidthConfig(MethodConfig):
    rates: list[float] = Field(default_factory=lambda: list(RATES), min_length=1, description="allowed width rates")
    rate: float | None = Field(None, description="every device trains this rate (e.g. FedSmall); overrides tiers")
    tiers: dict[str, float] = Field(default_factory=dict, description="device class -> rate (static tiers)")
    full_rate_flops: float = Field(
        100e9, gt=0, description="FLOP/s that earns rate 1; slower devices: largest p with p^2 <= flops/this"
    )
    scaler: bool | Literal["auto"] = Field(
        "auto", description="HeteroFL scaler: each layer's input x full/kept fan-in (elastic.FanInScaler); "
        "auto: on for models with BatchNorm, which keeps it from multiplying step sizes"
    )
    static_bn: bool = Field(True, description="ship no BN running stats; evaluate BN with batch statistics")
    masked_classifier: bool = Field(True, description="train and aggregate only the classifier rows of local labels")
    eval_rates: bool = Field(True, description="also evaluate every sub-model (leading channels): acc_p{rate}")

    @field_validator("rates")
    @classmethod
    def _rates_ok(cls, v: list[float]) -> list[float]:
        bad = [r for r in v if not 0 < r <= 1]
        if bad:
            raise ValueError(f"width rates must be in (0, 1], got {bad[0]}")
        return sorted({float(r) for r in v}, reverse=True)

    @field_validator("rate")
    @classmethod
    def _rate_known(cls, v: float | None, info: ValidationInfo) -> float | None:
        rates = info.data.get("rates", RATES)
        if v is not None and v not in rates:
            raise ValueError(f"{v} is not one of rates {list(rates)}")
        return v

    @field_validator("tiers")
    @classmethod
    def _tiers_known(cls, v: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        rates = info.data.get("rates", RATES)
        for name, r in v.items():
            if r not in rates:
                raise ValueError(f"{name}: {r} is not one of rates {list(rates)}")
        return v


def tier_rate(cfg: WidthConfig, profile: DeviceProfile) -> float:
    """The static rate of a device class (see module doc)."""
    if cfg.rate is not None:
        return cfg.rate
    if profile.name in cfg.tiers:
        return cfg.tiers[profile.name]
    ratio = profile.flops / cfg.full_rate_flops
    fits = [p for p in cfg.rates if p * p <= ratio * (1 + 1e-9)]
    return max(fits) if fits else min(cfg.rates)


class WidthMethod(Method):
    """Base of the width-scaling methods; a subclass sets ``name``, ``Config`` and maybe ``offset``."""

    Config: ClassVar[type[MethodConfig]] = WidthConfig
    linear = False
    cfg: WidthConfig

    def __init__(self, cfg: MethodConfig, model_fn: Callable[[], nn.Module]) -> None:
        super().__init__(cfg, model_fn)
        self._index: dict[tuple[float, int | None], elastic.Index] = {}
        self._profiles = ProfileCache()
        self._eval_models: dict[float, nn.Module] = {}
        self._up_bytes: dict[float, int] = {}

    @property
    def scaled(self) -> bool:
        """Whether sub-models get the fan-in scaler (``scaler: auto``: when the model has BatchNorm)."""
        return elastic.normalised(self.full) if self.wcfg.scaler == "auto" else bool(self.wcfg.scaler)

    @property
    def wcfg(self) -> WidthConfig:
        return self.cfg

    # ---- shared pieces
    def offset(self, rnd: int) -> int | None:
        """Start of the channel window in round ``rnd``; None keeps the leading channels."""
        return None

    def index(self, rate: float, rnd: int) -> elastic.Index:
        key = (rate, self.offset(rnd))
        if key not in self._index:
            self._index = {k: v for k, v in self._index.items() if k[1] == key[1]}  # drop past windows
            self._index[key] = slices.sub_index(self.full, rate, key[1])
        return self._index[key]

    def build(self, rate: float, scaler: bool | None = None) -> nn.Module:
        """A width-``rate`` model (with HeteroFL's scaler hooks when configured)."""
        with torch.random.fork_rng(devices=[]):
            model = slices.narrow(self.full, rate)
        if self.scaled if scaler is None else scaler:
            elastic.add_scalers(model, self.full)
        return model

    def sub_profile(self, rate: float, input_shape: tuple[int, ...]) -> ModelProfile:
        return self._profiles.get(rate, input_shape, lambda: self.build(rate, scaler=False))

    def shipped(self, key: str) -> bool:
        """Whether a device sends this entry back (static BN keeps running stats home)."""
        return not (self.wcfg.static_bn and elastic.is_bn_stat(key))

    def expected_shapes(self, rate: float, state: State) -> dict[str, torch.Size]:
        shapes = slices.sub_shapes(self.full, rate)
        out = {k: s for k, s in shapes.items() if self.shipped(k)}
        if self.wcfg.masked_classifier:
            head = elastic.classifier_keys(self.full)
            if head:
                out[LABELS] = torch.Size([state[head[0]].shape[0]])
        return out

    def label_mask(self, data: LocalData, state: State) -> torch.Tensor | None:
        head = elastic.classifier_keys(self.full)
        if not self.wcfg.masked_classifier or not head:
            return None
        mask = torch.zeros(state[head[0]].shape[0], dtype=torch.bool)  # shipped: on the CPU
        mask[data.y.unique().cpu()] = True
        return mask

    def _input_shape(self, profile: ModelProfile) -> tuple[int, ...]:
        if profile.input_shape is None:
            raise FlexrayError(f"method {self.name}: the model profile lacks input_shape; build it with profile_model")
        return profile.input_shape

    def _shipped_bytes(self, rate: float) -> int:
        if rate not in self._up_bytes:
            like = self.full.state_dict()
            shapes = self.expected_shapes(rate, like)
            sizes = {k: like[k].element_size() if k in like else 1 for k in shapes}  # LABELS: 1 byte each
            self._up_bytes[rate] = sum(s.numel() * sizes[k] for k, s in shapes.items())
        return self._up_bytes[rate]

    def check(self) -> None:
        channel_groups(self.full)  # the model's channel groups must trace, and slice exactly

    # ---- the scheduler's knob
    def options(self) -> list[SubModel]:
        rates = [self.wcfg.rate] if self.wcfg.rate is not None else self.wcfg.rates
        return [SubModel(Width(r)) for r in rates]

    def static_option(self, device: DeviceProfile) -> SubModel:
        return SubModel(Width(tier_rate(self.wcfg, device)))

    def option_memory_bytes(self, option: SubModel, input_shape: tuple[int, ...], batch_size: int) -> float:
        return training_memory_bytes(self.sub_profile(rate_of(option), input_shape), batch_size)

    def device_model(self, state: State, model: nn.Module, option: SubModel | None) -> nn.Module:
        rate = 1.0 if option is None else rate_of(option)
        if rate == 1:
            model.load_state_dict(state)
            return model
        sub = self.build(rate)
        sub.load_state_dict(elastic.extract(state, slices.sub_index(self.full, rate)))
        return sub

    # ---- server side
    def plan(self, rnd: int, devices: Sequence[DeviceView], state: State) -> list[Task]:
        """The scheduler's choice per device, else the static tier (see module doc)."""
        tasks = []
        for d in devices:
            rate = rate_of(d.choice) if d.choice is not None else tier_rate(self.wcfg, d.profile)
            tasks.append(Task(device=d.id, round=rnd, spec=self.spec(rnd, rate)))
        self.deployed.update({t.device: rate_of(t.spec) for t in tasks})
        return tasks

    def spec(self, rnd: int, rate: float) -> SubModel:
        """The sub-model of a device at ``rate`` in round ``rnd`` (FedRolex: its window too)."""
        return SubModel(Width(rate, self.offset(rnd)))

    def cost(self, task: Task, device: DeviceView, profile: ModelProfile) -> Cost:
        rate = rate_of(task.spec)
        sub = self.sub_profile(rate, self._input_shape(profile))
        step = self.step_of(rate, sub.input_shape or ())
        return Cost(step.epochs(device.num_samples, self.cfg.batch_size, self.wcfg.local_epochs), sub.param_bytes,
                    self._shipped_bytes(rate))

    def step_of(self, rate: float, input_shape: tuple[int, ...]) -> StepProfile:
        """One predicted SGD step of a task at ``rate``: the sub-model's own traced kernels
        (FjORD: expected over its rates), not the full model's scaled by FLOPs."""
        return self.sub_profile(rate, input_shape).step

    def validate(self, update: Update, state: State, planned: SubModel | None = None) -> str | None:
        trained = update.trained.of(Width) if update.trained is not None else None
        rate = trained.rate if trained is not None else None
        if rate is None or float(rate) not in self.wcfg.rates:
            return f"update has no allowed width rate (got {rate!r})"
        want = planned.of(Width) if planned is not None else None
        if want is not None and want.rate != float(rate):
            return f"update trained rate {rate}, planned {want.rate}"
        return check_tensors(update.tensors, self.expected_shapes(float(rate), state), f"rate {rate}")

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        if not updates:
            return state
        parts = []
        for u in updates:
            tensors = dict(u.tensors)
            rows = tensors.pop(LABELS, None)
            parts.append(elastic.Part(tensors, self.index(rate_of(u.trained), rnd), u.weight, rows))
        merged = elastic.aggregate(state, parts, classifier=elastic.classifier_keys(self.full))
        return cast_like(merged, state)

    def evaluate(self, state: State, model: nn.Module, data: LocalData) -> dict[str, float]:
        model.load_state_dict(state)
        with elastic.batch_stat_bn(model, self.wcfg.static_bn):
            metrics = evaluate_model(model, data)
        if self.wcfg.eval_rates:
            for rate in self.wcfg.rates:
                if rate == 1:
                    continue
                if rate not in self._eval_models:
                    self._eval_models[rate] = self.build(rate)
                sub = self._eval_models[rate]
                sub.load_state_dict(elastic.extract(state, slices.sub_index(self.full, rate)))
                with elastic.batch_stat_bn(sub, self.wcfg.static_bn):
                    metrics[f"acc_p{rate:g}"] = evaluate_model(sub, data)["accuracy"]
            metrics["acc_p1"] = metrics["accuracy"]
            self.add_mean_device_acc(metrics, lambda rate: f"acc_p{rate:g}")
        return metrics

    # ---- device side
    def local_update(self, task: Task, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        """Train the task's sub-model with plain local SGD (HeteroFL, FedRolex)."""
        rate = rate_of(task.spec)
        sub = elastic.extract(state, self.index(rate, task.round))
        model = self.sub_model(rate, task.round, ctx)
        model.load_state_dict(sub)
        labels = self.label_mask(data, state)
        with elastic.mask_logits(model, labels):
            samples, loss = sgd_train(model, data, self.cfg, ctx.generator)
        step = self.sub_profile(rate, tuple(data.x.shape[1:])).step
        work = step.trained(len(data), self.cfg.batch_size, samples)
        return self.finish(copy_state(model), labels, rate, len(data), samples, work, state_bytes(sub), loss)

    def sub_model(self, rate: float, rnd: int, ctx: DeviceContext) -> nn.Module:
        """The device's cached width-``rate`` model, its channel maps at this round's window."""
        model = ctx.model(f"{self.name}:{rate}", lambda: self.build(rate))
        slices.rewire(self.full, model, rate, self.offset(rnd))
        return model

    # BatchesClients: the devices of one rate (and, for FedRolex, one window) share a shape.
    def batch_key(self, task: Task, ctx: DeviceContext) -> Hashable | None:
        rate = rate_of(task.spec)
        return (rate, self.offset(task.round)) if why_not_batched(self.sub_model(rate, task.round, ctx)) is None else None

    def local_updates(
        self, tasks: Sequence[Task], state: State, datas: Sequence[LocalData], generators: Sequence[torch.Generator],
        ctx: DeviceContext,
    ) -> list[Update]:
        rate, rnd = rate_of(tasks[0].spec), tasks[0].round
        sub = elastic.extract(state, self.index(rate, rnd))
        model = self.sub_model(rate, rnd, ctx)
        model.load_state_dict(sub)
        labels = [self.label_mask(d, state) for d in datas]
        masks = None if labels[0] is None else [m for m in labels if m is not None]
        shape = tuple(datas[0].x.shape[1:])
        results = batched_sgd_train(model, datas, self.cfg, generators, self.step_loss(model, rate, shape, ctx), masks=masks)
        step = self.sub_profile(rate, shape).step
        return [self.finish(r.state, m, rate, len(d), r.samples,
                            r.work or step.trained(len(d), self.cfg.batch_size, r.samples), state_bytes(sub), r.loss)
                for r, m, d in zip(results, labels, datas)]

    def step_loss(self, model: nn.Module, rate: float, shape: tuple[int, ...], ctx: DeviceContext) -> StepLoss:
        """What one stacked step minimises (FjORD: a drawn width, maybe distilled)."""
        return StepLoss(model)

    def finish(
        self, state: State, labels: torch.Tensor | None, rate: float, weight: int, samples: int, work: Workload,
        bytes_down: int, loss: float,
    ) -> Update:
        """The update a device sends: shipped entries of its sub-model, its labels, and its rate."""
        tensors = {k: v for k, v in state.items() if self.shipped(k)}
        if labels is not None:
            tensors[LABELS] = labels
        return Update(
            tensors, weight=weight, samples=samples,
            work=work, bytes_down=bytes_down, metrics={"train_loss": loss, "rate": rate}, trained=SubModel(Width(rate)),
        )


def rate_of(spec: SubModel) -> float:
    knob = spec.of(Width)
    if knob is None:
        raise FlexrayError(f"width method: a task without a width rate ({spec.log()}); the scheduler or plan sets it")
    return float(knob.rate)
