"""Tracking hangs off the training loop as callbacks, as in Ray Train's ``RunConfig(callbacks=...)``.

The loop (``flexray.runtime.session``) knows nothing of MLflow, plots or checkpoint files: it
hands each callback a :class:`FitStart`, the files the method prepared, a :class:`RoundEnd`
after every round, and a :class:`FitEnd` once the rounds are done -- or a :class:`FitFailure`
when the run fails. A user's own callback (e.g. early stopping on a metric, a custom log)
subclasses :class:`Callback` and is passed to ``Session.fit(callbacks=[...])``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexray.config import JobConfig
from flexray.tracking import plots
from flexray.tracking.events import write_events
from flexray.tracking.metrics import RoundMetrics
from flexray.tracking.mlflow_logger import Checkpoint, Tracker


@dataclass(frozen=True)
class FitStart:
    """The run begins (``resumed``: from a checkpoint; its config and params are logged already)."""

    config: JobConfig
    derived: Mapping[str, str]  # choices the config implies (``Method.derived_params``)
    resumed: bool


@dataclass(frozen=True)
class RoundEnd:
    """One finished round: its metrics (the row logged at step ``round``) and its device events.
    ``snapshot()`` builds the full checkpoint record only when a callback asks for it."""

    round: int  # 1-based: the number of rounds done
    last: bool
    metrics: RoundMetrics
    events: Sequence[dict[str, Any]]
    snapshot: Callable[[], Checkpoint]


@dataclass(frozen=True)
class FitEnd:
    """The finished job: every round's metrics and device events, and the model to deploy."""

    history: list[RoundMetrics]
    events: list[dict[str, Any]]
    model: Any  # torch.nn.Module, already loaded with the final state
    example: Any  # a numpy batch of two inputs (the logged model's signature)


@dataclass(frozen=True)
class FitFailure:
    """The run failed with ``error``; ``last`` is the last round that finished (None: none did).
    ``resumable``: the failure left the run resumable from that round (e.g. every node left)."""

    error: BaseException
    last: RoundEnd | None
    resumable: bool = False


class Callback:
    """Hooks of the training loop; each is a no-op unless overridden. ``on_fit_end`` runs while
    Ray shuts down (it needs no cluster), so it may write files at leisure."""

    def on_fit_start(self, start: FitStart) -> None:
        return None

    def on_artifact(self, path: Path, folder: str | None) -> None:
        """A file the method prepared before round 1 (a design-space front, a proxy set)."""
        return None

    def on_round_end(self, end: RoundEnd) -> None:
        return None

    def on_fit_end(self, end: FitEnd) -> None:
        return None

    def on_exception(self, failure: FitFailure) -> None:
        return None


class RunLog(Callback):
    """The MLflow run's params, prepared files and end status."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_fit_start(self, start: FitStart) -> None:
        if not start.resumed:
            self.tracker.log_config(start.config, start.derived)

    def on_artifact(self, path: Path, folder: str | None) -> None:
        self.tracker.log_file(path, folder)


class RunCloser(Callback):
    """Closes the MLflow run -- FINISHED once every callback's ``on_fit_end`` is done, FAILED after
    every callback heard of a failure -- so it comes last."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_fit_end(self, end: FitEnd) -> None:
        self.tracker.set_terminated("FINISHED")

    def on_exception(self, failure: FitFailure) -> None:
        self.tracker.set_terminated("FAILED")


class MetricsLogger(Callback):
    """Each round's metrics to the MLflow run, at step = rounds done."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_round_end(self, end: RoundEnd) -> None:
        self.tracker.log_metrics(end.round, end.metrics.as_dict())


class Checkpointer(Callback):
    """A checkpoint every ``every`` rounds and after the last one (so a finished run can be
    extended with ``--resume``); ``every = 0`` turns checkpoints off."""

    def __init__(self, tracker: Tracker, every: int) -> None:
        self.tracker, self.every = tracker, every

    def on_round_end(self, end: RoundEnd) -> None:
        if self.every and (end.round % self.every == 0 or end.last):
            self.tracker.save_checkpoint(end.snapshot())

    def on_exception(self, failure: FitFailure) -> None:
        if failure.resumable and failure.last is not None:  # keep what is done, whatever ``every`` says
            self.tracker.save_checkpoint(failure.last.snapshot())


class RunFiles(Callback):
    """The run's files: the device events as Parquet, the plots and the deployable model."""

    def __init__(self, tracker: Tracker, cfg: JobConfig) -> None:
        self.tracker, self.cfg = tracker, cfg

    def on_fit_end(self, end: FitEnd) -> None:
        out, tracking = self.tracker.workdir, self.cfg.tracking
        self.tracker.log_file(write_events(end.events, out / "events.parquet"))
        if tracking.plots:
            for path in (
                plots.accuracy_vs_time([m.as_dict() for m in end.history], out / "accuracy_vs_time.png"),
                plots.gantt(end.events, tracking.gantt_rounds, out / "gantt.png"),
                plots.energy_per_device(end.events, out / "energy_per_device.png"),
            ):
                self.tracker.log_file(path, "plots")
        if tracking.log_model:
            self.tracker.log_model(end.model.eval(), end.example)


def tracking_callbacks(tracker: Tracker, cfg: JobConfig, user: Sequence[Callback] = ()) -> list[Callback]:
    """What every run logs -- params, metrics, checkpoints, the run's files -- around the user's
    callbacks; the run is closed FINISHED after all of them."""
    return [RunLog(tracker), MetricsLogger(tracker), Checkpointer(tracker, cfg.tracking.checkpoint_every),
            RunFiles(tracker, cfg), *user, RunCloser(tracker)]
