"""The protocol: typed records that cross layers, at the bottom of flexray's import stack.

Methods, the scheduler, the fleet, the runtime and the CLI all speak in these types, so this
module imports nothing of flexray's (see ``docs/architecture.md``, "Layers"). It also holds the
latency and energy formulas (``predict_times``, ``energy_j``): methods, the scheduler and the
actors' throttle price a task with the same two functions, so a prediction and a simulated round
can never disagree about what a device costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DeviceProfile:
    """A device class (``flexray.fleet.profiles.CATALOG`` lists the built-in ones)."""

    name: str
    flops: float  # sustained TRAINING FLOP/s (not peak) on this device with PyTorch
    memory_bytes: int  # memory usable for training
    uplink_bps: float  # bits per second
    downlink_bps: float
    power_active_w: float  # while computing
    power_idle_w: float
    power_radio_w: float  # extra power while transmitting/receiving


@dataclass(frozen=True)
class DesignPoint:
    """One point of a dropout design front (DISTREAL): a rate per droppable layer, the training
    FLOPs per sample it costs and the error it is predicted to reach."""

    rates: tuple[float, ...]
    flops: float
    error: float


@dataclass(frozen=True)
class SubModel:
    """What one device trains: the one typed description every method's knob fits in.

    Schedulers choose sub-models, methods extract and aggregate them, the runtime only carries
    them; a field a method does not use stays at its default. The event log's ``spec`` column
    holds ``log()``.
    """

    rate: float | None = None  # width fraction p (HeteroFL, FjORD, FedRolex)
    offset: int | None = None  # FedRolex: where the rolling width window starts
    k: int | None = None  # depth prefix, in blocks (FlexTrain, FedClass)
    mode: str | None = None  # FlexTrain: "centralised" trains the whole elastic model data-parallel
    ratio: float | None = None  # structured pruning ratio (REFT)
    cut: int | None = None  # SplitFed: stages the client trains (the last stage: no split)
    theta: float | None = None  # SplitFed: the client's share of the split server
    layers: tuple[str, ...] = ()  # DISTREAL: the droppable layers, in ``DesignPoint.rates`` order
    points: tuple[DesignPoint, ...] = ()  # DISTREAL: the front a device picks its dropout from
    memory_bytes: float | None = None  # training memory, when the method predicts it per task
    predicted_s: float | None = None  # the method's own latency prediction

    def log(self) -> dict[str, Any]:
        """The fields in use, as JSON-ready values (the front by its size)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value == ():
                continue
            out[f.name] = len(value) if f.name == "points" else list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class DeviceView:
    """What the server knows about a device when planning a round."""

    id: int
    profile: DeviceProfile
    speed: float
    num_samples: int
    deadline_s: float | None = None  # the round's deadline, so a device can size its own work
    choice: SubModel | None = None
    """The sub-model the scheduler picked; None: the method's own rule."""


@dataclass(frozen=True)
class Task:
    """One device's work for one round."""

    device: int
    round: int
    spec: SubModel = SubModel()


@dataclass(frozen=True)
class Cost:
    """Predicted work of a task, the input of the latency/energy model."""

    flops: float
    bytes_down: int
    bytes_up: int
    server_s: float = 0.0  # simulated time the device waits on a split server


@dataclass(frozen=True)
class ServerSpec:
    """A split-learning server a method needs the runtime to host (``flexray/runtime/split_server.py``)."""

    shared: bool  # one server model for all clients (SplitFed-V2) or a copy per client (V1)
    server_flops: tuple[float, ...]  # server training FLOPs per sample, indexed by cut - 1
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    num_cpus: float = 1.0
    max_clients: int = 64  # clients served concurrently
    num_gpus: float | None = None  # its GPU share (Ray's num_gpus); None: the fleet's fleet.num_gpus_per_actor


@dataclass
class Update:
    """What a device sends back. ``weight`` is its aggregation weight (usually samples)."""

    tensors: dict[str, torch.Tensor]
    weight: float
    samples: int
    flops: float | None = None  # None: the actor counts samples x counted per-sample FLOPs
    bytes_down: int | None = None  # None: bytes of the global state that was shipped
    metrics: dict[str, float] = field(default_factory=dict)
    device: int = -1  # set by the actor; -1 for an actor's pre-summed update
    staleness: int = 0  # set by the async driver: server versions since the device's copy
    trained: SubModel | None = None
    """The sub-model these tensors were trained on (width rate, depth k, pruning ratio, the dropout
    point picked): what the server's ``validate`` and ``aggregate`` read. ``metrics`` only logs."""


@dataclass
class LocalData:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


class CostModel(Protocol):
    """What a task costs a device: every method has it (``Method.cost``)."""

    def cost(self, task: Task, device: DeviceView, profile: Any) -> Cost: ...


@runtime_checkable
class SubModelKnob(CostModel, Protocol):
    """The capability of a method that trains sub-models: the menu of options (largest first),
    the static tier of a device class and an option's training memory. ``flexray.schedule`` and
    ``flexray.fleet.latency`` discover it with ``isinstance``; a method without it is planned whole."""

    def options(self) -> list[SubModel]: ...

    def static_option(self, device: DeviceProfile) -> SubModel | None: ...

    def option_memory_bytes(self, option: SubModel, input_shape: tuple[int, ...], batch_size: int) -> float: ...


@runtime_checkable
class PlanNotes(Protocol):
    """A method with something to say under ``flexray plan``'s table (SplitFed: server shares)."""

    def plan_notes(self, tasks: Sequence[Task]) -> list[str]: ...


# ---------------------------------------------------------------- the latency and energy model


def energy_j(profile: DeviceProfile, compute_s: float, comm_s: float, idle_s: float = 0.0) -> float:
    """Joules a device spends on one task.

    compute: ``power_active_w`` is whole-device power under full compute load, so it already
    includes the baseline. communication: the device is otherwise idle, so it pays its idle
    baseline plus the radio's extra ``power_radio_w`` (radios are measured as a delta over
    idle). waiting (``idle_s``, e.g. for a straggler or the server): idle baseline only.
    Compute and communication are treated as sequential, the conservative case for a
    round-based protocol (download, train, upload).
    """
    return (
        profile.power_active_w * compute_s
        + profile.power_radio_w * comm_s
        + profile.power_idle_w * (comm_s + idle_s)
    )


def predict_times(
    profile: DeviceProfile, speed: float, flops: float, bytes_down: float, bytes_up: float
) -> tuple[float, float, float]:
    """(download_s, compute_s, upload_s) for ``flops`` of training at trace ``speed``,
    with bandwidth in bits/s and payloads in bytes."""
    download_s = 8.0 * bytes_down / profile.downlink_bps
    compute_s = flops / (profile.flops * speed)
    upload_s = 8.0 * bytes_up / profile.uplink_bps
    return download_s, compute_s, upload_s
