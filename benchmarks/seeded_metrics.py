"""Behaviour kept: the final metrics of three seeded sync jobs, to compare across a redesign.

Runs the quickstart, a scaled FlexTrain job, a scaled SplitFed/TLMP job and a scaled tiled job (all seed 0, sync) and
prints one JSON line per job with its final metrics and the commit it ran on. Two runs on
different commits that print the same metrics show the redesign kept the behaviour.

    FLEXRAY_DATA_ROOT=../shared/data python benchmarks/seeded_metrics.py [quickstart,flextrain,splitfed,tiled]
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flexray.runtime.assembly import load_config  # noqa: E402
from flexray.runtime.session import run_job  # noqa: E402

QUIET = ["tracking.progress=false", "tracking.plots=false", "tracking.log_model=false", "tracking.checkpoint_every=0"]
JOBS = {
    "quickstart": ("jobs/quickstart.yaml", []),
    "flextrain": ("jobs/cifar10_flextrain.yaml", ["data.samples_per_device=40", "data.test_samples=300", "rounds.num=2",
                                                  "rounds.eval_every=1"]),
    # SplitFed/TLMP on the quickstart's fleet: the EfficientNet job (jobs/mnist_sfl_efficientnet.yaml) diverges at
    # its scaled-down size, and a diverging run is not reproducible to the last bit, so it cannot show "unchanged".
    "splitfed": ("jobs/quickstart.yaml", ["method.name=splitfed", "fleet.actors=1", "rounds.num=5",
                                          "method.server_cpus=0.5"]),
    "tiled": ("jobs/tiled_cnn.yaml", ["data.samples_per_device=100", "data.test_samples=300", "rounds.num=2",
                                      "method.steps_per_round=4"]),
}
KEYS = ("accuracy", "loss", "sim_time_s", "energy_j", "bytes_up", "bytes_down", "train_loss", "mean_device_acc")


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        only = sys.argv[1].split(",") if len(sys.argv) > 1 else list(JOBS)
        for name, (path, extra) in ((n, JOBS[n]) for n in only):
            cfg = load_config(REPO / path, [*QUIET, f"tracking.uri=sqlite:///{tmp}/mlflow.db", *extra])
            t0 = time.perf_counter()
            final = run_job(cfg).metrics.as_dict()  # as MLflow logs it
            print(json.dumps({
                "benchmark": "seeded_metrics", "job": name, "commit": commit, "date": date.today().isoformat(),
                "machine": f"{platform.node()} {platform.machine()}", "command": "python benchmarks/seeded_metrics.py",
                "wall_s": round(time.perf_counter() - t0, 1),
                "final": {k: round(float(final[k]), 6) for k in KEYS if k in final},
            }), flush=True)


if __name__ == "__main__":
    main()
