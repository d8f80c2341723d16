"""Heterogeneity-aware methods vs FedAvg on CIFAR-10 with 20 devices of 4 classes (33x apart).

Same fleet, data split, model (CIFAR ResNet-8, or ``--model resnet20``) and number of rounds for every method; virtual
throttling, so simulated times are exact and reproducible:

- ``fedavg_wait``: FedAvg on the full model, every round waits for the slowest device;
- ``fedavg_drop``: FedAvg on the full model, a deadline drops the slowest class (its data is lost);
- ``fedsmall``: FedAvg on the prefix the weakest device can run (FlexTrain's k=1, no distillation);
- ``fedclass``: one FedAvg model per device class (its static FlexTrain tier);
- ``flextrain``: its defaults: depths chosen per round by the capacity scheduler (``schedule.mode:
  capacity``: the fastest device's full-model latency is the round time), the paper's Algorithm 2
  (``aggregation: paper``: over every device of the round, one that did not train an entry entering
  with its global value), self-distillation on class probabilities;
- ``flextrain_coverage``: each entry averaged over the devices that trained it (``aggregation: coverage``);
- ``flextrain_minmax`` / ``flextrain_static``: the strict min-max scheduler / the papers' static tiers;
- ``flextrain_anchor``: the defaults plus flexray's ``anchor: 1.0`` (CE at k = 1 on every deeper device);
- ``heterofl``, ``fjord``, ``fedrolex``: their defaults (capacity scheduler);
- ``heterofl_static``: the papers' static capability tiers;
- ``heterofl_minmax``: HeteroFL under the strict min-max scheduler. Width p costs p^2 of the FLOPs,
  so a 33x slower device on p = 1/16 sets a round time that leaves everyone on narrow sub-models:
  the fastest rounds, the least-trained full model (``schedule.slack`` trades the two).

Reported per method: final global accuracy, final mean device accuracy (each device evaluated
with the sub-model it trains), accuracy of every sub-model, simulated time to a common target
(``--target``; default 0.8 x FedAvg-wait's final accuracy) by the global model (FedSmall: its one prefix; FedClass: its largest class model)
and by the mean device accuracy, total energy, wall time.

    python benchmarks/hetero_cifar10.py [--data ../shared/data/cifar10.npz] [--rounds 20] [--only flextrain,...] [--seeds 0,1,2]
    python benchmarks/hetero_cifar10.py --report sqlite:///runs.db    # re-score runs kept with --uri

Prints one JSON line per method.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
from common import job_tree, mean, time_to  # benchmarks/common.py

from flexray.config import ModelConfig
from flexray.fleet.profiles import CATALOG
from flexray.models import build_model, profile_model
from flexray.protocol import predict_times
from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job

REPO = Path(__file__).resolve().parents[1]
DEPTH = ("flextrain", "fedclass")  # the depth-prefix methods (FedSmall is flextrain at k = 1)
FLEET = [("rpi4", 6), ("phone_mid", 6), ("jetson_nano", 4), ("laptop_cpu", 4)]  # 3, 10, 35, 100 GFLOP/s


def job(args: argparse.Namespace, uri: str, name: str, method: dict, schedule: str, deadline: float | None,
        seed: int = 0) -> dict:
    return job_tree(
        "hetero_cifar10", name, uri,
        data={"name": "cifar10", "path": str(args.data), "samples_per_device": args.samples,
              "test_samples": args.test_samples, "partition": {"kind": "dirichlet", "alpha": 1.0}},
        model={"name": args.model, "width": 16, "stage_heads": args.stage_heads and method["name"] in DEPTH},
        groups=[{"profile": p, "count": n} for p, n in FLEET],
        method={"lr": 0.05, "momentum": 0.5, **method},
        rounds={"num": args.rounds, "eval_every": args.eval_every, "deadline_s": deadline, "stragglers": "drop"},
        schedule={"mode": schedule}, seed=seed)


def drop_deadline(args: argparse.Namespace) -> float:
    """Just above the second-slowest class's full-model round time: the rpi4 class always misses it."""
    model = build_model(ModelConfig(name=args.model, width=16), (3, 32, 32), 10)
    prof = profile_model(model, (3, 32, 32))
    work = prof.step.epochs(args.samples, 32)  # one local epoch at the benchmarks' batch 32
    second = CATALOG[FLEET[1][0]]
    return 1.05 * sum(predict_times(second, 1.0, work, prof.param_bytes, prof.param_bytes))


def variants(deadline: float) -> dict[str, tuple[dict, str, float | None]]:
    return {
        "fedavg_wait": ({"name": "fedavg"}, "minmax", None),
        "fedavg_drop": ({"name": "fedavg"}, "minmax", deadline),
        "fedsmall": ({"name": "flextrain", "k": 1, "beta": 0.0}, "static", None),
        "fedclass": ({"name": "fedclass"}, "static", None),
        "flextrain": ({"name": "flextrain"}, "capacity", None),
        "flextrain_coverage": ({"name": "flextrain", "aggregation": "coverage"}, "capacity", None),
        "flextrain_minmax": ({"name": "flextrain"}, "minmax", None),
        "flextrain_static": ({"name": "flextrain"}, "static", None),
        "flextrain_anchor": ({"name": "flextrain", "anchor": 1.0}, "capacity", None),  # flexray's option
        "heterofl": ({"name": "heterofl"}, "capacity", None),
        "fjord": ({"name": "fjord"}, "capacity", None),
        "fedrolex": ({"name": "fedrolex"}, "capacity", None),
        "heterofl_static": ({"name": "heterofl"}, "static", None),
        "heterofl_minmax": ({"name": "heterofl"}, "minmax", None),
    }


TARGET_FRACTION = 0.8


Runs = dict[str, list[tuple[list[dict], float]]]
"""Per method, one (metric history, wall seconds) per seed."""


def final(hist: list[dict]) -> dict:
    return [h for h in hist if "accuracy" in h][-1]


def common_target(results: Runs) -> float:
    """80% of the final accuracy of FedAvg waiting for every device (mean over seeds): the level the
    heterogeneity-aware methods must reach, in less simulated time, to be worth their smaller models."""
    base = results.get("fedavg_wait")
    return TARGET_FRACTION * mean([final(h)["accuracy"] for h, _ in base]) if base else 0.0


def report(results: Runs, rounds: int, target: float | None, model: str) -> None:
    """One JSON line per method: means over seeds, per-seed values beside the headline ones."""
    target = target or common_target(results)
    base = results.get("fedavg_wait")
    base_ts = [time_to(h, target) for h, _ in base] if base else []
    base_t = None if not base_ts or None in base_ts else mean(base_ts)  # type: ignore[arg-type]
    for name, runs in results.items():
        lasts = [final(h) for h, _ in runs]
        ts = [time_to(h, target) for h, _ in runs]
        ts_dev = [time_to(h, target, "mean_device_acc") for h, _ in runs]
        t = None if None in ts else mean(ts)  # type: ignore[arg-type]
        t_dev = None if None in ts_dev else mean(ts_dev)  # type: ignore[arg-type]
        devs = [last.get("mean_device_acc", last["accuracy"]) for last in lasts]
        subs = {k: round(mean([last[k] for last in lasts]), 4) for k in sorted(lasts[0]) if k.startswith(("acc_k", "acc_p"))}
        print(json.dumps({
            "benchmark": "hetero_cifar10", "method": name, "model": model, "rounds": rounds, "devices": 20,
            "seeds": len(runs), "final_accuracy": round(mean([last["accuracy"] for last in lasts]), 4),
            "mean_device_acc": round(mean(devs), 4), "mean_device_acc_per_seed": [round(d, 4) for d in devs],
            "submodel_acc": subs, "target_accuracy": round(target, 4),
            "sim_time_to_target_s": None if t is None else round(t, 3),
            "time_ratio_vs_fedavg_wait": None if t is None or not base_t else round(t / base_t, 3),
            "sim_time_to_target_mean_device_s": None if t_dev is None else round(t_dev, 3),
            "sim_time_total_s": round(mean([h[-1]["sim_time_s"] for h, _ in runs]), 3),
            "energy_j": round(mean([h[-1]["energy_j"] for h, _ in runs]), 1),
            "wall_s": round(sum(w for _, w in runs), 1),
        }), flush=True)


def from_store(uri: str) -> Runs:
    """The histories of a finished benchmark's runs, read back from its MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("hetero_cifar10")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []
    out: Runs = {}
    for run in runs:
        steps: dict[int, dict] = {}
        for key in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, key):
                steps.setdefault(m.step, {"round": m.step})[key] = m.value
        wall = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
        name = run.info.run_name.removeprefix("hetero_cifar10-").split("@seed")[0]
        out.setdefault(name, []).append(([steps[k] for k in sorted(steps)], wall))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10.npz")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--model", default="resnet8", choices=["resnet8", "resnet20"],
                    help="resnet20: 9 blocks, so FlexTrain's shortest prefix costs ~1/6 of the model (resnet8: ~1/2)")
    ap.add_argument("--stage-heads", action="store_true",
                    help="depth-prefix methods: one classifier per stage (model.stage_heads) instead of zero-padding")
    ap.add_argument("--samples", type=int, default=100, help="training images per device")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (data split, weights, batch order); "
                    "every method runs every seed, lines report means")
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--test-samples", type=int, default=1000)
    ap.add_argument("--target", type=float, default=None, help="default: see common_target")
    ap.add_argument("--only", default="", help="comma-separated subset of methods")
    ap.add_argument("--uri", default=None, help="MLflow store to keep the runs in (default: a temporary sqlite)")
    ap.add_argument("--report", default=None, metavar="URI", help="only re-score the runs already in this MLflow store")
    args = ap.parse_args()
    if args.report:
        results = from_store(args.report)
        report(results, len([h for h in next(iter(results.values()))[0][0] if "sim_time_s" in h]), args.target, args.model)
        return
    if not args.data.is_file():
        raise SystemExit(f"CIFAR-10 not found at {args.data}; pass --data path/to/cifar10.npz")
    chosen = variants(drop_deadline(args))
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    seeds = [int(x) for x in args.seeds.split(",")]
    results: Runs = {}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            uri = args.uri or f"sqlite:///{tmp}/mlflow.db"
            for seed in seeds:  # seed-major: a run cut short still has every method side by side
                for name, (method, schedule, dl) in chosen.items():
                    t0 = time.perf_counter()
                    run = name if len(seeds) == 1 else f"{name}@seed{seed}"
                    res = run_job(parse_config(job(args, uri, run, method, schedule, dl, seed)))
                    results.setdefault(name, []).append(([m.row() for m in res.history], time.perf_counter() - t0))
    finally:
        ray.shutdown()
    report(results, args.rounds, args.target, args.model)


if __name__ == "__main__":
    main()
