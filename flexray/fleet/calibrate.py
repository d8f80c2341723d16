"""Calibrating the per-layer latency model on the machine it runs on (``flexray probe``).

A suite of small networks, one or two kernel kinds each at several widths, spatial sizes and
batch sizes, is trained for real; each case's median step time is regressed on the kernel counts
``flexray.models.kernels`` traces for it (non-negative least squares on relative error, so small
and large steps weigh alike). The fit is a ``LatencyParams``: per kernel kind a FLOP rate, a
bandwidth, a per-kernel and a per-row cost, plus a per-step cost. No zoo model is in the suite,
so ``benchmarks/latency_fidelity.py`` can check the fit on models it has never seen.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import nnls
from torch import nn
from tqdm import tqdm

from flexray.models.kernels import step_profile
from flexray.protocol import KINDS, LatencyParams, StepProfile

Shape = tuple[int, int, int]
BATCHES = (8, 24, 64)
PASSES = 4
"""Each case is timed in this many passes over the suite and its fastest window kept (see ``measurements``)."""


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], tuple[nn.Module, Shape]]


@dataclass(frozen=True)
class Calibration:
    params: LatencyParams
    cases: int
    seconds: float
    median_factor: float  # on the suite itself: max(pred/meas, meas/pred)
    worst_factor: float
    threads: int


def _convs(c: int, hw: int, bn: bool, k: int = 3, pool: bool = False) -> tuple[nn.Module, Shape]:
    layers: list[nn.Module] = [nn.Conv2d(3, c, k, padding=k // 2)]
    for i in range(2):
        layers += [*([nn.BatchNorm2d(c)] if bn else []), nn.ReLU(), *([nn.MaxPool2d(2)] if pool and i == 0 else []),
                   nn.Conv2d(c, c, k, padding=k // 2)]
    return nn.Sequential(*layers, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)), (3, hw, hw)


def _depthwise(c: int, hw: int) -> tuple[nn.Module, Shape]:
    layers: list[nn.Module] = [nn.Conv2d(3, c, 1)]
    for _ in range(3):
        layers += [nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU6()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)), (3, hw, hw)


def _inverted(c: int, hw: int) -> tuple[nn.Module, Shape]:
    """Expand 1x1, depthwise 3x3, project 1x1, each with BatchNorm (the inverted-residual pattern)."""
    layers: list[nn.Module] = [nn.Conv2d(3, c, 1)]
    for _ in range(2):
        layers += [nn.Conv2d(c, 6 * c, 1), nn.BatchNorm2d(6 * c), nn.ReLU6(), nn.Conv2d(6 * c, 6 * c, 3, padding=1, groups=6 * c),
                   nn.BatchNorm2d(6 * c), nn.ReLU6(), nn.Conv2d(6 * c, c, 1), nn.BatchNorm2d(c)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)), (3, hw, hw)


class _Residual(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity: the residual pattern at a given width."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


def _residuals(c: int, hw: int, blocks: int = 4) -> tuple[nn.Module, Shape]:
    """Many small kernels: at narrow widths this is what a step's fixed costs are made of."""
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *(_Residual(c) for _ in range(blocks)), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(c, 10)), (3, hw, hw)


def _mlp(d: int) -> tuple[nn.Module, Shape]:
    return nn.Sequential(nn.Flatten(), nn.Linear(192, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 10)), (3, 8, 8)


class _Tokens(nn.Module):
    """One transformer encoder layer over ``seq`` tokens cut from the image."""

    def __init__(self, d: int, heads: int, seq: int, activation: str = "relu") -> None:
        super().__init__()
        self.seq = seq
        self.embed = nn.Linear(192 // seq, d)
        self.encoder = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, activation=activation,
                                                  batch_first=True, norm_first=activation == "gelu")
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(1).reshape(x.shape[0], self.seq, -1)
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def _norms(c: int, hw: int) -> tuple[nn.Module, Shape]:
    layers: list[nn.Module] = [nn.Conv2d(3, c, 1)]
    for _ in range(4):
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)), (3, hw, hw)


def _pools(c: int, hw: int) -> tuple[nn.Module, Shape]:
    return nn.Sequential(nn.Conv2d(3, c, 1), nn.MaxPool2d(2), nn.ReLU(), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(c * (hw // 8) ** 2, 10)), (3, hw, hw)


def suite() -> list[Case]:
    """Layer kinds x widths x spatial sizes; none of them is a model of the zoo."""
    cases = [Case(f"conv{c}@{hw}", lambda c=c, hw=hw: _convs(c, hw, bn=False)) for c in (4, 16, 64) for hw in (8, 32)]
    cases += [Case(f"conv{c}@{hw}", lambda c=c, hw=hw: _convs(c, hw, bn=False)) for c, hw in ((256, 4), (512, 2))]
    cases += [Case(f"conv{c}_bn_pool@32", lambda c=c: _convs(c, 32, bn=True, pool=True)) for c in (8, 32)]
    cases += [Case("conv1x1_96_bn@16", lambda: _convs(96, 16, bn=True, k=1))]
    cases += [Case(f"dw{c}@{hw}", lambda c=c, hw=hw: _depthwise(c, hw)) for c, hw in ((16, 32), (64, 16), (256, 4), (512, 2))]
    cases += [Case(f"mlp{d}", lambda d=d: _mlp(d)) for d in (64, 512, 2048)]
    cases += [Case(f"attn{d}h{h}s{s}", lambda d=d, h=h, s=s: (_Tokens(d, h, s), (3, 8, 8)))
              for d, h, s in ((32, 4, 64), (64, 2, 16), (128, 8, 64))]
    cases += [Case("attn48h4s64_gelu", lambda: (_Tokens(48, 4, 64, "gelu"), (3, 8, 8)))]
    cases += [Case(f"inverted{c}@{hw}", lambda c=c, hw=hw: _inverted(c, hw)) for c, hw in ((16, 8), (64, 2))]
    cases += [Case(f"norm{c}@16", lambda c=c: _norms(c, 16)) for c in (8, 64)]
    cases += [Case(f"residual{c}@{hw}", lambda c=c, hw=hw: _residuals(c, hw)) for c, hw in ((2, 8), (2, 32), (8, 16), (32, 8))]
    cases += [Case("linear", lambda: (nn.Sequential(nn.Flatten(), nn.Linear(192, 10)), (3, 8, 8)))]
    cases += [Case(f"pool{c}@32", lambda c=c: _pools(c, 32)) for c in (4, 32)]
    return cases


def time_step(net: nn.Module, shape: tuple[int, ...], batch_size: int, seconds: float = 0.3, classes: int = 10,
              min_steps: int = 3, device: str = "cpu") -> float:
    """Median wall seconds of one real SGD step (a mini-batch gathered by shuffled indices, as
    flexray's trainer does, then forward, loss, backward, optimizer) after a warm-up; on a GPU each
    step is synchronised, so its kernels' time is counted, not their launch."""
    g = torch.Generator().manual_seed(0)
    pool = 4 * batch_size
    xs, ys = torch.randn(pool, *shape, generator=g), torch.randint(0, classes, (pool,), generator=g)
    net, xs, ys = net.to(device), xs.to(device), ys.to(device)
    sync = torch.cuda.synchronize if xs.is_cuda else (lambda: None)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    net.train()

    def step() -> None:
        idx = torch.randperm(pool, generator=g)[:batch_size].to(device)
        x, y = xs[idx], ys[idx]
        opt.zero_grad(set_to_none=True)
        out = net(x)
        F.cross_entropy(out[0] if isinstance(out, tuple) else out, y).backward()
        opt.step()
        sync()

    for _ in range(2):
        step()
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - t0 < seconds:
        a = time.perf_counter()
        step()
        times.append(time.perf_counter() - a)
    return statistics.median(times)


def measurements(cases: list[Case], batches: tuple[int, ...] = BATCHES, seconds: float = 0.15, device: str = "cpu",
                 passes: int = PASSES, done: Callable[[], object] = lambda: None,
                 after_pass: Callable[[], object] = lambda: None) -> list[tuple[str, StepProfile, int, float]]:
    """Each (case, batch)'s step time: the fastest of ``passes`` windows spread over the run.

    A shared machine slows down for seconds at a time (another tenant, a core shared with a
    sibling), and interference only ever adds time; the fastest window is the undisturbed
    machine the latency model describes. ``done`` is called after every window (a progress bar),
    ``after_pass`` after every pass (work to be measured in the same periods, e.g. a benchmark's)."""
    built = []
    for case in cases:
        torch.manual_seed(0)
        net, shape = case.build()
        net = net.to(device)
        built.append((case.name, net, shape, step_profile(net, shape)))
    best: dict[tuple[str, int], float] = {}
    for _ in range(passes):
        for name, net, shape, _prof in built:
            for b in batches:
                t = time_step(net, shape, b, seconds, device=device)
                best[name, b] = min(t, best.get((name, b), math.inf))
                done()
        after_pass()
    return [(name, prof, b, best[name, b]) for name, _, _, prof in built for b in batches]


def _fitted() -> np.ndarray:
    """Which coefficients the fit may use: every kind's per-kernel cost and FLOP rate; bandwidth
    where kernels stream memory (not matmul/attention, whose operands are small and reused); a
    per-row cost only where kernels loop per (sample, channel) plane (depthwise convs, norms).
    Freeing the rest over-fits the suite (checked on held-out models: latency_fidelity.py)."""
    n = len(KINDS)
    mask = np.zeros(2 + 4 * n, dtype=bool)  # the last feature, counted FLOPs, is the coarse model's
    mask[0] = True
    mask[1:1 + n] = True
    for i, kind in enumerate(KINDS):
        mask[1 + n + i] = kind in ("conv", "grouped", "matmul", "attention")
        mask[1 + 2 * n + i] = kind not in ("matmul", "attention")
        mask[1 + 3 * n + i] = kind in ("conv", "grouped", "norm")
    return mask


def fit(rows: list[tuple[StepProfile, int, float]]) -> tuple[LatencyParams, np.ndarray]:
    """Non-negative least squares on relative error: every coefficient is a cost, never a credit."""
    x = np.array([p.step(b).features() for p, b, _ in rows])
    y = np.array([t for _, _, t in rows])
    mask = _fitted()
    coef = np.zeros(x.shape[1])
    coef[mask], _ = nnls(x[:, mask] / y[:, None], np.ones_like(y))
    pred = x @ coef
    return LatencyParams.from_coefficients(coef), np.maximum(pred / y, y / pred)


def calibrate(seconds: float = 0.15, batches: tuple[int, ...] = BATCHES, threads: int | None = None,
              progress: bool = False, device: str = "cpu", passes: int = PASSES) -> Calibration:
    """Time the suite on this machine (``device``: "cuda" for its GPU) and fit its ``LatencyParams``
    (about 1.5 minutes on 2 cores; ``progress``: a bar on stderr)."""
    if threads:
        torch.set_num_threads(threads)
    t0, cases = time.perf_counter(), suite()
    bar = tqdm(total=passes * len(cases) * len(batches), desc="calibrating", unit="step", disable=not progress,
               file=sys.stderr)
    rows = [(prof, b, t) for _, prof, b, t in measurements(cases, batches, seconds, device, passes, bar.update)]
    bar.close()
    params, factors = fit(rows)
    return Calibration(params, len(rows), time.perf_counter() - t0, float(np.median(factors)), float(factors.max()),
                       torch.get_num_threads())
