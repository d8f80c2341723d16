"""Nodes that leave and come back, on a real two-node Ray cluster. A node joins as device class
``c`` and two devices are pinned to it (two more to the head's ``device:a``). A callback of the
job stops that node between rounds, the way a board drops off the network, and later starts a new
one advertising the same ``device:c``: the devices are reported offline, the run goes on with
the rest, and the devices train again once Ray has restarted their actors on the new node.
When no device is left to train, the run waits ``cluster.rejoin_timeout_s`` and stops with one
line and a checkpoint it resumes from."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flexray.errors import FlexrayError
from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job
from flexray.tracking.callbacks import Callback, RoundEnd
from tests.conftest import job_tree
from tests.test_cluster_multinode import WorkerNode, _alive_node_with, join_node, leave

pytestmark = pytest.mark.ray

ON_C = {"profile": "phone_mid", "count": 2, "resources": {"device:c": 0.5}}
ON_HEAD = {"profile": "laptop_cpu", "count": 2, "resources": {"device:a": 0.5}}


def _tree(tmp_path: Path, groups: list[dict], rounds: int, **extra: object) -> dict:
    return job_tree(name="nodes", fleet__groups=groups, fleet__num_cpus_per_actor=0.5, model__width=8,
                    rounds__num=rounds, tracking__uri=f"sqlite:///{tmp_path}/mlflow.db", tracking__experiment="nodes",
                    **{"tracking__checkpoint_every": 1, **extra})


def _actors_alive_on(node_id: str, dashboard: str, count: int) -> bool:
    from ray.util.state import list_actors

    alive = list_actors(address=dashboard, filters=[("class_name", "=", "DeviceActor"), ("state", "=", "ALIVE")],
                        detail=True, limit=10000, raise_on_missing_output=False)
    return sum(a.node_id == node_id for a in alive) >= count


class NodeSwitch(Callback):
    """Stops node c after round ``stop_after``; with ``rejoin_after``, starts a new node c after
    that round and waits until Ray has restarted the two pinned actors there."""

    def __init__(self, node: WorkerNode, ray_cluster, stop_after: int, rejoin_after: int | None = None,
                 pace_s: float = 0.0) -> None:
        self.node, self.cluster = node, ray_cluster
        self.stop_after, self.rejoin_after, self.pace_s = stop_after, rejoin_after, pace_s
        self.nodes: list[WorkerNode] = [node]

    def on_round_end(self, end: RoundEnd) -> None:
        if self.rejoin_after is not None and end.round > self.rejoin_after and end.metrics.offline:
            time.sleep(self.pace_s)  # async versions take milliseconds; give restarted actors wall time to load
        if end.round == self.stop_after:
            leave(self.nodes[-1], "c")
        if end.round == self.rejoin_after:
            self.nodes.append(join_node(self.cluster.address, "c", self.cluster.env, 2))
            deadline = time.monotonic() + 120
            while not _actors_alive_on(self.nodes[-1].node_id, self.cluster.dashboard, 2) and time.monotonic() < deadline:
                time.sleep(0.5)

    def stop(self) -> None:
        if _alive_node_with("device:c"):
            leave(self.nodes[-1], "c")


def _events(uri: str, run_id: str, tmp_path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(MlflowClient(uri).download_artifacts(run_id, "events.parquet", str(tmp_path))).to_pylist()


def test_devices_of_a_lost_node_go_offline_and_come_back_when_it_rejoins(ray_cluster, tmp_path):
    switch = NodeSwitch(join_node(ray_cluster.address, "c", ray_cluster.env, 2), ray_cluster, stop_after=2,
                        rejoin_after=4)
    try:
        result = run_job(parse_config(_tree(tmp_path, [ON_HEAD, ON_C], rounds=9)), callbacks=[switch])
    finally:
        switch.stop()
    history = result.history
    assert len(history) == 9  # every round ran
    assert sum(h.nodes_lost for h in history) == 1 and history[2].nodes_lost == 1  # seen in round 3
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows = _events(uri, result.run_id, tmp_path)
    on_c = {r["device"] for r in rows if r["profile"] == "phone_mid"}
    status = {(r["round"], r["device"]): r["status"] for r in rows}
    assert all(status[(rnd, d)] == "ok" for rnd in (0, 1) for d in on_c)  # before the loss
    assert all(status[(rnd, d)] == "offline" for rnd in (2, 3) for d in on_c)  # node gone
    back = [rnd for rnd in range(4, 9) if all(status.get((rnd, d)) == "ok" for d in on_c)]
    assert back, f"the devices of node c never trained again: {sorted(status.items())}"
    new_node = switch.nodes[-1].node_id
    assert {r["node"] for r in rows if r["round"] == back[0] and r["device"] in on_c} == {new_node}
    for h in history:  # the surviving rounds trained on the head's devices and logged clean metrics
        assert h.participants >= 2 and 0.0 <= h.accuracy <= 1.0
    assert [h.offline for h in history[2:4]] == [2.0, 2.0]
    assert MlflowClient(uri).get_run(result.run_id).info.status == "FINISHED"


def test_with_every_node_gone_the_run_stops_in_one_line_and_resumes(ray_cluster, tmp_path):
    node = join_node(ray_cluster.address, "c", ray_cluster.env, 2)
    switch = NodeSwitch(node, ray_cluster, stop_after=1)
    cfg = parse_config(_tree(tmp_path, [ON_C], rounds=3, cluster__rejoin_timeout_s=3))
    try:
        with pytest.raises(FlexrayError) as err:
            run_job(cfg, callbacks=[switch])
    finally:
        switch.stop()
    line = str(err.value)
    assert "\n" not in line and "cluster.rejoin_timeout_s=3 s" in line and "--resume" in line, line
    run_id = line.rsplit(" ", 1)[-1]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert MlflowClient(uri).list_artifacts(run_id, "checkpoints")  # round 1 is kept

    again = join_node(ray_cluster.address, "c", ray_cluster.env, 2)
    try:
        resumed = run_job(cfg, resume=run_id)
    finally:
        leave(again, "c")
    assert [h.round for h in resumed.history] == [1, 2, 3]
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_async_rounds_report_a_lost_node_offline_and_take_its_devices_back(ray_cluster, tmp_path):
    """The same loss in async rounds (one model version per arrival): flights on the lost node are
    dropped, every version logs its devices offline, and once their actors have restarted on the
    new node (and reloaded their data, which takes seconds: the callback paces versions meanwhile)
    they fly again. All four devices are phones, so node c's devices land as often as the head's."""
    switch = NodeSwitch(join_node(ray_cluster.address, "c", ray_cluster.env, 2), ray_cluster, stop_after=2,
                        rejoin_after=5, pace_s=0.5)
    head = {**ON_HEAD, "profile": "phone_mid"}
    cfg = parse_config(_tree(tmp_path, [head, ON_C], rounds=60, rounds__mode="async", tracking__checkpoint_every=0))
    try:
        result = run_job(cfg, callbacks=[switch])
    finally:
        switch.stop()
    history = result.history
    assert len(history) == 60 and sum(h.nodes_lost for h in history) == 1
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows = _events(uri, result.run_id, tmp_path)
    on_c = {2, 3}  # the second group's devices
    status = {(r["round"], r["device"]): (r["status"], r["node"]) for r in rows}
    new_node = switch.nodes[-1].node_id
    back = min((rnd for (rnd, d), (st, node) in status.items() if d in on_c and st == "ok" and node == new_node),
               default=None)
    assert back is not None, f"no device of node c trained on the new node: {sorted(status.items())}"
    assert all(status[(rnd, d)][0] == "offline" for rnd in range(2, 6) for d in on_c)  # lost, not waited for
    assert not any(st == "ok" and d in on_c for (rnd, d), (st, _) in status.items() if 2 <= rnd < back)
    assert all(0.0 <= h.accuracy <= 1.0 for h in history)
    assert MlflowClient(uri).get_run(result.run_id).info.status == "FINISHED"
    offline = [rnd for (rnd, d), (st, _) in sorted(status.items()) if d == 2 and st == "offline"]
    print(f"async node loss: versions {len(history)}, device 2 offline in versions {offline[0]}..{offline[-1]}, back in "
          f"version {back}, accuracy {history[1].accuracy:.3f} -> {history[-1].accuracy:.3f}")
