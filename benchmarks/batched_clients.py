"""Batched clients vs client after client, side by side in one run, on one compute device.

W1: 20 devices x 250 CIFAR-10 images, all 20 every round. W2: 100 devices x 100 images, 10 per
round. LeNet, FedAvg (or ``--method``: heterofl, fjord; flextrain on resnet8), 1 local epoch,
batch 32, SGD lr 0.01 momentum 0.9. One device actor's own
code path (``DeviceHost.run_round``, in this process, so the figure is the training lever
without Ray's share) hosts every device; ``fleet.batch_clients`` is 1 (one by one) or the round's
size (one stack). Steady round = median wall time of rounds 2..N.

    python benchmarks/batched_clients.py [--device cpu|cuda] [--workloads W1,W2] [--rounds 5] [--method fedavg]

Prints one JSON line per workload (and appends it to benchmarks/results/batched_clients.jsonl
with --save).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from flexray.data import load_dataset
from flexray.fleet.fleet import assign_actors, build_fleet
from flexray.fleet.report import RoundRequest
from flexray.protocol import DeviceView
from flexray.runtime.actor import DeviceHost
from flexray.runtime.assembly import parse_config

REPO = Path(__file__).resolve().parents[1]

WORKLOADS = {"W1": (20, 250, 20), "W2": (100, 100, 10)}  # devices, images per device, devices per round


MODELS = {"flextrain": "resnet8"}  # depth prefixes need residual stages; the rest train LeNet


def tree(devices: int, per_device: int, data: Path, device: str, chunk: int, method: str = "fedavg") -> dict:
    return {
        "name": "batched", "seed": 0,
        "data": {"name": "cifar10", "source": "npz", "path": str(data), "samples_per_device": per_device,
                 "test_samples": 100, "partition": {"kind": "iid"}},
        "model": {"name": MODELS.get(method, "lenet")},
        "fleet": {"actors": 1, "groups": [{"profile": "phone_mid", "count": devices}], "batch_clients": chunk,
                  **({"compute_device": "cuda", "num_gpus_per_actor": 1} if device == "cuda" else {})},
        "method": {"name": method, "local_epochs": 1, "batch_size": 32, "lr": 0.01, "momentum": 0.9},
        "rounds": {"num": 5},
        "tracking": {"uri": "sqlite:///unused.db", "progress": False},
    }


def steady_round(workload: str, data: Path, device: str, chunk: int, rounds: int, method: str) -> tuple[float, float, int]:
    """(steady round seconds, final train loss, peak GPU bytes) of one configuration."""
    devices, per_device, per_round = WORKLOADS[workload]
    cfg = parse_config(tree(devices, per_device, data, device, chunk, method))
    ds = load_dataset(cfg.data)
    fleet = build_fleet(cfg, ds.y_train)
    torch.manual_seed(0)
    host = DeviceHost(cfg, assign_actors(cfg, fleet)[0], fleet, ds)
    method = host.method
    state = method.init(host.ctx._model_fn())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    for rnd in range(rounds):
        picked = [fleet[(rnd * per_round + i) % devices] for i in range(per_round)]
        tasks = method.plan(rnd, [DeviceView(d.id, d.profile, 1.0, len(d.indices)) for d in picked], state)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reports, updates = host.run_round(RoundRequest(rnd, 0.0, None, False, tuple(tasks), True), state)
        state = method.aggregate(rnd, state, updates)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        loss = statistics.fmean(r.metrics["train_loss"] for r in reports)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return statistics.median(times[1:]), loss, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--workloads", default="W1")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10.npz")
    ap.add_argument("--method", default="fedavg", choices=["fedavg", "fedprox", "heterofl", "fedrolex", "fjord", "flextrain"])
    ap.add_argument("--save", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    for workload in args.workloads.split(","):
        per_round = WORKLOADS[workload][2]
        alone_s, alone_loss, alone_peak = steady_round(workload, args.data, args.device, 1, args.rounds, args.method)
        stack_s, stack_loss, stack_peak = steady_round(workload, args.data, args.device, per_round, args.rounds, args.method)
        line = {
            "benchmark": "batched_clients", "workload": workload, "method": args.method,
            "model": MODELS.get(args.method, "lenet"), "device": args.device,
            "devices_per_round": per_round, "rounds": args.rounds,
            "one_by_one_round_s": round(alone_s, 4), "batched_round_s": round(stack_s, 4),
            "speedup": round(alone_s / stack_s, 3),
            "train_loss_diff": abs(alone_loss - stack_loss),
            **({"peak_gpu_mb_one_by_one": round(alone_peak / 2**20, 1), "peak_gpu_mb_batched": round(stack_peak / 2**20, 1),
                "gpu": torch.cuda.get_device_name(0)} if args.device == "cuda" else {}),
            "load_1m": round(os.getloadavg()[0], 2),  # both sides ran under the same load, one after the other
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} cores {platform.machine()}, "
                       + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"),
            "command": "python benchmarks/batched_clients.py " + " ".join(sys.argv[1:]),
        }
        print(json.dumps(line), flush=True)
        if args.save:
            with open(REPO / "benchmarks" / "results" / "batched_clients.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
