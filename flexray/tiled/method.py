"""Tiled, fused CNN training (arXiv 2409.09083): one model trained by an edge cluster, no server.

The early, feature-map-heavy conv/pool stages are cut into spatial tiles that devices compute
in parallel (halos included, fused over consecutive layers); the rest runs on device 0 and the
weight gradients are all-reduced. This is not a federated round, so the method names the engine
that runs it (``engine``: ``flexray.tiled.engine``, beside this file); the engine calls
``batches`` for the data order, and ``local_update`` is the single-device reference of exactly
the same steps (tests hold the tiled engine to it) for models without dropout: the engine draws
dropout masks from per-step seeds so that every tile slices the same mask, ``local_update``
from torch's global stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field, field_validator
from torch import nn

from flexray.config import MethodConfig
from flexray.methods.base import DeviceContext, Method, cast_like, copy_state
from flexray.protocol import LocalData, State, Task, Update
from flexray.schedule.tiling import MESSAGE_S


class TiledConfig(MethodConfig):
    steps_per_round: int | None = Field(
        None, ge=1, description="synchronous SGD steps per logged round; null = local_epochs passes over the "
        "devices' pooled data, the samples a FedAvg round of the same fleet processes")

    def round_steps(self, samples: int) -> int:
        """Steps of one round over ``samples`` pooled samples."""
        return self.steps_per_round or self.local_epochs * math.ceil(samples / self.batch_size)
    grid: tuple[int, int] | None = Field(None, description="[rows, cols] of tiles; null = the planner picks")
    groups: list[int] | None = Field(
        None, description="fused-layer indices where a new group starts ([] = one group); null = the planner picks")
    fused_stages: int | None = Field(None, ge=1, description="leading stages to tile; null = every tileable one")
    message_s: float | None = Field(
        None, ge=0, description=f"fixed seconds the planner charges per message (radio round trip, task hop); "
        f"null = each device profile's rtt_s ({MESSAGE_S} s where a profile has none)")

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError("rows and cols must be >= 1, e.g. [2, 1]")
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (min(v, default=1) < 1 or sorted(set(v)) != v):
            raise ValueError("increasing layer indices >= 1, e.g. [4, 9]")
        return v


def batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Row indices of each step's batch: fresh shuffles of ``n`` rows, consumed in order."""
    out: list[torch.Tensor] = []
    order = torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


class Tiled(Method):
    name = "tiled"
    engine = "flexray.tiled.engine:TiledEngine"
    Config = TiledConfig
    cfg: TiledConfig

    def local_update(self, task: Task, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        """The round's steps on one device alone, in the order ``batches`` gives."""
        cfg = self.cfg
        model = ctx.model()
        model.load_state_dict(state)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        loss_sum = 0.0
        steps = batches(len(data), cfg.batch_size, cfg.round_steps(len(data)), ctx.generator)
        for idx in steps:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(data.x[idx]), data.y[idx])
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
        samples = sum(len(i) for i in steps)
        return Update(copy_state(model), weight=samples, samples=samples, metrics={"train_loss": loss_sum / len(steps)})

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        """Every device ends a step with the same weights; any one of them is the model."""
        return cast_like(updates[0].tensors, state) if updates else state
