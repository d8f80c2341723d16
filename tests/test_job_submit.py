"""The quickstart submitted with ``ray job submit`` to a real head, read back from MLflow."""

from __future__ import annotations

import time
import uuid

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, ray_job_submit

pytestmark = pytest.mark.ray


def test_quickstart_via_ray_job_submit(ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sub_id = f"flexray-test-{uuid.uuid4().hex[:8]}"
    args = ["--address", ray_cluster.dashboard, "--submission-id", sub_id, "--working-dir", str(REPO), "--no-wait", "--",
            "flexray", "run", "jobs/quickstart.yaml", "--set", f"tracking.uri={uri}", "--set", "tracking.progress=false"]
    out = ray_job_submit(args, ray_cluster.env, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

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
