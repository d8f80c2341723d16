"""What only some methods can do: typed protocols the runtime discovers with ``isinstance``.

The core every method has is :class:`flexray.methods.base.Method` (plan, aggregate, evaluate,
local_update, state). A method that needs more from the runtime implements one of these by
defining the method -- no flag, no registration -- and the runtime (``flexray.runtime.job``,
``flexray.schedule``) looks for it:

=====================  ===================================================  =========================
capability             what the runtime does with it                        who has it
=====================  ===================================================  =========================
``SubModelKnob``       the min-max scheduler picks each device's option     width methods, FlexTrain
``Attaches``           gets the model profile and the server's class first  SplitFed/TLMP
``Prepares``           server-side work before round 1 (files logged)       DISTREAL, REFT
``Deploys``            the per-device model that is logged at the end       width methods, FlexTrain
``HasPolicy``          its own aggregation policy, in sync and async rounds FedAsync, FedBuff
``PlanNotes``          lines printed under ``flexray plan``'s table         SplitFed
``BatchesClients``     trains same-shaped devices stacked (batch_clients)   FedAvg, width, FlexTrain
=====================  ===================================================  =========================
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from flexray.methods.base import DeviceContext, ServerData
from flexray.methods.policy import HasPolicy
from flexray.models.profile import ModelProfile
from flexray.protocol import DeviceProfile, LocalData, PlanNotes, State, SubModel, SubModelKnob, Task, Update


@runtime_checkable
class Attaches(Protocol):
    """Plans with runtime facts: the model's per-stage profile and the server's device class.
    Called on the driver, in every actor and by ``flexray plan``, before anything is planned."""

    def attach(self, profile: ModelProfile, server: DeviceProfile) -> None: ...


@runtime_checkable
class Prepares(Protocol):
    """Server-side preparation before the first round (a design-space search, a proxy set);
    returns files to log as run artifacts. Runs again on resume, so it must be deterministic."""

    def setup(self, data: ServerData, workdir: Path) -> list[Path]: ...


@runtime_checkable
class Deploys(Protocol):
    """The model a device with ``option`` deploys (None: the model the run logs at the end),
    when that is not simply the full model loaded with the global state."""

    def device_model(self, state: State, model: nn.Module, option: SubModel | None) -> nn.Module: ...


@runtime_checkable
class BatchesClients(Protocol):
    """Devices whose local update is plain SGD on one model shape train together
    (``fleet.batch_clients``): the actor hands the tasks with equal ``batch_key`` (None: this
    task trains alone) to one ``local_updates`` call, which must return what ``local_update``
    returns task after task, each task with its own seeded generator."""

    def batch_key(self, task: Task, ctx: DeviceContext) -> Hashable | None: ...

    def local_updates(
        self, tasks: Sequence[Task], state: State, datas: Sequence[LocalData], generators: Sequence[torch.Generator],
        ctx: DeviceContext,
    ) -> list[Update]: ...


def deployed_model(method: object, state: State, model: nn.Module) -> nn.Module:
    """The model a run logs: the method's own choice (``Deploys``), else the full model."""
    if isinstance(method, Deploys):
        return method.device_model(state, model, None)
    model.load_state_dict(state)
    return model


__all__ = ["Attaches", "BatchesClients", "Deploys", "HasPolicy", "PlanNotes", "Prepares", "SubModelKnob", "deployed_model"]
