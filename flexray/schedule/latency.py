"""Latency and energy prediction per device: the model every scheduler and ``flexray plan`` share.

It uses the same ``predict_times``/``energy_j`` as the actors' virtual throttle, so a prediction
made here is exactly what a ``virtual`` round will simulate for the same task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flexray.fleet.energy import energy_j, predict_times
from flexray.fleet.fleet import Device
from flexray.methods.base import DeviceView, Method, Task
from flexray.models.profile import ModelProfile


@dataclass(frozen=True)
class Prediction:
    device: int
    name: str
    profile: str
    samples: int
    flops: float
    download_s: float
    compute_s: float
    upload_s: float
    energy_j: float
    fits_memory: bool
    server_s: float = 0.0  # waiting on a split server

    @property
    def total_s(self) -> float:
        return self.download_s + self.compute_s + self.upload_s + self.server_s


def training_memory_bytes(profile: ModelProfile, batch_size: int) -> float:
    """Weights + grads + momentum (3x params) plus every stage's activations kept for backward."""
    acts = sum(layer.activation_bytes for layer in profile.layers) + profile.input_bytes
    return 3 * profile.param_bytes + batch_size * acts


def predict(
    method: Method, tasks: Sequence[Task], devices: dict[int, Device], t: float, profile: ModelProfile, batch_size: int
) -> list[Prediction]:
    out = []
    mem = training_memory_bytes(profile, batch_size)
    for task in tasks:
        d = devices[task.device]
        speed = d.trace.speed(t)
        view = DeviceView(d.id, d.profile, speed, len(d.indices))
        cost = method.cost(task, view, profile)
        dl, comp, ul = predict_times(d.profile, speed, cost.flops, cost.bytes_down, cost.bytes_up)
        out.append(Prediction(
            d.id, d.name, d.profile.name, len(d.indices), cost.flops, dl, comp, ul,
            energy_j(d.profile, comp, dl + ul, idle_s=cost.server_s), _fits(task, d, mem), cost.server_s,
        ))
    return out


def _fits(task: Task, device: Device, full_model_bytes: float) -> bool:
    """A task that names its own memory need (e.g. a split client's part) is checked against that."""
    need = task.spec.get("memory_bytes", full_model_bytes)
    return float(need) <= device.profile.memory_bytes


def round_time(preds: Sequence[Prediction], deadline_s: float | None, drop: bool) -> float:
    """Synchronous round: the slowest participant, or the deadline when stragglers are dropped."""
    slowest = max((p.total_s for p in preds), default=0.0)
    if deadline_s is not None and drop and slowest > deadline_s:
        return deadline_s
    return slowest
