"""The protocol: typed records that cross layers, at the bottom of flexray's import stack.

Methods, the scheduler, the fleet, the runtime and the CLI all speak in these types, so this
module imports nothing of flexray's (see ``docs/architecture.md``, "Layers"). It also holds the
latency and energy formulas (``predict_times``, ``energy_j``): methods, the scheduler and the
actors' throttle price a task with the same two functions, so a prediction and a simulated round
can never disagree about what a device costs.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class KindRates:
    """How fast a device runs one kind of kernel: each kernel costs
    ``kernel_s + flops / flops_per_s + bytes / bytes_per_s + rows * row_s`` (``inf``: not limiting)."""

    flops_per_s: float = math.inf
    bytes_per_s: float = math.inf
    kernel_s: float = 0.0
    row_s: float = 0.0


@dataclass(frozen=True)
class LatencyParams:
    """A device's calibrated per-layer latency model (``flexray probe`` fits it; docs/latency.md)."""

    step_s: float  # fixed cost of one optimizer step (Python, autograd engine, zero_grad)
    kinds: tuple[KindRates, ...]  # one per ``KINDS``

    def coefficients(self) -> tuple[float, ...]:
        """Seconds per unit of ``Workload.features()`` (counted FLOPs, the last, cost nothing here)."""
        return (
            self.step_s, *(k.kernel_s for k in self.kinds), *(1.0 / k.flops_per_s for k in self.kinds),
            *(1.0 / k.bytes_per_s for k in self.kinds), *(k.row_s for k in self.kinds), 0.0,
        )

    @classmethod
    def from_coefficients(cls, c: Sequence[float]) -> LatencyParams:
        n = len(KINDS)
        rate = (lambda v: 1.0 / v if v > 0 else math.inf)
        return cls(float(c[0]), tuple(
            KindRates(rate(c[1 + n + i]), rate(c[1 + 2 * n + i]), float(c[1 + i]), float(c[1 + 3 * n + i])) for i in range(n)))

    def scaled(self, speedup: float) -> LatencyParams:
        """The same device ``speedup`` times faster at everything (a catalog class from a reference)."""
        return LatencyParams.from_coefficients([c / speedup for c in self.coefficients()])


@dataclass(frozen=True)
class DeviceProfile:
    """A device class (``flexray.fleet.profiles.CATALOG`` lists the built-in ones).

    ``flops`` alone is the coarse model (time = counted FLOPs / flops); ``latency`` is the
    calibrated per-layer model that replaces it for compute when present."""

    name: str
    flops: float  # sustained TRAINING FLOP/s (not peak) on this device with PyTorch
    memory_bytes: int  # memory usable for training
    uplink_bps: float  # bits per second
    downlink_bps: float
    power_active_w: float  # while computing
    power_idle_w: float
    power_radio_w: float  # extra power while transmitting/receiving
    latency: LatencyParams | None = None
    rtt_s: float = 0.0  # round-trip time: what every message pays before its bytes flow


KINDS = ("conv", "grouped", "matmul", "attention", "pool", "norm", "memory")
"""Kernel kinds whose speed differs on real hardware: dense convs, grouped/depthwise convs,
matmuls (linear layers), attention, pooling, normalisation and the other memory-bound kernels
(activations, elementwise, the optimizer's updates)."""

Vector = tuple[float, ...]  # one number per kind, in ``KINDS`` order
_ZERO: Vector = (0.0,) * len(KINDS)


def _vec(kind: str, value: float) -> Vector:
    out = [0.0] * len(KINDS)
    out[KINDS.index(kind)] = float(value)
    return tuple(out)


@dataclass(frozen=True)
class Workload:
    """Training work as the latency model sees it: counts that add up across kernels, steps and
    tasks, so a task's time is one dot product with a device's rates (``compute_seconds``).
    ``flexray.models.kernels`` counts them from a traced training step."""

    steps: float = 0.0  # optimizer steps: each pays the device's fixed per-step cost
    counted: float = 0.0  # FLOPs as torch.utils.flop_counter counts them (what logs and coarse profiles use)
    kernels: Vector = _ZERO  # kernels launched, per kind: each pays a per-kernel cost
    flops: Vector = _ZERO  # FLOPs as executed, per kind: channel dims rounded up to the vector width
    bytes: Vector = _ZERO  # bytes read + written, per kind
    rows: Vector = _ZERO  # image planes (N x C) or token rows a kernel loops over, per kind

    @classmethod
    def kernel(cls, kind: str, counted: float, executed: float, nbytes: float, rows: float) -> Workload:
        return cls(0.0, counted, _vec(kind, 1.0), _vec(kind, executed), _vec(kind, nbytes), _vec(kind, rows))

    @classmethod
    def coarse(cls, flops: float) -> Workload:
        """Work known only by its FLOPs (a server's aggregation), costed as one dense-conv kernel."""
        return cls(counted=flops, flops=_vec("conv", flops))

    def __add__(self, other: Workload) -> Workload:
        return Workload(self.steps + other.steps, self.counted + other.counted, _add(self.kernels, other.kernels, 1.0),
                        _add(self.flops, other.flops, 1.0), _add(self.bytes, other.bytes, 1.0),
                        _add(self.rows, other.rows, 1.0))

    def __sub__(self, other: Workload) -> Workload:
        return Workload(self.steps - other.steps, self.counted - other.counted, _add(self.kernels, other.kernels, -1.0),
                        _add(self.flops, other.flops, -1.0), _add(self.bytes, other.bytes, -1.0),
                        _add(self.rows, other.rows, -1.0))

    def __mul__(self, k: float) -> Workload:
        return Workload(self.steps * k, self.counted * k, tuple(a * k for a in self.kernels), tuple(a * k for a in self.flops),
                        tuple(a * k for a in self.bytes), tuple(a * k for a in self.rows))

    __rmul__ = __mul__

    def clip(self) -> Workload:
        """Negative counts (float noise of an affine fit) to zero."""
        return Workload(max(self.steps, 0.0), max(self.counted, 0.0), tuple(max(a, 0.0) for a in self.kernels),
                        tuple(max(a, 0.0) for a in self.flops), tuple(max(a, 0.0) for a in self.bytes),
                        tuple(max(a, 0.0) for a in self.rows))

    def features(self) -> tuple[float, ...]:
        """(steps, kernels, executed FLOPs, bytes and rows per kind, counted FLOPs): a task's time is
        their dot product with ``coefficients(profile)``."""
        return (self.steps, *self.kernels, *self.flops, *self.bytes, *self.rows, self.counted)


def _add(a: Vector, b: Vector, sign: float) -> Vector:
    return tuple(x + sign * y for x, y in zip(a, b))


@dataclass(frozen=True)
class StepProfile:
    """One training step of a model: ``fixed`` per step (weights, optimizer state, kernel count)
    plus ``per_sample`` times the batch (activations, FLOPs)."""

    fixed: Workload
    per_sample: Workload

    def __add__(self, other: StepProfile) -> StepProfile:
        return StepProfile(self.fixed + other.fixed, self.per_sample + other.per_sample)

    def __mul__(self, k: float) -> StepProfile:
        """Weighted (a mixture of steps, a share of one): counts scale, as costs do."""
        return StepProfile(self.fixed * k, self.per_sample * k)

    __rmul__ = __mul__

    def step(self, batch_size: int) -> Workload:
        return self.fixed + self.per_sample * batch_size

    def epochs(self, samples: int, batch_size: int, epochs: float = 1.0) -> Workload:
        """``epochs`` passes over ``samples`` in mini-batches (the last one partial)."""
        steps = -(-int(samples) // max(int(batch_size), 1))
        return (self.fixed * steps + self.per_sample * samples) * epochs

    def trained(self, num_samples: int, batch_size: int, samples: float) -> Workload:
        """What training ``samples`` on a shard of ``num_samples`` costs: as many passes over it
        (``epochs``) as that makes, a partial pass counted pro rata (an ``Update``'s work)."""
        return self.epochs(num_samples, batch_size, samples / max(num_samples, 1))


class Knob:
    """A method's own setting of what one device trains -- a width rate, a depth, a pruning ratio,
    a cut and server share, a dropout front. Subclass it as a frozen dataclass in the method's
    file; only that method reads it. ``log()`` is its form in the event log's ``spec`` column."""

    def log(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is not None and value != ():
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


K = TypeVar("K", bound=Knob)


@dataclass(frozen=True)
class SubModel:
    """What one device trains, as the runtime and the scheduler see it: a predicted cost, a
    memory need and a label for the event log. What the method itself needs to build it is its
    ``knob``, a typed record only that method reads (``None``: the whole model)."""

    knob: Knob | None = None
    memory_bytes: float | None = None  # training memory, when the method predicts it per task
    predicted_s: float | None = None  # the method's own latency prediction

    def of(self, kind: type[K]) -> K | None:
        """The knob as the method's own type (None when absent or another method's)."""
        return self.knob if isinstance(self.knob, kind) else None

    def log(self) -> dict[str, Any]:
        """The knob's fields in use, then the cost figures, as JSON-ready values."""
        out = self.knob.log() if self.knob is not None else {}
        for name in ("memory_bytes", "predicted_s"):
            if (value := getattr(self, name)) is not None:
                out[name] = value
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

    work: Workload
    bytes_down: int
    bytes_up: int
    server_s: float = 0.0  # simulated time the device waits on a server the method runs
    round_trips: float = 0.0  # messages exchanged while training (split learning: one per step)

    @property
    def flops(self) -> float:
        """Counted FLOPs, for logs."""
        return self.work.counted


@dataclass
class Update:
    """What a device sends back. ``weight`` is its aggregation weight (usually samples)."""

    tensors: dict[str, torch.Tensor]
    weight: float
    samples: int
    work: Workload | None = None  # what was trained; None: the model's SGD steps over ``samples``
    bytes_down: int | None = None  # None: bytes of the global state that was shipped
    metrics: dict[str, float] = field(default_factory=dict)
    device: int = -1  # set by the actor; -1 for an actor's pre-summed update
    staleness: int = 0  # set by the async driver: server versions since the device's copy
    trained: SubModel | None = None
    """The sub-model these tensors were trained on (its knob: the width rate, depth, pruning ratio,
    dropout point picked): what the server's ``validate`` and ``aggregate`` read. ``metrics`` only logs."""

    @property
    def flops(self) -> float | None:
        """Counted FLOPs of ``work``, for logs (None: the actor counts them)."""
        return self.work.counted if self.work is not None else None


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
    """A method with something to say under ``flexray plan``'s table (e.g. how it shares a server)."""

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


def coefficients(profile: DeviceProfile) -> tuple[float, ...]:
    """Seconds per unit of ``Workload.features()`` on ``profile``: its calibrated per-layer model,
    else (the coarse form) counted FLOPs over ``profile.flops``."""
    if profile.latency is not None:
        return profile.latency.coefficients()
    return (0.0,) * (1 + 4 * len(KINDS)) + (1.0 / profile.flops,)


def compute_seconds(profile: DeviceProfile, work: Workload, speed: float = 1.0) -> float:
    """Seconds ``profile`` needs for ``work`` at trace ``speed`` (a linear model: see ``coefficients``)."""
    return sum(c * f for c, f in zip(coefficients(profile), work.features())) / speed


def transfer_seconds(profile: DeviceProfile, nbytes: float, bps: float, messages: float = 1.0) -> float:
    """``messages`` round trips plus ``nbytes`` at ``bps`` bits/s; nothing sent costs nothing."""
    return (profile.rtt_s * messages if nbytes > 0 else 0.0) + 8.0 * nbytes / bps


def predict_times(
    profile: DeviceProfile, speed: float, work: Workload, bytes_down: float, bytes_up: float, round_trips: float = 0.0,
) -> tuple[float, float, float]:
    """(download_s, compute_s, upload_s) of one task, with bandwidth in bits/s and payloads in bytes;
    ``round_trips`` exchanged while training (split learning) are counted with the upload."""
    download_s = transfer_seconds(profile, bytes_down, profile.downlink_bps)
    compute_s = compute_seconds(profile, work, speed)
    upload_s = transfer_seconds(profile, bytes_up, profile.uplink_bps) + profile.rtt_s * round_trips
    return download_s, compute_s, upload_s


def cost_times(profile: DeviceProfile, speed: float, cost: Cost) -> tuple[float, float, float]:
    """``predict_times`` of a task's ``Cost``."""
    return predict_times(profile, speed, cost.work, cost.bytes_down, cost.bytes_up, cost.round_trips)
