"""Sync FedAvg vs FedAsync vs FedBuff on CIFAR-10 with a fleet whose speeds differ 33x.

Same fleet, data and number of client updates for every method; virtual throttling, so the
simulated times are exact and reproducible. Sync FedAvg waits for the slowest device every
round; the async methods let fast devices keep going. Reported per method: final accuracy,
simulated time to a common target accuracy (the lowest final accuracy of the three, times 0.95),
energy and wall time.

    python benchmarks/async_vs_sync.py [--data ../shared/data/cifar10.npz] [--rounds 30]

Prints one JSON line per method.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
from common import job_tree, time_to  # benchmarks/common.py

from flexray.runtime.assembly import parse_config
from flexray.runtime.driver import run_job

REPO = Path(__file__).resolve().parents[1]
DEVICES = 20
FLEET = [("rpi4", 10), ("phone_mid", 5), ("laptop_cpu", 5)]  # 3, 10, 100 GFLOP/s: 33x apart


def job(data: Path, uri: str, method: dict, rounds: dict) -> dict:
    return job_tree(
        "async_vs_sync", method["name"], uri,
        data={"name": "cifar10", "path": str(data), "samples_per_device": 250, "partition": {"kind": "dirichlet", "alpha": 1.0}},
        model={"name": "lenet"}, groups=[{"profile": p, "count": n} for p, n in FLEET],
        method={"lr": 0.02, "momentum": 0.9, **method}, rounds=rounds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10.npz")
    ap.add_argument("--rounds", type=int, default=30, help="sync rounds; async methods get as many client updates")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"CIFAR-10 not found at {args.data}; pass --data path/to/cifar10.npz")
    updates = args.rounds * DEVICES
    k = 5
    variants = {
        "fedavg_sync": ({"name": "fedavg"}, {"num": args.rounds, "eval_every": 1}),
        "fedasync": ({"name": "fedasync", "alpha": 0.6, "staleness_fn": "polynomial", "a": 0.5},
                     {"num": updates, "mode": "async", "eval_every": DEVICES}),
        "fedbuff": ({"name": "fedbuff", "buffer_size": k, "server_lr": 1.0},
                    {"num": updates // k, "mode": "async", "eval_every": DEVICES // k}),
    }
    results = {}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"sqlite:///{tmp}/mlflow.db"
            for name, (method, rounds) in variants.items():
                t0 = time.perf_counter()
                res = run_job(parse_config(job(args.data, uri, method, rounds)))
                results[name] = (res.history, time.perf_counter() - t0)
    finally:
        ray.shutdown()
    target = 0.95 * min(max(h.get("accuracy", 0.0) for h in hist) for hist, _ in results.values())
    sync_t = time_to(results["fedavg_sync"][0], target)
    for name, (hist, wall) in results.items():
        evals = [h for h in hist if "accuracy" in h]
        t = time_to(hist, target)
        print(json.dumps({
            "benchmark": "async_vs_sync", "method": name, "client_updates": updates,
            "final_accuracy": round(evals[-1]["accuracy"], 4), "target_accuracy": round(target, 4),
            "sim_time_to_target_s": None if t is None else round(t, 3),
            "time_ratio_vs_sync": None if t is None or not sync_t else round(t / sync_t, 3),
            "sim_time_total_s": round(hist[-1]["sim_time_s"], 3), "energy_j": round(hist[-1]["energy_j"], 1),
            "wall_s": round(wall, 1), "speed_spread": 33.3,
        }))


if __name__ == "__main__":
    main()
