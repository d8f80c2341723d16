"""Sub-model assignment for methods with a knob (FlexTrain's depth k, width p).

Every round, for each device and each sub-model option, the shared latency model predicts
download + compute + upload from the device profile, its trace's *current* speed and the
method's per-option cost (from the model's per-layer profile); options whose training memory
exceeds the device's are out. Then:

- ``capacity`` (the default): the round time ``T`` is the user's ``rounds.deadline_s``, else
  the larger of the fastest device's latency on the largest option any device fits in memory
  (the full model; each device costed on the round's largest local dataset, so devices of the
  fastest class all train the full model, whatever their share of the data) and ``T*`` below
  (the round cannot end sooner: the slowest device on its fastest option). Every device trains
  the largest option it finishes by ``slack * T``; a device that finishes none by then (only
  under a user deadline) trains its fastest option and is the round's straggler. So the full model is
  trained every round by every device that can afford it, and never starved: the papers'
  capability rule, with the speeds of this round. ``tests/test_minmax.py`` checks it against
  brute force.
- ``minmax`` (strict): the round's slowest device cannot finish before ``T* = max_i min_o latency(i, o)``
  (device i on its fastest option that fits). That is the best possible round time, so it
  becomes the deadline, and every device trains the *largest* option it finishes by
  ``slack * T*``. The result is optimal for the lexicographic goal (min max latency first, then
  each device's sub-model as large as possible): nothing else meets ``T*`` with a larger option
  on any device. ``tests/test_minmax.py`` checks it against brute force. It starves the global
  model: on a fleet whose slowest device is many times slower than its fastest, ``T*`` is the
  slow device's smallest sub-model, and no device trains the full model.
- ``static``: the method's capability tier (the papers' setting), stepped down to the largest
  smaller option when the tier does not fit the device's memory.

A device that fits no option in memory gets no task this round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from flexray.config import ScheduleConfig
from flexray.models.profile import ModelProfile
from flexray.protocol import CostModel, DeviceView, SubModel, SubModelKnob, Task, cost_times


def min_max_time(latency: np.ndarray, fits: np.ndarray) -> float:
    """``T* = max_i min_o latency(i, o)`` over the devices (rows) that fit some option (columns);
    inf when none fits anything."""
    fastest = np.where(fits, latency, np.inf).min(axis=1)
    ok = np.isfinite(fastest)
    return float(fastest[ok].max()) if ok.any() else float("inf")


def minmax_choice(latency: np.ndarray, fits: np.ndarray, slack: float = 1.0) -> tuple[np.ndarray, float]:
    """Per device (row) the index of its option (columns, largest first), -1 when none fits.

    Returns the choices and the target latency ``slack * T*`` (inf when no device fits anything).
    """
    target = min_max_time(latency, fits)
    if not np.isfinite(target):
        return np.full(latency.shape[0], -1), target
    target *= slack
    within = np.where(fits, latency, np.inf) <= target * (1 + 1e-12)
    return np.where(within.any(axis=1), within.argmax(axis=1), -1), target


def capacity_choice(latency: np.ndarray, fits: np.ndarray, target: float) -> np.ndarray:
    """Per device (row) the largest option (columns, largest first) it finishes by ``target``,
    else its fastest option that fits; -1 when none fits."""
    lat = np.where(fits, latency, np.inf)
    within = lat <= target * (1 + 1e-12)
    fastest = np.where(fits.any(axis=1), lat.argmin(axis=1), -1)
    return np.where(within.any(axis=1), within.argmax(axis=1), fastest)


def static_choice(tier: np.ndarray, fits: np.ndarray) -> np.ndarray:
    """The tier's index, or the next smaller option that fits memory; -1 when none does."""
    out = np.full(len(tier), -1)
    for i, t in enumerate(tier):
        smaller = np.flatnonzero(fits[i, t:])
        if smaller.size:
            out[i] = t + smaller[0]
    return out


@dataclass(frozen=True)
class Plan:
    views: list[DeviceView]  # the devices that got a choice (all of them for methods without a knob)
    predicted_s: dict[int, float]  # device -> predicted latency of its choice
    target_s: float  # capacity: the round time; minmax: the deadline all choices meet; static: slowest choice


class SubModelScheduler:
    """Chooses each device's sub-model every round; inert for methods without options."""

    def __init__(
        self, cfg: ScheduleConfig, method: CostModel, profile: ModelProfile, batch_size: int,
        deadline_s: float | None = None,
    ) -> None:
        if profile.input_shape is None:
            raise ValueError("the scheduler needs a model profile with input_shape")
        self.cfg, self.method, self.profile, self.batch_size = cfg, method, profile, batch_size
        self.deadline_s = deadline_s  # rounds.deadline_s: the capacity mode's round time when set
        self.knob = method if isinstance(method, SubModelKnob) else None
        self.options = self.knob.options() if self.knob else []
        self._memory = [
            self.knob.option_memory_bytes(o, profile.input_shape, batch_size) for o in self.options
        ] if self.knob else []
        self._tiers: dict[str, int] = {}

    def latency(self, view: DeviceView, spec: SubModel, rnd: int = 0) -> float:
        cost = self.method.cost(Task(view.id, rnd, spec), view, self.profile)
        return sum(cost_times(view.profile, view.speed, cost))

    def table(self, views: Sequence[DeviceView]) -> tuple[np.ndarray, np.ndarray]:
        """Predicted latency and memory fit of every (device, option)."""
        lat = np.array([[self.latency(v, o) for o in self.options] for v in views]).reshape(len(views), -1)
        mem = np.array(self._memory)
        fits = np.array([mem <= v.profile.memory_bytes for v in views]).reshape(len(views), -1)
        return lat, fits

    def round_time(self, views: Sequence[DeviceView], lat: np.ndarray, fits: np.ndarray) -> float:
        """The capacity mode's ``T`` before slack (see module doc); inf when no device fits anything."""
        if self.deadline_s is not None:
            return self.deadline_s
        someone = fits.any(axis=0)
        if not someone.any():
            return float("inf")
        j = int(np.argmax(someone))  # the largest option some device fits
        most = max(v.num_samples for v in views)
        full = min(
            self.latency(replace(v, num_samples=most), self.options[j]) for i, v in enumerate(views) if fits[i, j]
        )
        return max(full, min_max_time(lat, fits))  # never shorter than the straggler makes it anyway

    def _tier(self, view: DeviceView) -> int:
        name = view.profile.name
        if name not in self._tiers:
            tier = self.knob.static_option(view.profile) if self.knob else None
            self._tiers[name] = self.options.index(tier) if tier in self.options else 0
        return self._tiers[name]

    def assign(self, views: Sequence[DeviceView]) -> Plan:
        """Give each device its option for this round (see module doc)."""
        if not self.options or not views:
            return Plan(list(views), {}, 0.0)
        lat, fits = self.table(views)
        if self.cfg.mode == "capacity":
            target = self.round_time(views, lat, fits) * self.cfg.slack
            idx = capacity_choice(lat, fits, target)
        elif self.cfg.mode == "minmax":
            idx, target = minmax_choice(lat, fits, self.cfg.slack)
        else:
            idx = static_choice(np.array([self._tier(v) for v in views]), fits)
            chosen = [lat[i, j] for i, j in enumerate(idx) if j >= 0]
            target = max(chosen, default=0.0)
        out = [replace(v, choice=self.options[j]) for v, j in zip(views, idx) if j >= 0]
        pred = {v.id: float(lat[i, j]) for i, (v, j) in enumerate(zip(views, idx)) if j >= 0}
        return Plan(out, pred, target)
