"""DISTREAL and REFT against FedAvg dropping stragglers, uniform dropout and HeteroFL on CIFAR-10.

Uniform dropout runs twice: with its default rates (up to 0.75) and capped at DISTREAL's grid
(up to 0.5), so DISTREAL's per-layer search is compared like for like.

20 devices (rpi4 x8, phone_mid x6, jetson_nano x4, laptop_cpu x2) with random-walk speed traces
that step every round; a round deadline a mid phone meets with the full model at speed 1.2, so
the Pis never do and the phones only on good rounds. Same data (Dirichlet 0.5 label skew), model
(the small ``cnn``), rounds and deadline for every method; virtual throttling, so simulated times
are exact. HeteroFL's static tiers use the FLOP/s that fits a full local epoch in the deadline.

Reported per method, as means over ``--seeds`` (each seed: data split, weights, traces) with the
per-seed values beside them: final accuracy, simulated time to a common target accuracy (0.95 x the
lowest mean final accuracy of all methods; null if some seed never reaches it), energy, bytes
up/down (total and per kept update), stragglers, wall time; DISTREAL adds its Pareto front (FLOPs
and measured seconds per step against d = 0) and how often devices changed their choice; every
line its upload reduction against FedAvg waiting for every device (the FedAvg that, like REFT,
uploads from every device every round).

    python benchmarks/distreal_reft.py [--data ../shared/data/cifar10.npz] [--rounds 30] [--seeds 0,1,2]
    python benchmarks/distreal_reft.py --only fedavg_wait,reft,reft_no_distill --target 0.274   # REFT ablation
    python benchmarks/distreal_reft.py --model resnet20 --samples 50 --rounds 10 --dse-scale 0.1 --test-samples 1000 --seeds 0,1,2

Prints one JSON line per method. Budget: about 8 minutes per seed on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pyarrow.parquet as pq
import ray
from common import epoch_seconds, job_tree, mean, time_to  # benchmarks/common.py
from mlflow.tracking import MlflowClient

from flexray.config import ModelConfig
from flexray.models import build_model, profile_model
from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job

REPO = Path(__file__).resolve().parents[1]
FLEET = [("rpi4", 8), ("phone_mid", 6), ("jetson_nano", 4), ("laptop_cpu", 2)]
SAMPLES, WIDTH = 250, 16
# every device prunes at least 30%: REFT saves bandwidth too, not only compute
CAP = [0.0, 0.25, 0.5]  # DISTREAL's per-layer grid (and the capped uniform baseline's rates)
REFT = {"proxy_samples": 1000, "ratios": [0.3, 0.45, 0.6, 0.75, 0.85]}


def job(data: Path, uri: str, name: str, method: dict, rounds: int, deadline: float, stragglers: str = "drop",
        seed: int = 0, width: int = WIDTH, model: str = "cnn", samples: int = SAMPLES, test_samples: int = 2000) -> dict:
    trace = {"kind": "random_walk", "sigma": 0.35, "step_s": deadline, "min_speed": 0.25, "max_speed": 3.0}
    return job_tree(
        "distreal_reft", name, uri,
        data={"name": "cifar10", "path": str(data), "samples_per_device": samples, "test_samples": test_samples,
              "partition": {"kind": "dirichlet", "alpha": 0.5}},
        model={"name": model, "width": width}, groups=[{"profile": p, "count": n, "trace": trace} for p, n in FLEET],
        method={"lr": 0.05, "momentum": 0.9, **method},
        rounds={"num": rounds, "deadline_s": deadline, "stragglers": stragglers, "eval_every": 1},
        schedule={"mode": "static"}, seed=seed)  # static: the papers' tiers for HeteroFL (minmax puts all on 1/16)


@dataclass
class Run:
    """One (method, seed) run: its metric history, wall seconds and event log."""

    history: list[dict]
    wall: float
    events: list[dict]


def variants(epoch_flops: float, deadline: float, dse_cache: str, dse_scale: float = 1.0) -> dict[str, dict]:
    # rates up to 0.5: a device that cannot afford that is late and dropped rather than send a
    # quarter-network's update (README, issue 4 section: DISTREAL measured with both grids)
    dse = {"grid": CAP, "proxy_samples": 2000, "proxy_steps": max(10, int(100 * dse_scale)), "pop_size": 10,
           "generations": max(2, int(5 * dse_scale)), "cache_dir": dse_cache}
    return {
        "fedavg_drop_stragglers": {"name": "fedavg"},
        "uniform_dropout": {"name": "uniform_dropout"},
        "uniform_dropout_capped": {"name": "uniform_dropout", "rates": CAP},  # DISTREAL's grid, like for like
        "distreal": {"name": "distreal", "dse": dse},
        "reft": {"name": "reft", **REFT, "distill_steps": 30, "distill_lr": 1e-4},
        "heterofl": {"name": "heterofl", "full_rate_flops": epoch_flops / deadline},
        # REFT without distillation (plain in-place averaging) and FedAvg waiting for every
        # device: every device uploads every round there, as in REFT, so it is the upload baseline
        "reft_no_distill": {"name": "reft", **REFT, "distill_steps": 0},
        "fedavg_wait": {"name": "fedavg", "stragglers": "wait"},
    }


def line(name: str, runs: list[Run], target: float, fedavg_up: float, deadline: float, width: int, model: str,
         samples: int) -> dict:
    """The JSON line of one method: means over seeds, and the per-seed values that matter."""
    finals = [r.history[-1]["accuracy"] for r in runs]
    times = [time_to(r.history, target) for r in runs]
    ups = [sum(e["bytes_up"] for e in r.events) for r in runs]
    kept = [sum(e["status"] in ("ok", "late") for e in r.events) for r in runs]
    out = {
        "benchmark": "distreal_reft", "method": name, "model": model, "samples_per_device": samples, "width": width, "rounds": len(runs[0].history), "seeds": len(runs),
        "deadline_s": deadline, "final_accuracy": round(mean(finals), 4),
        "final_accuracy_per_seed": [round(f, 4) for f in finals],
        "best_accuracy": round(mean([max(h["accuracy"] for h in r.history) for r in runs]), 4),
        "target_accuracy": round(target, 4),
        "sim_time_to_target_s": None if None in times else round(mean(times), 3),  # type: ignore[arg-type]
        "sim_time_to_target_per_seed": [None if t is None else round(t, 3) for t in times],
        "sim_time_total_s": round(mean([r.history[-1]["sim_time_s"] for r in runs]), 3),
        "energy_j": round(mean([r.history[-1]["energy_j"] for r in runs]), 2),
        "bytes_up": round(mean(ups)), "bytes_down": round(mean([sum(e["bytes_down"] for e in r.events) for r in runs])),
        "bytes_up_per_update": round(sum(ups) / max(sum(kept), 1)), "updates_kept": round(mean(kept), 1),
        "stragglers": round(mean([sum(e["status"] == "straggler" for e in r.events) for r in runs]), 1),
        "upload_reduction_vs_fedavg": round(fedavg_up / mean(ups), 3) if fedavg_up and mean(ups) else None,
        "wall_s": round(sum(r.wall for r in runs), 1),
    }
    if name == "distreal":
        picks = defaultdict(list)
        for e in sorted(runs[0].events, key=lambda e: e["round"]):
            if e["status"] in ("ok", "late"):
                picks[e["device"]].append(json.loads(e["metrics"])["point"])
        out["choice_changes"] = sum(sum(a != b for a, b in pairwise(p)) for p in picks.values())
        out["devices_that_changed"] = sum(len(set(p)) > 1 for p in picks.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10.npz")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; every method runs every seed")
    ap.add_argument("--width", type=int, default=WIDTH, help="cnn width (filters of the first conv); the deadline scales with it")
    ap.add_argument("--only", default="", help="comma-separated subset of methods")
    ap.add_argument("--model", default="cnn", help="any zoo model the structured methods take, e.g. resnet20")
    ap.add_argument("--samples", type=int, default=SAMPLES, help="training images per device")
    ap.add_argument("--test-samples", type=int, default=2000, help="test images evaluated every round")
    ap.add_argument("--dse-scale", type=float, default=1.0, help="DISTREAL search budget (proxy steps, generations) x this")
    ap.add_argument("--target", type=float, default=None, help="default: 0.95 x the lowest mean final accuracy")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"CIFAR-10 not found at {args.data}; pass --data path/to/cifar10.npz")
    seeds = [int(s) for s in args.seeds.split(",")]
    per_sample = profile_model(build_model(ModelConfig(name=args.model, width=args.width), (3, 32, 32), 10), (3, 32, 32))
    epoch_flops = args.samples * per_sample.train_flops_per_sample
    # the mid phone's full-model epoch at speed 1.2 on the per-layer clock (was: FLOPs / 1.2 x 10 GFLOP/s)
    deadline = round(epoch_seconds("phone_mid", args.model, args.width, args.samples, speed=1.2), 4)
    with tempfile.TemporaryDirectory() as tmp:
        chosen = {k: v for k, v in variants(epoch_flops, deadline, f"{tmp}/dse", args.dse_scale).items()
                  if not args.only or k in args.only.split(",")}
        results: dict[str, list[Run]] = defaultdict(list)
        fronts = {}
        uri = f"sqlite:///{tmp}/mlflow.db"
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        try:
            for seed in seeds:  # seed-major: a run cut short still has every method side by side
                for name, method in chosen.items():
                    t0 = time.perf_counter()
                    method = dict(method)
                    stragglers = method.pop("stragglers", "drop")
                    tree = job(args.data, uri, name, method, args.rounds, deadline, stragglers, seed, args.width, args.model,
                               args.samples, args.test_samples)
                    res = run_job(parse_config(tree))
                    wall = time.perf_counter() - t0
                    client = MlflowClient(uri)
                    events = pq.read_table(client.download_artifacts(res.run_id, "events.parquet", tmp)).to_pylist()
                    if name == "distreal" and name not in fronts:
                        with open(client.download_artifacts(res.run_id, "method/distreal_front.json", tmp)) as f:
                            fronts[name] = json.load(f)
                    results[name].append(Run([m.row() for m in res.history], wall, events))
        finally:
            ray.shutdown()
    target = args.target or 0.95 * min(mean([r.history[-1]["accuracy"] for r in runs]) for runs in results.values())
    base = results.get("fedavg_wait")
    fedavg_up = mean([sum(e["bytes_up"] for e in r.events) for r in base]) if base else 0.0
    for name, runs in results.items():
        out = line(name, runs, target, fedavg_up, deadline, args.width, args.model, args.samples)
        if name in fronts:
            front = fronts[name]
            out["front"] = [
                {"d": p["rates"], "flops_vs_d0": round(p["flops"] / front["full_flops"], 3),
                 "step_time_vs_d0": round(p["step_s"] / front["full_step_s"], 3), "proxy_loss": round(p["loss"], 3)}
                for p in front["points"]
            ]
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
