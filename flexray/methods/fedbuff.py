"""FedBuff (Nguyen et al., AISTATS 2022, arXiv 2106.06639): FedAvg whose updates are buffered as
deltas; the server steps by the mean of K of them, so fast devices never wait for slow ones.
Updates staler than ``max_staleness`` are discarded. The buffer is the ``fedbuff`` policy of
``flexray.methods.policy``, which any method can use under ``rounds.mode: async``; this name keeps
the method's own options for it (in sync rounds a round's updates are one buffer)."""

from __future__ import annotations

from pydantic import Field

from flexray.config import MethodConfig
from flexray.methods.fedavg import FedAvg
from flexray.methods.policy import AsyncPolicy


class FedBuffConfig(MethodConfig):
    buffer_size: int = Field(10, ge=1, description="K: updates per server step")
    server_lr: float = Field(1.0, gt=0)
    max_staleness: int | None = Field(None, ge=0, description="discard staler updates; null = keep all")
    staleness_scaling: bool = Field(True, description="weight deltas by 1/sqrt(1+staleness)")


class FedBuff(FedAvg):
    name = "fedbuff"
    Config = FedBuffConfig
    cfg: FedBuffConfig

    def policy(self) -> AsyncPolicy:
        c = self.cfg
        return AsyncPolicy("fedbuff", staleness="polynomial" if c.staleness_scaling else "constant", a=0.5,
                           buffer_size=c.buffer_size, server_lr=c.server_lr, max_staleness=c.max_staleness)
