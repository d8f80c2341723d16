"""The ready jobs work for a user who cloned the repository: they name no development folder,
and each one plans (data, fleet, method, model) with its data found the user's way, in the data
root ($FLEXRAY_DATA_ROOT pointed at the offline .npz files; digits needs none). No Ray."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from flexray.cli import main

from .conftest import REPO, SHARED_DATA

JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def test_there_are_ready_jobs() -> None:
    assert len(JOBS) >= 10 and (REPO / "jobs" / "quickstart.yaml") in JOBS


@pytest.mark.parametrize("job", JOBS, ids=[j.stem for j in JOBS])
def test_job_names_no_development_folder(job: Path) -> None:
    text = job.read_text()
    assert "shared/" not in text and "../" not in text, f"{job.name} points outside the repository"


@pytest.fixture(scope="module")
def npz_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decompressed-array cache for all jobs (CIFAR-10's LZMA archive takes ~8 s to read)."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("job", JOBS, ids=[j.stem for j in JOBS])
def test_job_plans_with_data_from_the_data_root(
    job: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, npz_cache: Path, one_torch_thread: None,
) -> None:
    if "digits" not in job.read_text() and not SHARED_DATA.is_dir():
        pytest.skip(f"offline data not present at {SHARED_DATA}")
    monkeypatch.setenv("FLEXRAY_DATA_ROOT", str(SHARED_DATA))
    monkeypatch.setenv("FLEXRAY_CACHE", str(npz_cache))
    monkeypatch.chdir(tmp_path)  # a job resolves nothing relative to the checkout
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["plan", str(job)])
    assert rc == 0, err.getvalue()
    assert "devices" in out.getvalue() or "tile" in out.getvalue(), out.getvalue()
