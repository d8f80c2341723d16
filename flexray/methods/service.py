"""Round services: what a method runs beside the rounds (a split server, a parameter server, an
aggregation tree). The runtime knows only this protocol; the method's ``round_service()`` returns
one, and both round loops call every hook of it, so a method without one gets the do-nothing
default and the loops carry no branch for it.

Lifecycle, driven by the runtime (sync rounds left, async rounds right)::

    actors(cfg)              what it asks Ray for: placed and checked beside the device actors
    start(env)               with the job, after the device actors are up
    begin_round / launch     before a round's tasks / one device's task leaves
    client()                 shipped to the devices with their tasks; ``connect(device)`` gives the
                             task its link (``DeviceContext.service``), whose ``traffic`` the actor
                             adds to the device's report
    end_round / land         after the round / when that device's task lands: extra updates
    stop()                   with the job, however it ends

A service never sees the device actors or the clock; it starts its own actors through
``ServiceEnv.spawn``, which applies the fleet's placement rules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from flexray.config import JobConfig
from flexray.protocol import DeviceProfile, Task, Update


@dataclass(frozen=True)
class ServiceActor:
    """One actor a service asks Ray for (counted by the placement check and ``flexray plan``)."""

    role: str  # how plans, logs and placement errors name it, e.g. "split server"
    num_cpus: float
    num_gpus: float = 0.0
    gpu_field: str = "fleet.num_gpus_per_actor"  # the config field that sets num_gpus (named in errors)
    max_concurrency: int = 1  # calls it serves at once (one per concurrently training client)


@dataclass(frozen=True)
class ServiceEnv:
    """What the runtime gives a service when the job starts."""

    cfg: JobConfig
    input_shape: tuple[int, ...]
    num_classes: int
    server: DeviceProfile  # the server's device class: what the service's simulated time is priced on
    spawn: Callable[[type, ServiceActor, tuple[Any, ...]], Any]
    """``spawn(cls, actor, args)``: a Ray actor of ``cls(*args)`` with ``actor``'s resources; its handle."""


@dataclass
class Traffic:
    """What one device's task exchanged with a service: added to the device's report and clock."""

    bytes_up: int = 0
    bytes_down: int = 0
    server_s: float = 0.0  # simulated time the device waited on the service
    round_trips: int = 0  # messages exchanged while training (each pays the device's rtt_s)
    wall_s: float = 0.0  # measured time inside those calls (what ``throttle: none`` reports)


class Link(Protocol):
    """A task's end of a service (the method's own type; the runtime reads only ``traffic``)."""

    traffic: Traffic


class ServiceClient(Protocol):
    """Travels to the device actors with their tasks (so it must pickle): a link per task."""

    def connect(self, device: int) -> Link: ...


class RoundService:
    """The do-nothing service every method without one gets; subclass and override what you need."""

    def actors(self, cfg: JobConfig) -> list[ServiceActor]:
        return []

    def start(self, env: ServiceEnv) -> None:
        return None

    def client(self) -> ServiceClient | None:
        """None: tasks get no link (and may train stacked, ``fleet.batch_clients``)."""
        return None

    def begin_round(self, rnd: int, state: Any, tasks: Sequence[Task]) -> None:
        """Sync rounds, before the tasks leave; ``state`` is the global state's object-store ref."""
        return None

    def end_round(self, kept: Sequence[int]) -> list[Update]:
        """Sync rounds, after the tasks landed: updates of the service's own (``kept``: the devices
        whose work counts)."""
        return []

    def launch(self, task: Task, state: Any) -> None:
        """Async rounds: one device's task leaves, on the version ``state`` refers to."""
        return None

    def land(self, device: int, keep: bool) -> list[Update]:
        """Async rounds: that device's task landed (``keep``: its work counts) or was lost."""
        return []

    def stop(self) -> None:
        return None
