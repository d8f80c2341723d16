"""GPU shares in the fleet on a real Ray cluster. A node joins advertising one GPU (Ray's logical
resource, as a GPU machine's ``ray start`` would): fractional device actors, tile actors and the
split server are planned, placed and run there, and a fleet asking for more GPUs than the
cluster (or, before Ray starts, this machine) has is refused in one line before any actor starts. This machine has no CUDA, so the actors compute on the CPU (``auto``);
the CUDA path itself is tested by the ``cuda`` tests (benchmarks/gpu_check.sh)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
import torch
import yaml

from ray.util.state import list_actors

from flexray.cli import main
from flexray.data import load_dataset
from flexray.errors import FlexrayError
from flexray.fleet.fleet import build_fleet
from flexray.fleet.placement import ActorSpec, Node, check_placement
from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job
from flexray.runtime.job import Job
from flexray.runtime.session import Session
from flexray.tiled.engine import TiledEngine
from flexray.tiled.method import Tiled
from tests.conftest import job_tree
from tests.test_tiled_ray import tiled_tree
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
    result = run_job(parse_config(_tree(tmp_path, 2, 0.5)))
    assert len(result.history) == 1 and result.metrics.participants == 4
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


# ---------------------------------------------------------------- tile actors and the split server


def _splitfed_tree(tmp_path, share: float, **kw: object) -> dict:
    return job_tree(name="gpu", fleet__actors=2, fleet__num_gpus_per_actor=share, fleet__num_cpus_per_actor=0.5,
                    method={"name": "splitfed", "batch_size": 32, "lr": 0.1, "server_cpus": 0.5, **kw}, rounds__num=1,
                    tracking__uri=f"sqlite:///{tmp_path}/mlflow.db", tracking__experiment="gpu")


def _alive(ray_cluster, cls: str) -> list:
    return list_actors(address=ray_cluster.dashboard, detail=True, limit=10000,
                       filters=[("class_name", "=", cls), ("state", "=", "ALIVE")])


def test_tile_actors_and_the_split_server_ask_ray_for_their_gpu_share(ray_cluster, gpu_node, tmp_path):
    """Both ask for a GPU share as device actors do, so they land on the GPU node; without CUDA
    (a logical GPU) they compute on the CPU (``auto``)."""
    cfg = parse_config(tiled_tree(method__grid=[2, 1], fleet__num_gpus_per_actor=0.25, fleet__num_cpus_per_actor=0.5))
    ds = load_dataset(cfg.data)
    engine = TiledEngine(cfg, build_fleet(cfg, ds.y_train), ds, Tiled(cfg.method, lambda: None))
    assert [s.num_gpus for s in engine.specs()] == [0.25, 0.25]
    actors, _ = engine.start()
    try:
        assert sorted(i["rank"] for i in ray.get([h.info.remote() for _, h in actors], timeout=120)) == [0, 1]
        tiles = _alive(ray_cluster, "TileHost")
        assert len(tiles) == 2 and all(a.required_resources.get("GPU") == 0.25 for a in tiles), tiles
        assert {a.node_id for a in tiles} == {gpu_node.node_id}
    finally:
        for _, h in actors:
            ray.kill(h)

    session = Session(parse_config(_splitfed_tree(tmp_path, 0.25, server_gpus=0.5)))
    session.service.start(session.service_env())  # the split server, as the session starts it for a run
    try:
        assert ray.get(session.service.handle.info.remote(), timeout=120)["device"] == "cpu"
        (server,) = _alive(ray_cluster, "SplitServerHost")
        assert server.required_resources.get("GPU") == 0.5 and server.node_id == gpu_node.node_id
    finally:
        session.service.stop()


def test_plan_shows_the_split_servers_share_and_node(ray_cluster, gpu_node, tmp_path, capsys):
    job = tmp_path / "sfl.yaml"
    job.write_text(yaml.safe_dump(_splitfed_tree(tmp_path, 0.25)))
    assert main(["plan", str(job), "--address", ray_cluster.address]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("split server:")]
    assert line.startswith("split server: 0.5 CPU, 0.25 GPU on ") and line.endswith(f" {gpu_node.node_id[:8]}"), line


def test_the_split_servers_share_counts_in_the_cluster_check():
    node = Node("n" * 16, "10.0.0.1", {"CPU": 4.0, "GPU": 1.0})
    actors = [ActorSpec(i, (i,), 1.0, {}, num_gpus=0.25) for i in range(2)]
    check_placement([*actors, ActorSpec(2, (), 1.0, {}, num_gpus=0.5, role="split server")], [node])
    with pytest.raises(FlexrayError) as err:
        check_placement([*actors, ActorSpec(2, (), 1.0, {}, num_gpus=0.75, role="split server")], [node])
    assert str(err.value).startswith("fleet: the cluster has 1 GPU but the fleet needs 1.25;"), err.value


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU for the local Ray")
def test_plan_refuses_gpu_tile_actors_and_split_server_on_a_machine_without_gpus(tmp_path, capsys):
    """The local check (before Ray starts) counts tile actors and the split server, in one line."""

    tiles, sfl = tmp_path / "tiles.yaml", tmp_path / "sfl.yaml"
    tiles.write_text(yaml.safe_dump(tiled_tree(method__grid=[2, 1], fleet__num_gpus_per_actor=0.5)))
    sfl.write_text(yaml.safe_dump(_splitfed_tree(tmp_path, 0.0, server_gpus=0.5)))
    assert main(["plan", str(tiles)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("flexray: error: config error: fleet.num_gpus_per_actor: 2 actors x 0.5 GPU need 1 GPUs "
                           "but this machine has 0;"), line
    assert main(["plan", str(sfl)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("flexray: error: config error: method.server_gpus: the split server's 0.5 GPU need 0.5 GPUs "
                           "but this machine has 0;"), line
