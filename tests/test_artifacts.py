"""Where a run's files land, and what a healthy run prints.

With a sqlite store the artifacts live in ``mlartifacts/`` beside the database, for relative
and absolute store paths alike, and nowhere else (an earlier version turned
``sqlite:////srv/exp/mlflow.db`` into ``/exp/mlartifacts``, at the file-system root, which only
root can write). That the quickstart, run exactly as the README prints it, keeps its files beside
its relative store and prints the progress bar and two result lines, nothing else, is checked by
the README walk (tests/test_readme.py), which runs that command.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from flexray.runtime.assembly import parse_config
from flexray.runtime.session import run_job
from flexray.tracking.mlflow_logger import resolve_uri, sqlite_artifact_root

from .conftest import job_tree

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
