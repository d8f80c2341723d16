"""Where a run's files land, and what a healthy run prints.

With a sqlite store the artifacts live in ``mlartifacts/`` beside the database, for relative
and absolute store paths alike, and nowhere else (an earlier version turned
``sqlite:////srv/exp/mlflow.db`` into ``/exp/mlartifacts``, at the file-system root, which only
root can write). The quickstart, run exactly as the README prints it, shows the progress bar and
the two result lines, nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job
from flexray.tracking.mlflow_logger import resolve_uri, sqlite_artifact_root

from .conftest import REPO, job_tree

FLEXRAY = shutil.which("flexray", path=str(Path(sys.executable).parent)) or "flexray"
PLOTS = {"accuracy_vs_time.png", "gantt.png", "energy_per_device.png"}


def test_artifact_root_is_beside_the_database(tmp_path: Path, monkeypatch) -> None:
    assert sqlite_artifact_root("sqlite:////srv/exp/mlflow.db") == "file:///srv/exp/mlartifacts"
    assert sqlite_artifact_root("sqlite:////srv/exp/mlflow.db?timeout=20") == "file:///srv/exp/mlartifacts"
    monkeypatch.chdir(tmp_path)
    uri = resolve_uri("sqlite:///runs/mlflow.db")
    assert uri == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert sqlite_artifact_root(uri) == (tmp_path / "runs" / "mlartifacts").as_uri()
    assert sqlite_artifact_root("http://127.0.0.1:5000") is None  # a server chooses its own


def files_under(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*") if p.is_file()}


def clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "FLEXRAY_"))}
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}


def test_quickstart_is_quiet_and_keeps_its_files_beside_the_store(tmp_path: Path) -> None:
    """``flexray run jobs/quickstart.yaml`` from a project folder, default (relative) store."""
    project, home = tmp_path / "project", tmp_path / "home"
    shutil.copytree(REPO / "jobs", project / "jobs")
    home.mkdir()
    proc = subprocess.run([FLEXRAY, "run", "jobs/quickstart.yaml"], cwd=project, env=clean_env(home),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert len(out) == 2, proc.stdout
    assert re.fullmatch(r"run (\w+) finished: rounds=15 accuracy=0\.\d+ sim_time_s=\S+ energy_j=\S+", out[0]), out[0]
    assert out[1] == f"tracked in sqlite:///{project}/mlflow.db (view: mlflow ui --backend-store-uri sqlite:///{project}/mlflow.db)"
    # stderr holds only the progress bar's redraws: no ERROR/WARNING/INFO line from Ray or MLflow.
    for part in re.split(r"[\r\n]+", proc.stderr):
        assert not part.strip() or part.startswith("quickstart: "), repr(part)

    run_id = re.match(r"run (\w+)", out[0]).group(1)
    run = MlflowClient(f"sqlite:///{project}/mlflow.db").get_run(run_id)
    assert run.info.artifact_uri.startswith((project / "mlartifacts").as_uri() + "/")
    names = files_under(project / "mlartifacts")
    assert {"events.parquet", "config.yaml", "checkpoint.pt", "MLmodel"} | PLOTS <= names, names
    assert sorted(p.name for p in project.iterdir()) == ["jobs", "mlartifacts", "mlflow.db"]
    assert not (home / ".flexray" / "mlartifacts").exists()


def test_absolute_store_path_keeps_files_beside_it(ray_cluster, tmp_path: Path, monkeypatch) -> None:
    store, elsewhere = tmp_path / "srv" / "exp", tmp_path / "cwd"
    store.mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store}/mlflow.db"
    assert uri.startswith("sqlite:////")
    cfg = parse_config(job_tree(tracking__uri=uri, tracking__experiment="artifacts-abs", tracking__plots=True,
                                tracking__log_model=True, rounds__num=2))
    result = run_job(cfg)
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri() + "/")
    assert {"events.parquet", "MLmodel"} | PLOTS <= files_under(store / "mlartifacts")
    assert list(elsewhere.iterdir()) == []
