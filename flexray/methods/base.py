"""The Method protocol: what a training method tells the driver and the devices.

A method decides *what* each device does (``plan``), *how* a device trains (``local_update``)
and *how* updates are merged (``aggregate``). It never touches Ray, MLflow or the clock, so the
same method runs in sync, async, simulated or real mode. Shaped after Flower's ``Strategy``.

The records a method exchanges with the runtime (``Task``, ``Update``, ``DeviceView``, ...) live
in ``flexray.protocol``; they are re-exported here for the methods' convenience.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from flexray.config import MethodConfig
from flexray.data.datasets import to_tensor
from flexray.errors import FlexrayError
from flexray.methods.service import Link, RoundService
from flexray.models.evaluate import evaluate_model
from flexray.models.profile import ModelProfile, state_bytes
from flexray.protocol import (
    Cost, DeviceProfile, DeviceView, LocalData, State, SubModel, Task, Update,
)


@dataclass(frozen=True)
class ServerData:
    """What the server may use before training (``Method.setup``): the dataset, the indices of
    the training samples no device holds (a held-out slice for proxy training or distillation),
    and where the server computes (the driver's device: DISTREAL's search, REFT's distillation).
    What a method stores or returns from there (states, fronts) stays on the CPU."""

    dataset: Any  # flexray.data.datasets.Dataset
    held_out: Any  # numpy int64 indices into dataset.x_train
    compute: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = False  # tracking.progress: long preparation (a design-space search) shows a bar

    def take(self, count: int, field: str) -> LocalData:
        """The first ``count`` held-out samples as tensors, or a FlexrayError naming ``field``."""
        if len(self.held_out) < count:
            raise FlexrayError(
                f"config error: {field}: needs {count} held-out training samples but devices leave "
                f"{len(self.held_out)}; lower it or cap data.samples_per_device"
            )
        idx = self.held_out[:count]
        ds = self.dataset
        return LocalData(to_tensor(ds.x_train[idx], ds.mean, ds.std), torch.as_tensor(ds.y_train[idx], dtype=torch.long))


class DeviceContext:
    """Device-side helpers: a model cache (one module per spec), the task's RNG and, for a method
    with a round service, the task's link to it (``ctx.service``: the method's own type)."""

    def __init__(self, model_fn: Callable[[], nn.Module], compute: torch.device | None = None) -> None:
        self._model_fn = model_fn
        self.compute = compute or torch.device("cpu")
        """Where the models live and train (the actor's ``fleet.compute_device``); data is there too."""
        self._models: dict[str, nn.Module] = {}
        self.generator = torch.Generator()
        self.device: DeviceView | None = None
        """The device running the current task (profile, trace speed now, deadline): its budget."""
        self.service: Link | None = None

    def model(self, key: str = "full", build: Callable[[], nn.Module] | None = None) -> nn.Module:
        if key not in self._models:
            self._models[key] = (build or self._model_fn)().to(self.compute)
        return self._models[key]

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)
        torch.manual_seed(seed)  # dropout and friends use the global RNG


class Method(ABC):
    """The core every method has; one subclass per file in ``flexray/methods``.

    The server half (``init``, ``plan``, ``aggregate``, ``evaluate``, ``validate``, state) runs on
    the driver; the device half (``local_update``, ``combine``) runs in the actors, on an instance
    built from the same config. What only some methods need -- a sub-model knob, runtime facts, a
    split server, server-side preparation, a per-device model, an async policy -- is a protocol in
    ``flexray.methods.capabilities`` that the runtime discovers with ``isinstance``.
    """

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    linear: ClassVar[bool] = False
    """True when aggregation is a weighted mean, so an actor may pre-sum its devices' updates."""
    engine: ClassVar[str | None] = None
    """``module:Class`` of the engine that runs the method (``flexray.fleet.engine.Engine``; None:
    federated rounds, the only engine with async rounds). Imported only when a job runs it."""
    plans_pool: ClassVar[bool] = False
    """Async rounds: plan a launching device among every device available now (its task's share of
    something common, e.g. the split server, depends on the others), not alone."""

    def __init__(self, cfg: MethodConfig, model_fn: Callable[[], nn.Module]) -> None:
        self.cfg = cfg
        self.model_fn = model_fn
        self.deployed: dict[int, Any] = {}
        """Device -> the knob value it last trained, i.e. the sub-model it would deploy (checkpointed)."""

    @property
    def full(self) -> nn.Module:
        """A reference copy of the full model for shapes and profiles, built once on first use
        without shifting the training RNG stream."""
        if getattr(self, "_full", None) is None:
            with torch.random.fork_rng(devices=[]):
                self._full = self.model_fn()
        return self._full

    def round_service(self) -> RoundService:
        """What the method runs beside the rounds (``flexray.methods.service``); by default nothing."""
        return RoundService()

    def check(self) -> None:
        """Raise a one-line FlexrayError if this method cannot train the configured model; the
        driver calls it before starting Ray so a mismatch costs no cluster start-up."""
        return None

    def derived_params(self) -> dict[str, str]:
        """Choices the config implies but does not spell out (e.g. FlexTrain's classifier rule),
        logged as MLflow params beside it so a run says how it was trained."""
        return {}

    # ---- server half
    def init(self, model: nn.Module) -> State:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def plan(self, rnd: int, devices: Sequence[DeviceView], state: State) -> list[Task]:
        return [Task(device=d.id, round=rnd) for d in devices]

    def cost(self, task: Task, device: DeviceView, profile: ModelProfile) -> Cost:
        work = profile.step.epochs(device.num_samples, self.cfg.batch_size, self.cfg.local_epochs)
        return Cost(work, profile.param_bytes, profile.param_bytes)

    @abstractmethod
    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State: ...

    def evaluate(self, state: State, model: nn.Module, data: LocalData) -> dict[str, float]:
        model.load_state_dict(state)
        return evaluate_model(model, data)

    def validate(self, update: Update, state: State, planned: SubModel | None = None) -> str | None:
        """Why an update must be rejected (wrong keys or shapes, NaN/Inf, not the sub-model it was
        given), or None if it is sound. ``planned`` is the spec of the update's task (None for an
        actor's pre-summed update): the actor and the server both pass it, so the check needs no
        memory of the plan and is the same on either side."""
        for key, value in update.tensors.items():
            ref = state.get(key)
            if ref is None:
                return f"unknown tensor {key!r}"
            if value.shape != ref.shape:
                return f"{key}: shape {tuple(value.shape)} != {tuple(ref.shape)}"
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"{key}: NaN or Inf"
        return None

    def add_mean_device_acc(self, metrics: dict[str, float], key: Callable[[Any], str]) -> None:
        """``mean_device_acc``: each device's accuracy with the sub-model it trains (``key(knob)``
        names that sub-model's accuracy metric), averaged over every device planned so far."""
        accs = [metrics[key(v)] for v in self.deployed.values() if key(v) in metrics]
        if accs:
            metrics["mean_device_acc"] = sum(accs) / len(accs)

    def state_dict(self) -> dict[str, Any]:
        """Server-side method state beyond the global weights (checkpointed)."""
        return {"deployed": dict(self.deployed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.deployed = dict(state.get("deployed", {}))

    # ---- device half (runs in the actors, on a copy built from the same config)
    @abstractmethod
    def local_update(self, task: Task, state: State, data: LocalData, ctx: DeviceContext) -> Update: ...

    def combine(self, updates: Sequence[Update]) -> Update:
        """Pre-sum on the actor (only when ``linear``): one weighted-mean update in float64."""
        total = sum(u.weight for u in updates)
        return Update(
            tensors=weighted_mean(updates),
            weight=total,
            samples=sum(u.samples for u in updates),
        )


# ---------------------------------------------------------------- shared helpers


def weighted_mean(updates: Sequence[Update], like: State | None = None) -> dict[str, torch.Tensor]:
    """Sample-weighted mean, accumulated in float64 so pre-summed and flat results agree.

    Results keep float64 so an actor's partial mean loses nothing; ``cast_like`` restores dtypes.
    """
    total = sum(u.weight for u in updates)
    out: dict[str, torch.Tensor] = {}
    for key in updates[0].tensors:
        acc = torch.zeros_like(updates[0].tensors[key], dtype=torch.float64)
        for u in updates:
            acc += u.tensors[key].to(torch.float64) * (u.weight / total)
        out[key] = acc
    return out


def check_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str) -> str | None:
    """Why a sub-model update does not match the sub-model ``what`` names (its keys and shapes
    exactly, finite values), or None: the shared check of the methods that ship sub-models."""
    if set(tensors) != set(expected):
        odd = min(set(tensors) ^ set(expected))
        return f"{odd}: {'unknown' if odd in tensors else 'missing'} tensor for {what}"
    for key, value in tensors.items():
        if value.shape != expected[key]:
            return f"{key}: shape {tuple(value.shape)} != {tuple(expected[key])} ({what})"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{key}: NaN or Inf"
    return None


def cast_like(tensors: Mapping[str, torch.Tensor], like: State) -> State:
    """Back to the global state's dtypes (integer buffers are rounded)."""
    out: State = {}
    for k, ref in like.items():
        v = tensors[k]
        out[k] = v.round().to(ref.dtype) if not ref.is_floating_point() else v.to(ref.dtype)
    return out


def local_batches(n: int, cfg: MethodConfig, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of every local mini-batch: a fresh shuffle per epoch. Every local trainer
    uses it, so methods compared on one seed see the same batches in the same order."""
    for _ in range(cfg.local_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            yield order[start : start + cfg.batch_size]


def sgd_train(
    model: nn.Module,
    data: LocalData,
    cfg: MethodConfig,
    generator: torch.Generator,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[int, float]:
    """Plain local SGD over shuffled mini-batches; returns (samples processed, mean loss).

    ``batch_loss(x, y)`` replaces cross-entropy of ``model(x)`` (e.g. self-distillation);
    ``extra_loss(model)`` is added to it (e.g. FedProx's proximal term)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    ce = nn.CrossEntropyLoss()
    loss_fn = batch_loss or (lambda x, y: ce(model(x), y))
    seen, loss_sum = 0, 0.0
    for idx in local_batches(len(data), cfg, generator):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(data.x[idx], data.y[idx])
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        opt.step()
        seen += len(idx)
        loss_sum += float(loss.detach()) * len(idx)
    return seen, loss_sum / max(seen, 1)


def copy_state(model: nn.Module) -> State:
    """The model's weights as an update carries them: copies on the CPU (the object store's side)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


__all__ = [
    "Cost", "DeviceContext", "DeviceProfile", "DeviceView", "LocalData", "Method", "ServerData",
    "State", "SubModel", "Task", "Update",
    "cast_like", "check_tensors", "copy_state", "evaluate_model", "sgd_train", "state_bytes", "weighted_mean",
]
