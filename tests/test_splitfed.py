"""SplitFed through the actor's code path (in-process server host) and end to end on Ray + MLflow."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from flexray.errors import FlexrayError
from flexray.fleet.report import RoundRequest
from flexray.runtime.assembly import load_config, parse_config
from flexray.methods.split_server import Split
from flexray.methods.splitfed import cut_of
from tests.conftest import REPO, job_tree

pytestmark = pytest.mark.usefixtures("warm_ray_actors")  # in-process jobs reuse device actors (conftest)

# Two devices so slow that splitting pays (2 MFLOP/s), beside ordinary ones that train whole.
SLOW = [("fleet.profiles={slow: {flops: 2.0e6, memory_bytes: 1.0e9, uplink_bps: 1.0e8, downlink_bps: 1.0e8, "
        "power_active_w: 3, power_idle_w: 1, power_radio_w: 0.5}}"), "fleet.groups.0.profile=slow"]


def _split_round(overrides: list[str], rnd: int = 0):
    """One round of the quickstart's 8 devices through ``DeviceHost.run_round`` with an in-process
    split server: (method, state, tasks, reports, device updates, server updates)."""
    from flexray.data import load_dataset
    from flexray.fleet.fleet import assign_actors, build_fleet
    from flexray.fleet.profiles import resolve_profile
    from flexray.methods import method_class
    from flexray.protocol import DeviceView
    from flexray.runtime.actor import DeviceHost
    from flexray.methods.split_server import ServerClient, SplitServerHost

    cfg = load_config(REPO / "jobs" / "quickstart.yaml", ["method.name=splitfed", "fleet.actors=1", *overrides])
    ds = load_dataset(cfg.data)
    devices = build_fleet(cfg, ds.y_train)
    host = DeviceHost(cfg, assign_actors(cfg, devices)[0], devices, ds)
    server = resolve_profile(cfg.fleet.server_profile, cfg.fleet.profiles)
    torch.manual_seed(cfg.seed)
    method = method_class(cfg.method.name)(cfg.method, host.ctx._model_fn)
    method.attach(host.model_profile, server)
    state = method.init(host.ctx.model())
    tasks = method.plan(rnd, [DeviceView(d.id, d.profile, d.trace.speed(0.0), len(d.indices)) for d in devices], state)
    split = SplitServerHost(cfg, method.server_spec(), ds.input_shape, ds.num_classes, server)
    split.begin_round(rnd, state, tasks)
    reports, updates = host.run_round(RoundRequest(rnd, 0.0, None, False, tuple(tasks), False, service=ServerClient(split)), state)
    server_updates = split.end_round([r.device for r in reports if r.status == "ok"])
    return method, state, tasks, reports, updates, server_updates


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_hybrid_round_mixes_fl_and_split_devices_into_one_model(one_torch_thread, variant):
    method, state, tasks, reports, updates, server_updates = _split_round([*SLOW, f"method.variant={variant}"])
    cuts = {t.device: cut_of(t.spec) for t in tasks}
    L = len(method.points)
    assert {cuts[0], cuts[1]} != {L} and L in cuts.values()  # slow devices split, others train whole
    assert sum(t.spec.of(Split).theta for t in tasks) <= 1 + 1e-9
    names = ["conv1", "conv2", "head"]  # flexray plan names the stage each cut follows
    cut_note = next(n for n in method.plan_notes(tasks) if n.startswith("cuts (of 3 stages): "))
    assert all(f"{c} after {names[c - 1]}" in cut_note for c in cuts.values() if c < L) and f"{L} no split" in cut_note
    assert all(r.status == "ok" for r in reports)
    for r in reports:  # virtual time is exactly what the plan predicted, server wait included
        assert r.end_s - r.start_s == pytest.approx(r.predicted_s, rel=1e-9)
        assert (r.server_s > 0) == (cuts[r.device] < L)
        assert r.predicted_s == pytest.approx(r.spec["predicted_s"], rel=1e-9)
    for u in updates:  # a split client returns only its stages
        names = {k.split(".")[0] for k in u.tensors}
        assert len(names) == cuts[u.device]
    if variant == "v1":
        assert sorted(u.device for u in server_updates) == sorted(d for d, c in cuts.items() if c < L)
    else:
        assert [u.device for u in server_updates] == [-1]
    new = method.aggregate(0, state, updates + server_updates)
    assert set(new) == set(state)
    changed = [k for k in state if state[k].is_floating_point() and not torch.equal(new[k], state[k])]
    assert len(changed) == sum(v.is_floating_point() for v in state.values())  # every stage was trained


def test_split_rounds_are_reproducible(one_torch_thread):
    a = _split_round([*SLOW, "method.scheduler=fixed", "method.cut=1"])
    b = _split_round([*SLOW, "method.scheduler=fixed", "method.cut=1"])
    for ua, ub in zip(a[4] + a[5], b[4] + b[5]):
        assert ua.device == ub.device
        for k in ua.tensors:
            assert torch.equal(ua.tensors[k], ub.tensors[k]), k
    assert [r.metrics for r in a[3]] == [r.metrics for r in b[3]]


def test_split_config_errors_are_one_line():
    with pytest.raises(FlexrayError, match=r"^config error: method: scheduler=fixed needs method.cut") as err:
        parse_config(job_tree(method__name="splitfed", method__scheduler="fixed"))
    assert "\n" not in str(err.value)
    with pytest.raises(FlexrayError, match=r"^config error: method.variant: "):
        parse_config(job_tree(method__name="splitfed", method__variant="v3"))
    with pytest.raises(FlexrayError, match=r"method.cut: the model has 3 stages; use 1..3"):
        _split_round(["method.scheduler=fixed", "method.cut=9"])


@pytest.mark.ray
def test_splitfed_job_on_ray_logs_predicted_and_simulated_latency(ray_cluster, mlflow_uri, one_torch_thread):
    from flexray.runtime.session import run_job

    slow = {"slow": {"flops": 2.0e6, "memory_bytes": 1.0e9, "uplink_bps": 1.0e8, "downlink_bps": 1.0e8,
                     "power_active_w": 3, "power_idle_w": 1, "power_radio_w": 0.5}}
    tree = job_tree(tracking__uri=mlflow_uri, method__name="splitfed", fleet__actors=1, rounds__num=3,
                    fleet__profiles=slow, fleet__groups=[{"profile": "slow", "count": 2}, {"profile": "laptop_cpu", "count": 2}])
    res = run_job(parse_config(tree))
    accs = [h.accuracy for h in res.history]
    assert accs[-1] > 0.6 and accs[-1] > accs[0]
    run = MlflowClient(mlflow_uri).get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.data.params["method.name"] == "splitfed"
    path = MlflowClient(mlflow_uri).download_artifacts(res.run_id, "events.parquet")
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == 12
    split_rows = [r for r in rows if json.loads(r["spec"])["cut"] < 3]
    assert split_rows and all(r["server_s"] > 0 for r in split_rows)
    for r in rows:  # predicted vs simulated latency, side by side in the event log
        assert r["end_s"] - r["start_s"] == pytest.approx(r["predicted_s"], rel=1e-6)
    for h in res.history:
        assert h.round_predicted_s <= h.round_sim_s


@pytest.mark.ray
def test_splitfed_round_on_ray_cuts_mobilenet_v2_between_blocks(ray_cluster, mlflow_uri, one_torch_thread):
    """One tiny round of a torchvision model (a stage per inverted-residual block) through Ray:
    the slow device splits, the split server trains the rest, predicted = simulated time."""
    from flexray.runtime.session import run_job

    slow = {"slow": {"flops": 2.0e6, "memory_bytes": 1.0e9, "uplink_bps": 1.0e8, "downlink_bps": 1.0e8,
                     "power_active_w": 3, "power_idle_w": 1, "power_radio_w": 0.5}}
    tree = job_tree(tracking__uri=mlflow_uri, method__name="splitfed", fleet__actors=1, rounds__num=1,
                    model__name="torchvision:mobilenet_v2", data__samples_per_device=32, data__test_samples=64,
                    fleet__profiles=slow, fleet__groups=[{"profile": "slow", "count": 1}, {"profile": "laptop_cpu", "count": 1}])
    res = run_job(parse_config(tree))
    assert len(res.history) == 1 and 0.0 <= res.history[0].accuracy <= 1.0
    path = MlflowClient(mlflow_uri).download_artifacts(res.run_id, "events.parquet")
    rows = pq.read_table(path).to_pylist()
    cuts = [json.loads(r["spec"])["cut"] for r in rows]
    assert len(rows) == 2 and min(cuts) < 20  # 20 stages: stem, 17 blocks, last conv, head; 20 = no split
    for r, cut in zip(rows, cuts):
        assert (r["server_s"] > 0) == (cut < 20)
        assert r["end_s"] - r["start_s"] == pytest.approx(r["predicted_s"], rel=1e-6)
