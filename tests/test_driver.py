"""End-to-end runs on the shared Ray cluster with a real MLflow sqlite store."""

from __future__ import annotations


import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job
from tests.conftest import job_tree

pytestmark = [pytest.mark.usefixtures("warm_ray_actors"), pytest.mark.ray]


ROUND_KEYS = ("accuracy", "loss", "sim_time_s", "round_sim_s", "wall_time_s", "energy_j", "round_energy_j",
              "participants", "stragglers", "bytes_up", "bytes_down")
DETERMINISTIC = ("accuracy", "loss", "sim_time_s", "round_sim_s", "energy_j", "participants", "stragglers",
                 "bytes_up", "bytes_down", "train_loss")


def _run(ray_cluster, mlflow_uri, resume=None, **kw):
    cfg = parse_config(job_tree(tracking__uri=mlflow_uri, **kw))
    return run_job(cfg, resume=resume)


def _same(a, b):
    assert len(a.history) == len(b.history)
    for ha, hb in zip(a.history, b.history):
        for k in DETERMINISTIC:
            assert getattr(ha, k) == pytest.approx(getattr(hb, k), rel=1e-6, abs=1e-9), (k, ha, hb)


def test_fedavg_learns_and_logs_everything(ray_cluster, mlflow_uri, tmp_path):
    res = _run(ray_cluster, mlflow_uri, rounds__num=4, tracking__plots=True, tracking__log_model=True)
    accs = [h.accuracy for h in res.history]
    assert accs[-1] > 0.8 and accs[-1] > accs[0]

    client = MlflowClient(mlflow_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "fedavg"
    assert run.data.params["fleet.groups.0.profile"] == "rpi3"
    for key in ROUND_KEYS:
        steps = [m.step for m in client.get_metric_history(res.run_id, key)]
        assert steps == [1, 2, 3, 4], key
    sim = [m.value for m in client.get_metric_history(res.run_id, "sim_time_s")]
    assert all(b > a for a, b in zip(sim, sim[1:]))  # the clock only moves forward

    names = {f.path for f in client.list_artifacts(res.run_id)} | {
        f.path for f in client.list_artifacts(res.run_id, "plots")
    }
    assert {"config.yaml", "events.parquet", "plots/gantt.png", "plots/accuracy_vs_time.png",
            "plots/energy_per_device.png"} <= names
    events = pq.read_table(client.download_artifacts(res.run_id, "events.parquet", str(tmp_path))).to_pylist()
    assert len(events) == 4 * 4  # every device every round
    assert {e["profile"] for e in events} == {"rpi3", "laptop_cpu"}
    for e in events:
        assert e["status"] == "ok" and e["flops"] > 0 and e["energy_j"] > 0 and e["bytes_up"] > 0
        assert e["end_s"] == pytest.approx(e["start_s"] + e["download_s"] + e["compute_s"] + e["upload_s"])
    # The slow class is the round's critical path.
    last = [e for e in events if e["round"] == 3]
    slowest = max(last, key=lambda e: e["end_s"])
    assert slowest["profile"] == "rpi3"

    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(mlflow_uri)
    model = mlflow.pytorch.load_model(f"runs:/{res.run_id}/model")
    from flexray.data import load_dataset, to_tensor

    ds = load_dataset(parse_config(job_tree()).data)
    x = to_tensor(ds.x_test, ds.mean, ds.std)
    acc = float((model(x).argmax(1) == torch.tensor(ds.y_test)).float().mean())
    assert acc == pytest.approx(accs[-1], abs=1e-6)


def test_same_seed_same_metrics_whatever_the_actor_count(ray_cluster, mlflow_uri):
    one = _run(ray_cluster, mlflow_uri, fleet__actors=1)
    two = _run(ray_cluster, mlflow_uri, fleet__actors=2)
    _same(one, two)
    other = _run(ray_cluster, mlflow_uri, seed=1)
    assert [h.loss for h in other.history] != [h.loss for h in one.history]


def test_deadline_drops_or_waits_for_stragglers(ray_cluster, mlflow_uri):
    # rpi3 (1 GFLOP/s) needs ~0.05 s per round here, the laptops < 1 ms: a 0.02 s deadline splits them.
    drop = _run(ray_cluster, mlflow_uri, rounds__deadline_s=0.02, rounds__stragglers="drop")
    wait = _run(ray_cluster, mlflow_uri, rounds__deadline_s=0.02, rounds__stragglers="wait")
    for h in drop.history:
        assert h.participants == 2 and h.stragglers == 2
        assert h.round_sim_s == pytest.approx(0.02, rel=1e-3)  # closed at the deadline (+ tiny server time)
    for h in wait.history:
        assert h.participants == 4 and h.stragglers == 2
        assert h.round_sim_s > 0.04
    assert drop.history[-1].bytes_up < wait.history[-1].bytes_up
    assert drop.history[-1].energy_j < wait.history[-1].energy_j


def test_resume_continues_the_same_run_with_identical_metrics(ray_cluster, mlflow_uri):
    full = _run(ray_cluster, mlflow_uri, rounds__num=4, tracking__checkpoint_every=2)
    first = _run(ray_cluster, mlflow_uri, rounds__num=2, tracking__checkpoint_every=2)
    resumed = _run(ray_cluster, mlflow_uri, resume=first.run_id, rounds__num=4, tracking__checkpoint_every=2)
    assert resumed.run_id == first.run_id
    _same(full, resumed)
    steps = [m.step for m in MlflowClient(mlflow_uri).get_metric_history(first.run_id, "accuracy")]
    assert steps == [1, 2, 3, 4]


def test_resume_with_a_changed_experiment_is_refused(ray_cluster, mlflow_uri):
    from flexray.errors import FlexrayError

    first = _run(ray_cluster, mlflow_uri, rounds__num=1, tracking__checkpoint_every=1)
    with pytest.raises(FlexrayError, match="method.lr"):
        _run(ray_cluster, mlflow_uri, resume=first.run_id, rounds__num=2, method__lr=0.5)


def test_unplaceable_fleet_fails_fast(ray_cluster, mlflow_uri):
    from flexray.errors import FlexrayError

    groups = [{"profile": "rpi4", "count": 1, "resources": {"device:rpi4": 1}}]
    with pytest.raises(FlexrayError, match="device:rpi4"):
        _run(ray_cluster, mlflow_uri, fleet__groups=groups, tracking__experiment="unplaceable")
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("unplaceable").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]  # no run left dangling as RUNNING


def test_client_sampling_is_seeded(ray_cluster, mlflow_uri, tmp_path):
    res = _run(ray_cluster, mlflow_uri, rounds__clients_per_round=2, rounds__num=3)
    assert all(h.participants == 2 for h in res.history)
    client = MlflowClient(mlflow_uri)
    events = pq.read_table(client.download_artifacts(res.run_id, "events.parquet", str(tmp_path))).to_pylist()
    picked = [tuple(sorted(e["device"] for e in events if e["round"] == r)) for r in range(3)]
    assert len(set(picked)) > 1  # different devices in different rounds
    again = _run(ray_cluster, mlflow_uri, rounds__clients_per_round=2, rounds__num=3)
    _same(res, again)
    assert np.isfinite([h.loss for h in res.history]).all()


