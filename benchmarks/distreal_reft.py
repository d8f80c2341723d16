"""DISTREAL and REFT against FedAvg dropping stragglers, uniform dropout and HeteroFL on CIFAR-10.

20 devices (rpi4 x8, phone_mid x6, jetson_nano x4, laptop_cpu x2) with random-walk speed traces
that step every round; a round deadline a mid phone meets with the full model at speed 1.2, so
the Pis never do and the phones only on good rounds. Same data (Dirichlet 0.5 label skew), model
(the small ``cnn``), rounds and deadline for every method; virtual throttling, so simulated times
are exact. HeteroFL's static tiers use the FLOP/s that fits a full local epoch in the deadline.

Reported per method: final accuracy, simulated time to a common target accuracy (the lowest final
accuracy of all methods, times 0.95), energy, bytes up/down (total and per kept update),
stragglers, wall time; DISTREAL adds its Pareto front (FLOPs and measured seconds per step against
d = 0) and how often devices changed their choice; every line its upload reduction against FedAvg
waiting for every device (the FedAvg that, like REFT, uploads from every device every round).

    python benchmarks/distreal_reft.py [--data ../shared/data/cifar10.npz] [--rounds 30]
    python benchmarks/distreal_reft.py --only fedavg_wait,reft,reft_no_distill --target 0.274   # REFT ablation

Prints one JSON line per method. Budget: about 25 minutes on 2 idle CPU cores (`--rounds 20` cuts
it by a fifth).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import pyarrow.parquet as pq
import ray
from common import job_tree, time_to  # benchmarks/common.py
from mlflow.tracking import MlflowClient

from flexray.config import ModelConfig, parse_config
from flexray.models import build_model, profile_model
from flexray.runtime.driver import run_job

REPO = Path(__file__).resolve().parents[1]
FLEET = [("rpi4", 8), ("phone_mid", 6), ("jetson_nano", 4), ("laptop_cpu", 2)]
SAMPLES, WIDTH, PHONE_FLOPS = 250, 16, 10e9
# every device prunes at least 30%: REFT saves bandwidth too, not only compute
REFT = {"proxy_samples": 1000, "ratios": [0.3, 0.45, 0.6, 0.75, 0.85]}


def job(data: Path, uri: str, name: str, method: dict, rounds: int, deadline: float, stragglers: str = "drop") -> dict:
    trace = {"kind": "random_walk", "sigma": 0.35, "step_s": deadline, "min_speed": 0.25, "max_speed": 3.0}
    return job_tree(
        "distreal_reft", name, uri,
        data={"name": "cifar10", "path": str(data), "samples_per_device": SAMPLES, "partition": {"kind": "dirichlet", "alpha": 0.5}},
        model={"name": "cnn", "width": WIDTH}, groups=[{"profile": p, "count": n, "trace": trace} for p, n in FLEET],
        method={"lr": 0.05, "momentum": 0.9, **method},
        rounds={"num": rounds, "deadline_s": deadline, "stragglers": stragglers, "eval_every": 1})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10.npz")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--only", default="", help="comma-separated subset of methods")
    ap.add_argument("--target", type=float, default=None, help="default: 0.95 x the lowest final accuracy")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"CIFAR-10 not found at {args.data}; pass --data path/to/cifar10.npz")
    per_sample = profile_model(build_model(ModelConfig(name="cnn", width=WIDTH), (3, 32, 32), 10), (3, 32, 32))
    epoch_flops = SAMPLES * per_sample.train_flops_per_sample
    deadline = round(epoch_flops / (1.2 * PHONE_FLOPS), 4)
    with tempfile.TemporaryDirectory() as tmp:
        cache = f"{tmp}/dse"
        dse = {"proxy_samples": 2000, "proxy_steps": 100, "pop_size": 10, "generations": 5, "cache_dir": cache}
        variants = {
            "fedavg_drop_stragglers": {"name": "fedavg"},
            "uniform_dropout": {"name": "uniform_dropout"},
            "distreal": {"name": "distreal", "dse": dse},
            "reft": {"name": "reft", **REFT, "distill_steps": 30, "distill_lr": 1e-4},
            "heterofl": {"name": "heterofl", "full_rate_flops": epoch_flops / deadline},
            # REFT without distillation (plain in-place averaging) and FedAvg waiting for every
            # device: every device uploads every round there, as in REFT, so it is the upload baseline
            "reft_no_distill": {"name": "reft", **REFT, "distill_steps": 0},
            "fedavg_wait": {"name": "fedavg", "stragglers": "wait"},
        }
        chosen = args.only.split(",") if args.only else list(variants)
        variants = {k: v for k, v in variants.items() if k in chosen}
        results = {}
        uri = f"sqlite:///{tmp}/mlflow.db"
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        try:
            for name, method in variants.items():
                t0 = time.perf_counter()
                method = dict(method)
                stragglers = method.pop("stragglers", "drop")
                res = run_job(parse_config(job(args.data, uri, name, method, args.rounds, deadline, stragglers)))
                wall = time.perf_counter() - t0
                client = MlflowClient(uri)
                events = pq.read_table(client.download_artifacts(res.run_id, "events.parquet", tmp)).to_pylist()
                front = None
                if name == "distreal":
                    with open(client.download_artifacts(res.run_id, "method/distreal_front.json", tmp)) as f:
                        front = json.load(f)
                results[name] = (res.history, wall, events, front)
        finally:
            ray.shutdown()
    target = args.target or 0.95 * min(hist[-1]["accuracy"] for hist, *_ in results.values())
    base = results.get("fedavg_wait") or results.get("fedavg_drop_stragglers")
    fedavg_up = sum(r["bytes_up"] for r in base[2]) if base else 0
    for name, (hist, wall, events, front) in results.items():
        t = time_to(hist, target)
        kept = [e for e in events if e["status"] in ("ok", "late")]
        up = sum(e["bytes_up"] for e in events)
        line = {
            "benchmark": "distreal_reft", "method": name, "rounds": len(hist), "deadline_s": deadline,
            "final_accuracy": round(hist[-1]["accuracy"], 4), "best_accuracy": round(max(h["accuracy"] for h in hist), 4),
            "target_accuracy": round(target, 4), "sim_time_to_target_s": None if t is None else round(t, 3),
            "sim_time_total_s": round(hist[-1]["sim_time_s"], 3), "energy_j": round(hist[-1]["energy_j"], 2),
            "bytes_up": up, "bytes_down": sum(e["bytes_down"] for e in events),
            "bytes_up_per_update": round(up / max(len(kept), 1)), "updates_kept": len(kept),
            "stragglers": sum(e["status"] == "straggler" for e in events),
            "upload_reduction_vs_fedavg": round(fedavg_up / up, 3) if up and fedavg_up else None,
            "wall_s": round(wall, 1),
        }
        if front is not None:
            picks = defaultdict(list)
            for e in sorted(events, key=lambda e: e["round"]):
                if e["status"] in ("ok", "late"):
                    picks[e["device"]].append(json.loads(e["metrics"])["point"])
            line["choice_changes"] = sum(sum(a != b for a, b in pairwise(p)) for p in picks.values())
            line["devices_that_changed"] = sum(len(set(p)) > 1 for p in picks.values())
            line["front"] = [
                {"d": p["rates"], "flops_vs_d0": round(p["flops"] / front["full_flops"], 3),
                 "step_time_vs_d0": round(p["step_s"] / front["full_step_s"], 3), "proxy_loss": round(p["loss"], 3)}
                for p in front["points"]
            ]
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
