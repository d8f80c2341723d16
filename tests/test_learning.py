"""Every method learns the quickstart under its defaults, in sync and async rounds.

The quickstart as a user runs it with one ``--set method.name=M`` (``jobs/quickstart.yaml``: digits,
8 devices of 4 classes, 15 sync rounds); async runs the same number of client updates (120 model
versions). The global model's final test accuracy must reach 0.85x FedAvg's in the same mode, on
the same data and seed. No method gets its own learning rate, rounds or model: FlexTrain and
FedClass train the residual resnet8 because depth prefixes need residual blocks, and are still
held to FedAvg's accuracy on the quickstart's cnn. A cell that trains but does not learn is what
this file exists to catch (HeteroFL and FedRolex sat at chance for months while every matrix cell
"ran"). Through Ray and MLflow, as users run it, with the device actors kept warm between cells.
``benchmarks/learning.py`` prints the same table with mean device accuracy, time and energy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flexray.methods import _PATHS
from flexray.methods.fedbuff import FedBuffConfig
from flexray.runtime.actor import warm_actors
from flexray.runtime.assembly import load_config
from flexray.runtime.session import run_job
from flexray.tracking.metrics import RoundMetrics

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "jobs" / "quickstart.yaml"
RATIO = 0.85
ASYNC_UPDATES = 120  # 15 sync rounds x 8 devices
FEDBUFF_BUFFER = FedBuffConfig.model_fields["buffer_size"].default  # FedBuff: one model version per buffer
DEPTH = {"flextrain", "fedclass"}  # depth prefixes need a residual model
ASYNC_ONLY = {"fedasync", "fedbuff"}  # FedAvg under an async policy; in sync rounds they are FedAvg
SYNC_ONLY = {"tiled"}  # its own engine: synchronous steps, no async mode
CELLS = [(m, mode) for mode in ("sync", "async") for m in _PATHS if m != "fedavg"
         and not (mode == "sync" and m in ASYNC_ONLY) and not (mode == "async" and m in SYNC_ONLY)]
FINAL: dict[tuple[str, str], dict[str, float]] = {}


def overrides(method: str, mode: str, uri: str) -> list[str]:
    """The user's one ``--set method.name=M`` (and the model for depth methods); the rest keeps the
    test quiet and light (no progress bar, plots, model files or checkpoints; one final evaluation)."""
    sets = [f"method.name={method}", f"tracking.uri={uri}", "tracking.progress=false", "tracking.plots=false",
            "tracking.log_model=false", "tracking.checkpoint_every=0", "tracking.experiment=learning"]
    if method in DEPTH:
        sets.append("model.name=resnet8")
    if mode == "async":
        versions = ASYNC_UPDATES // FEDBUFF_BUFFER if method == "fedbuff" else ASYNC_UPDATES  # one per buffer
        sets += ["rounds.mode=async", f"rounds.num={versions}", f"rounds.eval_every={versions}"]
    else:
        sets.append("rounds.eval_every=15")
    return sets


def final(method: str, mode: str, uri: str) -> RoundMetrics:
    if (method, mode) not in FINAL:
        FINAL[method, mode] = run_job(load_config(QUICKSTART, overrides(method, mode, uri))).metrics
    return FINAL[method, mode]


@pytest.fixture(scope="module", autouse=True)
def _warm(ray_cluster) -> Iterator[None]:  # noqa: ANN001
    """The quickstart's two device actors serve every cell (a new actor re-imports torch)."""
    with warm_actors():
        yield


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_fedavg_learns(mode: str, mlflow_uri: str) -> None:
    """The yardstick itself learns (96.7% sync, 93.9% async on this seed when this was written)."""
    assert final("fedavg", mode, mlflow_uri).accuracy >= 0.9


@pytest.mark.parametrize(("method", "mode"), CELLS, ids=[f"{m}-{mode}" for m, mode in CELLS])
def test_method_learns_like_fedavg(method: str, mode: str, mlflow_uri: str) -> None:
    base = final("fedavg", mode, mlflow_uri).accuracy
    got = final(method, mode, mlflow_uri)
    assert got.accuracy >= RATIO * base, (
        f"{method} ({mode}) reached {got.accuracy:.3f}, below {RATIO} x FedAvg's {base:.3f}")


def test_runs_are_seeded(mlflow_uri: str) -> None:
    """The same job twice gives the same model: a width method (sub-model plan, rolled RNGs) in sync."""
    first = final("heterofl", "sync", mlflow_uri)
    again = run_job(load_config(QUICKSTART, overrides("heterofl", "sync", mlflow_uri))).metrics
    assert again.accuracy == first.accuracy and again.loss == first.loss
