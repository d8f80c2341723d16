"""Shared fixtures: one real Ray head (``ray start --head``) and one MLflow sqlite store per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Token auth on, as in production (Ray >= 2.52); set before anything imports ray, which caches it.
# The head creates ~/.ray/auth_token when missing; every client here reads it.
os.environ["RAY_AUTH_MODE"] = "token"

# Console scripts (flexray, ray, mlflow) of the interpreter running the tests come first on PATH,
# as in an activated venv: Ray's job entrypoints and the subprocess tests find them there.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RayCluster:
    address: str  # GCS address for ray.init
    dashboard: str  # http address for ray job submit
    env: dict[str, str]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A real Ray head on 127.0.0.1 shared by every test; stopped at the end of the session."""
    import ray

    port, dash = free_port(), free_port()
    # Every port of its own: a second Ray on this machine (another session, a benchmark) holding the
    # default agent port would leave this head without a job agent ("No available agent to submit job").
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    temp = Path("/tmp") / f"flexray-test-ray-{os.getpid()}"  # short: Ray's socket paths must stay < 108 chars
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--temp-dir={temp}", "--disable-usage-stats", *agent_ports,
           '--resources={"device:a": 2}']  # a device class of its own: test_cluster_multinode pins to it
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=180)
    address = f"127.0.0.1:{port}"
    try:
        ray.init(address=address, logging_level="WARNING")
        yield RayCluster(address, f"http://127.0.0.1:{dash}", env)
    finally:
        ray.shutdown()
        stop_ray_node(temp)
        shutil.rmtree(temp, ignore_errors=True)


def ray_job_submit(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``ray job submit ARGS``; retried while the head has no job agent registered yet, which a
    loaded machine shows as "No available agent to submit job" (the job is never created then)."""
    for attempt in range(6):
        out = subprocess.run([RAY, "job", "submit", *args], env=env, capture_output=True, text=True, timeout=timeout)
        if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr:
            return out
        time.sleep(5 * (attempt + 1))
    return out


def stop_ray_node(temp_dir: Path, timeout_s: float = 5.0) -> int:
    """Stop only the Ray node whose ``--temp-dir`` is ``temp_dir`` (and its workers).

    ``ray stop`` would kill every Ray process on the machine, including other test sessions'
    clusters; Ray's daemons carry their temp dir on the command line, workers are their children.
    """
    import psutil

    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid not in skip and any(f"{temp_dir}/" in a or a.endswith(str(temp_dir)) for a in p.info["cmdline"] or ()):
                roots.append(p)
        except psutil.Error:
            continue
    procs = {p.pid: p for p in roots}
    for p in roots:
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return len(procs)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and OpenMP spinning is slow on busy CI boxes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


def job_tree(**overrides: object) -> dict:
    """A tiny digits job (4 devices of 2 classes) that trains in a couple of seconds."""
    tree: dict = {
        "name": "test",
        "seed": 0,
        "data": {"name": "digits", "partition": {"kind": "iid"}},
        "model": {"name": "cnn", "width": 8},
        "fleet": {"actors": 2, "groups": [{"profile": "rpi3", "count": 2}, {"profile": "laptop_cpu", "count": 2}]},
        "method": {"name": "fedavg", "local_epochs": 1, "batch_size": 32, "lr": 0.1, "momentum": 0.5},
        "rounds": {"num": 3},
        "tracking": {"experiment": "tests", "progress": False, "plots": False, "log_model": False, "checkpoint_every": 0},
    }
    for dotted, value in overrides.items():
        cur = tree
        keys = dotted.split("__")
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        cur[keys[-1]] = value
    return tree


MLFLOW = str(Path(sys.executable).with_name("mlflow")) if Path(sys.executable).with_name("mlflow").exists() else "mlflow"


def start_mlflow_server(root: Path, port: int, env: dict[str, str], *extra: str, timeout_s: float = 300) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1 (its own process group), returned once /health answers."""
    import urllib.request

    log = open(root / "server.log", "a")
    proc = subprocess.Popen(
        [MLFLOW, "server", *extra, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process_group(proc)
            raise RuntimeError("mlflow server did not start: " + (root / "server.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (uvicorn's workers go with it), SIGKILL if it lingers."""
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def host_round(overrides: list[str]) -> tuple:
    """One round of the quickstart's first 4 devices through the actor's own code path
    (``DeviceHost.run_round``) without starting Ray: (method, state, tasks, reports, updates)."""
    from flexray.runtime.assembly import load_config
    from flexray.data import load_dataset
    from flexray.fleet.fleet import assign_actors, build_fleet
    from flexray.fleet.report import RoundRequest
    from flexray.methods import method_class
    from flexray.protocol import DeviceView
    from flexray.runtime.actor import DeviceHost

    cfg = load_config(REPO / "jobs" / "quickstart.yaml", [*overrides, "fleet.actors=1"])
    ds = load_dataset(cfg.data)
    devices = build_fleet(cfg, ds.y_train)[:4]
    host = DeviceHost(cfg, assign_actors(cfg, devices)[0], devices, ds)
    method = method_class(cfg.method.name)(cfg.method, host.ctx._model_fn)
    state = method.init(host.ctx.model())
    tasks = method.plan(0, [DeviceView(d.id, d.profile, 1.0, len(d.indices)) for d in devices], state)
    reports, updates = host.run_round(RoundRequest(0, 0.0, None, False, tuple(tasks), True), state)
    return method, state, tasks, reports, updates


@pytest.fixture(scope="module")
def warm_ray_actors() -> Iterator[None]:
    """Device actors kept between this module's in-process jobs (``warm_actors``, as a sweep keeps
    them): a small job then costs its rounds (~0.3 s), not new processes importing torch (~3.5 s).
    Each job still rebuilds its actors' data and models; they are killed when the module ends."""
    from flexray.runtime.actor import warm_actors

    with warm_actors():
        yield


@pytest.fixture
def free_cpus(ray_cluster: RayCluster) -> None:
    """Kill the warm device actors first, for a test whose Ray work is not an in-process flexray
    job (a CLI subprocess, ``ray job submit``, actors started by hand): they would hold the CPUs."""
    from flexray.runtime.actor import drop_warm

    drop_warm()
