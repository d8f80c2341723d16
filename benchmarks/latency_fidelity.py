"""Can the simulated clock be trusted? Predicted vs measured local epochs on models never calibrated on.

For each thread count, in 4 interleaved passes: one pass of ``flexray probe``'s calibration suite
(its per-layer latency model) and of its ``--coarse`` measurement (the old one-number FLOP/s
profile), then every held-out case. The host's speed drifts by 10-30 % over minutes, so the fit
and the measurements each keep their fastest of the same periods. Each held-out case --
torchvision models with depthwise, grouped and residual layers, the ViT, HeteroFL width sub-models
p = 1/16 ... 1 of resnet20 and cnn, FlexTrain depth prefixes, DISTREAL dropout points, SplitFed
client parts, batch sizes 8 to 64 -- trains one local epoch for real and is predicted by both
models from its own traced kernels. Its measurement is the fastest of its epochs (per pass a
warm-up epoch, then at least 2 and 0.5 s): interference only ever adds time; ``measured_spread``
(slowest / fastest) says how much there was. One JSON line per case, the width sub-models'
predicted and measured speed-ups over their full model, and a summary line per thread count:
median and worst factor max(pred/meas, meas/pred), new model beside old.

    python benchmarks/latency_fidelity.py [--threads 1,2] [--samples 256] [--passes 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flexray.config import MethodConfig, ModelConfig
from flexray.fleet import calibrate
from flexray.fleet.probe import measure
from flexray.methods.heterofl import HeteroFL
from flexray.models import build_model, depth, filters, profile_model
from flexray.models.split import split_model, split_points
from flexray.protocol import DeviceProfile, LatencyParams, StepProfile, compute_seconds

CIFAR, DIGITS = (3, 32, 32), (1, 8, 8)
RATES = (1.0, 0.5, 0.25, 0.125, 0.0625)


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # what the case stands for (torchvision, vit, heterofl, flextrain, distreal, splitfed)
    batch: int
    build: Callable[[], tuple[nn.Module, tuple[int, ...], StepProfile, Callable[..., None]]]


def _zoo(name: str, shape: tuple[int, ...], width: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, **({"width": width} if width else {})), shape, 10)


def _plain(net: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...], StepProfile, Callable[..., None]]:
    """A model trained end to end with cross-entropy: predicted from its own profile."""
    return net, shape, profile_model(net, shape).step, _ce_step


def _ce_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    out = net(x)
    F.cross_entropy(out[0] if isinstance(out, tuple) else out, y).backward()
    opt.step()


def _width(model: str, shape: tuple[int, ...], rate: float) -> Callable[[], tuple]:
    def build() -> tuple:
        method = HeteroFL(MethodConfig.model_validate({"name": "heterofl"}), lambda: _zoo(model, shape))
        return _plain(method.build(rate, scaler=False), shape)
    return build


def _prefix(k: int) -> Callable[[], tuple]:
    return lambda: _plain(depth.depth_prefix(_zoo("resnet20", CIFAR), k), CIFAR)


def _dropout(rates: dict[str, float]) -> Callable[[], tuple]:
    """The slim model a DISTREAL design point trains (the quickstart's cnn on digits)."""
    def build() -> tuple:
        full = _zoo("cnn", DIGITS, 16)
        return _plain(filters.slim(full, filters.widths(filters.chain(full), rates)), DIGITS)
    return build


def _client(model: str, shape: tuple[int, ...], cut: int, width: int | None = None) -> Callable[[], tuple]:
    """A SplitFed client part: its forward, the server's gradient injected, its backward and step."""
    def build() -> tuple:
        full = _zoo(model, shape, width)
        point = split_points(profile_model(full, shape), 32)[cut - 1]
        client, _ = split_model(full, cut)

        grads: dict[torch.Size, list[torch.Tensor]] = {}
        g = torch.Generator().manual_seed(0)

        def step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, _y: torch.Tensor) -> None:
            """The server's gradient: random, made once per shape, its sign alternating so the
            weights do not drift one way (a drifting client measured up to 1.6x fast)."""
            opt.zero_grad(set_to_none=True)
            h = net(x)
            if h.shape not in grads:
                d = torch.randn(h.shape, generator=g) * 1e-3
                grads[h.shape] = [d, -d]
            pair = grads[h.shape]
            pair.reverse()
            h.backward(pair[0])
            opt.step()
        return client, shape, point.client_step, step
    return build


def cases() -> list[Case]:
    out = [
        Case("torchvision:mobilenet_v2", "torchvision (depthwise)", 32, lambda: _plain(_zoo("torchvision:mobilenet_v2", CIFAR), CIFAR)),
        Case("torchvision:shufflenet_v2_x0_5", "torchvision (grouped)", 32,
             lambda: _plain(_zoo("torchvision:shufflenet_v2_x0_5", CIFAR), CIFAR)),
        Case("torchvision:resnet18", "torchvision (residual)", 16, lambda: _plain(_zoo("torchvision:resnet18", CIFAR), CIFAR)),
        Case("vit", "vit", 32, lambda: _plain(_zoo("vit", CIFAR), CIFAR)),
        Case("vit", "vit", 8, lambda: _plain(_zoo("vit", CIFAR), CIFAR)),
        Case("vgg", "zoo", 16, lambda: _plain(_zoo("vgg", CIFAR), CIFAR)),
    ]
    out += [Case(f"resnet20 p={r:g}", "heterofl resnet20", 32, _width("resnet20", CIFAR, r)) for r in RATES]
    out += [Case(f"cnn p={r:g}", "heterofl cnn", 64, _width("cnn", CIFAR, r)) for r in RATES]
    out += [Case(f"resnet20 k={k}", "flextrain prefix", 16, _prefix(k)) for k in (1, 4, 7)]
    out += [Case(f"cnn16 drop {r:g}", "distreal point", 8, _dropout({"conv1.0": r, "conv2.0": r})) for r in (0.25, 0.5, 0.75)]
    out += [Case("resnet20 client cut=2", "splitfed client", 32, _client("resnet20", CIFAR, 2)),
            Case("resnet20 client cut=5", "splitfed client", 32, _client("resnet20", CIFAR, 5)),
            Case("cnn client cut=1", "splitfed client", 64, _client("cnn", CIFAR, 1))]
    return out


def epoch_seconds(net: nn.Module, shape: tuple[int, ...], batch: int, samples: int, step: Callable[..., None],
                  repeats: int = 2, seconds: float = 0.5) -> list[float]:
    """Wall seconds of local epochs (``samples`` in batches of ``batch``, last one partial): at least
    ``repeats`` and ``seconds`` of them, so a 30 ms epoch gets as many chances as a 1 s one."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(samples, *shape, generator=g), torch.randint(0, 10, (samples,), generator=g)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    net.train()

    def epoch() -> float:  # shuffled mini-batches gathered by index, as flexray's trainer does
        t0 = time.perf_counter()
        order = torch.randperm(samples, generator=g)
        for i in range(0, samples, batch):
            idx = order[i:i + batch]
            step(net, opt, x[idx], y[idx])
        return time.perf_counter() - t0

    epoch()  # warm-up: allocator, oneDNN primitives, momentum buffers
    times = [epoch() for _ in range(repeats)]
    while sum(times) < seconds:
        times.append(epoch())
    return times


def _profile(flops: float, latency: LatencyParams | None) -> DeviceProfile:
    """This machine as ``flexray probe`` prints it; only the compute fields matter here."""
    return DeviceProfile("this_machine", flops, 1 << 34, 1e9, 1e9, 1.0, 1.0, 1.0, latency=latency)


def factor(pred: float, meas: float) -> float:
    return max(pred / meas, meas / pred)


def stamp() -> dict:
    return {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} cores {platform.machine()}, no GPU",
            "command": "python benchmarks/latency_fidelity.py " + " ".join(sys.argv[1:])}


def run(threads: int, samples: int, passes: int) -> list[dict]:
    """Calibration and validation interleaved, pass by pass: this host's speed drifts by 10-30 %
    over minutes, so each side keeps its fastest of the same ``passes`` periods."""
    torch.set_num_threads(threads)
    built = [(case, *case.build()) for case in cases()]
    epochs: list[list[float]] = [[] for _ in built]
    coarse_flops: list[float] = []

    def held_out_pass() -> None:  # after each pass of `flexray probe`'s suite: its `--coarse` and every case
        coarse_flops.append(measure(seconds=10.0 / passes, threads=threads).flops)
        for times, (case, net, shape, _prof, step) in zip(epochs, built):
            times.extend(epoch_seconds(net, shape, case.batch, samples, step))
        print(f"# threads {threads}: pass {len(coarse_flops)}/{passes} done", file=sys.stderr, flush=True)

    windows = calibrate.measurements(calibrate.suite(), passes=passes, after_pass=held_out_pass)
    params, _ = calibrate.fit([(prof, b, t) for _, prof, b, t in windows])
    new, old = _profile(max(coarse_flops), params), _profile(max(coarse_flops), None)
    rows = []
    for times, (case, _net, _shape, step_prof, _step) in zip(epochs, built):
        work = step_prof.epochs(samples, case.batch)
        meas = min(times)  # interference only adds time: the fastest epoch is the undisturbed machine
        pred, pred_old = compute_seconds(new, work), compute_seconds(old, work)
        row = {"benchmark": "latency_fidelity", "case": case.name, "group": case.group, "batch": case.batch,
               "threads": threads, "samples": samples, "measured_s": round(meas, 5),
               "measured_spread": round(max(times) / meas, 3), "predicted_s": round(pred, 5),
               "predicted_old_s": round(pred_old, 5), "factor": round(factor(pred, meas), 3),
               "factor_old": round(factor(pred_old, meas), 3), **stamp()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for model in ("resnet20", "cnn"):  # what a width sub-model saves over the full model
        full = next(r for r in rows if r["case"] == f"{model} p=1")
        for r in [r for r in rows if r.get("case", "").startswith(f"{model} p=") and r is not full]:
            line = {"benchmark": "latency_fidelity", "speedup": r["case"], "threads": threads,
                    "measured": round(full["measured_s"] / r["measured_s"], 2),
                    "predicted": round(full["predicted_s"] / r["predicted_s"], 2),
                    "predicted_old": round(full["predicted_old_s"] / r["predicted_old_s"], 2), **stamp()}
            rows.append(line)
            print(json.dumps(line), flush=True)
    f_new = [r["factor"] for r in rows if "factor" in r]
    f_old = [r["factor_old"] for r in rows if "factor" in r]
    summary = {"benchmark": "latency_fidelity", "summary": True, "threads": threads, "cases": len(f_new),
               "median_factor": round(statistics.median(f_new), 3), "worst_factor": round(max(f_new), 3),
               "median_factor_old": round(statistics.median(f_old), 3), "worst_factor_old": round(max(f_old), 3),
               "goal": "median <= 1.10, worst <= 1.35", **stamp()}
    rows.append(summary)
    print(json.dumps(summary), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--samples", type=int, default=256, help="samples in the local epoch (default 256)")
    ap.add_argument("--passes", type=int, default=4, help="interleaved passes of calibration and cases (default 4)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [r for t in args.threads.split(",") for r in run(int(t), args.samples, args.passes)]
    if args.out:
        with Path(args.out).open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
