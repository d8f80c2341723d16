"""MLflow as a service: a real ``mlflow server --app-name basic-auth`` on 127.0.0.1.

The job logs there with the right credentials; with wrong or missing ones it is refused in one
line before Ray does anything (no actor is created, no run is left behind).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, job_tree, start_mlflow_server, stop_process_group

pytestmark = pytest.mark.ray



@dataclass(frozen=True)
class Server:
    uri: str
    admin: str
    password: str
    root: Path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("mlflow-server")
    ini = root / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/auth.db\n"
                   "admin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    password = secrets.token_urlsafe(16)
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    port = free_port()
    proc = start_mlflow_server(root, port, env, "--app-name", "basic-auth")
    try:
        yield Server(f"http://127.0.0.1:{port}", "admin", password, root)
    finally:
        stop_process_group(proc)


def _login(monkeypatch: pytest.MonkeyPatch, user: str | None, password: str | None) -> None:
    for var, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)


def _tree(uri: str, experiment: str = "remote") -> dict:
    return job_tree(name="remote", rounds__num=2, model__width=8, tracking__uri=uri, tracking__experiment=experiment,
                    tracking__checkpoint_every=1)


def _device_actors(dashboard: str) -> int:
    from ray.util.state import list_actors

    found = list_actors(address=dashboard, filters=[("class_name", "=", "DeviceActor")], limit=10000,
                        raise_on_missing_output=False)
    return len(found)


def test_job_logs_to_the_server_with_the_right_credentials(ray_cluster, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flexray.runtime.assembly import parse_config
    from flexray.runtime.session import run_job

    _login(monkeypatch, mlflow_server.admin, mlflow_server.password)
    result = run_job(parse_config(_tree(mlflow_server.uri)))
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["tracking.uri"] == mlflow_server.uri
    assert [m.step for m in client.get_metric_history(result.run_id, "accuracy")] == [1, 2]
    names = {f.path for f in client.list_artifacts(result.run_id)}
    assert {"events.parquet", "config.yaml", "checkpoints"} <= names
    # The server proxies artifacts into its --artifacts-destination.
    assert list((mlflow_server.root / "artifacts").rglob("events.parquet"))


@pytest.mark.parametrize("user, password, why", [
    ("admin", "not-the-password", "user 'admin' or its password is wrong"),
    (None, None, "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD are not set"),
])
def test_bad_credentials_are_refused_before_training(ray_cluster, mlflow_server, monkeypatch, tmp_path, capsys,
                                                     user, password, why):
    from flexray.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_tree(mlflow_server.uri, experiment="refused")))
    _login(monkeypatch, user, password)
    before = _device_actors(ray_cluster.dashboard)
    t0 = time.monotonic()
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert time.monotonic() - t0 < 30
    assert err.count("\n") == 0, err
    assert err.startswith(f"flexray: error: tracking: the MLflow server at {mlflow_server.uri} (tracking.uri) refused")
    assert why in err and "MLFLOW_TRACKING_PASSWORD" in err
    assert _device_actors(ray_cluster.dashboard) == before  # Ray was never asked for an actor

    from mlflow.tracking import MlflowClient

    _login(monkeypatch, mlflow_server.admin, mlflow_server.password)
    assert MlflowClient(mlflow_server.uri).get_experiment_by_name("refused") is None  # nothing left behind


def test_tracker_maps_refusals_to_one_line(mlflow_server, monkeypatch):
    """The Python API path (no CLI pre-flight): Tracker's own set-up names the fix too."""
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    from flexray.runtime.assembly import parse_config
    from flexray.errors import FlexrayError
    from flexray.tracking.mlflow_logger import Tracker

    cfg = parse_config(_tree(mlflow_server.uri, experiment="private"))
    _login(monkeypatch, "admin", "still-not-the-password")
    with pytest.raises(FlexrayError, match=r"refused the credentials \(user 'admin' or its password is wrong\); set MLFLOW_TRACKING_USERNAME"):
        Tracker(cfg)

    # A real user without write access to someone else's experiment: 403, not 401.
    _login(monkeypatch, mlflow_server.admin, mlflow_server.password)
    MlflowClient(mlflow_server.uri).create_experiment("private")
    AuthServiceClient(mlflow_server.uri).create_user("reader", "reader-password-123")
    _login(monkeypatch, "reader", "reader-password-123")
    with pytest.raises(FlexrayError, match=r"user 'reader' may not use experiment 'private' at http://127\.0\.0\.1:\d+ \(tracking.uri\)"):
        Tracker(cfg)
