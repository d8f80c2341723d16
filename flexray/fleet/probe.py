"""``flexray probe``: measure this machine for a device profile.

Two measurements. The coarse one times real training steps (forward, backward, optimizer) of the
model the jobs use and divides the FLOPs ``flexray.models.profile`` counts for them by the wall
time: one sustained FLOP/s number (datasheet peaks are 10-50x too optimistic for small-batch
training on edge hardware). The calibration (``flexray.fleet.calibrate``) fits the per-layer
latency model that replaces it: a board is 12x faster or slower depending on the workload.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexray.config import ModelConfig
from flexray.fleet.calibrate import PASSES, Calibration, calibrate
from flexray.fleet.profiles import CATALOG, latency_yaml, yaml_float
from flexray.models import build_model, train_flops_per_sample
from flexray.protocol import DeviceProfile

# (C, H, W) of each dataset the zoo trains on; probing needs the shape, not the data.
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
}
NUM_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


@dataclass(frozen=True)
class ProbeResult:
    flops: float  # sustained training FLOP/s
    flops_per_sample: float
    samples: int
    seconds: float
    steps: int
    threads: int
    memory_bytes: int


def available_memory() -> int:
    """Memory free for training now (Linux MemAvailable), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def measure(
    model: str = "cnn", width: int = 32, data: str = "cifar10", batch_size: int = 32,
    seconds: float = 10.0, min_steps: int = 3, warmup: int = 2, threads: int | None = None,
) -> ProbeResult:
    """Train on random batches of the dataset's shape for ``seconds`` and count the FLOPs."""
    if threads:
        torch.set_num_threads(threads)
    shape, classes = INPUT_SHAPES[data], NUM_CLASSES[data]
    torch.manual_seed(0)
    net = build_model(ModelConfig(name=model, width=width), shape, classes)
    per_sample = train_flops_per_sample(net, shape)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, *shape, generator=gen), torch.randint(0, classes, (batch_size,), generator=gen))
               for _ in range(4)]
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    for i in range(warmup):
        step(i)
    steps, t0 = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - t0 < seconds:
        step(steps)
        steps += 1
    elapsed = time.perf_counter() - t0
    samples = steps * batch_size
    return ProbeResult(per_sample * samples / elapsed, per_sample, samples, elapsed, steps, torch.get_num_threads(),
                       available_memory())


def nearest_class(flops: float) -> DeviceProfile:
    """The catalog class closest in (log) FLOP/s: its bandwidth and power are the best guess."""
    return min(CATALOG.values(), key=lambda p: abs(math.log(p.flops / flops)))


def default_name() -> str:
    return re.sub(r"[^a-z0-9_]+", "_", socket.gethostname().lower()).strip("_") or "my_device"


@dataclass(frozen=True)
class HostProbe:
    """Everything ``flexray probe`` measured on one machine."""

    host: str
    result: ProbeResult
    calibration: Calibration | None  # None: --coarse
    rtt_s: float | None = None  # measured message round trip (cluster probes), else the like-class's


def probe_host(model: str, width: int, data: str, batch_size: int, seconds: float, threads: int | None,
               calibration_seconds: float | None, calibration_passes: int = PASSES) -> HostProbe:
    """The coarse FLOP/s and (unless ``calibration_seconds`` is None) the calibrated latency model."""
    result = measure(model, width, data, batch_size, seconds=seconds, threads=threads)
    cal = (calibrate(seconds=calibration_seconds, threads=threads, passes=calibration_passes)
           if calibration_seconds is not None else None)
    return HostProbe(default_name(), result, cal)


def profile_line(name: str, probe: HostProbe, like: DeviceProfile) -> str:
    """One YAML line for ``fleet.profiles``; floats keep a '.' so YAML reads them as numbers."""
    fields = {
        "flops": probe.result.flops, "memory_bytes": probe.result.memory_bytes, "uplink_bps": like.uplink_bps,
        "downlink_bps": like.downlink_bps, "power_active_w": like.power_active_w, "power_idle_w": like.power_idle_w,
        "power_radio_w": like.power_radio_w, "rtt_s": probe.rtt_s if probe.rtt_s is not None else like.rtt_s,
    }
    body = ", ".join(f"{k}: {v if isinstance(v, int) else yaml_float(v)}" for k, v in fields.items())
    if probe.calibration is not None:
        body += f", latency: {latency_yaml(probe.calibration.params)}"
    return f"{name}: {{{body}}}"


def describe(probe: HostProbe, like: DeviceProfile, model: str, width: int, data: str, batch: int) -> list[str]:
    """The comment lines above a profile."""
    res, cal = probe.result, probe.calibration
    lines = [f"# flexray probe on {probe.host}: {res.flops:.4g} FLOP/s sustained training ({model} width {width} on "
             f"{data}-shaped input, batch {batch}, {res.threads} threads, {res.steps} steps in {res.seconds:.1f} s)"]
    if cal is not None:
        lines.append(f"# latency model: {cal.cases} calibration cases timed in {cal.seconds:.0f} s, {cal.threads} threads; "
                     f"the fit is within {cal.median_factor:.2f}x of them (median), {cal.worst_factor:.2f}x (worst); "
                     "docs/latency.md")
    else:
        lines.append("# coarse profile (flops only); drop --coarse for the per-layer latency model")
    rtt = "rtt_s measured as a Ray round trip, " if probe.rtt_s is not None else ""
    lines.append(f"# paste under fleet.profiles; {rtt}bandwidth and power are copied from {like.name} (measure them to be exact)")
    return lines
