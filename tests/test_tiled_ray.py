"""The tiled engine on the shared real Ray cluster, logging to a real MLflow store."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from flexray.data import load_dataset
from flexray.data.datasets import to_tensor
from flexray.errors import FlexrayError
from flexray.fleet.fleet import build_fleet, derive_seed
from flexray.fleet.profiles import CATALOG
from flexray.methods import method_class
from flexray.methods.base import DeviceContext
from flexray.models import build_model, profile_model
from flexray.protocol import LocalData, Task
from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job
from flexray.methods.service import RoundService
from flexray.tiled.engine import TiledEngine
from flexray.tiled.method import Tiled
from tests.conftest import job_tree

pytestmark = pytest.mark.ray


def tiled_tree(**kw):
    base = {"model__name": "cnn", "model__width": 4,
            "fleet__groups": [{"profile": "rpi4", "count": 1}, {"profile": "rpi3", "count": 2}],
            "method": {"name": "tiled", "batch_size": 16, "lr": 0.05, "momentum": 0.9, "steps_per_round": 3}}
    return job_tree(**{**base, **kw})


def tiled_round_and_one_device(cfg):  # noqa: ANN001, ANN201
    """One round on tile actors and the same steps trained by one device (``local_update``):
    (engine, state before, tiled weights after, the round's outcome, the one-device update)."""
    ds = load_dataset(cfg.data)
    engine = TiledEngine(cfg, build_fleet(cfg, ds.y_train), ds, Tiled(cfg.method, lambda: None))
    actors, _ = engine.start()
    try:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, ds.input_shape, ds.num_classes)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        rounds = engine.rounds(engine.method, actors, CATALOG["edge_gpu_server"], profile_model(model, ds.input_shape),
                               RoundService())
        new, out = rounds.step(0, 0.0, state)
    finally:
        for _, h in actors:
            ray.kill(h)
    method = method_class("tiled")(cfg.method, lambda: build_model(cfg.model, ds.input_shape, ds.num_classes))
    data = LocalData(to_tensor(ds.x_train[rounds.pool], ds.mean, ds.std), torch.as_tensor(ds.y_train[rounds.pool]))
    ctx = DeviceContext(method.model_fn)
    ctx.generator.manual_seed(derive_seed(cfg.seed, 0, 11))
    return engine, state, new, out, method.local_update(Task(0, 0), state, data, ctx)


def test_tiled_actors_match_single_device_training(ray_cluster, one_torch_thread):
    """Tile actors (2x1 grid, two groups) end the round with the weights one device gets alone."""
    cfg = parse_config(tiled_tree(method__grid=[2, 1], method__groups=[3]))
    engine, state, new, out, ref = tiled_round_and_one_device(cfg)
    assert engine.plan.grid == (2, 1) and engine.plan.groups == ((0, 3), (3, 6))
    assert engine.tile_devices[0].profile.name == "rpi4"  # fastest device takes tile 0 (and the tail)
    for k in state:
        torch.testing.assert_close(new[k], ref.tensors[k], atol=1e-4, rtol=1e-4)
    assert not torch.equal(new["conv1.0.weight"], state["conv1.0.weight"])
    assert out.reports[0].metrics["train_loss"] == pytest.approx(ref.metrics["train_loss"], rel=1e-4)
    ok = [r for r in out.reports if r.status == "ok"]
    assert len(ok) == 2 and [r.status for r in out.reports].count("idle") == 1
    assert out.duration_s == pytest.approx(3 * engine.plan.step_s)
    assert all(r.compute_s > 0 and r.bytes_up > 0 and r.energy_j > 0 for r in ok)


def test_tiled_actors_batchnorm_darknet19(ray_cluster, one_torch_thread):
    """Darknet-19 (BN + in-place LeakyReLU in every fused layer) on 2 tile actors: the BN
    statistics and gradient sums all-gathered through Ray end the round at one device's weights
    and running statistics. One step: this tiny BN net amplifies float32 rounding (relative
    ~1e-6 per step) by orders of magnitude over further steps, on one device as much as tiled."""
    cfg = parse_config(tiled_tree(model__name="darknet19", model__width=4, method__grid=[2, 1], method__fused_stages=2,
                                  method__steps_per_round=1, method__batch_size=16))
    engine, state, new, _, ref = tiled_round_and_one_device(cfg)
    assert engine.plan.syncs and all(len(s) >= 1 for s in engine.plan.syncs)
    worst = max(float((new[k].double() - ref.tensors[k].double()).abs().max()) for k in state)
    assert worst <= 1e-4, f"max abs diff {worst:.3g}"
    assert not torch.equal(new["conv1.1.running_mean"], state["conv1.1.running_mean"])
    assert int(new["conv1.1.num_batches_tracked"]) == 1


def test_tiled_job_logs_to_mlflow_and_is_reproducible(ray_cluster, mlflow_uri, tmp_path):
    runs = [run_job(parse_config(tiled_tree(tracking__uri=mlflow_uri, rounds__num=2))) for _ in range(2)]
    a, b = runs
    for ha, hb in zip(a.history, b.history):
        for k in ("accuracy", "loss", "train_loss", "sim_time_s", "energy_j", "bytes_up"):
            assert getattr(ha, k) == pytest.approx(getattr(hb, k), rel=1e-5), k
    client = MlflowClient(mlflow_uri)
    run = client.get_run(a.run_id)
    assert run.info.status == "FINISHED" and run.data.params["method.name"] == "tiled"
    sim = [m.value for m in client.get_metric_history(a.run_id, "sim_time_s")]
    assert len(sim) == 2 and 0 < sim[0] < sim[1]
    assert a.history[-1].energy_j > 0 and a.history[-1].participants >= 1
    events = pq.read_table(client.download_artifacts(a.run_id, "events.parquet", str(tmp_path))).to_pylist()
    assert {e["status"] for e in events} <= {"ok", "idle"} and len(events) == 2 * 3
    assert all(e["compute_s"] > 0 for e in events if e["status"] == "ok")


def test_bad_tiled_config_is_one_line():
    with pytest.raises(FlexrayError, match="method.grid"):
        parse_config(tiled_tree(method__grid=[0, 2]))
    with pytest.raises(FlexrayError, match="method.groups"):
        parse_config(tiled_tree(method__groups=[3, 2]))
    cfg = parse_config(tiled_tree(model__name="vit", model__width=8))
    ds = load_dataset(cfg.data)
    with pytest.raises(FlexrayError, match="config error: model.name.*tileable.*; use .*darknet19") as err:
        TiledEngine(cfg, build_fleet(cfg, ds.y_train), ds, Tiled(cfg.method, lambda: None))
    assert "\n" not in str(err.value)
    cfg = parse_config(tiled_tree(method__grid=[2, 2]))
    with pytest.raises(FlexrayError, match="method.grid: 2x2 tiles need"):
        TiledEngine(cfg, build_fleet(cfg, ds.y_train), ds, Tiled(cfg.method, lambda: None))


def test_flexray_plan_prints_the_tiled_plan(tmp_path, capsys):
    import yaml

    from flexray.cli import main

    job = tmp_path / "tiled.yaml"
    job.write_text(yaml.safe_dump(tiled_tree(method__grid=[1, 2])))
    assert main(["plan", str(job)]) == 0
    out = capsys.readouterr().out
    assert "tiled plan: grid 1x2" in out and "rpi4-0" in out and "predicted step" in out
