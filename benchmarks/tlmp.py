"""TLMP vs brute force, solve time at scale, and max-latency reduction against the baselines.

Random fleets: device classes drawn from the catalog, trace speeds x0.2-1.5, bandwidth
x0.3-1.5, 50-1000 samples each; in the brute-force fleets 30% of the devices have memory for
only some cuts (drawn between the first cut's and the full model's training memory), in the
scale fleets memory fits every cut so that every baseline, FL only included, can run. Server: the catalog's
edge_gpu_server. Models: the real per-stage profiles of resnet8 (CIFAR-10, 5 cuts),
EfficientNetV2-S (MNIST resized to 32x32, the paper's setting; 43 cuts, one per MBConv block),
MobileNetV2 (CIFAR-10, 20 cuts) and torchvision's ResNet-18 (CIFAR-10, 10 cuts, one per block).

1. gap: for 2..8 clients (ResNet-18: 2..4, MobileNetV2, EfficientNetV2-S: 2..3; L^N combinations), TLMP's max latency vs the
   brute-force optimum over every cut combination x server shares on a 1/10,000 grid.
2. scale: 10, 100, 1,000, 10,000 clients: TLMP solve time (median of 3), its max latency vs the
   exact discrete optimum and vs the baselines FL only, best single cut for all, equal shares.
3. vs exact: 40 more fleets of 10-1,000 clients (with and without memory limits): how often TLMP
   is within 1% of the exact optimum (bisection over every integer cut), and ever worse than a baseline;
   and what block-level cuts buy: the exact optimum with every cut vs with only the cuts between
   torchvision's block groups (``layer2_0``, ``layer2_1`` -> one ``layer2``), on the same fleets.

    python benchmarks/tlmp.py [--fleets 10] [--models resnet8,efficientnet]

Prints one JSON line per (model, fleet size) and per model. Pure numpy; ~3 minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.synthetic

from flexray.config import ModelConfig
from flexray.fleet.profiles import CATALOG
from flexray.models import build_model, profile_model
from flexray.models.split import SplitPoint, split_points
from tests.synthetic import random_clients  # noqa: E402
from flexray.schedule.tlmp import baselines, brute_force, exact_minmax, tlmp

SERVER = CATALOG["edge_gpu_server"]
MODELS = {
    "resnet8": ("resnet8", (3, 32, 32), 8),
    "efficientnet": ("torchvision:efficientnet_v2_s", (1, 32, 32), 3),
    "mobilenet": ("torchvision:mobilenet_v2", (3, 32, 32), 3),
    "resnet18": ("torchvision:resnet18", (3, 32, 32), 4),
}


def reduction(ours: float, base: float) -> float | None:
    """Percent of the baseline's max latency TLMP saves (None: the baseline cannot run the fleet)."""
    return None if not np.isfinite(base) else round(100.0 * (1.0 - ours / base), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fleets", type=int, default=10, help="random fleets per size in the brute-force check")
    ap.add_argument("--models", default="resnet8,efficientnet,mobilenet,resnet18")
    ap.add_argument("--sizes", default="10,100,1000,10000")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for key in args.models.split(","):
        name, shape, max_brute = MODELS[key]
        model = build_model(ModelConfig(name=name), shape, 10)
        profile = profile_model(model, shape)
        points = split_points(profile, batch_size=32)
        rng = np.random.default_rng(0)
        for n in range(2, max_brute + 1):
            gaps, tl_s, bf_s = [], [], []
            for _ in range(args.fleets):
                clients = random_clients(n, rng, points)
                plan = tlmp(clients, points, SERVER)
                t0 = time.perf_counter()
                best, _ = brute_force(clients, points, SERVER, grid=10_000)
                bf_s.append(time.perf_counter() - t0)
                tl_s.append(plan.solve_s)
                gaps.append(plan.max_latency / best - 1.0)
            print(json.dumps({
                "bench": "tlmp_gap", "model": key, "cuts": len(points), "clients": n, "fleets": args.fleets,
                "max_gap_pct": round(100 * max(gaps), 4), "mean_gap_pct": round(100 * float(np.mean(gaps)), 4),
                "tlmp_s": round(float(np.mean(tl_s)), 5), "brute_force_s": round(float(np.mean(bf_s)), 3),
                "fit_error": round(plan.fit_error, 4),
            }), flush=True)
        for n in (int(s) for s in args.sizes.split(",")):
            clients = random_clients(n, rng, points, tight_share=0.0)  # every baseline (FL only too) can run the fleet
            times, plan = [], None
            for _ in range(3):
                plan = tlmp(clients, points, SERVER)
                times.append(plan.solve_s)
            assert plan is not None
            exact = exact_minmax(clients, points, SERVER)  # bisection over every integer cut
            base = baselines(clients, points, SERVER)
            ours = plan.max_latency
            print(json.dumps({
                "bench": "tlmp_scale", "model": key, "cuts": len(points), "clients": n,
                "solve_s": round(float(np.median(times)), 4), "iterations": plan.iterations,
                "max_latency_s": round(ours, 4), "gap_vs_exact_pct": round(100 * (ours / exact.max_latency - 1), 6),
                "exact_solve_s": round(exact.solve_s, 4),
                "split_clients": int((plan.cuts < len(points)).sum()), "share_sum": round(float(plan.theta.sum()), 6),
                **{f"{k}_s": (round(v, 4) if np.isfinite(v) else None) for k, v in base.items()},
                **{f"reduction_vs_{k}_pct": reduction(ours, v) for k, v in base.items()},
                "fit_error": round(plan.fit_error, 4),
            }), flush=True)

        robustness(key, points, group_cuts(points, [layer.name for layer in profile.layers]))


def group_cuts(points: list[SplitPoint], names: list[str]) -> list[SplitPoint]:
    """The cuts a stage per block group allowed (after ``layer2_1`` but not ``layer2_0``), renumbered 1..k."""
    group = [re.sub(r"_\d+$", "", n) for n in names]
    keep = [p for i, p in enumerate(points) if i + 1 == len(points) or group[i] != group[i + 1]]
    return [dataclasses.replace(p, cut=i + 1) for i, p in enumerate(keep)]


def robustness(key: str, points: list[SplitPoint], coarse: list[SplitPoint]) -> None:
    """TLMP vs the exact optimum on 40 more fleets of 10-1,000 clients, with and without memory limits."""
    rng = np.random.default_rng(0)
    gaps, worse, gains = [], 0, []
    for n in [10, 30, 100, 300, 1000] * 4:
        for tight in (0.0, 0.3):
            clients = random_clients(n, rng, points, tight)
            ours = tlmp(clients, points, SERVER).max_latency
            exact = exact_minmax(clients, points, SERVER).max_latency
            gaps.append(ours / exact - 1.0)
            gains.append(1.0 - exact / exact_minmax(clients, coarse, SERVER).max_latency)
            worse += ours > min(baselines(clients, points, SERVER).values()) * (1 + 1e-9)
    print(json.dumps({
        "bench": "tlmp_vs_exact", "model": key, "fleets": len(gaps), "within_1pct": sum(g <= 0.01 for g in gaps),
        "worst_gap_pct": round(100 * max(gaps), 4), "mean_gap_pct": round(100 * float(np.mean(gaps)), 5),
        "worse_than_best_baseline": int(worse), "cuts": len(points), "group_cuts": len(coarse),
        "block_cuts_gain_mean_pct": round(100 * float(np.mean(gains)), 4),
        "block_cuts_gain_max_pct": round(100 * max(gains), 4), "fleets_gaining": sum(g > 1e-9 for g in gains),
    }), flush=True)


if __name__ == "__main__":
    main()
