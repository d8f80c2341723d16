"""The job driver: build the fleet, run rounds, evaluate, checkpoint, log. Never names a method."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray._raylet
import torch
from tqdm import tqdm

from flexray import phases
from flexray.config import JobConfig, flatten
from flexray.data.datasets import Dataset, load_dataset, to_tensor
from flexray.errors import FlexrayError
from flexray.fleet.fleet import ActorSpec, build_fleet
from flexray.fleet.profiles import resolve_profile
from flexray.methods import method_class
from flexray.methods.base import Method, ServerData
from flexray.models import build_model, profile_model
from flexray.protocol import LocalData
from flexray.runtime.actor import DeviceActorHandle, wait_ready
from flexray.runtime.engines import Engine, engine_for
from flexray.runtime.rounds import RoundOutcome
from flexray.runtime.split_server import start_split_server
from flexray.tracking import plots
from flexray.tracking.events import write_events
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
        ray.shutdown()


def _ray_actor(handle: Any) -> Any:
    return handle.actor if isinstance(handle, DeviceActorHandle) else handle


def _check_resume(cfg: JobConfig, saved: dict[str, Any]) -> None:
    now = flatten(cfg.model_dump(mode="json"))
    for key, value in flatten(saved).items():
        if key.startswith(_RESUME_FIXED) and now.get(key) != value:
            raise FlexrayError(f"--resume: {key} was {value!r} in the run but is {now.get(key)!r} now; resume with the run's config")


def run_job(cfg: JobConfig, resume: str | None = None) -> JobResult:
    """Run (or resume) a job end to end; returns the per-round metric history."""
    wall0 = time.perf_counter()
    dataset = load_dataset(cfg.data)
    method_class(cfg.method.name)(
        cfg.method, lambda: build_model(cfg.model, dataset.input_shape, dataset.num_classes)
    ).check()
    devices = build_fleet(cfg, dataset.y_train)
    engine = engine_for(cfg, devices, dataset)  # the method names its engine; rounds unless it says otherwise
    phases.mark("data_and_fleet")
    with ThreadPoolExecutor(1) as pool:
        # MLflow's store set-up is Python work; Ray's start-up is mostly waiting: overlap them.
        tracker_future = pool.submit(Tracker, cfg, resume)
        driving = False
        try:
            with ray_session(cfg):
                phases.mark("ray_init")
                actors, _data_ref = engine.start()
                try:
                    tracker = tracker_future.result()
                    phases.mark("tracker_ready")
                    driving = True
                    result, finish = _drive(cfg, resume, tracker, dataset, engine, actors, wall0)
                    # The files need no cluster: write them while Ray shuts down.
                    finishing = pool.submit(finish)
                finally:
                    for _, handle in actors:
                        ray.kill(_ray_actor(handle))
            phases.mark("ray_shutdown")
            finishing.result()
            phases.mark("artifacts")
            return result
        except BaseException:
            if not driving and tracker_future.exception() is None:
                tracker_future.result().set_terminated("FAILED")  # e.g. the fleet could not be placed
            raise


def _drive(
    cfg: JobConfig, resume: str | None, tracker: Tracker, dataset: Dataset, engine: Engine,
    actors: list[tuple[ActorSpec, Any]], wall0: float,
) -> tuple[JobResult, Callable[[], None]]:
    """Run the rounds; returns the result and the step that writes the run's files and closes
    the MLflow run (it needs no Ray, so the caller overlaps it with Ray's shutdown)."""
    def model_fn() -> torch.nn.Module:
        return build_model(cfg.model, dataset.input_shape, dataset.num_classes)

    torch.manual_seed(cfg.seed)
    method: Method = method_class(cfg.method.name)(cfg.method, model_fn)
    eval_model = model_fn()
    state = method.init(eval_model)
    server = resolve_profile(cfg.fleet.server_profile, cfg.fleet.profiles)
    model_profile = profile_model(eval_model, dataset.input_shape)
    method.attach(model_profile, server)
    split_server = None
    test = LocalData(to_tensor(dataset.x_test, dataset.mean, dataset.std), torch.tensor(dataset.y_test, dtype=torch.long))

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
        held_out = np.setdiff1d(np.arange(len(dataset.y_train)), np.concatenate([d.indices for d in engine.devices]))
        with torch.random.fork_rng(devices=[]):  # server-side preparation never shifts the training RNG
            for path in method.setup(ServerData(dataset, held_out), tracker.workdir):
                tracker.log_file(path, "method")
        wait_ready(actors)
        phases.mark("actors_ready")
        split_server = _start_split_server(cfg, method, dataset, server)
        rounds = engine.rounds(method, actors, server, model_profile, split_server)
        if resume:
            rounds.load_state_dict(engine_state)
        bar = tqdm(range(start, cfg.rounds.num), desc=cfg.name, unit="round", disable=not cfg.tracking.progress)
        for rnd in bar:
            state, out = rounds.step(rnd, clock, state)
            clock += out.duration_s
            energy += sum(r.energy_j for r in out.reports)
            metrics = _round_metrics(out, clock, energy, wall_before + time.perf_counter() - wall0)
            last = rnd + 1 == cfg.rounds.num
            if (rnd + 1) % cfg.rounds.eval_every == 0 or last:
                metrics.update(method.evaluate(state, eval_model, test))
                bar.set_postfix(acc=f"{metrics['accuracy']:.3f}", sim_s=f"{clock:.0f}")
            tracker.log_metrics(rnd + 1, metrics)
            history.append({"round": rnd + 1, **metrics})
            rows.extend(r.row() for r in out.reports)
            every = cfg.tracking.checkpoint_every
            if every and ((rnd + 1) % every == 0 or last):  # the last one lets a run be extended
                tracker.save_checkpoint(Checkpoint(
                    round=rnd + 1, clock_s=clock, energy_j=energy, wall_s=wall_before + time.perf_counter() - wall0,
                    state=state, method=method.state_dict(), engine=rounds.state_dict(), events=rows, history=history,
                    config=cfg.model_dump(mode="json"),
                ))
        phases.mark("rounds")
        final = method.device_model(state, eval_model, None)
        example = test.x[:2].numpy()
    except BaseException:
        tracker.set_terminated("FAILED")
        raise
    finally:
        if split_server is not None:
            ray.kill(split_server)

    def finish() -> None:
        status = "FAILED"
        try:
            _finish(tracker, cfg, rows, history, final, example)
            status = "FINISHED"
        finally:
            tracker.set_terminated(status)

    return JobResult(tracker.run_id, tracker.uri, history), finish


def _start_split_server(cfg: JobConfig, method: Method, dataset: Dataset, server: Any) -> Any:
    """Start the split server the method asks for (``Method.server_spec``), or None."""
    spec = method.server_spec()
    if spec is None:
        return None
    handle = start_split_server(cfg, spec, dataset.input_shape, dataset.num_classes, server)
    try:
        ray.get(handle.info.remote(), timeout=120)
    except ray.exceptions.GetTimeoutError:
        ray.kill(handle)
        raise FlexrayError(f"the split server needs {spec.num_cpus} CPU(s) the cluster cannot give next to the device "
                           "actors; lower method.server_cpus or fleet.actors / fleet.num_cpus_per_actor") from None
    return handle


def _round_metrics(out: RoundOutcome, clock: float, energy: float, wall: float) -> dict[str, float]:
    kept = [r for r in out.reports if r.status in ("ok", "late")]
    losses = [(r.metrics["train_loss"], r.samples) for r in kept if "train_loss" in r.metrics]
    metrics = {
        "sim_time_s": clock, "round_sim_s": out.duration_s, "wall_time_s": wall,
        "energy_j": energy, "round_energy_j": sum(r.energy_j for r in out.reports),
        "participants": float(len(kept)), "stragglers": float(out.count("straggler", "late")),
        "lost": float(out.count("lost")), "rejected": float(out.count("rejected")), "failed": float(out.count("failed")),
        "bytes_up": float(sum(r.bytes_up for r in out.reports)),
        "bytes_down": float(sum(r.bytes_down for r in out.reports)),
    }
    predicted = [r.predicted_s for r in out.reports if r.predicted_s == r.predicted_s]
    if predicted:  # the methods' own latency prediction, next to the simulated round_sim_s
        metrics["round_predicted_s"] = max(predicted)
    if losses and sum(n for _, n in losses):
        metrics["train_loss"] = sum(l * n for l, n in losses) / sum(n for _, n in losses)
    return metrics


def _finish(tracker: Tracker, cfg: JobConfig, rows: list[dict[str, Any]], history: list[dict[str, float]], model: torch.nn.Module, example: Any) -> None:
    out = tracker.workdir
    tracker.log_file(write_events(rows, out / "events.parquet"))
    if cfg.tracking.plots:
        for path in (
            plots.accuracy_vs_time(history, out / "accuracy_vs_time.png"),
            plots.gantt(rows, cfg.tracking.gantt_rounds, out / "gantt.png"),
            plots.energy_per_device(rows, out / "energy_per_device.png"),
        ):
            tracker.log_file(path, "plots")
    if cfg.tracking.log_model:
        tracker.log_model(model.eval(), example)
