"""FedClass: the FlexTrain paper's baseline of one FedAvg model per device class.

A device class is the depth configuration ``k`` a device can run (its FlexTrain tier, or the
scheduler's choice): devices of class ``k`` train, with plain FedAvg among themselves, their own
copy of configuration ``k``. Classes share nothing, so each sees only its members' data; that is
the point of the comparison with FlexTrain's shared prefixes. The global state holds every
class's model under the key prefix ``k{k}/``. FlexTrain's ``aggregation`` does not apply: a class
is plain FedAvg, and a FedBuff buffer averages an entry over the arrivals of its class.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from flexray.methods.base import DeviceContext, cast_like, evaluate_model, weighted_mean
from flexray.methods.flextrain import Depth, FlexTrain, FlexTrainConfig, depth_of
from flexray.models import depth
from flexray.protocol import LocalData, State, SubModel, Task, Update


class FedClassConfig(FlexTrainConfig):
    mode: Literal["federated"] = "federated"
    beta: float = Field(0.0, ge=0, description="distillation weight; 0 is plain FedAvg within a class")


class FedClass(FlexTrain):
    name = "fedclass"
    Config = FedClassConfig

    @staticmethod
    def prefix(k: int) -> str:
        return f"k{k}/"

    def class_state(self, state: State, k: int) -> State:
        pre = self.prefix(k)
        return {key[len(pre):]: v for key, v in state.items() if key.startswith(pre)}

    def init(self, model: nn.Module) -> State:
        base = super().init(model)
        return {self.prefix(k) + key: base[key].clone() for k in self.configs for key in self.update_keys(k)}

    def _trained(self) -> int:
        """The largest class any device trained so far (the deployable "global" model)."""
        return max(self.deployed.values(), default=self.max_k)

    def device_model(self, state: State, model: nn.Module, option: SubModel | None) -> nn.Module:
        k = self._trained() if option is None else depth_of(option)
        model.load_state_dict(self.class_state(state, k), strict=False)
        return depth.depth_prefix(model, k)

    def validate(self, update: Update, state: State, planned: SubModel | None = None) -> str | None:
        trained = update.trained.of(Depth) if update.trained is not None else None
        k = trained.k if trained is not None else None
        if k is None or float(k) not in self.configs:
            return f"update has no valid depth configuration k (got {k!r})"
        return super().validate(update, self.class_state(state, int(k)), planned)

    def buffer_rule(self) -> Literal["coverage", "devices"]:
        return "coverage"

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        """FedAvg (sample-weighted) within each class; other classes keep their weights."""
        groups: dict[int, list[Update]] = defaultdict(list)
        for u in updates:
            groups[depth_of(u.trained)].append(u)
        out = dict(state)
        for k, group in groups.items():
            pre = self.prefix(k)
            for key, value in cast_like(weighted_mean(group), self.class_state(state, k)).items():
                out[pre + key] = value
        return out

    def evaluate(self, state: State, model: nn.Module, data: LocalData) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for k in self.configs:
            model.load_state_dict(self.class_state(state, k), strict=False)
            metrics[f"acc_k{k}"] = evaluate_model(depth.depth_prefix(model, k), data)["accuracy"]
        model.load_state_dict(self.class_state(state, self._trained()), strict=False)
        metrics.update(evaluate_model(depth.depth_prefix(model, self._trained()), data))
        self.add_mean_device_acc(metrics, lambda k: f"acc_k{k}")
        return metrics

    def local_update(self, task: Task, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        update = super().local_update(task, self.class_state(state, depth_of(task.spec)), data, ctx)
        return replace(update, weight=float(len(data)))

    def local_updates(
        self, tasks: Sequence[Task], state: State, datas: Sequence[LocalData], generators: Sequence[torch.Generator],
        ctx: DeviceContext,
    ) -> list[Update]:
        updates = super().local_updates(tasks, self.class_state(state, depth_of(tasks[0].spec)), datas, generators, ctx)
        return [replace(u, weight=float(len(d))) for u, d in zip(updates, datas)]
