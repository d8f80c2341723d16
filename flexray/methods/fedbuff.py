"""FedBuff (Nguyen et al., AISTATS 2022, arXiv 2106.06639): devices send model deltas; the server
buffers K of them and applies their mean, so fast devices never wait for slow ones and the
server steps once per K arrivals. Updates staler than ``max_staleness`` are discarded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from flexray.config import MethodConfig
from flexray.methods.base import DeviceContext, LocalData, Method, State, Task, Update, cast_like, sgd_train


class FedBuffConfig(MethodConfig):
    buffer_size: int = Field(10, ge=1, description="K: updates per server step")
    server_lr: float = Field(1.0, gt=0)
    max_staleness: int | None = Field(None, ge=0, description="discard staler updates; null = keep all")
    staleness_scaling: bool = Field(True, description="weight deltas by 1/sqrt(1+staleness)")


class FedBuff(Method):
    name = "fedbuff"
    Config = FedBuffConfig
    supports_async = True

    def __init__(self, cfg: MethodConfig, model_fn: Any, asynchronous: bool = False) -> None:
        super().__init__(cfg, model_fn, asynchronous)
        self.buffer: list[dict[str, torch.Tensor]] = []
        self.weights: list[float] = []

    def local_update(self, task: Task, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        model = ctx.model()
        model.load_state_dict(state)
        samples, loss = sgd_train(model, data, self.cfg, ctx.generator)
        delta = {k: v.detach() - state[k] for k, v in model.state_dict().items()}
        return Update(delta, weight=len(data), samples=samples, metrics={"train_loss": loss})

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        cfg: FedBuffConfig = self.cfg  # type: ignore[assignment]
        for u in updates:
            if cfg.max_staleness is not None and u.staleness > cfg.max_staleness:
                continue
            scale = (1.0 + u.staleness) ** -0.5 if cfg.staleness_scaling else 1.0
            self.buffer.append({k: v.double() for k, v in u.tensors.items()})
            self.weights.append(scale)
        # Async: step once K updates are in. Sync: a round's updates are the buffer.
        if not self.buffer or (self.asynchronous and len(self.buffer) < cfg.buffer_size):
            return state
        total = len(self.buffer)
        step = {k: sum(w * d[k] for w, d in zip(self.weights, self.buffer)) / total for k in state}
        self.buffer, self.weights = [], []
        return cast_like({k: state[k].double() + cfg.server_lr * step[k] for k in state}, state)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer, self.weights = list(state["buffer"]), list(state["weights"])
