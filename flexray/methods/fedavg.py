"""FedAvg (McMahan et al., 2017): local SGD, sample-weighted mean of the returned weights."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from flexray.methods.base import DeviceContext, Method, cast_like, copy_state, sgd_train, weighted_mean
from flexray.methods.batched import batched_sgd_train, why_not_batched
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

    def prox_mu(self) -> float:
        """FedProx's mu for the batched trainer (the same term ``extra_loss`` adds)."""
        return 0.0

    # BatchesClients: every task trains the full model, so all of a round's tasks share one shape.
    def batch_key(self, task: Task, ctx: DeviceContext) -> Hashable | None:
        return "full" if why_not_batched(ctx.model()) is None else None

    def local_updates(
        self, tasks: Sequence[Task], state: State, datas: Sequence[LocalData], generators: Sequence[torch.Generator],
        ctx: DeviceContext,
    ) -> list[Update]:
        model = ctx.model()
        model.load_state_dict(state)
        results = batched_sgd_train(model, datas, self.cfg, generators, prox_mu=self.prox_mu())
        return [Update(r.state, weight=len(d), samples=r.samples, metrics={"train_loss": r.loss})
                for r, d in zip(results, datas)]

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        if not updates:
            return state  # every participant straggled: keep the model
        return cast_like(weighted_mean(updates), state)
