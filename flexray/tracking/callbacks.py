"""Tracking hangs off the training loop as callbacks, as in Ray Train's ``RunConfig(callbacks=...)``.

The loop (``flexray.runtime.driver``) knows nothing of MLflow, plots or checkpoint files: after
every round it hands each callback a :class:`RoundEnd`, and once the rounds are done a
:class:`FitEnd`. A user's own callback (e.g. early stopping on a metric, a custom log) subclasses
:class:`Callback` and is passed to ``run_job(..., callbacks=[...])``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flexray.config import JobConfig
from flexray.tracking import plots
from flexray.tracking.events import write_events
from flexray.tracking.mlflow_logger import Checkpoint, Tracker


@dataclass(frozen=True)
class RoundEnd:
    """One finished round: its metrics (the row logged at step ``round``) and its device events.
    ``snapshot()`` builds the full checkpoint record only when a callback asks for it."""

    round: int  # 1-based: the number of rounds done
    last: bool
    metrics: dict[str, float]
    events: Sequence[dict[str, Any]]
    snapshot: Callable[[], Checkpoint]


@dataclass(frozen=True)
class FitEnd:
    """The finished job: every round's metrics and device events, and the model to deploy."""

    history: list[dict[str, float]]
    events: list[dict[str, Any]]
    model: Any  # torch.nn.Module, already loaded with the final state
    example: Any  # a numpy batch of two inputs (the logged model's signature)


class Callback:
    """Hooks of the training loop; each is a no-op unless overridden. ``on_fit_end`` runs while
    Ray shuts down (it needs no cluster), so it may write files at leisure."""

    def on_round_end(self, end: RoundEnd) -> None:
        return None

    def on_fit_end(self, end: FitEnd) -> None:
        return None


class MetricsLogger(Callback):
    """Each round's metrics to the MLflow run, at step = rounds done."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def on_round_end(self, end: RoundEnd) -> None:
        self.tracker.log_metrics(end.round, end.metrics)


class Checkpointer(Callback):
    """A checkpoint every ``every`` rounds and after the last one (so a finished run can be
    extended with ``--resume``); ``every = 0`` turns checkpoints off."""

    def __init__(self, tracker: Tracker, every: int) -> None:
        self.tracker, self.every = tracker, every

    def on_round_end(self, end: RoundEnd) -> None:
        if self.every and (end.round % self.every == 0 or end.last):
            self.tracker.save_checkpoint(end.snapshot())


class RunFiles(Callback):
    """The run's files: the device events as Parquet, the plots and the deployable model."""

    def __init__(self, tracker: Tracker, cfg: JobConfig) -> None:
        self.tracker, self.cfg = tracker, cfg

    def on_fit_end(self, end: FitEnd) -> None:
        out, tracking = self.tracker.workdir, self.cfg.tracking
        self.tracker.log_file(write_events(end.events, out / "events.parquet"))
        if tracking.plots:
            for path in (
                plots.accuracy_vs_time(end.history, out / "accuracy_vs_time.png"),
                plots.gantt(end.events, tracking.gantt_rounds, out / "gantt.png"),
                plots.energy_per_device(end.events, out / "energy_per_device.png"),
            ):
                self.tracker.log_file(path, "plots")
        if tracking.log_model:
            self.tracker.log_model(end.model.eval(), end.example)


def tracking_callbacks(tracker: Tracker, cfg: JobConfig) -> list[Callback]:
    """What every run logs: metrics, checkpoints and the run's files."""
    return [MetricsLogger(tracker), Checkpointer(tracker, cfg.tracking.checkpoint_every), RunFiles(tracker, cfg)]
