"""The job driver: assemble the job, run the rounds, evaluate, and hand each round to the callbacks
(MLflow metrics, checkpoints, run files). Never names a method."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from flexray.fleet.fleet import ActorSpec
from flexray.fleet.placement import check_local_gpus, check_placement
from flexray.methods.base import Method
from flexray.methods.capabilities import NeedsSplitServer, deployed_model
from flexray.runtime.actor import drop_warm, release_actors, wait_ready
from flexray.runtime.engines import Engine, engine_for
from flexray.runtime.compute import driver_device
from flexray.runtime.job import Job, local_gpus
from flexray.runtime.rounds import NodesLeft, RoundOutcome
from flexray.runtime.split_server import server_actor, server_gpus, start_split_server
from flexray.tracking.callbacks import Callback, FitEnd, RoundEnd, tracking_callbacks
from flexray.tracking.mlflow_logger import Checkpoint, Tracker

log = logging.getLogger("flexray")

# Sections whose change would make a resumed run a different experiment.
_RESUME_FIXED = ("seed", "data", "model", "fleet", "method", "schedule", "rounds.mode", "rounds.clients_per_round",
                 "rounds.fraction", "rounds.deadline_s", "rounds.stragglers", "rounds.eval_every")


@dataclass
class JobResult:
    run_id: str
    tracking_uri: str
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


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


def run_job(cfg: JobConfig, resume: str | None = None, callbacks: Sequence[Callback] = ()) -> JobResult:
    """Run (or resume) a job end to end; returns the per-round metric history.

    ``callbacks`` come after the tracking ones (metrics, checkpoints, run files) and see the same
    round ends."""
    wall0 = time.perf_counter()
    job = Job.assemble(cfg)  # every refusal of the config happens here, before Ray
    engine = engine_for(job)  # the method names its engine; rounds unless it says otherwise
    specs = engine.specs()
    server = server_actor(cfg, job.method(), len(specs))
    if not (ray.is_initialized() or cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        check_local_gpus([*specs, *([server] if server else [])], local_gpus())  # a cluster is checked on joining
    phases.mark("data_and_fleet")
    with ThreadPoolExecutor(1) as pool:
        # MLflow's store set-up is Python work; Ray's start-up is mostly waiting: overlap them.
        tracker_future = pool.submit(Tracker, cfg, resume)
        driving = done = False
        try:
            with ray_session(cfg):
                phases.mark("ray_init")
                if server is not None:  # the actors and the split server together (each engine checks its own)
                    check_placement([*specs, server])
                actors, _data_ref = engine.start()
                try:
                    tracker = tracker_future.result()
                    phases.mark("tracker_ready")
                    driving = True
                    loop = [*tracking_callbacks(tracker, cfg), *callbacks]
                    result, fit_end = _drive(job, resume, tracker, engine, actors, loop, wall0)
                    # The files need no cluster: write them while Ray shuts down.
                    finishing = pool.submit(_finish, tracker, loop, fit_end)
                    done = True
                finally:
                    release_actors(actors, ok=done)
            phases.mark("ray_shutdown")
            finishing.result()
            phases.mark("artifacts")
            return result
        except BaseException:
            if not driving and tracker_future.exception() is None:
                tracker_future.result().set_terminated("FAILED")  # e.g. the fleet could not be placed
            raise


def _drive(
    job: Job, resume: str | None, tracker: Tracker, engine: Engine, actors: list[tuple[ActorSpec, Any]],
    callbacks: Sequence[Callback], wall0: float,
) -> tuple[JobResult, FitEnd]:
    """Run the rounds; returns the result and what the callbacks' ``on_fit_end`` writes (it
    needs no Ray, so the caller overlaps it with Ray's shutdown)."""
    cfg = job.cfg
    torch.manual_seed(cfg.seed)
    method = job.method()
    eval_model = job.model()
    state = method.init(eval_model)  # the global weights stay on the CPU: that is what travels
    eval_model.to(driver_device(cfg.fleet))  # evaluation runs where the actors compute, if this process can
    split_server = None
    test = job.test_data()

    start, clock, energy, wall_before = 0, 0.0, 0.0, 0.0
    rows: list[dict[str, Any]] = []
    history: list[dict[str, float]] = []
    try:
        if resume:
            ck = tracker.load_checkpoint()
            _check_resume(cfg, ck.config)
            start, clock, energy, wall_before = ck.round, ck.clock_s, ck.energy_j, ck.wall_s
            state, rows, history = ck.state, ck.events, ck.history
            method.load_state_dict(ck.method)
            engine_state = ck.engine
        else:
            tracker.log_config(cfg, method.derived_params())
        for path in job.prepare(method, tracker.workdir):
            tracker.log_file(path, "method")
        wait_ready(actors)
        phases.mark("actors_ready")
        split_server = _start_split_server(job, method)
        rounds = engine.rounds(method, actors, job.server_profile, job.model_profile, split_server)
        if resume:
            rounds.load_state_dict(engine_state)
        bar = tqdm(range(start, cfg.rounds.num), desc=cfg.name, unit="round", disable=not cfg.tracking.progress)
        last_end: RoundEnd | None = None
        for rnd in bar:
            try:
                state, out = rounds.step(rnd, clock, state)
            except NodesLeft as err:  # keep what is done: a checkpoint of the last round, then one line
                if last_end is None:
                    raise FlexrayError(f"{err} (no round had finished: run it again)") from None
                tracker.save_checkpoint(last_end.snapshot())
                raise FlexrayError(f"{err} with: flexray run CONFIG --resume {tracker.run_id}") from None
            clock += out.duration_s
            energy += sum(r.energy_j for r in out.reports)
            metrics = _round_metrics(out, clock, energy, wall_before + time.perf_counter() - wall0)
            last = rnd + 1 == cfg.rounds.num
            if (rnd + 1) % cfg.rounds.eval_every == 0 or last:
                metrics.update(method.evaluate(state, eval_model, test))
                bar.set_postfix(acc=f"{metrics['accuracy']:.3f}", sim_s=f"{clock:.0f}")
            history.append({"round": rnd + 1, **metrics})
            new_rows = [r.row() for r in out.reports]
            rows.extend(new_rows)

            def snapshot(done: int = rnd + 1, clock: float = clock, energy: float = energy, state: Any = state) -> Checkpoint:
                return Checkpoint(
                    round=done, clock_s=clock, energy_j=energy, wall_s=wall_before + time.perf_counter() - wall0,
                    state=state, method=method.state_dict(), engine=rounds.state_dict(), events=rows, history=history,
                    config=cfg.model_dump(mode="json"),
                )

            end = last_end = RoundEnd(rnd + 1, last, metrics, new_rows, snapshot)
            for callback in callbacks:
                callback.on_round_end(end)
        phases.mark("rounds")
        fit_end = FitEnd(history, rows, deployed_model(method, state, eval_model.cpu()), test.x[:2].numpy())
    except BaseException:
        tracker.set_terminated("FAILED")
        raise
    finally:
        if split_server is not None:
            ray.kill(split_server)
    return JobResult(tracker.run_id, tracker.uri, history), fit_end


def _finish(tracker: Tracker, callbacks: Sequence[Callback], end: FitEnd) -> None:
    """The callbacks' ``on_fit_end``, then the MLflow run is closed (FAILED if one raised)."""
    status = "FAILED"
    try:
        for callback in callbacks:
            callback.on_fit_end(end)
        status = "FINISHED"
    finally:
        tracker.set_terminated(status)


def _start_split_server(job: Job, method: Method) -> Any:
    """Start the split server the method asks for (``NeedsSplitServer``), or None."""
    spec = method.server_spec() if isinstance(method, NeedsSplitServer) else None
    if spec is None:
        return None
    handle = start_split_server(job.cfg, spec, job.dataset.input_shape, job.dataset.num_classes, job.server_profile)
    try:
        ray.get(handle.info.remote(), timeout=120)
    except ray.exceptions.GetTimeoutError:
        ray.kill(handle)
        raise FlexrayError(f"the split server needs {spec.num_cpus:g} CPU(s) and {server_gpus(job.cfg, spec):g} GPU the "
                           "cluster cannot give next to the device actors; lower method.server_cpus / method.server_gpus "
                           "or fleet.actors / fleet.num_cpus_per_actor") from None
    return handle


def _round_metrics(out: RoundOutcome, clock: float, energy: float, wall: float) -> dict[str, float]:
    kept = [r for r in out.reports if r.status in ("ok", "late")]
    losses = [(r.metrics["train_loss"], r.samples) for r in kept if "train_loss" in r.metrics]
    metrics = {
        "sim_time_s": clock, "round_sim_s": out.duration_s, "wall_time_s": wall,
        "energy_j": energy, "round_energy_j": sum(r.energy_j for r in out.reports),
        "participants": float(len(kept)), "stragglers": float(out.count("straggler", "late")),
        "lost": float(out.count("lost")), "rejected": float(out.count("rejected")), "failed": float(out.count("failed")),
        "offline": float(out.count("offline")), "nodes_lost": float(out.nodes_lost),
        "bytes_up": float(sum(r.bytes_up for r in out.reports)),
        "bytes_down": float(sum(r.bytes_down for r in out.reports)),
    }
    predicted = [r.predicted_s for r in out.reports if r.predicted_s == r.predicted_s]
    if predicted:  # the methods' own latency prediction, next to the simulated round_sim_s
        metrics["round_predicted_s"] = max(predicted)
    if losses and sum(n for _, n in losses):
        metrics["train_loss"] = sum(l * n for l, n in losses) / sum(n for _, n in losses)
    return metrics
