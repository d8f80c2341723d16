"""What an engine is: how a method's work reaches the devices, as the driver sees it.

The rounds engine (``flexray.runtime.engines``: sync and async federated rounds on device actors)
runs every method that names no engine. A method whose work is not a federated round names its
own by import path (``Method.engine = "package.module:Class"``, in the method's own package);
the driver imports it only then, and never by a name of its own. An engine is built once per job from the resolved config, the devices and the method
instance the driver plans with.
"""

from __future__ import annotations

from typing import Any, Protocol

from flexray.config import JobConfig
from flexray.data.datasets import Dataset
from flexray.fleet.fleet import ActorSpec, Device
from flexray.fleet.report import RoundOutcome
from flexray.methods.base import Method
from flexray.methods.service import RoundService
from flexray.models.profile import ModelProfile
from flexray.protocol import DeviceProfile, State

Actors = list[tuple[ActorSpec, Any]]  # each actor's spec and its handle


class Rounds(Protocol):
    """The per-round runner an engine builds: one logged round per ``step``; checkpointable."""

    def step(self, rnd: int, clock_s: float, state: State) -> tuple[State, RoundOutcome]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, saved: dict[str, Any]) -> None: ...


class Engine(Protocol):
    devices: list[Device]
    reuses_actors: bool
    """True when ``start`` takes device actors kept warm by an earlier job (``warm_actors``);
    otherwise the driver kills those first, so they cannot hold the CPUs this engine needs."""

    def __init__(self, cfg: JobConfig, devices: list[Device], dataset: Dataset, method: Method) -> None: ...

    def specs(self) -> list[ActorSpec]:
        """The actors ``start`` will ask Ray for (the placement check counts them before Ray starts)."""
        ...

    def describe(self) -> str:
        """What ``flexray plan`` prints for this engine (empty: the driver's per-device table)."""
        ...

    def start(self) -> tuple[Actors, Any]:
        """Start the actors (without waiting for them); also returns anything to keep alive for the job."""
        ...

    def rounds(self, method: Method, actors: Actors, server: DeviceProfile, profile: ModelProfile,
               service: RoundService) -> Rounds: ...
