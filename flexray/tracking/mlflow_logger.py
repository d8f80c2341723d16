"""One MLflow run per job: params, per-round metrics, artifacts, checkpoints, the final model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from mlflow.exceptions import MlflowException

from flexray.config import JobConfig, flatten
from flexray.errors import FlexrayError

log = logging.getLogger("flexray")

CHECKPOINT = "checkpoints/checkpoint.pt"
CHECKPOINT_FORMAT = "flexray-checkpoint-v1"


def default_uri() -> str:
    """./mlflow.db, except under ``ray job submit``: the job's working dir is a temporary copy
    that Ray deletes, so a relative store would be lost; use ~/.flexray/mlflow.db there."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        home = Path.home() / ".flexray"
        home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{home / 'mlflow.db'}"
    return "sqlite:///mlflow.db"


def resolve_uri(cfg_uri: str | None) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then the default store, made absolute so the UI finds it."""
    uri = cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


AUTH_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def access_error(uri: str, experiment: str, status: int | None) -> FlexrayError | None:
    """One line for a refused request: which URI, which setting, which env vars to fix."""
    if status not in (401, 403):
        return None
    from mlflow.utils.credentials import read_mlflow_creds  # env vars, else ~/.mlflow/credentials

    creds = read_mlflow_creds()
    if status == 401:
        why = (f"user {creds.username!r} or its password is wrong" if creds.username and creds.password
               else f"{AUTH_ENV[0]} and {AUTH_ENV[1]} are not set")
        return FlexrayError(f"tracking: the MLflow server at {uri} (tracking.uri) refused the credentials ({why}); "
                            f"set {AUTH_ENV[0]} and {AUTH_ENV[1]} (or ~/.mlflow/credentials) for a user of that server")
    return FlexrayError(f"tracking: user {creds.username or '?'!r} may not use experiment {experiment!r} at {uri} "
                        "(tracking.uri); ask the server's admin for permission or set tracking.experiment")


def check_access(uri: str, experiment: str) -> None:
    """Ask a tracking server for the experiment once, without retries, before any training:
    wrong credentials or an unreachable server fail here in one line, not after Ray started."""
    if not _is_server(uri):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        resp = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/get-by-name", "GET",
                            max_retries=0, timeout=15, params={"experiment_name": experiment})
    except Exception as err:  # noqa: BLE001 - requests/MLflow wrap connection errors differently
        raise FlexrayError(f"tracking: cannot reach the MLflow server at {uri} (tracking.uri): "
                           f"{str(err).splitlines()[0][:160]}; is `mlflow server` running there?") from None
    err = access_error(uri, experiment, resp.status_code)
    if err is not None:
        raise err
    if resp.status_code not in (200, 404):  # 404: the experiment does not exist yet, the Tracker creates it
        raise FlexrayError(f"tracking: the MLflow server at {uri} (tracking.uri) answered HTTP {resp.status_code}: "
                           f"{resp.text.strip().splitlines()[0][:160] if resp.text.strip() else ''}")


def sqlite_artifact_root(uri: str) -> str | None:
    """``mlartifacts/`` beside the sqlite file: artifacts stay with their store.

    The path is cut from the URI, not parsed as a URL: ``urlparse`` reads ``sqlite:////srv/x.db``
    as the path ``//srv/x.db``, whose ``file:`` URI MLflow resolves to ``/x...`` at the root.
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :].split("?", 1)[0]).expanduser().resolve()
    return (db.parent / "mlartifacts").as_uri()


class Tracker:
    """Thin wrapper over ``MlflowClient`` so the driver never deals with MLflow details."""

    def __init__(self, cfg: JobConfig, resume_run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.uri = resolve_uri(cfg.tracking.uri)
        self.client = MlflowClient(self.uri)
        try:
            if resume_run_id:
                run = self.client.get_run(resume_run_id)
                self.experiment_id = run.info.experiment_id
                self.run_id = resume_run_id
            else:
                self.experiment_id = self._experiment()
                run = self.client.create_run(
                    self.experiment_id, run_name=cfg.tracking.run_name or cfg.name, tags={"flexray.job": cfg.name}
                )
                self.run_id = run.info.run_id
            self.artifact_uri: str = run.info.artifact_uri
        except FlexrayError:
            raise
        except Exception as err:  # noqa: BLE001 - MLflow raises many kinds; the user needs one line
            status = getattr(err, "get_http_status_code", lambda: None)()
            refused = access_error(self.uri, cfg.tracking.experiment, status)
            if refused is not None:
                raise refused from None
            what = f"run {resume_run_id!r} not found" if resume_run_id else "cannot start a run"
            raise FlexrayError(f"tracking: {what} at {self.uri}: {str(err).splitlines()[0]}") from None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"flexray-{self.run_id[:8]}-"))
        self.checkpointed = bool(resume_run_id)  # a resumed run had one (``load_checkpoint`` insists)
        # While the store is unreachable, rows and files wait here (and in memory) until it is back.
        self.spill = Path.home() / ".flexray" / "unsent" / self.run_id
        self.pending: list[Any] = []  # mlflow Metric rows not yet accepted by the store
        self.unsent: list[tuple[Path, str | None]] = []
        self.offline = False
        if _is_server(self.uri):  # fail over in seconds, not MLflow's default minutes of retries
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    def _experiment(self) -> str:
        name = self.cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=sqlite_artifact_root(self.uri))
        except MlflowException as err:
            # Another driver created it meanwhile, or a slow server did and our retry of the same
            # request was refused (seen under load with the 10 s request timeout): use it.
            if err.error_code != "RESOURCE_ALREADY_EXISTS" or (exp := self.client.get_experiment_by_name(name)) is None:
                raise
            return exp.experiment_id

    # ---- logging
    def log_config(self, cfg: JobConfig, derived: Mapping[str, str] | None = None) -> None:
        """The flattened config as params, plus ``derived`` ones the method reports."""
        from mlflow.entities import Param

        values = {**flatten(cfg.model_dump(mode="json")), **(derived or {})}
        params = [Param(k, str(v)[:6000]) for k, v in values.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Never raises: if the store is down, training goes on and the rows wait for it."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        self.flush()

    def flush(self) -> bool:
        """Send everything that is waiting; True when nothing is left behind."""
        try:
            for i in range(0, len(self.pending), 900):  # MLflow accepts <= 1000 metrics a batch
                self.client.log_batch(self.run_id, metrics=self.pending[i : i + 900])
            while self.unsent:
                path, folder = self.unsent[0]
                self.client.log_artifact(self.run_id, str(path), folder)
                self.unsent.pop(0)
        except Exception as err:  # noqa: BLE001 - connection, HTTP and DB errors all mean "later"
            self._went_offline(err)
            return False
        if self.offline:
            log.warning("MLflow at %s is reachable again; the waiting metrics and files were sent", self.uri)
            shutil.rmtree(self.spill, ignore_errors=True)
        self.pending, self.offline = [], False
        return True

    def _went_offline(self, err: Exception) -> None:
        if not self.offline:
            log.warning("MLflow at %s is unreachable (%s); training goes on, metrics wait in %s",
                        self.uri, str(err).splitlines()[0][:120], self.spill)
        self.offline = True
        self.spill.mkdir(parents=True, exist_ok=True)
        rows = [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in self.pending]
        (self.spill / "metrics.json").write_text(json.dumps(rows))

    def log_text(self, text: str, name: str) -> None:
        path = self.workdir / name
        path.write_text(text)
        self.log_file(path)

    def log_file(self, path: Path, folder: str | None = None) -> None:
        """Artifacts queue up like metrics when the store is down (a local copy is kept)."""
        if self.offline or self.unsent:
            self._keep(path, folder)
            self.flush()
            return
        try:
            self.client.log_artifact(self.run_id, str(path), folder)
        except Exception as err:  # noqa: BLE001
            self._keep(path, folder)
            self._went_offline(err)

    def _keep(self, path: Path, folder: str | None) -> None:
        dest = self.spill / (folder or "") / path.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
        self.unsent = [(p, f) for p, f in self.unsent if (p.name, f) != (path.name, folder)] + [(dest, folder)]

    def log_model(self, model: Any, example: Any) -> None:
        import mlflow
        import mlflow.pytorch

        mlflow.set_tracking_uri(self.uri)
        try:
            with mlflow.start_run(run_id=self.run_id):
                # Explicit requirements: inferring them imports the model in a subprocess (slow).
                mlflow.pytorch.log_model(model, name="model", input_example=example, pip_requirements=["torch"])
        except Exception as err:  # noqa: BLE001 - the trained weights must survive a store outage
            import torch

            self._went_offline(err)
            path = self.workdir / "model_state_dict.pt"
            torch.save(model.state_dict(), path)
            self._keep(path, "model")  # uploaded as a plain artifact once the store is back

    def set_terminated(self, status: str = "FINISHED") -> None:
        deadline = time.monotonic() + self.cfg.tracking.offline_grace_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(2.0)  # a short outage at the very end should not leave the run RUNNING
        if not self.offline:
            try:
                self.client.set_terminated(self.run_id, status)
                return
            except Exception as err:  # noqa: BLE001
                self._went_offline(err)
        log.warning("MLflow at %s is still unreachable: this run's remaining metrics and files are in %s "
                    "(the run shows as RUNNING there)", self.uri, self.spill)

    # ---- checkpoints
    def save_checkpoint(self, ckpt: Checkpoint) -> None:
        import torch

        path = self.workdir / "checkpoint.pt"
        torch.save({"format": CHECKPOINT_FORMAT, **ckpt.to_dict()}, path)
        self.log_file(path, "checkpoints")
        self.checkpointed = True

    @property
    def checkpoint_uri(self) -> str | None:
        """Where the run's checkpoint is (``--resume RUN_ID`` reads it), or None if it has none."""
        return f"{self.artifact_uri}/{CHECKPOINT}" if self.checkpointed else None

    def load_checkpoint(self) -> Checkpoint:
        local = self.client.download_artifacts(self.run_id, CHECKPOINT, str(self.workdir)) if self._has_checkpoint() else None
        if local is None:
            raise FlexrayError(f"--resume {self.run_id}: the run has no checkpoint (tracking.checkpoint_every was 0 or it stopped before one)")
        return Checkpoint.from_dict(read_checkpoint(Path(local)), CHECKPOINT)

    def _has_checkpoint(self) -> bool:
        return any(f.path == CHECKPOINT for f in self.client.list_artifacts(self.run_id, "checkpoints"))


@dataclass
class Checkpoint:
    """What a run needs to resume exactly where it stopped (saved as a plain dict of tensors and
    lists, so it loads with ``weights_only=True``)."""

    round: int  # rounds (sync) or model versions (async) completed
    clock_s: float  # simulated time
    energy_j: float
    wall_s: float
    state: dict[str, Any]  # the global model's tensors
    method: dict[str, Any]  # Method.state_dict()
    engine: dict[str, Any]  # the round loop's in-flight work (async flights, policy buffer)
    events: list[dict[str, Any]]  # the event log so far
    history: list[dict[str, float]]  # per-round metrics so far
    config: dict[str, Any]  # the job config, to refuse resuming a different experiment

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> Checkpoint:
        missing = [f.name for f in fields(cls) if f.name not in raw]
        if missing:
            raise FlexrayError(f"checkpoint {where}: lacks {', '.join(missing)}; it was written by another flexray version")
        return cls(**{f.name: raw[f.name] for f in fields(cls)})


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint can never run code."""
    import pickle

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise FlexrayError(f"checkpoint {path}: unreadable or not a flexray checkpoint ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise FlexrayError(f"checkpoint {path}: not a flexray checkpoint (expected format {CHECKPOINT_FORMAT})")
    return ckpt

