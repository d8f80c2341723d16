"""What an actor sends back per device per round: the row of the event log."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from flexray.methods.service import ServiceClient
from flexray.protocol import Task, Update


@dataclass(frozen=True)
class RoundRequest:
    """One actor's share of a round: its tasks plus the clock facts it needs to throttle."""

    round: int
    start_s: float  # simulated time the round starts
    deadline_s: float | None  # relative to start_s
    drop_stragglers: bool
    tasks: tuple[Task, ...]
    presum: bool = True  # False when the driver must pick updates per device (over-commit, async)
    draw: int = 0  # async: the dispatch number, so one device's repeated tasks differ in randomness
    service: ServiceClient | None = None  # the method's round service: each task gets its link


@dataclass
class DeviceReport:
    round: int
    device: int
    name: str
    profile: str
    actor: str
    node: str
    status: str
    """ok | late (past the deadline, waited for) | straggler (dropped at the deadline) | lost (went
    offline mid-task) | rejected (NaN/Inf or wrong shape) | failed (its actor died) |
    surplus (over-committed, not among the first K) | stale (async, too stale)"""
    samples: int
    flops: float
    speed: float
    wall_s: float
    download_s: float
    compute_s: float
    upload_s: float
    start_s: float
    end_s: float
    energy_j: float
    bytes_down: int
    bytes_up: int
    metrics: dict[str, float] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    server_s: float = 0.0  # simulated time waiting on the method's round service (inside start_s..end_s)
    predicted_s: float = float("nan")  # the method's predicted latency (download + compute + server + upload)

    @classmethod
    def untrained(cls, round: int, device: int, name: str, profile: str, actor: str, status: str, note: str,
                  speed: float, start_s: float, energy_j: float = 0.0, node: str = "") -> DeviceReport:
        """A device that trained nothing this round (failed, offline, idle): zero work, zero time."""
        return cls(round=round, device=device, name=name, profile=profile, actor=actor, node=node, status=status,
                   samples=0, flops=0.0, speed=speed, wall_s=0.0, download_s=0.0, compute_s=0.0, upload_s=0.0,
                   start_s=start_s, end_s=start_s, energy_j=energy_j, bytes_down=0, bytes_up=0, note=note)

    @property
    def comm_s(self) -> float:
        return self.download_s + self.upload_s

    @property
    def busy_s(self) -> float:
        return self.end_s - self.start_s

    def row(self) -> dict[str, Any]:
        """Flat, primitive-only row (Parquet and checkpoint friendly)."""
        out = asdict(self)
        out["comm_s"] = self.comm_s
        out["train_loss"] = float(self.metrics.get("train_loss", float("nan")))
        out["metrics"] = json.dumps(self.metrics, sort_keys=True)
        out["spec"] = json.dumps(self.spec, sort_keys=True, default=str)
        return out


@dataclass
class RoundOutcome:
    """One round as an engine closes it: every device's report, the updates to aggregate, and
    the simulated time it took."""

    reports: list[DeviceReport]
    updates: list[Update]
    duration_s: float  # simulated, incl. server time
    server_s: float
    nodes_lost: int = 0  # Ray nodes that left since the previous round

    def count(self, *statuses: str) -> int:
        return sum(r.status in statuses for r in self.reports)
