"""Async rounds, availability and injected faults, on the shared Ray cluster with real MLflow."""

from __future__ import annotations

import threading
import time

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from tests.test_driver import _run, _same


pytestmark = [pytest.mark.usefixtures("warm_ray_actors"), pytest.mark.ray]


def events(mlflow_uri, run_id, tmp_path):
    client = MlflowClient(mlflow_uri)
    return pq.read_table(client.download_artifacts(run_id, "events.parquet", str(tmp_path))).to_pylist()


ASYNC = {"rounds__mode": "async", "rounds__num": 6, "method__name": "fedbuff", "method__buffer_size": 2}


def test_fedbuff_virtual_async_is_deterministic_and_favours_fast_devices(ray_cluster, mlflow_uri, tmp_path):
    a = _run(ray_cluster, mlflow_uri, **ASYNC)
    b = _run(ray_cluster, mlflow_uri, fleet__actors=1, **ASYNC)
    _same(a, b)  # event order is simulated time, not host speed or actor count
    sims = [h.sim_time_s for h in a.history]
    assert all(y > x for x, y in zip(sims, sims[1:]))
    assert all(h.participants == 2 for h in a.history)  # one server step per K=2 arrivals
    ev = events(mlflow_uri, a.run_id, tmp_path)
    per = {p: sum(e["profile"] == p for e in ev) for p in ("rpi3", "laptop_cpu")}
    assert per["laptop_cpu"] > 3 * per["rpi3"]  # fast devices never wait for slow ones
    # A sync round waits for the rpi3s, so sync needs far more simulated time per update.
    sync = _run(ray_cluster, mlflow_uri, rounds__num=3)
    per_update_sync = sync.history[-1].sim_time_s / (3 * 4)
    per_update_async = a.history[-1].sim_time_s / (6 * 2)
    assert per_update_async < per_update_sync


def test_real_time_async_takes_updates_as_actors_finish(ray_cluster, mlflow_uri, tmp_path):
    """``sleep`` throttle: arrivals come from ray.wait, in the order the actors really finish."""
    res = _run(ray_cluster, mlflow_uri, fleet__throttle="sleep", fleet__time_scale=5.0,
               fleet__num_cpus_per_actor=0.5, **ASYNC)
    assert len(res.history) == 6 and all(h.participants == 2 for h in res.history)
    ev = events(mlflow_uri, res.run_id, tmp_path)
    per = {p: sum(e["profile"] == p for e in ev) for p in ("rpi3", "laptop_cpu")}
    assert per["laptop_cpu"] > per["rpi3"]  # the laptops really do finish first


def test_fedasync_weights_stale_updates_less(ray_cluster, mlflow_uri, tmp_path):
    res = _run(ray_cluster, mlflow_uri, rounds__mode="async", rounds__num=12, method__name="fedasync")
    assert res.history[-1].accuracy > res.history[0].accuracy
    import json

    stale = [json.loads(e["metrics"])["staleness"] for e in events(mlflow_uri, res.run_id, tmp_path)]
    assert max(stale) > 0 and min(stale) == 0
    from flexray.methods.fedasync import FedAsync, FedAsyncConfig

    m = FedAsync(FedAsyncConfig(name="fedasync", alpha=0.6, staleness_fn="polynomial", a=0.5), lambda: None)
    assert m.weight(0) == pytest.approx(0.6) and m.weight(3) == pytest.approx(0.3)


def test_nan_and_wrong_shape_updates_are_rejected(ray_cluster, mlflow_uri, tmp_path):
    res = _run(ray_cluster, mlflow_uri, faults__nan_updates=[[0, 1]], faults__bad_shape_updates=[[1, 2]])
    h = res.history
    assert [x.rejected for x in h] == [1, 1, 0]
    assert [x.participants for x in h] == [3, 3, 4]  # the others on the same actor still count
    ev = events(mlflow_uri, res.run_id, tmp_path)
    bad = {(e["round"], e["device"]): e["note"] for e in ev if e["status"] == "rejected"}
    assert set(bad) == {(0, 1), (1, 2)}
    assert "NaN" in bad[(0, 1)] and "shape" in bad[(1, 2)]
    assert all(x.loss == x.loss and x.loss < 10 for x in h)  # the model never saw a NaN


def test_device_going_offline_mid_task_loses_it(ray_cluster, mlflow_uri, tmp_path):
    # The rpi3s are online for the first 30 ms of every 60 ms and need ~50 ms: they start, then drop out.
    flaky = {"kind": "periodic", "period_s": 0.06, "duty": 0.5}
    groups = [{"profile": "rpi3", "count": 2, "trace": flaky}, {"profile": "laptop_cpu", "count": 2}]
    res = _run(ray_cluster, mlflow_uri, fleet__groups=groups, rounds__num=2)
    assert res.history[0].lost == 2 and res.history[0].participants == 2
    ev = events(mlflow_uri, res.run_id, tmp_path)
    assert {e["device"] for e in ev if e["status"] == "lost"} == {0, 1}
    assert all(e["bytes_up"] == 0 for e in ev if e["status"] == "lost")


def test_overcommit_keeps_the_first_to_finish(ray_cluster, mlflow_uri, tmp_path):
    res = _run(ray_cluster, mlflow_uri, rounds__clients_per_round=2, rounds__overcommit=2.0)
    ev = events(mlflow_uri, res.run_id, tmp_path)
    assert {e["profile"] for e in ev if e["status"] == "surplus"} == {"rpi3"}
    for rnd, x in enumerate(res.history):
        assert x.participants == 2
        kept = [e["end_s"] - e["start_s"] for e in ev if e["round"] == rnd and e["status"] == "ok"]
        surplus = [e["end_s"] - e["start_s"] for e in ev if e["round"] == rnd and e["status"] == "surplus"]
        # closed when the laptops were done, not the rpi3s
        assert max(kept) <= x.round_sim_s * (1 + 1e-9) and x.round_sim_s < min(surplus)


def test_killed_device_actor_loses_its_round_then_restarts(ray_cluster, mlflow_uri, tmp_path):
    """SIGKILL a device actor's process mid-round: the round completes with the rest, Ray
    restarts the actor (reloading its data) and the run goes on."""
    import os
    import signal

    from ray.util.state import list_actors

    client = MlflowClient(mlflow_uri)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            exp = client.get_experiment_by_name("faults")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and client.get_metric_history(runs[0].info.run_id, "round_sim_s"):
                alive = list_actors(address=ray_cluster.dashboard, detail=True,
                                    filters=[("class_name", "=", "DeviceActor"), ("state", "=", "ALIVE")])
                slow = [a for a in alive if "rpi3-0" in (a.repr_name or "")]
                if slow:  # rpi3-0 trains ~2 s a round: a kill now lands mid-task
                    os.kill(slow[0].pid, signal.SIGKILL)
                    killed.append(slow[0].pid)
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    # sleep throttle: one actor per device, rounds of ~2 s of wall time (the rpi3s at 40x).
    res = _run(ray_cluster, mlflow_uri, rounds__num=4, fleet__throttle="sleep", fleet__time_scale=40.0,
               fleet__num_cpus_per_actor=0.5, tracking__experiment="faults")
    t.join(timeout=5)
    assert killed, "the test never found an actor to kill"
    failed = [x.failed for x in res.history]
    assert sum(failed) == 1  # exactly one device lost exactly one round
    ev = events(mlflow_uri, res.run_id, tmp_path)
    (dead,) = [e for e in ev if e["status"] == "failed"]
    later = [e for e in ev if e["device"] == dead["device"] and e["round"] > dead["round"]]
    assert later and all(e["status"] == "ok" for e in later)  # restarted with its data
    assert client.get_run(res.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow)])  # async: ~4 min
def test_killed_driver_resumes_to_bit_identical_metrics(ray_cluster, free_cpus, mlflow_uri, tmp_path, mode):
    """SIGKILL the driver process mid-run, `flexray run --resume RUN_ID`, and end with exactly
    the metrics of an uninterrupted run (model, method state, clock, in-flight work restored)."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import job_tree

    if mode == "sync":  # sleep throttle slows rounds to ~1 s of wall time; sync results do not depend on it
        extra = dict(rounds__num=5, fleet__throttle="sleep", fleet__time_scale=20.0, fleet__num_cpus_per_actor=0.5)
    else:  # async must stay virtual to be deterministic: make each version cost real work instead
        extra = dict(rounds__num=30, rounds__mode="async", method__name="fedbuff", method__buffer_size=2,
                     method__local_epochs=3, model__width=32)
    knobs = dict(tracking__checkpoint_every=1, tracking__experiment=f"kill-{mode}", **extra)
    tree = job_tree(tracking__uri=mlflow_uri, cluster__address=ray_cluster.address, **knobs)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    cli = [sys.executable, "-m", "flexray.cli", "run", str(cfg)]
    client = MlflowClient(mlflow_uri)

    proc = subprocess.Popen(cli, env=ray_cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_id, deadline = None, time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            exp = client.get_experiment_by_name(f"kill-{mode}")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "round_sim_s")) >= 2 \
                    and client.list_artifacts(runs[0].info.run_id, "checkpoints"):
                run_id = runs[0].info.run_id
                break
            time.sleep(0.1)
    finally:
        proc.kill()  # SIGKILL: no cleanup, no final checkpoint
        proc.wait()
    assert run_id, "the driver never reached its second checkpoint"
    assert len(client.get_metric_history(run_id, "round_sim_s")) < knobs["rounds__num"]  # really cut short

    done = subprocess.run([*cli, "--resume", run_id], env=ray_cluster.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    full = _run(ray_cluster, mlflow_uri, **knobs)

    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    final = {k: v for k, v in resumed.data.metrics.items() if k != "wall_time_s"}
    expect = {k: v for k, v in full.metrics.as_dict().items() if k in final}
    assert final == expect  # bit for bit


def test_mlflow_outage_mid_run_loses_nothing(ray_cluster, tmp_path):
    """Stop the real MLflow server after round 1 and bring it back later: training goes on,
    and every round's metrics end up in the store, in order, once it is back."""
    import os

    from tests.conftest import free_port, start_mlflow_server, stop_process_group

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    server = start_mlflow_server(tmp_path, port, env)
    uri = f"http://127.0.0.1:{port}"
    client = MlflowClient(uri)
    events_log: list[str] = []

    def outage() -> None:
        nonlocal server
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                exp = client.get_experiment_by_name("outage")
                runs = client.search_runs([exp.experiment_id]) if exp else []
                if runs and client.get_metric_history(runs[0].info.run_id, "round_sim_s"):
                    break
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.1)
        stop_process_group(server)
        events_log.append("down")
        time.sleep(6)  # rounds go by while it is down
        server = start_mlflow_server(tmp_path, port, env)
        events_log.append("up")

    t = threading.Thread(target=outage, daemon=True)
    t.start()
    try:
        res = _run(ray_cluster, uri, rounds__num=6, fleet__throttle="sleep", fleet__time_scale=20.0,
                   fleet__num_cpus_per_actor=0.5, tracking__experiment="outage", tracking__checkpoint_every=2,
                   tracking__offline_grace_s=180.0)
        t.join(timeout=180)
        assert events_log == ["down", "up"]
        assert len(res.history) == 6
        run = client.get_run(res.run_id)
        assert run.info.status == "FINISHED"
        for key in ("accuracy", "sim_time_s", "energy_j"):
            steps = sorted(m.step for m in client.get_metric_history(res.run_id, key))
            assert steps == [1, 2, 3, 4, 5, 6], key
        names = {f.path for f in client.list_artifacts(res.run_id)}
        assert "events.parquet" in names
    finally:
        stop_process_group(server)
