"""The rounds engine, and how the driver finds a method's own engine (``Method.engine``: an
import path, or a name registered under the ``flexray.engines`` entry point group). The driver
asks ``engine_for``; nothing here names a method or another engine."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from flexray.config import JobConfig
from flexray.data.datasets import Dataset
from flexray.errors import FlexrayError
from flexray.fleet.engine import Actors, Engine, Rounds
from flexray.fleet.fleet import ActorSpec, Device, assign_actors
from flexray.methods.base import Method
from flexray.methods.service import RoundService
from flexray.models.profile import ModelProfile
from flexray.protocol import DeviceProfile
from flexray.runtime.actor import start_actors
from flexray.runtime.async_rounds import AsyncRounds
from flexray.runtime.rounds import SyncRounds


class RoundsEngine:
    """Federated rounds, sync or async, on ``DeviceActor``s hosting the devices."""

    reuses_actors = True

    def __init__(self, cfg: JobConfig, devices: list[Device], dataset: Dataset, method: Method) -> None:
        self.cfg, self.devices, self.dataset = cfg, devices, dataset

    def specs(self) -> list[ActorSpec]:
        return assign_actors(self.cfg, self.devices)

    def describe(self) -> str:
        return ""

    def start(self) -> tuple[Actors, Any]:
        return start_actors(self.cfg, self.specs(), self.devices, self.dataset)

    def rounds(self, method: Method, actors: Actors, server: DeviceProfile, profile: ModelProfile,
               service: RoundService) -> Rounds:
        kind = AsyncRounds if self.cfg.rounds.mode == "async" else SyncRounds
        return kind(self.cfg, self.devices, actors, method, server, profile, service)


def engine_class(method: type[Method]) -> type[Engine]:
    """The engine ``method`` names (None: the rounds engine), imported now."""
    name = method.engine
    if name is None:
        return RoundsEngine
    found = {ep.name: ep.value for ep in entry_points(group="flexray.engines")}
    path = found.get(name, name)
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise FlexrayError(f"method {method.name!r} names engine {name!r}, which cannot be imported ({err}); "
                           "use package.module:Class or a name under the flexray.engines entry points") from None


def engine_for(cfg: JobConfig, devices: list[Device], dataset: Dataset, method: Method) -> Engine:
    return engine_class(type(method))(cfg, devices, dataset, method)
