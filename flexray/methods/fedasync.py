"""FedAsync (Xie et al., 2019, arXiv 1903.03934): FedAvg whose updates are mixed into the global
model one at a time, w <- (1 - a_t) w + a_t w_k, with a_t = alpha * s(staleness) so stale work
counts less. The mixing is the ``fedasync`` policy of ``flexray.methods.policy``, which any method
can use under ``rounds.mode: async``; this name keeps the method's own options for it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flexray.config import MethodConfig
from flexray.methods.fedavg import FedAvg
from flexray.methods.policy import AsyncPolicy


class FedAsyncConfig(MethodConfig):
    alpha: float = Field(0.6, gt=0, le=1, description="mixing weight of a fresh update")
    staleness_fn: Literal["constant", "polynomial", "hinge"] = "polynomial"
    a: float = Field(0.5, ge=0, description="polynomial exponent / hinge slope")
    b: int = Field(4, ge=0, description="hinge: staleness tolerated at full weight")


class FedAsync(FedAvg):
    name = "fedasync"
    Config = FedAsyncConfig
    cfg: FedAsyncConfig

    def policy(self) -> AsyncPolicy:
        c = self.cfg
        return AsyncPolicy("fedasync", alpha=c.alpha, staleness=c.staleness_fn, a=c.a, b=c.b)

    def weight(self, staleness: int) -> float:
        """The mixing weight a_t of an update ``staleness`` versions old."""
        return self.cfg.alpha * self.policy().scale(staleness)
