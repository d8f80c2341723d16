"""FedAsync (Xie et al., 2019, arXiv 1903.03934): the server mixes each arriving model into the
global one, w <- (1 - a_t) w + a_t w_k, with a_t = alpha * s(staleness) so stale work counts less."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from flexray.config import MethodConfig
from flexray.methods.base import State, Update, cast_like, weighted_mean
from flexray.methods.fedavg import FedAvg


class FedAsyncConfig(MethodConfig):
    alpha: float = Field(0.6, gt=0, le=1, description="mixing weight of a fresh update")
    staleness_fn: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: float = Field(0.5, ge=0, description="polynomial exponent / hinge slope")
    b: int = Field(4, ge=0, description="hinge: staleness tolerated at full weight")


class FedAsync(FedAvg):
    name = "fedasync"
    Config = FedAsyncConfig
    linear = False
    supports_async = True

    def weight(self, staleness: int) -> float:
        cfg: FedAsyncConfig = self.cfg  # type: ignore[assignment]
        if cfg.staleness_fn == "polynomial":
            s = (staleness + 1) ** (-cfg.a)
        elif cfg.staleness_fn == "hinge":
            s = 1.0 if staleness <= cfg.b else 1.0 / (cfg.a * (staleness - cfg.b) + 1.0)
        else:
            s = 1.0
        return cfg.alpha * s

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        if not updates:
            return state
        # Sync mode hands over a whole round at once: mix its mean as one fresh update.
        mixed = weighted_mean(updates)
        a = self.weight(max(u.staleness for u in updates))
        new = {k: (1 - a) * state[k].double() + a * mixed[k] for k in state}
        return cast_like(new, state)
