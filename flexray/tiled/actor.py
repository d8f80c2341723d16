"""Tiled, fused training across device actors, no central server (arXiv 2409.09083).

Every device holds the whole model. Per step, device t computes tile t of every fused group:
it reads its input tile (with halo), runs the group's layers on it and keeps the autograd
graph; at a group boundary each device gathers the parts of the other devices' output tiles
its next input needs (the ObjectRefs go device to device; the orchestrator only passes refs).
Device 0 runs the rest of the network on the assembled feature map and sends each device its
output tile's gradient; devices back-propagate through their stacks (exchanging input-gradient
halos at group boundaries, summed where halos overlap), then every device fetches every
device's weight gradients, sums them in rank order and applies the same optimizer step, so the
weights stay identical everywhere without a parameter server.

A training-mode BatchNorm splits its group into segments: every device returns its owned
positions' statistics, and the next segment's call on every device takes all of them (the same
all-gather as the weight gradients, at the size of a few floats per channel); backward does the
same with the sums BN's input gradient needs (``models/tile_norm.py``). Dropout masks and the
tail's random draws come from a per-step seed, so every tile and the tail see what one device
seeded alike would draw.

``TileHost`` is the device logic, free of Ray so tests can run it in-process;
``TileActor`` is the Ray actor. ``TiledStep`` drives one step over either.

A tile actor computes on ``compute_device`` with its GPU share, as a device actor does. What
crosses actors (tiles, halos, statistics, gradients, weights, optimizer state) travels as CPU
numpy arrays or tensors and moves to the tile's device on arrival; dropout masks are drawn on
the CPU, so a GPU tile draws the bits a CPU one does.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from flexray.data.datasets import Dataset, to_tensor
from flexray.errors import FlexrayError
from flexray.models.blocks import stages
from flexray.models.profile import profile_model
from flexray.models.tile_norm import TileNorm, dropout_mask, local_stats
from flexray.models.tiling import (
    LayerGeom, Region, assemble, feature_sizes, layer_geom, layer_stats, leaves, run_span, scatter_add)
from flexray.compute import compute_device
from flexray.schedule.tiling import FusedStack, TilingPlan

Batch = Any  # a float tensor holding the whole input batch, or row indices into the host's dataset


def split_model(model: nn.Module, fused: int) -> tuple[list[nn.Module], list[LayerGeom], nn.Sequential, list[int]]:
    """(fused layers, their geometry, the rest of the network, layer index after each fused stage)."""
    named = stages(model)
    if not 0 < fused < len(named):
        raise FlexrayError(f"config error: method.fused_stages: {fused} is out of range; the model has {len(named) - 1} stages before its classifier")
    layers, ends = [], []
    for name, stage in named[:fused]:
        for m in leaves(stage):
            if layer_geom(m) is None:
                raise FlexrayError(
                    f"config error: method.fused_stages: stage {name!r} has a {type(m).__name__}, which a tile cannot "
                    "compute alone; fuse fewer stages or use model cnn, vgg, darknet19 or torchvision:vgg11_bn")
            layers.append(m)
        ends.append(len(layers))
    geoms = [layer_geom(m) for m in layers]
    return layers, geoms, nn.Sequential(*(s for _, s in named[fused:])), ends  # type: ignore[return-value]


def fused_stack(model: nn.Module, input_shape: tuple[int, int, int], fused: int) -> FusedStack:
    """The planner's view of the fused layers: counted FLOPs per pixel, channels, tail cost."""
    layers, geoms, _, ends = split_model(model, fused)
    c, h, w = input_shape
    flops, chans = layer_stats(layers, c, (h, w))
    prof = profile_model(model, input_shape)
    head_fwd = sum(layer.fwd_flops for layer in prof.layers[fused:])
    total_fwd = prof.fwd_flops_per_sample or 1.0
    tail_train = prof.train_flops_per_sample * head_fwd / total_fwd  # the tail's share of counted training
    return FusedStack(tuple(geoms), tuple(flops), tuple(chans), (h, w), tail_train, prof.param_bytes, tuple(ends))


class TileHost:
    """One device: the model, its tile of every group, the optimizer."""

    def __init__(
        self, rank: int, model: nn.Module, fused: int, plan: TilingPlan, opt: dict[str, float],
        data: Dataset | None = None, threads: int | None = None, pace: Sequence[float] | None = None,
        measure_memory: bool = True, compute: str = "cpu", num_gpus: float = 0.0,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.dev = compute_device(compute, num_gpus)  # fleet.compute_device with this actor's GPU share
        self.rank, self.model, self.plan, self.data = rank, model.to(self.dev), plan, data
        self.layers, self.geoms, self.tail_net, _ = split_model(model, fused)
        self.params = list(model.parameters())
        self.param_ptrs = {p.data_ptr() for p in self.params}
        self.opt = torch.optim.SGD(self.params, lr=opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"])
        self.loss_fn = nn.CrossEntropyLoss()
        self.pace = list(pace) if pace else None  # sleep throttle: wall seconds per (forward, backward) of a step
        self.graphs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, TileNorm | None]] = {}
        self.pending: dict[int, torch.Tensor] = {}  # a segment's output waiting for its BN statistics
        self.norms: dict[int, tuple[torch.Tensor, TileNorm]] = {}  # a BN segment waiting for the gradient sums
        self.saved: dict[Any, int] = {}
        self.sizes = feature_sizes(self.geoms, plan.size) if plan.size != (0, 0) else []
        self.seed = 0
        self.calls = sum(len(plan.bounds(g)) - 1 for g in range(len(plan.groups)))  # forward calls per step
        self.measure_memory = measure_memory  # off for pure timing runs: the hook runs per saved tensor
        self.reset_stats()

    def info(self) -> dict[str, object]:
        return {"pid": os.getpid(), "rank": self.rank}

    def reset_stats(self) -> dict[str, float]:
        old = getattr(self, "stats", {})
        self.stats = {"compute_s": 0.0, "peak_activation_bytes": 0.0, "tail_activation_bytes": 0.0,
                      "loss_sum": 0.0, "steps": 0.0}
        return old

    def load(self, state: dict[str, torch.Tensor], opt_state: dict[str, Any] | None = None) -> None:
        self.model.load_state_dict(state)
        if opt_state is not None:
            self.opt.load_state_dict(opt_state)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def opt_state(self) -> dict[str, Any]:
        """The optimizer's state with its tensors on the CPU (it is checkpointed, and loads anywhere)."""
        sd = self.opt.state_dict()
        return {**sd, "state": {i: {k: v.to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                                for i, s in sd["state"].items()}}

    def checksum(self) -> float:
        return float(sum(p.detach().double().sum() for p in self.params))

    # ---- one step
    def _input(self, batch: Batch, region: Region) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):  # a copy: the device holds its tile, not the batch
            return batch[:, :, region.h0:region.h1, region.w0:region.w1].contiguous().to(self.dev)
        assert self.data is not None, "index batches need the host's dataset"
        x = self.data.x_train[batch][:, :, region.h0:region.h1, region.w0:region.w1]
        return to_tensor(np.ascontiguousarray(x), self.data.mean, self.data.std).to(self.dev)

    def _saving(self, bucket: Any) -> Any:
        """Measure activation memory: bytes of the non-parameter tensors autograd keeps for backward."""
        if not self.measure_memory:
            return contextlib.nullcontext()
        seen: set[int] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.param_ptrs and ptr not in seen:
                seen.add(ptr)
                self.saved[bucket] = self.saved.get(bucket, 0) + t.untyped_storage().nbytes()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def _dropout(self, a: int, tile_regions: Sequence[Region]) -> Any:
        """Training-mode dropout of group-relative layer i: this tile's slice of the whole map's mask."""
        def run(i: int, x: torch.Tensor) -> torch.Tensor:
            m, (h, w), r = self.layers[a + i], self.sizes[a + i], tile_regions[i]
            full = dropout_mask(self.seed * 1009 + a + i, (x.shape[0], x.shape[1], h, w), m.p, x.dtype)  # type: ignore[arg-type]
            return x * full[:, :, r.h0:r.h1, r.w0:r.w1].to(x.device)
        return run

    def forward(self, g: int, s: int, batch: Batch, seed: int, ids: Sequence[int], *parts: Any) -> Any:
        """Segment ``s`` of group ``g``: returns its output tile, or (when a BN follows) the
        owned positions' statistics; ``parts`` are halo tiles (s = 0) or every device's statistics."""
        t0 = time.perf_counter()
        tile = self.plan.tiles[g][self.rank]
        bounds = self.plan.bounds(g)
        a, lo, hi = bounds[0], bounds[s], bounds[s + 1]
        norm = None
        if s == 0 and g == 0:
            self.saved.clear()
            self.seed = seed
            x = self._input(batch, tile.input)
        elif s == 0:
            prev = self.plan.tiles[g - 1]
            x = assemble(tile.input, [(prev[u].output, p) for u, p in zip(ids, parts)]).to(self.dev).requires_grad_()
        else:
            x = self.pending.pop(g).detach().requires_grad_()
        with self._saving((g, s)):
            y = x
            if s:  # the BN this segment starts with, on the whole map's statistics
                own = tile.owned[lo - a].within(tile.regions[lo - a])  # type: ignore[union-attr]
                norm, y = TileNorm.apply(self.layers[lo], x, parts, own)  # type: ignore[arg-type]
                if tile.regions[lo - a + 1] != tile.regions[lo - a]:
                    y = y[(..., *tile.regions[lo - a + 1].within(tile.regions[lo - a]))]
                lo += 1
            out = run_span(self.layers[a:], self.geoms[a:], tile, lo - a, hi - a, y, self._dropout(a, tile.regions))
        self.graphs[(g, s)] = (x, out, norm)
        last = s == len(bounds) - 2
        if g == len(self.plan.groups) - 1 and last:
            self.stats["peak_activation_bytes"] = max(self.stats["peak_activation_bytes"], float(sum(self.saved.values())))
        self._spent(t0, 0)
        if not last:
            self.pending[g] = out
            return local_stats(out[(..., *tile.owned[hi - a].within(tile.regions[hi - a]))])  # type: ignore[union-attr]
        return out.detach().cpu().numpy()

    def tail(self, y: Batch, *parts: np.ndarray) -> Any:
        """Rest of the network on the assembled map (device 0); returns the gradient of each
        device's output tile (one Ray return per tile, so each device fetches only its own)."""
        t0 = time.perf_counter()
        last = self.plan.tiles[-1]
        full = Region(0, max(t.output.h1 for t in last), 0, max(t.output.w1 for t in last))
        fmap = assemble(full, [(t.output, p) for t, p in zip(last, parts)]).to(self.dev).requires_grad_()
        labels = y if isinstance(y, torch.Tensor) else torch.as_tensor(self.data.y_train[y], dtype=torch.long)  # type: ignore[union-attr]
        labels = labels.to(self.dev)
        self.saved[-1] = 0
        rng = [self.dev.index or 0] if self.dev.type == "cuda" else []  # the step's seed, not this process's stream
        with self._saving(-1), torch.random.fork_rng(devices=rng):
            torch.manual_seed(self.seed)
            loss = self.loss_fn(self.tail_net(fmap), labels)
        loss.backward()
        self.stats["tail_activation_bytes"] = max(self.stats["tail_activation_bytes"], float(self.saved.pop(-1)))
        self.stats["loss_sum"] += float(loss.detach())
        grad = fmap.grad.cpu().numpy()  # type: ignore[union-attr]
        tiles = [np.ascontiguousarray(grad[(..., *t.output.within(full))]) for t in last]
        self.stats["compute_s"] += time.perf_counter() - t0
        return tiles if len(tiles) > 1 else tiles[0]

    def backward(self, g: int, s: int, ids: Sequence[int], *parts: Any) -> Any:
        """Back-propagate segment ``s`` of group ``g``; returns the BN gradient sums (s > 0),
        the input-gradient (s = 0), or for group 0 every weight gradient. ``parts`` are the
        output gradient's pieces (last segment) or every device's sums for the next BN."""
        t0 = time.perf_counter()
        x, out, norm = self.graphs.pop((g, s))
        tile = self.plan.tiles[g][self.rank]
        if s < len(self.plan.bounds(g)) - 2:
            nx, nnorm = self.norms.pop(g)
            grad = nnorm.input_grad(nx.grad, parts)
        elif g == len(self.plan.groups) - 1:
            grad = torch.from_numpy(np.array(parts[0])).to(self.dev)
        else:
            nxt = self.plan.tiles[g + 1]
            grad = scatter_add(tile.output, [(nxt[u].input, p) for u, p in zip(ids, parts)]).to(self.dev)
        if out.requires_grad:
            out.backward(grad)
        self.saved.pop((g, s), None)
        self._spent(t0, 1)
        if s:
            self.norms[g] = (x, norm)  # type: ignore[assignment]
            return norm.local_sums()  # type: ignore[union-attr]
        if g:
            return x.grad.cpu().numpy()  # type: ignore[union-attr]
        self.stats["steps"] += 1
        return [None if p.grad is None else p.grad.detach().to("cpu", copy=True).numpy() for p in self.params]

    def step(self, *grads: list[np.ndarray | None]) -> None:
        """The all-reduce's end: sum every device's weight gradients in rank order, then step."""
        for i, p in enumerate(self.params):
            got = [g[i] for g in grads if g[i] is not None]
            p.grad = torch.from_numpy(np.sum(got, axis=0)).to(p.device) if got else None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def _spent(self, t0: float, phase: int) -> None:
        wall = time.perf_counter() - t0
        self.stats["compute_s"] += wall
        if self.pace is not None:  # sleep throttle: this group's share of the device's predicted compute
            time.sleep(max(0.0, self.pace[phase] / self.calls - wall))


TileActor = ray.remote(TileHost)


class TiledStep:
    """Runs training steps over hosts: Ray actor handles, or in-process ``TileHost``s."""

    def __init__(self, plan: TilingPlan, hosts: Sequence[Any], seed: int = 0) -> None:
        self.plan, self.hosts = plan, list(hosts)
        self.remote = not isinstance(self.hosts[0], TileHost)
        n, groups = plan.n_tiles, len(plan.groups)
        if len(self.hosts) != n:
            raise ValueError(f"{n} tiles need {n} hosts, got {len(self.hosts)}")
        tiles = plan.tiles
        # who reads whose output (forward) and whose input-gradient (backward), per boundary
        self.fwd_src = [[[u for u in range(n) if tiles[g - 1][u].output.overlap(tiles[g][t].input)] for t in range(n)]
                        for g in range(1, groups)]
        self.bwd_src = [[[u for u in range(n) if tiles[g + 1][u].input.overlap(tiles[g][t].output)] for t in range(n)]
                        for g in range(groups - 1)]
        self.segments = [len(plan.bounds(g)) - 1 for g in range(groups)]
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Step k draws its dropout masks and tail randomness from ``seed`` and k."""
        self.seed, self.count = seed, 0

    def call(self, rank: int, name: str, *args: Any) -> Any:
        host = self.hosts[rank]
        return getattr(host, name).remote(*args) if self.remote else getattr(host, name)(*args)

    def get(self, refs: Any) -> Any:
        return ray.get(refs) if self.remote else refs

    def all(self, name: str, *args: Any) -> list[Any]:
        return self.get([self.call(r, name, *args) for r in range(len(self.hosts))])

    def step_seed(self) -> int:
        return (self.seed * 1_000_003 + self.count) % 2**40

    def backprop(self, x: Batch, y: Batch) -> tuple[list[Any], list[Any]]:
        """Queue one forward/backward: (the last group's output tiles, every device's weight gradients)."""
        n, groups = self.plan.n_tiles, len(self.plan.groups)
        seed = self.step_seed()
        self.count += 1
        outs: list[list[Any]] = []
        for g in range(groups):
            if g == 0:
                cur = [self.call(t, "forward", 0, 0, x, seed, ()) for t in range(n)]
            else:
                src = self.fwd_src[g - 1]
                cur = [self.call(t, "forward", g, 0, None, seed, tuple(src[t]), *(outs[g - 1][u] for u in src[t]))
                       for t in range(n)]
            for s in range(1, self.segments[g]):  # each BN: every device takes every device's statistics
                cur = [self.call(t, "forward", g, s, None, seed, (), *cur) for t in range(n)]
            outs.append(cur)
        if self.remote:
            tail = self.hosts[0].tail.options(num_returns=n).remote(y, *outs[-1])
        else:
            tail = self.hosts[0].tail(y, *outs[-1])
        tail = tail if n > 1 else [tail]
        grads: list[Any] = [None] * groups
        for g in reversed(range(groups)):
            last = self.segments[g] - 1
            if g == groups - 1:
                cur = [self.call(t, "backward", g, last, (t,), tail[t]) for t in range(n)]
            else:
                src = self.bwd_src[g]
                cur = [self.call(t, "backward", g, last, tuple(src[t]), *(grads[g + 1][u] for u in src[t])) for t in range(n)]
            for s in reversed(range(last)):  # each BN: every device takes every device's gradient sums
                cur = [self.call(t, "backward", g, s, (), *cur) for t in range(n)]
            grads[g] = cur
        return outs[-1], grads[0]

    def apply(self, grads: list[Any]) -> list[Any]:
        """Every device sums every device's gradients (all-reduce) and steps; returns the calls."""
        return [self.call(t, "step", *grads) for t in range(self.plan.n_tiles)]

    def step(self, x: Batch, y: Batch) -> list[Any]:
        """Queue one training step; returns the step calls (wait on them with ``get``)."""
        return self.apply(self.backprop(x, y)[1])
