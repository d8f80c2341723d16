"""Async is a round mode for every method: the policies on partial updates, and runs through Ray."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from flexray.config import ModelConfig
from flexray.errors import FlexrayError
from flexray.methods import method_class
from flexray.methods.base import Update
from flexray.methods.fedasync import FedAsync, FedAsyncConfig
from flexray.methods.fedbuff import FedBuff, FedBuffConfig
from flexray.methods.heterofl import HeteroFL
from flexray.methods.policy import Arrivals, AsyncPolicy
from flexray.protocol import SubModel
from flexray.models import build_model
from flexray.models import elastic
from flexray.methods.width import Width
from tests.test_driver import _run, _same

pytestmark = pytest.mark.usefixtures("warm_ray_actors")  # in-process jobs reuse device actors (conftest)


def _heterofl() -> HeteroFL:
    cfg = HeteroFL.Config(name="heterofl", rates=[0.5, 1.0])
    return HeteroFL(cfg, lambda: build_model(ModelConfig(name="cnn", width=8), (1, 8, 8), 10))


def _slice_update(method: HeteroFL, base: dict[str, torch.Tensor], rate: float, plus: float) -> Update:
    """A device's trained sub-model: its slice of ``base`` moved by ``plus``."""
    sub = elastic.extract(base, method.index(rate, 0))
    tensors = {k: v + plus if v.is_floating_point() else v + 1 for k, v in sub.items()}
    return Update(tensors, weight=10, samples=10, metrics={"rate": rate}, trained=SubModel(Width(rate)))


def _inside(method: HeteroFL, state: dict[str, torch.Tensor], rate: float) -> dict[str, torch.Tensor]:
    """Bool masks of the entries a width-``rate`` device trains."""
    ones = {k: torch.ones_like(v, dtype=torch.float64) for k, v in state.items()}
    zeros = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
    part = elastic.Part(elastic.extract(ones, method.index(rate, 0)), method.index(rate, 0), 1.0)
    return {k: v > 0 for k, v in elastic.aggregate(zeros, [part]).items()}


def test_fedasync_mixes_only_the_entries_a_stale_partial_update_trained() -> None:
    m = _heterofl()
    base = m.init(m.model_fn())
    state = {k: v + 3.0 if v.is_floating_point() else v for k, v in base.items()}  # the server moved on
    arr = Arrivals(AsyncPolicy("fedasync", alpha=0.5, staleness="constant"), m)
    new = arr.arrive(0, base, state, [_slice_update(m, base, 0.5, 1.0)], staleness=2)
    assert new is not None
    inside = _inside(m, state, 0.5)
    w = "layers.0.weight" if "layers.0.weight" in state else next(k for k, v in state.items() if v.dim() == 4)
    assert inside[w].any() and (~inside[w]).any()
    # Trained entries: (1 - a) w + a w_k with w_k = base + 1; the rest keep the server's value, not the stale base.
    assert torch.allclose(new[w][inside[w]], (0.5 * state[w] + 0.5 * (base[w] + 1.0))[inside[w]])
    assert torch.equal(new[w][~inside[w]], state[w][~inside[w]])


def test_fedbuff_averages_each_entry_over_the_arrivals_that_trained_it() -> None:
    m = _heterofl()
    base = m.init(m.model_fn())
    arr = Arrivals(AsyncPolicy("fedbuff", staleness="constant", buffer_size=2, server_lr=1.0), m)
    assert arr.arrive(0, base, base, [_slice_update(m, base, 0.5, 1.0)], staleness=0) is None  # buffered
    new = arr.arrive(0, base, base, [_slice_update(m, base, 1.0, 3.0)], staleness=0)
    assert new is not None and arr.buffer == []
    inside = _inside(m, base, 0.5)
    for k, v in base.items():
        if not v.is_floating_point():
            continue
        step = new[k] - v
        assert torch.allclose(step[inside[k]], torch.full_like(step[inside[k]], 2.0))  # (1 + 3) / 2
        assert torch.allclose(step[~inside[k]], torch.full_like(step[~inside[k]], 3.0))  # the full-width device alone


def test_staleness_weights_and_discards() -> None:
    p = AsyncPolicy("fedasync", alpha=0.6, staleness="polynomial", a=0.5)
    assert p.scale(0) == 1.0 and p.scale(3) == pytest.approx(0.5)
    hinge = AsyncPolicy(staleness="hinge", a=1.0, b=2)
    assert hinge.scale(2) == 1.0 and hinge.scale(4) == pytest.approx(1 / 3)
    m = _heterofl()
    base = m.init(m.model_fn())
    arr = Arrivals(AsyncPolicy("fedasync", max_staleness=1), m)
    assert arr.arrive(0, base, base, [_slice_update(m, base, 0.5, 1.0)], staleness=2) is None
    assert arr.discarded == 1


def test_fedasync_and_fedbuff_names_are_fedavg_with_their_policy() -> None:
    fa = FedAsync(FedAsyncConfig(name="fedasync", alpha=0.4, staleness_fn="hinge", a=1.0, b=1), lambda: None)
    assert fa.policy() == AsyncPolicy("fedasync", alpha=0.4, staleness="hinge", a=1.0, b=1)
    fb = FedBuff(FedBuffConfig(name="fedbuff", buffer_size=3, staleness_scaling=False), lambda: None)
    assert fb.policy().kind == "fedbuff" and fb.policy().buffer_size == 3 and fb.policy().staleness == "constant"


# ---------------------------------------------------------------- through Ray and MLflow


def _events(mlflow_uri: str, run_id: str, tmp_path) -> list[dict]:
    client = MlflowClient(mlflow_uri)
    return pq.read_table(client.download_artifacts(run_id, "events.parquet", str(tmp_path))).to_pylist()


HETERO_ASYNC = dict(method__name="heterofl", method__rates=[0.25, 0.5, 1.0], rounds__mode="async", rounds__num=20,
                    fleet__groups=[{"profile": "rpi3", "count": 2}, {"profile": "laptop_cpu", "count": 2}])


@pytest.mark.ray
def test_heterofl_async_picks_widths_at_launch_and_is_deterministic(ray_cluster, mlflow_uri, tmp_path) -> None:
    a = _run(ray_cluster, mlflow_uri, **HETERO_ASYNC)
    b = _run(ray_cluster, mlflow_uri, fleet__actors=1, **HETERO_ASYNC)
    _same(a, b)  # simulated arrival order, whatever the actors
    ev = _events(mlflow_uri, a.run_id, tmp_path)
    rates = {p: {json.loads(e["spec"])["rate"] for e in ev if e["profile"] == p} for p in ("rpi3", "laptop_cpu")}
    assert max(rates["rpi3"]) < max(rates["laptop_cpu"])  # the min-max scheduler narrows the slow devices
    assert any(json.loads(e["metrics"])["staleness"] > 0 for e in ev)
    assert a.history[-1].accuracy > 0.2


@pytest.mark.ray
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_splitfed_clients_run_async_against_the_split_server(ray_cluster, mlflow_uri, tmp_path, variant) -> None:
    res = _run(ray_cluster, mlflow_uri, fleet__actors=1, method__server_cpus=0.5, method__name="splitfed",
               method__variant=variant, method__scheduler="fixed",
               method__cut=1, rounds__mode="async", rounds__num=6, rounds__async_policy="fedbuff",
               rounds__buffer_size=2)
    ev = _events(mlflow_uri, res.run_id, tmp_path)
    assert len(res.history) == 6 and all(h.participants == 2 for h in res.history)
    assert all(json.loads(e["spec"])["cut"] == 1 for e in ev)
    assert all(e["server_s"] > 0 for e in ev if e["status"] == "ok")  # every client was served
    assert res.history[-1].accuracy > res.history[0].accuracy or res.history[-1].accuracy > 0.3


# ---------------------------------------------------------------- methods from outside flexray


def test_a_method_named_by_import_path_is_refused_in_one_line_when_wrong() -> None:
    assert method_class("tests.plugin_method:HalfStepAvg").name == "half_step_avg"
    for path, why in (("tests.nowhere:X", "cannot import"), ("tests.plugin_method:NotAMethod", "not a flexray Method")):
        with pytest.raises(FlexrayError, match=f"config error: method.name: .*{why}") as err:
            method_class(path)
        assert "\n" not in str(err.value)


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_users_own_method_runs_sync_and_async(ray_cluster, mlflow_uri, mode) -> None:
    res = _run(ray_cluster, mlflow_uri, method__name="tests.plugin_method:HalfStepAvg", rounds__mode=mode,
               rounds__num=3)
    assert len(res.history) == 3 and res.history[-1].accuracy > 0.1
