"""Framework overhead: the same FedAvg work as a plain PyTorch loop and through flexray.

Work: 20 devices x 250 CIFAR-10 training images, LeNet (conv 6@5x5, pool, conv 16@5x5, pool,
fc 120, 84, 10), 1 local epoch, batch 32, SGD lr 0.01 momentum 0.9, every device every round,
5 rounds, then one evaluation on the test set. The plain loop uses two worker processes (both
cores); flexray uses two actors with virtual throttling. Both are measured in this one run.

    python benchmarks/overhead.py [--data ../shared/data/cifar10.npz]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
DEVICES, PER_DEVICE, ROUNDS, BATCH, LR, MOMENTUM = 20, 250, 5, 32, 0.01, 0.9


def job(data: Path, uri: str) -> dict:
    profiles = ["rpi4", "jetson_nano", "phone_mid", "laptop_cpu"]
    return {
        "name": "overhead", "seed": 0,
        "data": {"name": "cifar10", "source": "npz", "path": str(data), "samples_per_device": PER_DEVICE,
                 "test_samples": 2000, "partition": {"kind": "iid"}},
        "model": {"name": "lenet"},
        "fleet": {"actors": 2, "throttle": "virtual", "groups": [{"profile": p, "count": DEVICES // 4} for p in profiles]},
        "method": {"name": "fedavg", "local_epochs": 1, "batch_size": BATCH, "lr": LR, "momentum": MOMENTUM},
        "rounds": {"num": ROUNDS, "eval_every": ROUNDS},
        "tracking": {"uri": uri, "experiment": "overhead", "progress": False, "checkpoint_every": 0},
    }


class PeakRSS:
    """Peak of the summed RSS of a process tree (driver, Ray daemons, workers), sampled at 2 Hz."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(0.5)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return self.peak / 2**20


# ---------------------------------------------------------------- plain PyTorch


def _worker(conn, shards: list, model_args: tuple) -> None:
    """One plain worker process: its devices' data stays resident; only weights move per round."""
    import torch

    from flexray.config import ModelConfig
    from flexray.models import build_model

    torch.set_num_threads(1)
    model = build_model(ModelConfig(name="lenet"), *model_args)
    while (msg := conn.recv()) is not None:
        state, seed = msg
        acc, n_total = None, 0
        for dev, (x, y) in shards:
            model.load_state_dict(state)
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
            g = torch.Generator().manual_seed(seed * 1000 + dev)
            order = torch.randperm(len(y), generator=g)
            model.train()
            for s in range(0, len(y), BATCH):
                idx = order[s : s + BATCH]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            n_total += len(y)
            sd = model.state_dict()
            if acc is None:
                acc = {k: v.double() * len(y) for k, v in sd.items()}
            else:
                for k, v in sd.items():
                    acc[k] += v.double() * len(y)
        conn.send((acc, n_total))


def plain(data: Path) -> dict:
    t0 = time.perf_counter()
    import numpy as np
    import torch

    from flexray.config import DataConfig, ModelConfig, PartitionConfig
    from flexray.data import load_dataset, partition, to_tensor
    from flexray.models import build_model

    ds = load_dataset(DataConfig(name="cifar10", source="npz", path=str(data), test_samples=2000))
    parts = partition(ds.y_train, DEVICES, PartitionConfig(kind="iid"), seed=0, cap=PER_DEVICE)
    shards = [(i, (to_tensor(ds.x_train[p], ds.mean, ds.std), torch.as_tensor(ds.y_train[p], dtype=torch.long)))
              for i, p in enumerate(parts)]
    torch.manual_seed(0)
    margs = (ds.input_shape, ds.num_classes)
    model = build_model(ModelConfig(name="lenet"), *margs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for k in range(2):  # two processes = both cores, each with half the devices
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(there, shards[k::2], margs))
        proc.start()
        pipes.append(here)
        procs.append(proc)
    rounds = []
    for r in range(ROUNDS):
        tr = time.perf_counter()
        for conn in pipes:
            conn.send((state, r))
        halves = [conn.recv() for conn in pipes]
        n = sum(h[1] for h in halves)
        state = {k: ((halves[0][0][k] + halves[1][0][k]) / n).to(v.dtype) for k, v in state.items()}
        rounds.append(time.perf_counter() - tr)
    for conn, proc in zip(pipes, procs):
        conn.send(None)
        proc.join()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        x = to_tensor(ds.x_test, ds.mean, ds.std)
        acc = float((model(x).argmax(1) == torch.tensor(ds.y_test)).float().mean())
    return {"rounds": rounds, "job_s": time.perf_counter() - t0, "accuracy": acc, "steady": float(np.median(rounds[1:]))}


# ---------------------------------------------------------------- flexray


def through_flexray(data: Path, tmp: Path) -> dict:
    import numpy as np
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = tmp / "overhead.yaml"
    cfg.write_text(yaml.safe_dump(job(data, uri)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "flexray.cli", "run", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = PeakRSS(proc.pid)
    out, _ = proc.communicate()
    job_s = time.perf_counter() - t0
    peak = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"flexray run failed:\n{out[-3000:]}")
    run_id = next(line.split()[1] for line in out.splitlines() if line.startswith("run ") and " finished:" in line)
    client = MlflowClient(uri)
    wall = [m.value for m in sorted(client.get_metric_history(run_id, "wall_time_s"), key=lambda m: m.step)]
    acc = client.get_metric_history(run_id, "accuracy")[-1].value
    rounds = list(np.diff(wall))  # round r = wall(r) - wall(r-1), rounds 2..5: steady state
    return {"rounds": rounds, "job_s": job_s, "accuracy": acc, "steady": float(np.median(rounds)), "peak_rss_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10.npz")
    args = ap.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"CIFAR-10 not found at {args.data}; pass --data path/to/cifar10.npz")
    from flexray.config import DataConfig
    from flexray.data import load_dataset

    load_dataset(DataConfig(name="cifar10", source="npz", path=str(args.data)))  # warm the decompressed cache once
    with tempfile.TemporaryDirectory() as tmp:
        rss = PeakRSS(os.getpid())
        p = plain(args.data)
        p_rss = rss.stop()
        f = through_flexray(args.data, Path(tmp))
    print(json.dumps({
        "benchmark": "overhead", "devices": DEVICES, "images_per_device": PER_DEVICE, "rounds": ROUNDS,
        "plain_steady_round_s": round(p["steady"], 3), "flexray_steady_round_s": round(f["steady"], 3),
        "steady_round_ratio": round(f["steady"] / p["steady"], 3),
        "plain_job_s": round(p["job_s"], 2), "flexray_job_s": round(f["job_s"], 2),
        "job_ratio": round(f["job_s"] / p["job_s"], 3),
        "plain_accuracy": round(p["accuracy"], 4), "flexray_accuracy": round(f["accuracy"], 4),
        "flexray_peak_rss_mb": round(f["peak_rss_mb"]), "plain_peak_rss_mb": round(p_rss),
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
