"""A method from outside flexray with its own server actor (tests/plugin_split.py) runs in sync and
async rounds through Ray and MLflow: the round-service protocol is all the runtime needs."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from flexray.models import build_model, state_bytes
from flexray.config import ModelConfig
from tests.test_driver import _run

pytestmark = pytest.mark.usefixtures("warm_ray_actors")  # in-process jobs reuse device actors (conftest)

PLUGIN = "tests.plugin_split:SplitHead"


@pytest.mark.ray
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_plugin_with_its_own_server_actor_runs_sync_and_async(ray_cluster, mlflow_uri, tmp_path, mode) -> None:
    fedavg = _run(ray_cluster, mlflow_uri, rounds__mode=mode, rounds__num=4)
    res = _run(ray_cluster, mlflow_uri, method__name=PLUGIN, rounds__mode=mode, rounds__num=4)
    assert [m.round for m in res.history] == [1, 2, 3, 4]
    # it learns: from near chance to most of what FedAvg reaches on the same data and seed
    first, last = res.history[0].accuracy, res.history[-1].accuracy
    assert last > max(first, 0.5) and last >= 0.75 * fedavg.history[-1].accuracy, (first, last, fedavg.history[-1].accuracy)

    client = MlflowClient(mlflow_uri)
    assert client.get_run(res.run_id).info.status == "FINISHED"
    events = pq.read_table(client.download_artifacts(res.run_id, "events.parquet", str(tmp_path))).to_pylist()
    ok = [e for e in events if e["status"] == "ok"]
    assert len({e["device"] for e in ok}) == 4 if mode == "sync" else len(ok) == 4  # async: 4 landings (the fast devices)
    # every task went through the head server: it uploaded its activations, far more than the whole model
    model_bytes = state_bytes(build_model(ModelConfig(name="cnn", width=8), (1, 8, 8), 10).state_dict())
    assert all(e["bytes_up"] > model_bytes for e in ok), [e["bytes_up"] for e in ok]
