"""The tiled engine: plans the tiling, starts one ``TileActor`` per tile device, and turns each
logged round (``steps_per_round`` synchronous steps) into reports on the simulated clock.

Time per step follows the throttle as everywhere else: ``virtual`` = the planner's predicted
step (slowest device per phase, halo exchanges and all-reduce over the device radios),
``sleep`` = actors also sleep to that compute budget, ``none`` = measured wall time.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import ray
import torch

from flexray.config import JobConfig
from flexray.data.datasets import Dataset
from flexray.errors import FlexrayError
from flexray.fleet import placement
from flexray.fleet.fleet import ActorSpec, Device, derive_seed
from flexray.fleet.engine import Actors
from flexray.fleet.report import DeviceReport, RoundOutcome
from flexray.methods.base import Method
from flexray.methods.service import RoundService
from flexray.models import build_model
from flexray.models.blocks import stages
from flexray.models.profile import ModelProfile
from flexray.models.tiling import tileable_prefix
from flexray.protocol import DeviceProfile, State, energy_j
from flexray.schedule.tiling import TilingPlan, choose_plan, speed_order
from flexray.tiled.actor import TileActor, TiledStep, fused_stack
from flexray.tiled.method import Tiled, TiledConfig, batches


def plan_for(mcfg: TiledConfig, devices: list[Device], input_shape: tuple[int, int, int], model: torch.nn.Module,
             model_name: str) -> tuple[TilingPlan, int, list[Device]]:
    """(plan, fused stage count, the devices running tiles 0..n-1, fastest first)."""
    fused = mcfg.fused_stages or tileable_prefix([s for _, s in stages(model)])
    if fused == 0:
        raise FlexrayError(f"config error: model.name: {model_name!r} starts with no tileable conv/pool stage; "
                           "use cnn, vgg, darknet19 or torchvision:vgg11_bn")
    stack = fused_stack(model, input_shape, fused)
    while mcfg.fused_stages is None and fused > 1 and stack.sizes[-1][0] * stack.sizes[-1][1] < len(devices):
        fused -= 1  # a default that pools the map below one pixel per device could not be tiled
        stack = fused_stack(model, input_shape, fused)
    ordered = [devices[i] for i in speed_order([(d.profile, d.trace.speed(0.0)) for d in devices])]
    groups = None
    if mcfg.groups is not None:
        edges = [0, *mcfg.groups, len(stack.geoms)]
        if edges[-2] >= edges[-1]:
            raise FlexrayError(f"config error: method.groups: indices must be < {len(stack.geoms)}, the fused layer count")
        groups = list(itertools.pairwise(edges))
    plan = choose_plan(stack, [(d.profile, d.trace.speed(0.0)) for d in ordered], mcfg.batch_size, mcfg.grid, groups,
                       message_s=mcfg.message_s)
    return plan, fused, ordered[: plan.n_tiles]


class TiledEngine:
    """The tiled method's engine (``Tiled.engine`` names it): no federated round, no device actors."""

    reuses_actors = False

    def __init__(self, cfg: JobConfig, devices: list[Device], dataset: Dataset, method: Method) -> None:
        if not isinstance(method, Tiled):
            raise FlexrayError(f"the tiled engine runs the tiled method, not {method.name!r}")
        self.cfg, self.devices, self.dataset, self.method, self.mcfg = cfg, devices, dataset, method, method.cfg
        with torch.random.fork_rng(devices=[]):  # planning must not shift the training RNG stream
            model = build_model(cfg.model, dataset.input_shape, dataset.num_classes)
        self.plan, self.fused, self.tile_devices = plan_for(self.mcfg, devices, dataset.input_shape, model, cfg.model.name)
        self.model = model

    def describe(self) -> str:
        """The plan as ``flexray plan`` prints it: grid, groups, predicted per-step costs per device."""
        p = self.plan
        lines = [(f"tiled plan: grid {p.grid[0]}x{p.grid[1]}, groups {[list(g) for g in p.groups]} of fused layers, "
                  f"fused stages {self.fused}; predicted step {p.step_s:.4g} s (batch {self.mcfg.batch_size}), "
                  f"redundant compute {100 * p.redundant:.1f}%")]
        lines.append(f"{'tile':>4} {'device':>16} {'compute_s':>10} {'comm_s':>10} {'MB down':>8} {'MB up':>8} {'act MB':>8}")
        for r, (d, c) in enumerate(zip(self.tile_devices, p.devices)):
            lines.append(f"{r:>4} {d.name:>16} {c.compute_s:>10.4g} {c.comm_s:>10.4g} {c.bytes_down / 1e6:>8.3g} "
                         f"{c.bytes_up / 1e6:>8.3g} {c.activation_bytes / 2**20:>8.3g}")
        idle = [d.name for d in self.devices if d not in self.tile_devices]
        if idle:
            lines.append(f"left out (the planner predicts no gain from them): {', '.join(idle)}")
        return "\n".join(lines)

    def specs(self) -> list[ActorSpec]:
        """One tile actor per tile device, with the fleet's CPUs and GPU share per actor."""
        fleet = self.cfg.fleet
        return [ActorSpec(r, (d.id,), fleet.num_cpus_per_actor, dict(d.resources), dict(d.node_labels),
                          fleet.num_gpus_per_actor, role="tile") for r, d in enumerate(self.tile_devices)]

    def start(self) -> tuple[Actors, Any]:
        cfg, mcfg = self.cfg, self.mcfg
        specs = self.specs()
        data_ref = ray.put(self.dataset)
        opt = {"lr": mcfg.lr, "momentum": mcfg.momentum, "weight_decay": mcfg.weight_decay}
        sleep = cfg.fleet.throttle == "sleep"
        actors = []
        for s, cost in zip(specs, self.plan.devices):
            fwd = cost.compute_s / 3 * cfg.fleet.time_scale  # forward : backward = 1 : 2 (planner.BACKWARD)
            pace = (fwd, 2 * fwd) if sleep else None
            handle = TileActor.options(**placement.actor_options(s)).remote(
                s.index, self.model, self.fused, self.plan, opt, data_ref, max(1, int(s.num_cpus)), pace,
                compute=cfg.fleet.compute_device, num_gpus=s.num_gpus)
            actors.append((s, handle))
        return actors, data_ref

    def rounds(self, method: Method, actors: Actors, server: DeviceProfile, profile: ModelProfile,
               service: RoundService) -> TiledRounds:
        return TiledRounds(self, actors)


class TiledRounds:
    """One logged round = ``steps_per_round`` tiled SGD steps on the devices' pooled data (by
    default ``local_epochs`` passes over it)."""

    def __init__(self, engine: TiledEngine, actors: list[tuple[ActorSpec, Any]]) -> None:
        self.engine, self.cfg, self.plan = engine, engine.cfg, engine.plan
        self.handles = [h for _, h in actors]
        self.labels = [s.label for s, _ in actors]
        self.runner = TiledStep(self.plan, self.handles)
        # the cluster trains on the data its devices hold
        self.pool = np.sort(np.concatenate([d.indices for d in engine.devices]))
        self.opt_state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": ray.get(self.handles[0].opt_state.remote())}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.opt_state = saved.get("optimizer")

    def step(self, rnd: int, clock_s: float, state: State) -> tuple[State, RoundOutcome]:
        cfg, mcfg = self.cfg, self.engine.mcfg
        steps = mcfg.round_steps(len(self.pool))
        state_ref = ray.put(state)
        self.runner.all("load", state_ref, self.opt_state)
        self.opt_state = None
        self.runner.all("reset_stats")
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, rnd, 11))
        self.runner.reseed(derive_seed(cfg.seed, rnd, 13))
        t0 = time.perf_counter()
        pending: list[Any] = []
        for idx in batches(len(self.pool), mcfg.batch_size, steps, gen):
            rows = self.pool[idx.numpy()]
            ray.get(pending)  # one step at a time bounds the object store to one step's tiles
            pending = self.runner.step(rows, rows)
        ray.get(pending)
        wall = time.perf_counter() - t0
        sums = self.runner.all("checksum")
        if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
            raise RuntimeError(f"tiled: device weights diverged (checksums {sums})")
        stats = self.runner.all("reset_stats")
        new_state = ray.get(self.handles[0].state.remote())
        return new_state, self._outcome(rnd, clock_s, steps, wall, stats)

    def _outcome(self, rnd: int, clock_s: float, steps: int, wall: float, stats: list[dict[str, float]]) -> RoundOutcome:
        cfg, plan = self.cfg, self.plan
        measured = cfg.fleet.throttle == "none"
        duration = wall if measured else steps * plan.step_s
        batch = self.engine.mcfg.batch_size
        reports = []
        for rank, (dev, cost, st) in enumerate(zip(self.engine.tile_devices, plan.devices, stats)):
            speed = dev.trace.speed(clock_s)
            # the plan costed each step at the trace speed of t = 0; compute time scales with 1 / speed
            comp = st["compute_s"] if measured else steps * cost.compute_s * dev.trace.speed(0.0) / speed
            dl = steps * 8.0 * cost.bytes_down / dev.profile.downlink_bps
            ul = steps * 8.0 * cost.bytes_up / dev.profile.uplink_bps
            idle = max(0.0, duration - comp - dl - ul)
            metrics = {"peak_activation_bytes": st["peak_activation_bytes"]}
            if rank == 0:
                metrics.update(train_loss=st["loss_sum"] / max(st["steps"], 1.0), tail_activation_bytes=st["tail_activation_bytes"])
            reports.append(DeviceReport(
                round=rnd, device=dev.id, name=dev.name, profile=dev.profile.name, actor=self.labels[rank], node="",
                status="ok", samples=steps * batch, flops=steps * cost.flops, speed=speed, wall_s=st["compute_s"],
                download_s=dl, compute_s=comp, upload_s=ul, start_s=clock_s, end_s=clock_s + comp + dl + ul,
                energy_j=energy_j(dev.profile, comp, dl + ul, idle), bytes_down=steps * cost.bytes_down,
                bytes_up=steps * cost.bytes_up, metrics=metrics,
                spec={"tile": rank, **plan.describe()},
            ))
        used = {d.id for d in self.engine.tile_devices}
        for dev in self.engine.devices:  # devices the plan leaves out idle through the round
            if dev.id not in used:
                reports.append(DeviceReport.untrained(rnd, dev.id, dev.name, dev.profile.name, "", "idle",
                                                      "not in the tiling plan", dev.trace.speed(clock_s), clock_s,
                                                      energy_j(dev.profile, 0.0, 0.0, duration)))
        reports.sort(key=lambda r: r.device)
        return RoundOutcome(reports, [], duration, 0.0)
