"""Latency and energy prediction per device: the model every scheduler and ``flexray plan`` share.

It uses the same ``predict_times``/``energy_j`` as the actors' virtual throttle, so a prediction
made here is exactly what a ``virtual`` round will simulate for the same task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flexray.fleet.fleet import Device
from flexray.models.profile import ModelProfile, training_memory_bytes
from flexray.protocol import CostModel, DeviceView, SubModelKnob, Task, cost_times, energy_j


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
    server_s: float = 0.0  # waiting on the method's round service (a server it runs)

    @property
    def total_s(self) -> float:
        return self.download_s + self.compute_s + self.upload_s + self.server_s


def predict(
    method: CostModel, tasks: Sequence[Task], devices: dict[int, Device], t: float, profile: ModelProfile, batch_size: int,
    deadline_s: float | None = None,
) -> list[Prediction]:
    out = []
    full_mem = training_memory_bytes(profile, batch_size)
    knob = method if isinstance(method, SubModelKnob) and method.options() and profile.input_shape else None
    for task in tasks:
        mem = knob.option_memory_bytes(task.spec, profile.input_shape, batch_size) if knob else full_mem
        d = devices[task.device]
        speed = d.trace.speed(t)
        view = DeviceView(d.id, d.profile, speed, len(d.indices), deadline_s)
        cost = method.cost(task, view, profile)
        dl, comp, ul = cost_times(d.profile, speed, cost)
        out.append(Prediction(
            d.id, d.name, d.profile.name, len(d.indices), cost.flops, dl, comp, ul,
            energy_j(d.profile, comp, dl + ul, idle_s=cost.server_s), _fits(task, d, mem), cost.server_s,
        ))
    return out


def _fits(task: Task, device: Device, full_model_bytes: float) -> bool:
    """A task that names its own memory need (e.g. a split client's part) is checked against that."""
    need = task.spec.memory_bytes if task.spec.memory_bytes is not None else full_model_bytes
    return float(need) <= device.profile.memory_bytes


def round_time(preds: Sequence[Prediction], deadline_s: float | None, drop: bool) -> float:
    """Synchronous round: the slowest participant, or the deadline when stragglers are dropped."""
    slowest = max((p.total_s for p in preds), default=0.0)
    if deadline_s is not None and drop and slowest > deadline_s:
        return deadline_s
    return slowest
