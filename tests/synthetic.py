"""Random split-learning fleets drawn from the device catalog, for tests and benchmarks of TLMP."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from flexray.fleet.profiles import CATALOG
from flexray.models.split import SplitPoint
from flexray.schedule.tlmp import Clients


def random_clients(n: int, rng: np.random.Generator, points: Sequence[SplitPoint], tight_share: float = 0.3,
                   batch_size: int = 32) -> Clients:
    """A random fleet for tests and benchmarks: catalog devices at 0.2-1.5x their speed and
    0.3-1.5x their bandwidth; a ``tight_share`` of them has memory for only the first cuts."""
    devs = [p for k, p in CATALOG.items() if k not in ("edge_gpu_server", "cloud_gpu")]
    pick = [devs[i] for i in rng.integers(0, len(devs), n)]
    mem = np.array([p.memory_bytes for p in pick], dtype=float)
    tight = rng.random(n) < tight_share
    mem[tight] = rng.uniform(points[0].client_memory_bytes, points[-1].client_memory_bytes, int(tight.sum()))
    speed = rng.uniform(0.2, 1.5, n)
    up, down = rng.uniform(0.3, 1.5, n), rng.uniform(0.3, 1.5, n)
    samples = rng.integers(50, 1000, n).astype(float)
    base = Clients.of(pick, speed, samples, np.ceil(samples / batch_size))
    return dataclasses.replace(base, uplink_bps=base.uplink_bps * up, downlink_bps=base.downlink_bps * down, memory_bytes=mem)
