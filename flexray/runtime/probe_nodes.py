"""``flexray probe --address``: calibrate every board that joined the cluster, on the board itself.

One actor per alive node, pinned there with a hard node-affinity strategy, runs the same
measurement and calibration as a local ``flexray probe``; its ``rtt_s`` is the median round trip
of an empty call from the driver, what every message of a flexray job pays through Ray.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from flexray.fleet.calibrate import PASSES
from flexray.fleet.probe import HostProbe, probe_host

_PINGS = 20


class _Prober:
    def ping(self) -> None:
        return None

    def probe(self, *args: Any) -> HostProbe:
        return probe_host(*args)


def probe_nodes(address: str, model: str, width: int, data: str, batch_size: int, seconds: float,
                threads: int | None, calibration_seconds: float | None, calibration_passes: int = PASSES,
                ) -> list[tuple[str, HostProbe]]:
    """(node IP, probe) of every alive node, probed concurrently on one CPU each."""
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        actors = [ray.remote(_Prober).options(
            num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
        rtts = []
        for a in actors:
            ray.get(a.ping.remote())  # started
            times = []
            for _ in range(_PINGS):
                t0 = time.perf_counter()
                ray.get(a.ping.remote())
                times.append(time.perf_counter() - t0)
            rtts.append(statistics.median(times))
        probes = ray.get([a.probe.remote(model, width, data, batch_size, seconds, threads, calibration_seconds,
                                         calibration_passes)
                          for a in actors])
        return [(n["NodeManagerAddress"], dataclasses.replace(p, rtt_s=r)) for n, p, r in zip(nodes, probes, rtts)]
    finally:
        ray.shutdown()
