"""Engines: how a method's work reaches the devices. The method names its engine
(``Method.engine``); the driver asks this registry, never the method's name.

An engine starts the actors it needs (``start``: [(ActorSpec, handle)], plus anything to keep
alive for the job) and builds the per-round runner (``rounds``: an object with
``step(rnd, clock_s, state) -> (state, RoundOutcome)``, ``state_dict`` and ``load_state_dict``).
"""

from __future__ import annotations

from typing import Any, Protocol

from flexray.config import JobConfig
from flexray.data.datasets import Dataset
from flexray.fleet.fleet import ActorSpec, Device, assign_actors
from flexray.methods import method_class
from flexray.methods.base import Method
from flexray.models.profile import ModelProfile
from flexray.protocol import DeviceProfile
from flexray.runtime.actor import start_actors
from flexray.runtime.async_rounds import AsyncRounds
from flexray.runtime.job import Job
from flexray.runtime.rounds import SyncRounds
from flexray.runtime.tiled_rounds import TiledEngine


class Engine(Protocol):
    devices: list[Device]

    def __init__(self, cfg: JobConfig, devices: list[Device], dataset: Dataset) -> None: ...

    def specs(self) -> list[ActorSpec]:
        """The actors ``start`` will ask Ray for (the placement check counts them before Ray starts)."""
        ...

    def start(self) -> tuple[list[tuple[ActorSpec, Any]], Any]: ...

    def rounds(
        self, method: Method, actors: list[tuple[ActorSpec, Any]], server: DeviceProfile, profile: ModelProfile,
        split_server: Any = None,
    ) -> Any: ...


class RoundsEngine:
    """Federated rounds, sync or async, on ``DeviceActor``s hosting the devices."""

    def __init__(self, cfg: JobConfig, devices: list[Device], dataset: Dataset) -> None:
        self.cfg, self.devices, self.dataset = cfg, devices, dataset

    def specs(self) -> list[ActorSpec]:
        return assign_actors(self.cfg, self.devices)

    def start(self) -> tuple[list[tuple[ActorSpec, Any]], Any]:
        return start_actors(self.cfg, self.specs(), self.devices, self.dataset)

    def rounds(
        self, method: Method, actors: list[tuple[ActorSpec, Any]], server: DeviceProfile, profile: ModelProfile,
        split_server: Any = None,
    ) -> Any:
        if self.cfg.rounds.mode == "async":
            return AsyncRounds(self.cfg, self.devices, actors, method, server, profile, split_server)
        return SyncRounds(self.cfg, self.devices, actors, method, server, profile, split_server)


def engine_for(job: Job) -> Engine:
    engines: dict[str, type] = {"rounds": RoundsEngine, "tiled": TiledEngine}
    return engines[method_class(job.cfg.method.name).engine](job.cfg, job.devices, job.dataset)
