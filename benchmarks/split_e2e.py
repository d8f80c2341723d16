"""End to end: SplitFed + TLMP through the split server actor vs FedAvg on MNIST.

Same fleet, data, seed and samples for every run (each device trains its shard once per
round); virtual throttling, so simulated times are exact and reproducible. Runs:

- fedavg: plain FedAvg (the "FL only" baseline; its round time is the FL-only latency);
- tlmp: SplitFed-V1 (hybrid) with the TLMP scheduler, re-planned each round;
- tlmp_v2: the same with SplitFed-V2 (one shared server model);
- fixed: SplitFed-V1 with the single best cut for all (optimal shares);
- equal: SplitFed-V1 with equal server shares (each client takes its best cut for that share).

Reported per run: final accuracy, mean simulated round latency (clients + server aggregation),
the plan's predicted round latency, split clients per round, wall time.

    python benchmarks/split_e2e.py [--data ../shared/data/mnist.npz] [--rounds 6] [--runs fedavg,tlmp,...]

Prints one JSON line per run. Budget: resnet8 on 8 x 300 MNIST samples, 6 rounds: ~10-15 min on
2 shared cores for all five runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
from common import job_tree  # benchmarks/common.py
from mlflow.tracking import MlflowClient

from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job

REPO = Path(__file__).resolve().parents[1]
FLEET = [("rpi3", 2), ("rpi4", 2), ("phone_mid", 2), ("laptop_cpu", 2)]  # 1, 3, 10, 100 GFLOP/s
RUNS = {
    "fedavg": {"name": "fedavg"},
    "tlmp": {"name": "splitfed", "scheduler": "tlmp", "variant": "v1"},
    "tlmp_v2": {"name": "splitfed", "scheduler": "tlmp", "variant": "v2"},
    "fixed": {"name": "splitfed", "scheduler": "fixed", "variant": "v1"},
    "equal": {"name": "splitfed", "scheduler": "equal", "variant": "v1"},
}


def job(data: Path, uri: str, rounds: int, method: dict) -> dict:
    return job_tree(
        "split_e2e", method.get("scheduler", method["name"]), uri,
        data={"name": "mnist", "path": str(data), "samples_per_device": 300, "partition": {"kind": "dirichlet", "alpha": 1.0}},
        model={"name": "resnet8"}, groups=[{"profile": p, "count": n} for p, n in FLEET],
        method={"lr": 0.05, "momentum": 0.9, **method}, rounds={"num": rounds}, actors=1)


def best_fixed_cut(tree: dict) -> int:
    """The single cut for all whose planned max latency is least (what the 'fixed' baseline uses)."""
    from flexray.data import load_dataset
    from flexray.fleet.fleet import build_fleet
    from flexray.fleet.profiles import resolve_profile
    from flexray.methods import method_class
    from flexray.protocol import DeviceView
    from flexray.models import build_model, profile_model

    cfg = parse_config({**tree, "method": {**tree["method"], "scheduler": "fixed", "cut": 1}})
    ds = load_dataset(cfg.data)
    devices = build_fleet(cfg, ds.y_train)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes)
    prof = profile_model(model, ds.input_shape)
    views = [DeviceView(d.id, d.profile, d.trace.speed(0.0), len(d.indices)) for d in devices]
    best, best_cut = np.inf, 1
    for cut in range(1, len(prof.layers) + 1):
        m = method_class("splitfed")(cfg.method.model_copy(update={"cut": cut}), lambda: model)
        m.attach(prof, resolve_profile(cfg.fleet.server_profile))
        lat = max(t.spec["predicted_s"] for t in m.plan(0, views, m.init(model)))
        if lat < best:
            best, best_cut = lat, cut
    return best_cut


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mnist.npz")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", default=",".join(RUNS))
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"MNIST not found at {args.data}; pass --data path/to/mnist.npz")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"sqlite:///{tmp}/mlflow.db"
            for name in args.runs.split(","):
                method = dict(RUNS[name])
                if name == "fixed":
                    method["cut"] = best_fixed_cut(job(args.data, uri, args.rounds, method))
                t0 = time.perf_counter()
                res = run_job(parse_config(job(args.data, uri, args.rounds, method)))
                wall = time.perf_counter() - t0
                hist = res.history
                rows = pq.read_table(MlflowClient(uri).download_artifacts(res.run_id, "events.parquet")).to_pylist()
                n_split = sum(json.loads(r["spec"]).get("theta", 0.0) > 0 for r in rows)
                print(json.dumps({
                    "benchmark": "split_e2e", "run": name, "method": method, "rounds": args.rounds,
                    "samples_per_round": int(sum(r["samples"] for r in rows) / args.rounds),
                    "final_accuracy": round(hist[-1]["accuracy"], 4),
                    "mean_round_sim_s": round(float(np.mean([h.round_sim_s for h in hist])), 3),
                    "mean_round_predicted_s": round(float(np.mean([h.round_predicted_s for h in hist])), 3),
                    "max_abs_pred_err_s": round(max(abs(r["end_s"] - r["start_s"] - r["predicted_s"]) for r in rows), 9),
                    "split_clients_per_round": round(n_split / args.rounds, 2), "wall_s": round(wall, 1),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                }), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
