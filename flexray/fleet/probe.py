"""``flexray probe``: measure this machine's sustained training FLOP/s for a device profile.

The simulator turns counted FLOPs into time with a profile's ``flops``, so a real board's number
must be measured the same way: time real training steps (forward, backward, optimizer) of the
model the jobs use, and divide the FLOPs ``flexray.models.profile`` counts for them by the wall
time. Datasheet peaks are 10-50x too optimistic for small-batch training on edge hardware.
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
from flexray.fleet.profiles import CATALOG
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


def profile_line(name: str, result: ProbeResult, like: DeviceProfile) -> str:
    """One YAML line for ``fleet.profiles``; floats keep a '.' so YAML reads them as numbers."""
    fields = {
        "flops": result.flops, "memory_bytes": result.memory_bytes, "uplink_bps": like.uplink_bps,
        "downlink_bps": like.downlink_bps, "power_active_w": like.power_active_w, "power_idle_w": like.power_idle_w,
        "power_radio_w": like.power_radio_w,
    }
    body = ", ".join(f"{k}: {v if isinstance(v, int) else _yaml_float(v)}" for k, v in fields.items())
    return f"{name}: {{{body}}}"


def _yaml_float(v: float) -> str:
    """4 significant digits; PyYAML reads 1e+08 as a string, so write 1.0e+08."""
    text = f"{float(v):.4g}"
    mantissa, e, exp = text.partition("e")
    return f"{mantissa}.0{e}{exp}" if e and "." not in mantissa else text
