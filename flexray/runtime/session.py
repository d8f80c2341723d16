"""One job, assembled once: ``Session(cfg)`` serves ``plan()`` (what ``flexray plan`` prints)
and ``fit()`` (the run), as Ray Train's trainer serves ``fit() -> Result``.

The session builds everything that can refuse a config before Ray starts: the data and fleet
(``Job.assemble``), the driver's one ``Method``, the engine the method names, the method's round
service, and the actors they all ask Ray for -- checked against this machine's GPUs when no
cluster is given. ``plan`` and ``fit`` then use the same objects, so a plan matches its run.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from flexray import phases
from flexray.config import JobConfig
from flexray.fleet.fleet import ActorSpec
from flexray.fleet.latency import Prediction, predict, round_time
from flexray.fleet.placement import Placement, actor_options, check_local_gpus, check_placement, connected_placement
from flexray.methods.service import ServiceActor, ServiceEnv
from flexray.models.profile import ModelProfile
from flexray.protocol import DeviceView, PlanNotes, Task
from flexray.runtime.actor import drop_warm, release_actors
from flexray.runtime.driver import Progress, drive, ray_session
from flexray.runtime.engines import engine_for
from flexray.runtime.job import Job, local_gpus
from flexray.schedule.minmax import SubModelScheduler
from flexray.tracking.callbacks import Callback, FitEnd, FitFailure, tracking_callbacks
from flexray.tracking.metrics import RoundMetrics
from flexray.tracking.mlflow_logger import Tracker

log = logging.getLogger("flexray")


@dataclass(frozen=True)
class Result:
    """What ``fit()`` returns: the MLflow run, every round's metrics, the last checkpoint, the error."""

    run_id: str
    tracking_uri: str
    history: tuple[RoundMetrics, ...]
    checkpoint: str | None  # artifact URI of the run's checkpoint (None: the run saved none)
    error: BaseException | None = None  # set only by ``fit(raise_on_error=False)``

    @property
    def metrics(self) -> RoundMetrics | None:
        """The last round's metrics (None: no round finished)."""
        return self.history[-1] if self.history else None


@dataclass(frozen=True)
class Plan:
    """What ``flexray plan`` prints: the actors and where they land, then either the engine's own
    plan or the first round's tasks with their predicted latency and energy per device."""

    actors: list[ActorSpec]  # the engine's actors, then the round service's
    placement: Placement | None  # where each would land on a connected cluster (``--address``)
    engine: str  # an engine's own plan (``Engine.describe``); "" for the rounds engine
    tasks: list[Task]
    predictions: list[Prediction]
    left_out: list[str]  # devices no sub-model fits (they get no task)
    round_s: float  # predicted round time, simulated
    target_s: float | None  # the sub-model scheduler's round target (None: the method plans whole)
    held_out: int  # training samples the method keeps on the server
    notes: list[str]  # the method's own lines (``PlanNotes``)
    model: ModelProfile
    devices: int  # devices in the fleet
    train_samples: int


class Session:
    """A job built once from its config; ``plan()`` and ``fit()`` share the assembly."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.job = Job.assemble(cfg)  # every refusal of the config happens here, before Ray
        assert self.job.checked is not None
        self.method = self.job.checked  # the driver's one Method
        self.engine = engine_for(cfg, self.job.devices, self.job.dataset, self.method)
        self.service = self.method.round_service()
        self.engine_actors = self.engine.specs()
        self.service_actors = [_spec(len(self.engine_actors) + i, a) for i, a in enumerate(self.service.actors(cfg))]
        self.actors = [*self.engine_actors, *self.service_actors]

    def service_env(self) -> ServiceEnv:
        """What the round service is started with: the job's facts and a placed ``spawn``."""
        job = self.job
        return ServiceEnv(self.cfg, job.dataset.input_shape, job.dataset.num_classes, job.server_profile, _spawn)

    def _check_local(self) -> None:
        """The local Ray ``fit`` would start gets this machine's GPUs (a cluster is checked on joining)."""
        if not (ray.is_initialized() or self.cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
            check_local_gpus(self.actors, local_gpus())

    # ---------------------------------------------------------------- plan
    def plan(self, address: str | None = None) -> Plan:
        """The first round as the run would plan it; with ``address``, where the actors would land."""
        cfg, job, method = self.cfg, self.job, self.method
        placement = connected_placement(address, self.actors) if address else None
        if not address:
            check_local_gpus(self.actors, local_gpus())
        held = cfg.method.held_out(len(job.dataset.y_train))
        if text := self.engine.describe():  # an engine with its own planner prints its plan
            return Plan(self.actors, placement, text, [], [], [], 0.0, None, held, [], job.model_profile,
                        len(job.devices), len(job.dataset.y_train))
        mprof = job.model_profile
        with tempfile.TemporaryDirectory() as tmp:  # the method's preparation, e.g. a design-space search (cached on disk)
            job.prepare(method, Path(tmp))
        deadline = cfg.rounds.deadline_s
        views = [DeviceView(d.id, d.profile, d.trace.speed(0.0), len(d.indices), deadline)
                 for d in job.devices if d.trace.available(0.0)]
        chosen = SubModelScheduler(cfg.schedule, method, mprof, cfg.method.batch_size, deadline).assign(views)
        tasks = method.plan(0, chosen.views, method.init(job.model()))
        preds = predict(method, tasks, {d.id: d for d in job.devices}, 0.0, mprof, cfg.method.batch_size, deadline)
        left = {v.id for v in views} - {v.id for v in chosen.views}
        notes = method.plan_notes(tasks) if isinstance(method, PlanNotes) else []
        return Plan(self.actors, placement, "", tasks, preds, [d.name for d in job.devices if d.id in left],
                    round_time(preds, deadline, cfg.rounds.stragglers == "drop"),
                    chosen.target_s if chosen.predicted_s else None, held, notes, mprof, len(job.devices),
                    len(job.dataset.y_train))

    # ---------------------------------------------------------------- fit
    def fit(self, resume: str | None = None, callbacks: Sequence[Callback] = (), raise_on_error: bool = True) -> Result:
        """Run (or resume) the job end to end. ``callbacks`` see every hook after the tracking
        ones (params, metrics, checkpoints, run files) and before the run is closed."""
        cfg, job = self.cfg, self.job
        wall0 = time.perf_counter()
        self._check_local()
        phases.mark("data_and_fleet")
        tracker: Tracker | None = None
        loop: list[Callback] = []
        progress = Progress()
        try:
            with ThreadPoolExecutor(1) as pool:
                # MLflow's store set-up is Python work; Ray's start-up is mostly waiting: overlap them.
                tracker_future = pool.submit(Tracker, cfg, resume)
                with ray_session(cfg):
                    phases.mark("ray_init")
                    check_placement(self.actors)  # every actor of the job, before any starts: fail fast, naming the fix
                    if not self.engine.reuses_actors:
                        drop_warm()  # device actors kept warm by an earlier job would hold the CPUs
                    actors, _data_ref = self.engine.start()
                    done = False
                    try:
                        tracker = tracker_future.result()
                        loop = tracking_callbacks(tracker, cfg, callbacks)
                        phases.mark("tracker_ready")
                        env = self.service_env()
                        fit_end = drive(job, self.method, self.engine, self.service, env, actors, resume, tracker,
                                        loop, progress, wall0)
                        finishing = pool.submit(_finish, loop, fit_end, progress)  # the files need no cluster
                        done = True
                    finally:
                        release_actors(actors, ok=done)
                phases.mark("ray_shutdown")
                finishing.result()
                phases.mark("artifacts")
        except BaseException as err:
            if tracker is None and "tracker_future" in locals() and tracker_future.done() and not tracker_future.exception():
                tracker = tracker_future.result()  # e.g. the fleet could not be placed
                loop = tracking_callbacks(tracker, cfg, callbacks)
            if loop and not progress.heard:
                _fail(loop, FitFailure(err, progress.last, progress.resumable))
            if raise_on_error or tracker is None:
                raise
            return Result(tracker.run_id, tracker.uri, tuple(progress.history), tracker.checkpoint_uri, err)
        assert tracker is not None
        return Result(tracker.run_id, tracker.uri, tuple(progress.history), tracker.checkpoint_uri)


def _spec(index: int, actor: ServiceActor) -> ActorSpec:
    return ActorSpec(index, (), actor.num_cpus, {}, num_gpus=actor.num_gpus, role=actor.role, gpu_field=actor.gpu_field)


def _spawn(cls: type, actor: ServiceActor, args: tuple[Any, ...]) -> Any:
    """A round service's actor, placed by the fleet's rules (CPUs, GPU share), serving concurrent calls."""
    opts = actor_options(_spec(0, actor))
    return ray.remote(cls).options(**opts, max_concurrency=actor.max_concurrency).remote(*args)


def _fail(callbacks: Sequence[Callback], failure: FitFailure) -> None:
    """Every callback hears of the failure (one that raises does not stop the others)."""
    for callback in callbacks:
        try:
            callback.on_exception(failure)
        except Exception:  # noqa: BLE001 - the run's own error is the one to report
            log.warning("callback %s failed while handling %r", type(callback).__name__, failure.error, exc_info=True)


def _finish(callbacks: Sequence[Callback], end: FitEnd, progress: Progress) -> None:
    """The callbacks' ``on_fit_end`` (the last closes the run FINISHED); a failure there fails the run."""
    try:
        for callback in callbacks:
            callback.on_fit_end(end)
    except BaseException as err:
        progress.heard = True
        _fail(callbacks, FitFailure(err, progress.last))
        raise


def run_job(cfg: JobConfig, resume: str | None = None, callbacks: Sequence[Callback] = ()) -> Result:
    """``Session(cfg).fit(resume, callbacks)``: assemble and run a job in one call."""
    return Session(cfg).fit(resume, callbacks)


__all__ = ["Plan", "Result", "Session", "run_job"]
