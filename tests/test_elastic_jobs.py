"""Elastic methods end to end on the shared Ray cluster: the scheduler's choices reach the
devices, the event log and MLflow; predictions match the virtual clock."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job
from tests.conftest import job_tree

pytestmark = [pytest.mark.usefixtures("warm_ray_actors"), pytest.mark.ray]


RESNET = {"name": "resnet8", "width": 8}


def _events(mlflow_uri: str, run_id: str, tmp_path) -> list[dict]:
    client = MlflowClient(mlflow_uri)
    path = client.download_artifacts(run_id, "events.parquet", str(tmp_path))
    rows = pq.read_table(path).to_pylist()
    for r in rows:
        r["spec"] = json.loads(r["spec"])
    return rows


def test_flextrain_minmax_end_to_end(ray_cluster, mlflow_uri, tmp_path) -> None:
    cfg = parse_config(job_tree(
        tracking__uri=mlflow_uri, model=RESNET, rounds__num=3, tracking__log_model=True,
        method={"name": "flextrain", "local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.5},
    ))
    res = run_job(cfg)
    last = res.history[-1]
    assert {"acc_k1", "acc_k2", "acc_k3", "mean_device_acc"} <= set(last.as_dict())
    assert last.extra["acc_k3"] == last.accuracy and last.extra["acc_k3"] > 0.3
    events = _events(mlflow_uri, res.run_id, tmp_path)
    assert len(events) == 3 * 4 and all(e["status"] == "ok" for e in events)
    k = {e["profile"]: e["spec"]["k"] for e in events}
    assert k["rpi3"] < k["laptop_cpu"]  # the slow class sets the pace with a shorter prefix
    for rnd in range(3):
        rows = [e for e in events if e["round"] == rnd]
        for e in rows:  # virtual throttle: the scheduler's prediction is what the clock simulates
            assert e["predicted_s"] == pytest.approx(e["end_s"] - e["start_s"], rel=1e-4)
        slowest = max(e["end_s"] - e["start_s"] for e in rows)
        assert slowest == pytest.approx(max(e["predicted_s"] for e in rows if e["profile"] == "rpi3"), rel=1e-4)
    # The deployed model is the full one; every prefix deploys from it.
    client = MlflowClient(mlflow_uri)
    history = client.get_metric_history(res.run_id, "mean_device_acc")
    assert [m.step for m in history] == [1, 2, 3]
    params = client.get_run(res.run_id).data.params  # the classifier rule the issue asks to log
    assert params["method.head_rule"] == "zero_pad" and params["method.name"] == "flextrain"


def test_heterofl_static_tiers_and_fedclass_through_ray(ray_cluster, mlflow_uri, tmp_path) -> None:
    tiers = {"rpi3": 0.25, "laptop_cpu": 1.0}
    cfg = parse_config(job_tree(
        tracking__uri=mlflow_uri, model=RESNET, rounds__num=2, schedule={"mode": "static"},
        method={"name": "heterofl", "local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.5, "tiers": tiers},
    ))
    res = run_job(cfg)
    events = _events(mlflow_uri, res.run_id, tmp_path)
    assert {(e["profile"], e["spec"]["rate"]) for e in events} == set(tiers.items())
    assert res.history[-1].mean_device_acc == pytest.approx(
        (res.history[-1].extra["acc_p0.25"] + res.history[-1].extra["acc_p1"]) / 2
    )

    cfg = parse_config(job_tree(
        tracking__uri=mlflow_uri, model=RESNET, rounds__num=2, tracking__log_model=True,
        method={"name": "fedclass", "local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.5},
    ))
    res = run_job(cfg)
    last = res.history[-1]
    assert last.mean_device_acc == pytest.approx(
        sum(last.extra[f"acc_k{e['spec']['k']}"] for e in _events(mlflow_uri, res.run_id, tmp_path / "fc")
            if e["round"] == 1) / 4
    )
    import mlflow.pytorch

    mlflow.set_tracking_uri(mlflow_uri)
    model = mlflow.pytorch.load_model(f"runs:/{res.run_id}/model")  # the largest trained class model deploys
    assert "skip" not in dict(model.named_children())  # the laptop class trains every block: k = 3
