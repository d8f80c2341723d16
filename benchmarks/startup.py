"""Command to prompt: where the quickstart's wall time goes, beside Ray's own floor.

Two things are timed from outside, alternately, in this one run:

- the floor: a Python process that starts a local Ray, creates two actors that import torch,
  waits for them and shuts Ray down (what any Ray-based simulator pays before and after work);
- ``flexray run jobs/quickstart.yaml`` in a fresh folder (a new sqlite store), with
  ``FLEXRAY_PHASES_FILE`` set so flexray writes its phase marks (``flexray/phases.py``).

The phases: ``python`` (interpreter and imports until ``main``), ``config``, ``data_and_fleet``,
``ray_init``, ``tracker_ready`` (MLflow, overlapped with Ray), ``actors_ready``, ``rounds``,
``artifacts`` (events, plots, model), ``ray_shutdown``, ``result``, ``exit`` (interpreter exit).

    python benchmarks/startup.py [--repeats 3]

Prints one JSON line (medians over the repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLEXRAY = str(Path(sys.executable).with_name("flexray"))

BARE_RAY = """
import ray

@ray.remote(num_cpus=1)
class Host:
    def __init__(self):
        import torch  # what a device actor pays before its first task
        self.n = torch.get_num_threads()
    def ready(self):
        return self.n

ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
hosts = [Host.remote() for _ in range(2)]
ray.get([h.ready.remote() for h in hosts])
ray.shutdown()
"""


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_", "FLEXRAY_"))}
    return {**out, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}


def bare_ray() -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-c", BARE_RAY], env=env(), check=True, capture_output=True, timeout=300)
    return time.time() - t0


def quickstart() -> tuple[float, dict[str, float], float]:
    """(wall s, seconds per phase, final accuracy) of one quickstart run in a new folder."""
    with tempfile.TemporaryDirectory() as tmp:
        marks_file = Path(tmp) / "phases.json"
        t0 = time.time()
        proc = subprocess.run([FLEXRAY, "run", str(REPO / "jobs" / "quickstart.yaml")], cwd=tmp,
                              env={**env(), "FLEXRAY_PHASES_FILE": str(marks_file)},
                              capture_output=True, text=True, timeout=600)
        t1 = time.time()
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        marks = json.loads(marks_file.read_text())
    acc = float(re.search(r"accuracy=(\S+)", proc.stdout).group(1))
    phases, prev = {}, t0
    for m in marks:
        name = "python" if m["phase"] == "main" else m["phase"]
        phases[name] = round(m["t"] - prev, 3)
        prev = m["t"]
    phases["exit"] = round(t1 - prev, 3)
    return t1 - t0, phases, acc


def git_commit() -> str:
    """The commit measured (``-dirty`` with uncommitted changes), so before/after lines say which code."""
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "flexray"], cwd=REPO, capture_output=True, text=True).stdout
    return rev + ("-dirty" if dirty.strip() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    bare, walls, runs, accs = [], [], [], []
    for _ in range(args.repeats):
        bare.append(bare_ray())
        wall, phases, acc = quickstart()
        walls.append(wall)
        runs.append(phases)
        accs.append(acc)
    median_phases = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    floor, wall = statistics.median(bare), statistics.median(walls)
    print(json.dumps({
        "benchmark": "startup", "date": date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores {platform.machine()}, no GPU",
        "command": "python benchmarks/startup.py" + (f" --repeats {args.repeats}" if args.repeats != 3 else ""),
        "code": git_commit(), "repeats": args.repeats, "quickstart_wall_s": round(wall, 2), "bare_ray_wall_s": round(floor, 2),
        "ratio_vs_bare_ray": round(wall / floor, 2), "phases_s": median_phases,
        "quickstart_walls_s": [round(w, 2) for w in walls], "bare_ray_walls_s": [round(b, 2) for b in bare],
        "accuracy": accs[0], "same_accuracy_every_run": len(set(accs)) == 1,
    }))


if __name__ == "__main__":
    main()
