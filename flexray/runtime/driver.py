"""The training loop: run the rounds, evaluate, and hand each round to the callbacks (MLflow
metrics, checkpoints, run files); plus joining Ray. ``flexray.runtime.session`` assembles the job
and calls it. Never names a method."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray._raylet
import torch
from tqdm import tqdm

from flexray import phases
from flexray.config import JobConfig, flatten
from flexray.errors import FlexrayError
from flexray.compute import driver_device
from flexray.fleet.engine import Actors, Engine
from flexray.fleet.report import RoundOutcome
from flexray.methods.base import Method
from flexray.methods.capabilities import deployed_model
from flexray.methods.service import RoundService, ServiceEnv
from flexray.runtime.actor import drop_warm, wait_ready
from flexray.runtime.job import Job
from flexray.runtime.rounds import NodesLeft
from flexray.tracking.callbacks import Callback, FitEnd, FitStart, RoundEnd
from flexray.tracking.metrics import RoundMetrics
from flexray.tracking.mlflow_logger import Checkpoint, Tracker

log = logging.getLogger("flexray")

# Sections whose change would make a resumed run a different experiment.
_RESUME_FIXED = ("seed", "data", "model", "fleet", "method", "schedule", "rounds.mode", "rounds.clients_per_round",
                 "rounds.fraction", "rounds.deadline_s", "rounds.stragglers", "rounds.eval_every")


@dataclass
class Progress:
    """What the loop has done so far, kept by the session for its ``Result`` and failure hooks."""

    history: list[RoundMetrics] = field(default_factory=list)
    last: RoundEnd | None = None  # the last round that finished
    resumable: bool = False  # the failure left a run that ``--resume`` can finish
    heard: bool = False  # the callbacks have heard of the failure already


def use_ray_auth_mode(address: str | None) -> None:
    """Choose Ray's token authentication the way Ray >= 2.52 would, but say so explicitly.

    Left unset, Ray picks the same mode and logs a WARNING about its choice on every run; set
    explicitly, the choice is silent. A local Ray (no address) always uses a token; a cluster
    does when this machine holds its token file. An explicit RAY_AUTH_MODE wins. Ray's core
    caches its config when ``ray`` is imported, so it is re-read after the variable is set (the
    call Ray makes itself when it turns token mode on).
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    if not address or (Path.home() / ".ray" / "auth_token").is_file() or os.environ.get("RAY_AUTH_TOKEN"):
        os.environ["RAY_AUTH_MODE"] = "token"
        refresh = getattr(getattr(ray._raylet, "Config", None), "initialize", None)
        if refresh is not None:
            refresh("")


@contextmanager
def ray_session(cfg: JobConfig) -> Iterator[None]:
    """Join the configured cluster ($RAY_ADDRESS under ``ray job submit``) or start a local one."""
    if ray.is_initialized():
        yield
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if not address:
        kwargs.update(num_cpus=cfg.cluster.num_cpus, include_dashboard=False)
    ray.init(address=address, **kwargs)
    try:
        yield
    finally:
        drop_warm()
        ray.shutdown()


def _check_resume(cfg: JobConfig, saved: dict[str, Any]) -> None:
    now = flatten(cfg.model_dump(mode="json"))
    for key, value in flatten(saved).items():
        if key.startswith(_RESUME_FIXED) and now.get(key) != value:
            raise FlexrayError(f"--resume: {key} was {value!r} in the run but is {now.get(key)!r} now; resume with the run's config")


def drive(
    job: Job, method: Method, engine: Engine, service: RoundService, env: ServiceEnv, actors: Actors,
    resume: str | None, tracker: Tracker, callbacks: Sequence[Callback], progress: Progress, wall0: float,
) -> FitEnd:
    """Run the rounds, handing each to the callbacks; returns what their ``on_fit_end`` writes
    (it needs no Ray, so the session overlaps it with Ray's shutdown)."""
    cfg = job.cfg
    torch.manual_seed(cfg.seed)
    eval_model = job.model()
    state = method.init(eval_model)  # the global weights stay on the CPU: that is what travels
    eval_model.to(driver_device(cfg.fleet))  # evaluation runs where the actors compute, if this process can
    test = job.test_data()

    start, clock, energy, wall_before = 0, 0.0, 0.0, 0.0
    rows: list[dict[str, Any]] = []
    history = progress.history
    engine_state: dict[str, Any] = {}
    if resume:
        ck = tracker.load_checkpoint()
        _check_resume(cfg, ck.config)
        start, clock, energy, wall_before = ck.round, ck.clock_s, ck.energy_j, ck.wall_s
        state, rows = ck.state, ck.events
        history.extend(RoundMetrics.from_row(h) for h in ck.history)
        method.load_state_dict(ck.method)
        engine_state = ck.engine
    for callback in callbacks:
        callback.on_fit_start(FitStart(cfg, method.derived_params(), bool(resume)))
    for path in job.prepare(method, tracker.workdir):
        for callback in callbacks:
            callback.on_artifact(path, "method")
    wait_ready(actors)
    phases.mark("actors_ready")
    service.start(env)
    try:
        rounds = engine.rounds(method, actors, job.server_profile, job.model_profile, service)
        if resume:
            rounds.load_state_dict(engine_state)
        bar = tqdm(range(start, cfg.rounds.num), desc=cfg.name, unit="round", disable=not cfg.tracking.progress)
        for rnd in bar:
            try:
                state, out = rounds.step(rnd, clock, state)
            except NodesLeft as err:  # keep what is done (the checkpointer saves the last round), then one line
                if progress.last is None:
                    raise FlexrayError(f"{err} (no round had finished: run it again)") from None
                progress.resumable = True
                raise FlexrayError(f"{err} with: flexray run CONFIG --resume {tracker.run_id}") from None
            clock += out.duration_s
            energy += sum(r.energy_j for r in out.reports)
            metrics = round_metrics(rnd + 1, out, clock, energy, wall_before + time.perf_counter() - wall0)
            last = rnd + 1 == cfg.rounds.num
            if (rnd + 1) % cfg.rounds.eval_every == 0 or last:
                metrics = metrics.with_eval(method.evaluate(state, eval_model, test))
                bar.set_postfix(acc=f"{metrics.accuracy:.3f}", sim_s=f"{clock:.0f}")
            history.append(metrics)
            new_rows = [r.row() for r in out.reports]
            rows.extend(new_rows)

            def snapshot(done: int = rnd + 1, clock: float = clock, energy: float = energy, state: Any = state) -> Checkpoint:
                return Checkpoint(
                    round=done, clock_s=clock, energy_j=energy, wall_s=wall_before + time.perf_counter() - wall0,
                    state=state, method=method.state_dict(), engine=rounds.state_dict(), events=rows,
                    history=[h.row() for h in history], config=cfg.model_dump(mode="json"),
                )

            end = progress.last = RoundEnd(rnd + 1, last, metrics, new_rows, snapshot)
            for callback in callbacks:
                callback.on_round_end(end)
        phases.mark("rounds")
    finally:
        service.stop()
    return FitEnd(list(history), rows, deployed_model(method, state, eval_model.cpu()), test.x[:2].numpy())


def round_metrics(done: int, out: RoundOutcome, clock: float, energy: float, wall: float) -> RoundMetrics:
    """A closed round's metrics (before evaluation)."""
    kept = [r for r in out.reports if r.status in ("ok", "late")]
    losses = [(r.metrics["train_loss"], r.samples) for r in kept if "train_loss" in r.metrics]
    predicted = [r.predicted_s for r in out.reports if r.predicted_s == r.predicted_s]
    return RoundMetrics(
        round=done, sim_time_s=clock, round_sim_s=out.duration_s, wall_time_s=wall,
        energy_j=energy, round_energy_j=sum(r.energy_j for r in out.reports),
        participants=float(len(kept)), stragglers=float(out.count("straggler", "late")),
        lost=float(out.count("lost")), rejected=float(out.count("rejected")), failed=float(out.count("failed")),
        offline=float(out.count("offline")), nodes_lost=float(out.nodes_lost),
        bytes_up=float(sum(r.bytes_up for r in out.reports)), bytes_down=float(sum(r.bytes_down for r in out.reports)),
        # the methods' own latency prediction, next to the simulated round_sim_s
        round_predicted_s=max(predicted) if predicted else None,
        train_loss=(sum(l * n for l, n in losses) / sum(n for _, n in losses)) if losses and sum(n for _, n in losses) else None,
    )
