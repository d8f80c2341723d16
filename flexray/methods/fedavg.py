"""FedAvg (McMahan et al., 2017): local SGD, sample-weighted mean of the returned weights."""

from __future__ import annotations

from collections.abc import Sequence

from flexray.methods.base import DeviceContext, Method, cast_like, copy_state, sgd_train, weighted_mean
from flexray.protocol import LocalData, State, Task, Update


class FedAvg(Method):
    name = "fedavg"
    linear = True

    def local_update(self, task: Task, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        model = ctx.model()
        model.load_state_dict(state)
        samples, loss = sgd_train(model, data, self.cfg, ctx.generator, self.extra_loss(state))
        return Update(copy_state(model), weight=len(data), samples=samples, metrics={"train_loss": loss})

    def extra_loss(self, state: State):  # noqa: ANN201 - hook for FedProx
        return None

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        if not updates:
            return state  # every participant straggled: keep the model
        return cast_like(weighted_mean(updates), state)
