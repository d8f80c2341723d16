"""The quickstart submitted with ``ray job submit`` to a real head, read back from MLflow."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import RAY, REPO

pytestmark = pytest.mark.ray


def test_quickstart_via_ray_job_submit(ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sub_id = f"flexray-test-{uuid.uuid4().hex[:8]}"
    cmd = [RAY, "job", "submit", "--address", ray_cluster.dashboard, "--submission-id", sub_id,
           "--working-dir", str(REPO), "--no-wait", "--",
           "flexray", "run", "jobs/quickstart.yaml", "--set", f"tracking.uri={uri}", "--set", "tracking.progress=false"]
    subprocess.run(cmd, check=True, env=ray_cluster.env, capture_output=True, timeout=120)

    jobs = JobSubmissionClient(ray_cluster.dashboard)
    deadline = time.monotonic() + 400
    status = jobs.get_job_status(sub_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
        status = jobs.get_job_status(sub_id)
    if not status.is_terminal():
        jobs.stop_job(sub_id)
    assert status == JobStatus.SUCCEEDED, jobs.get_job_logs(sub_id)[-3000:]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    acc = client.get_metric_history(run.info.run_id, "accuracy")
    assert [m.step for m in acc] == list(range(1, 16))
    assert acc[-1].value >= 0.9  # the quickstart's promise
    assert run.data.metrics["participants"] == 8
    assert run.info.run_id in jobs.get_job_logs(sub_id)
