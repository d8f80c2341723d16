"""Does every method learn the quickstart under its defaults? One `--set method.name=M` each.

Sync: the quickstart as shipped (15 rounds of 8 devices = 120 client updates). Async: the same
number of client updates (``rounds.mode=async rounds.num=120``). Nothing else is set: every method
runs with its defaults. FlexTrain and FedClass train the residual ``resnet8`` (depth prefixes need
residual blocks) and are compared, like every method, with FedAvg on the quickstart's cnn.
Prints one JSON line per run (global accuracy, its ratio to FedAvg's in the same mode, mean device
accuracy, simulated time, energy); ``--out`` appends them to a results file.
``tests/test_learning.py`` holds every method to 0.85x FedAvg.

    python benchmarks/learning.py [--methods fedavg,heterofl] [--modes sync,async] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from flexray.methods import _PATHS
from flexray.methods.fedbuff import FedBuffConfig
from flexray.runtime.actor import warm_actors
from flexray.runtime.assembly import load_config
from flexray.runtime.session import run_job

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"
DEPTH = {"flextrain", "fedclass"}  # need a residual model
ASYNC_UPDATES = 120  # 15 sync rounds x 8 devices
FEDBUFF_BUFFER = FedBuffConfig.model_fields["buffer_size"].default  # FedBuff: one model version per buffer
ASYNC_ONLY = {"fedasync", "fedbuff"}  # FedAvg under an async policy
SYNC_ONLY = {"tiled"}  # its own engine: synchronous steps


def overrides(method: str, mode: str, uri: str) -> list[str]:
    sets = [f"method.name={method}", f"tracking.uri={uri}", "tracking.progress=false", "tracking.plots=false",
            "tracking.log_model=false", "tracking.checkpoint_every=0"]
    if method in DEPTH:
        sets.append("model.name=resnet8")
    if mode == "async":
        versions = ASYNC_UPDATES // FEDBUFF_BUFFER if method == "fedbuff" else ASYNC_UPDATES  # one per buffer
        sets += ["rounds.mode=async", f"rounds.num={versions}", f"rounds.eval_every={versions}"]
    return sets


def run(method: str, mode: str, uri: str) -> dict:
    cfg = load_config(QUICKSTART, overrides(method, mode, uri))
    final = run_job(cfg).metrics.as_dict()  # as MLflow logs it
    return {"method": method, "mode": mode, "model": cfg.model.name,
            "accuracy": round(final.get("accuracy", 0.0), 4),
            "mean_device_acc": round(final.get("mean_device_acc", final.get("accuracy", 0.0)), 4),
            "sim_time_s": round(final.get("sim_time_s", 0.0), 4), "energy_j": round(final.get("energy_j", 0.0), 3)}


def stamp() -> dict:
    """Date, machine and command of a result line (docs/benchmarks.md renders them)."""
    gpu = "no GPU"
    return {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} cores {platform.machine()}, {gpu}",
            "command": "python benchmarks/learning.py " + " ".join(sys.argv[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=None, help="default: every method that has the mode (fedavg first: the "
                    "others are compared with it); fedasync and fedbuff are async only, tiled sync only")
    ap.add_argument("--modes", default="sync,async")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp, warm_actors():
        uri = f"sqlite:///{tmp}/mlflow.db"
        for mode in args.modes.split(","):
            methods = args.methods.split(",") if args.methods else [
                m for m in _PATHS if m not in (SYNC_ONLY if mode == "async" else ASYNC_ONLY)]
            base = None if "fedavg" in methods else run("fedavg", mode, uri)["accuracy"]
            for method in methods:
                row = run(method, mode, uri)
                base = row["accuracy"] if method == "fedavg" else base
                row = {"benchmark": "learning", **row, "vs_fedavg": round(row["accuracy"] / base, 3), **stamp()}
                lines.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)


if __name__ == "__main__":
    main()
