"""A method defined outside flexray, named by import path in a job (tests/test_async_policy.py)."""

from __future__ import annotations

from collections.abc import Sequence

from flexray.methods.base import State, Update
from flexray.methods.fedavg import FedAvg


class HalfStepAvg(FedAvg):
    """FedAvg that moves only half way to the clients' mean: a user's own aggregation rule."""

    name = "half_step_avg"

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        mean = super().aggregate(rnd, state, updates)
        return {k: (v + mean[k]) / 2 if v.is_floating_point() else mean[k] for k, v in state.items()}


class NotAMethod:
    pass
