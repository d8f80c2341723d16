"""GPU shares in the fleet on a real Ray cluster. A node joins advertising one GPU (Ray's logical
resource, as a GPU machine's ``ray start`` would): fractional device actors are planned, placed
and run there, and a fleet asking for more GPUs than the cluster has is refused in one line
before any actor starts. This machine has no CUDA, so the actors compute on the CPU (``auto``);
the CUDA path itself is tested by the ``cuda`` tests (benchmarks/gpu_check.sh)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml

from flexray.errors import FlexrayError
from flexray.runtime.assembly import parse_config
from flexray.runtime.driver import run_job
from tests.conftest import job_tree
from tests.test_cluster_multinode import WorkerNode, _events, join_node, leave

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def gpu_node(ray_cluster) -> Iterator[WorkerNode]:
    node = join_node(ray_cluster.address, "g", ray_cluster.env, 2, "--num-gpus=1")
    try:
        yield node
    finally:
        leave(node, "g")


def _tree(tmp_path, actors: int, share: float) -> dict:
    return job_tree(name="gpu", fleet__actors=actors, fleet__num_gpus_per_actor=share, fleet__num_cpus_per_actor=0.5,
                    model__width=8, rounds__num=1, tracking__uri=f"sqlite:///{tmp_path}/mlflow.db",
                    tracking__experiment="gpu")


def test_plan_shows_the_gpu_share_and_node_of_every_actor(ray_cluster, gpu_node, tmp_path, capsys):
    from flexray.cli import main

    job = tmp_path / "gpu.yaml"
    job.write_text(yaml.safe_dump(_tree(tmp_path, 2, 0.5)))
    assert main(["plan", str(job), "--address", ray_cluster.address]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    header = lines[0]
    assert header[:4] == ["device", "actor", "gpu", "node"], header
    rows = [ln for ln in lines[1:] if "-" in ln[0] and ln[0].split("-")[-1].isdigit()]
    assert len(rows) == 4 and {r[1] for r in rows} == {"actor0[sim]", "actor1[sim]"}
    assert all(r[2] == "0.5" for r in rows), rows
    assert all(r[4] == gpu_node.node_id[:8] for r in rows), rows  # the only node with a GPU


def test_fractional_gpu_actors_train_on_the_gpu_node(ray_cluster, gpu_node, tmp_path):
    from ray.util.state import list_actors

    result = run_job(parse_config(_tree(tmp_path, 2, 0.5)))
    assert len(result.history) == 1 and result.final["participants"] == 4
    _, rows = _events(f"sqlite:///{tmp_path}/mlflow.db", "gpu")
    assert {r["node"] for r in rows} == {gpu_node.node_id}
    asked = [a.required_resources for a in list_actors(address=ray_cluster.dashboard, detail=True, limit=10000,
                                                        filters=[("class_name", "=", "DeviceActor")])]
    assert any(r.get("GPU") == 0.5 for r in asked), asked


def test_more_gpus_than_the_cluster_has_fail_at_once_in_one_line(ray_cluster, gpu_node, tmp_path):
    with pytest.raises(FlexrayError) as err:
        run_job(parse_config(_tree(tmp_path, 3, 0.5)))
    line = str(err.value)
    assert "\n" not in line and line.startswith("fleet: the cluster has 1 GPU but the fleet needs 1.5;"), line
    assert "fleet.num_gpus_per_actor" in line
