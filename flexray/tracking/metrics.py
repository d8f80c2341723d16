"""One round's metrics as a typed record: what the loop hands the callbacks, what ``fit()``
returns per round, and (as a plain dict) what MLflow logs and a checkpoint stores."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class RoundMetrics:
    round: int  # rounds (sync) or model versions (async) done, 1-based: the MLflow step
    sim_time_s: float  # simulated clock at the round's end
    round_sim_s: float
    wall_time_s: float
    energy_j: float  # every device's joules so far
    round_energy_j: float
    participants: float  # devices whose update counted
    stragglers: float
    lost: float
    rejected: float
    failed: float
    offline: float
    nodes_lost: float
    bytes_up: float
    bytes_down: float
    round_predicted_s: float | None = None  # the methods' own latency prediction of the round
    train_loss: float | None = None
    accuracy: float | None = None  # test metrics: evaluated rounds only (rounds.eval_every, the last)
    loss: float | None = None
    mean_device_acc: float | None = None  # methods with sub-models: each device's own sub-model's accuracy
    extra: Mapping[str, float] = field(default_factory=dict)  # the method's other evaluation metrics

    def with_eval(self, metrics: Mapping[str, float]) -> RoundMetrics:
        """The round with a method's evaluation added (known names typed, the rest in ``extra``)."""
        typed = {k: float(v) for k, v in metrics.items() if k in _OPTIONAL}
        return replace(self, **typed, extra={**self.extra, **{k: float(v) for k, v in metrics.items() if k not in _OPTIONAL}})

    def as_dict(self) -> dict[str, float]:
        """Flat ``name -> value`` (MLflow's metrics, a checkpoint's history); ``round`` excluded."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("round", "extra")}
        return {**{k: float(v) for k, v in out.items() if v is not None}, **self.extra}

    def row(self) -> dict[str, float]:
        return {"round": float(self.round), **self.as_dict()}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RoundMetrics:
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: (int(v) if k == "round" else float(v)) for k, v in row.items() if k in names}
        return cls(**known, extra={k: float(v) for k, v in row.items() if k not in names})


_OPTIONAL = {f.name for f in fields(RoundMetrics) if f.default is None}
