"""A real two-node Ray cluster on this machine: the session head (``device:a``) plus a second node
that joins through ``cluster/join-device.sh`` as device class ``b`` (resource ``device:b``, label
``flexray.io/device=b``). Jobs pin devices to each node; the event log says where each ran.

Never ``ray stop`` here: it would kill every Ray process on the machine, the shared head included.
The second node is stopped by terminating the processes under its own temp dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port, job_tree, ray_job_submit, stop_ray_node

pytestmark = pytest.mark.ray

JOIN = REPO / "cluster" / "join-device.sh"


@dataclass(frozen=True)
class WorkerNode:
    node_id: str
    temp_dir: Path


def _alive_node_with(resource: str) -> str | None:
    import ray

    return next((n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]), None)


def join_node(head: str, device: str, env: dict[str, str], num_cpus: int = 1, *extra: str) -> WorkerNode:
    """Start a worker node with the operator's script, as a board would join (``extra``: more
    ``ray start`` options, e.g. ``--num-gpus=1``)."""
    temp = Path("/tmp") / f"frx-{device}-{os.getpid()}"  # short: Ray's socket paths must stay < 108 chars
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    cmd = ["bash", str(JOIN), head, device, "--num-cpus", str(num_cpus), "--",
           f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", *ports, *extra]
    try:
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=180)
        deadline = time.monotonic() + 60
        while (node := _alive_node_with(f"device:{device}")) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert node, f"node device:{device} never registered"
    except BaseException:
        stop_ray_node(temp)
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return WorkerNode(node, temp)


def leave(node: WorkerNode, device: str) -> None:
    """Stop a node joined by ``join_node`` and wait until the head marks it dead."""
    stop_ray_node(node.temp_dir)
    deadline = time.monotonic() + 30
    while _alive_node_with(f"device:{device}") and time.monotonic() < deadline:
        time.sleep(0.5)  # let the head mark it dead, so later tests see the head alone
    shutil.rmtree(node.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def node_b(ray_cluster) -> Iterator[WorkerNode]:
    node = join_node(ray_cluster.address, "b", ray_cluster.env)
    try:
        yield node
    finally:
        leave(node, "b")


@pytest.fixture(scope="module")
def head_id(ray_cluster) -> str:
    node = _alive_node_with("device:a")
    assert node, "the session head should advertise device:a (tests/conftest.py)"
    return node


def pinned_tree(tmp_path: Path, groups: list[dict] | None = None, **extra: object) -> dict:
    """By default 2 rpi4 pinned to the head, 1 rpi3 pinned to node b, 1 simulated laptop anywhere; tiny."""
    groups = groups or [
        {"profile": "rpi4", "count": 2, "resources": {"device:a": 1}},
        {"profile": "rpi3", "count": 1, "resources": {"device:b": 1}},
        {"profile": "laptop_cpu", "count": 1},
    ]
    return job_tree(name="multinode", fleet__groups=groups, fleet__actors=1, fleet__num_cpus_per_actor=0.5,
                    model__width=8, rounds__num=2, tracking__uri=f"sqlite:///{tmp_path}/mlflow.db",
                    tracking__experiment="multinode", **extra)


def _events(uri: str, experiment: str):
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    local = client.download_artifacts(run.info.run_id, "events.parquet", str(Path(uri[len("sqlite:///"):]).parent))
    return run, pq.read_table(local).to_pylist()


def test_ray_job_submit_runs_every_device_where_it_is_pinned(ray_cluster, node_b, head_id, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    job = tmp_path / "multinode.yaml"
    job.write_text(yaml.safe_dump(pinned_tree(tmp_path)))
    sub_id = f"flexray-multinode-{uuid.uuid4().hex[:8]}"
    out = ray_job_submit(["--address", ray_cluster.dashboard, "--submission-id", sub_id, "--working-dir", str(REPO),
                          "--no-wait", "--", "flexray", "run", str(job)], ray_cluster.env, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    jobs = JobSubmissionClient(ray_cluster.dashboard)
    deadline = time.monotonic() + 300
    while not (status := jobs.get_job_status(sub_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
    if not status.is_terminal():
        jobs.stop_job(sub_id)
    assert status == JobStatus.SUCCEEDED, jobs.get_job_logs(sub_id)[-3000:]

    run, rows = _events(f"sqlite:///{tmp_path}/mlflow.db", "multinode")
    assert run.info.run_id in jobs.get_job_logs(sub_id)
    assert len({r["round"] for r in rows}) == 2 and len(rows) == 8  # 4 devices x 2 rounds
    where = {"rpi4": head_id, "rpi3": node_b.node_id}
    for r in rows:
        if r["profile"] in where:
            assert r["node"] == where[r["profile"]], r
            assert ("device:a" if r["profile"] == "rpi4" else "device:b") in r["actor"]
        else:
            assert r["node"] in (head_id, node_b.node_id) and "[sim]" in r["actor"]


def test_plan_shows_the_node_of_every_device(ray_cluster, node_b, head_id, tmp_path, capsys):
    from flexray.cli import main

    job = tmp_path / "multinode.yaml"
    job.write_text(yaml.safe_dump(pinned_tree(tmp_path)))
    assert main(["plan", str(job), "--address", ray_cluster.address]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert "node" in lines["device"]
    assert head_id[:8] in lines["rpi4-0"] and head_id[:8] in lines["rpi4-1"]
    assert node_b.node_id[:8] in lines["rpi3-2"]
    assert "(1 of 2)" in lines["laptop_cpu-3"]  # simulated: either node may take it


def test_node_labels_pin_an_actor_through_the_label_selector(ray_cluster, node_b, head_id):
    import ray

    from flexray.fleet.fleet import ActorSpec
    from flexray.fleet.placement import actor_options, check_placement

    @ray.remote
    class Where:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    for selector, expect in (({"flexray.io/device": "b"}, node_b.node_id), ({"flexray.io/device": "!b"}, head_id),
                             ({"flexray.io/device": "in(b,c)"}, node_b.node_id)):
        spec = ActorSpec(0, (0,), 0.25, {}, selector)
        assert check_placement([spec]).node_of[0].id == expect
        actor = Where.options(**actor_options(spec)).remote()
        try:
            assert ray.get(actor.node.remote(), timeout=120) == expect, selector
        finally:
            ray.kill(actor)


def test_unplaceable_fleets_fail_fast_with_one_line(ray_cluster, node_b, tmp_path, capsys):
    from flexray.cli import main
    from flexray.errors import FlexrayError
    from flexray.fleet.fleet import ActorSpec
    from flexray.fleet.placement import check_placement

    t0 = time.monotonic()
    with pytest.raises(FlexrayError, match=r"no node can host .*label flexray.io/device=c.*--labels flexray.io/device=c"):
        check_placement([ActorSpec(0, (0,), 0.5, {}, {"flexray.io/device": "c"})])
    # Totals suffice (3 CPU, 1 device:b) but node b has 1 CPU: only a per-node check sees it.
    with pytest.raises(FlexrayError, match=r"no node can host .*device:b: 1, 2 CPU"):
        check_placement([ActorSpec(0, (0,), 2.0, {"device:b": 1})])
    # Each fits the head alone, not both together (2 CPU there): the packing check sees it.
    with pytest.raises(FlexrayError, match="do not fit together"):
        check_placement([ActorSpec(0, (0,), 1.5, {"device:a": 1}), ActorSpec(1, (1,), 1.5, {"device:a": 1})])
    with pytest.raises(FlexrayError, match="the cluster has 1 device:b but the fleet needs 2"):
        check_placement([ActorSpec(0, (0,), 0.1, {"device:b": 1}), ActorSpec(1, (1,), 0.1, {"device:b": 1})])

    job = tmp_path / "bad.yaml"
    job.write_text(yaml.safe_dump(job_tree(fleet__groups=[{"profile": "rpi4", "count": 1,
                                                           "node_labels": {"flexray.io/device": "rpi4"}}])))
    assert main(["plan", str(job), "--address", ray_cluster.address]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "flexray.io/device=rpi4" in err and err.startswith("flexray: error: fleet:")
    assert time.monotonic() - t0 < 60


def test_job_pins_devices_by_node_label(ray_cluster, node_b, head_id, tmp_path):
    from flexray.runtime.assembly import parse_config
    from flexray.runtime.session import run_job

    groups = [{"profile": "rpi3", "count": 1, "node_labels": {"flexray.io/device": "b"}},
              {"profile": "rpi4", "count": 1, "node_labels": {"flexray.io/device": "!b"}}]
    cfg = parse_config(pinned_tree(tmp_path, groups))
    run_job(cfg)
    _, rows = _events(f"sqlite:///{tmp_path}/mlflow.db", "multinode")
    assert {r["profile"]: r["node"] for r in rows} == {"rpi3": node_b.node_id, "rpi4": head_id}
