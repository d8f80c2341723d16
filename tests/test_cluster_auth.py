"""RAY_AUTH_MODE=token on the session head: with the token a job is submitted and runs; without
it (no token file, no RAY_AUTH_TOKEN) or with a wrong one, the job API refuses and nothing runs.

Ray >= 2.52 reads the token from RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token
(ray/_private/authentication); the clients below get an empty HOME so none of them is found.
"""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import ray_job_submit

pytestmark = pytest.mark.ray


def _client_env(base: dict[str, str], home: Path, token: str | None, mode: str = "token") -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE=mode, HOME=str(home))
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return env


def _submit(dashboard: str, env: dict[str, str], marker: str) -> subprocess.CompletedProcess[str]:
    return ray_job_submit(["--address", dashboard, "--submission-id", marker, "--", "python", "-c", f"print('{marker}')"], env)


def _token() -> str:
    return (Path.home() / ".ray" / "auth_token").read_text().strip()  # the session head wrote it


def test_the_cluster_runs_with_token_auth(ray_cluster):
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert ray_cluster.env["RAY_AUTH_MODE"] == "token" and is_token_auth_enabled()
    with pytest.raises(urllib.error.HTTPError) as err:  # the job API itself, no client library
        urllib.request.urlopen(f"{ray_cluster.dashboard}/api/jobs/", timeout=10)
    assert err.value.code == 401
    req = urllib.request.Request(f"{ray_cluster.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {_token()}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def test_submission_with_the_token_succeeds(ray_cluster, tmp_path):
    marker = f"token-ok-{uuid.uuid4().hex[:8]}"
    out = _submit(ray_cluster.dashboard, _client_env(ray_cluster.env, tmp_path, _token()), marker)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "succeeded" in out.stdout + out.stderr and marker in out.stdout + out.stderr


@pytest.mark.parametrize("token, mode, why", [
    (None, "token", "couldn't find an authentication token"),  # the client knows it has none
    (None, "disabled", "Missing authentication token"),  # a client that sends none: the server says 401
    ("not-the-token", "token", "Invalid authentication token"),  # the server says 403
])
def test_submission_without_the_token_is_refused(ray_cluster, tmp_path, token, mode, why):
    from ray.job_submission import JobSubmissionClient

    marker = f"token-refused-{uuid.uuid4().hex[:8]}"
    out = _submit(ray_cluster.dashboard, _client_env(ray_cluster.env, tmp_path, token, mode), marker)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and why in text, text[-2000:]
    assert marker not in {j.submission_id for j in JobSubmissionClient(ray_cluster.dashboard).list_jobs()}
