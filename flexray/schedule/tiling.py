"""Planner for tiled, fused training: which grid and which layer grouping to run.

Cost of one training step (batch B) on devices holding one tile each, as a sequence of phases,
each as long as its slowest device (the paper's synchronous schedule):

- input scatter: every device receives its input tile (with halo);
- per group: forward compute (FLOPs of the pixels it computes, halo included), then at a group
  boundary a halo exchange (each device sends the parts of its output tile other tiles read);
- the rest of the network on device 0 (it receives every output tile, sends their gradients);
- per group in reverse: backward compute (2x forward) and the reverse halo exchange;
- a ring all-reduce of the weight gradients (2 (n-1)/n of the weights through every radio);
- per BatchNorm in a fused group, two all-gathers (forward: count, sum, centred sum of squares
  per channel; backward: sum of dy and of dy * xhat), each a phase of its own in which every
  device sends its small record to and receives one from every other device.

Radios are half duplex (Wi-Fi), so a device's exchange time is send + receive, plus a fixed
``message_s`` per message it sends or receives (radio round trip, task hop: on 2 real actors
here a boundary costs ~10 ms whatever its bytes). Grouping cuts the halo growth of a deep fused
stack (less redundant compute, less memory) at the price of an exchange per boundary; the
planner weighs both with the device profiles and picks the minimum.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from flexray.errors import FlexrayError
from flexray.models.tiling import LayerGeom, Pair, TileSpec, feature_sizes, plan_tiles
from flexray.models.kernels import pad_lanes
from flexray.protocol import DeviceProfile, Workload, compute_seconds

BYTES = 4  # float32 activations and gradients
BACKWARD = 2.0  # backward FLOPs per forward FLOP (input grad + weight grad)
MAX_CUTS = 12  # beyond this many cut candidates, cut only at stage boundaries
MESSAGE_S = 0.003  # a Wi-Fi round trip / a Ray task hop: what a profile without ``rtt_s`` pays per message
_KIND = {"conv": "conv", "maxpool": "pool", "avgpool": "pool", "bn": "norm"}  # geometry kind -> kernel kind
STAT_BYTES = 8  # BatchNorm statistics travel as float64


@dataclass(frozen=True)
class FusedStack:
    """What the planner knows about the fused layers (from the counted per-layer profile)."""

    geoms: tuple[LayerGeom, ...]
    flops_px: tuple[float, ...]  # forward FLOPs per output pixel per sample, per layer
    channels: tuple[int, ...]  # channels of each layer's input, then of the last output
    size: Pair  # input H, W
    tail_train_flops: float  # per sample: forward + backward of everything after the stack
    param_bytes: int  # the whole model's weights (what the all-reduce moves)
    stage_ends: tuple[int, ...] = ()  # layer index after each fused stage (preferred cuts)

    @property
    def sizes(self) -> list[Pair]:
        return feature_sizes(self.geoms, self.size)


@dataclass(frozen=True)
class DeviceCost:
    compute_s: float
    comm_s: float
    flops: float
    bytes_down: int
    bytes_up: int
    activation_bytes: int  # fused-layer activations kept for backward (predicted)
    messages: int = 0  # messages sent + received per step


@dataclass(frozen=True)
class TilingPlan:
    grid: Pair
    groups: tuple[Pair, ...]  # [start, end) layer ranges
    tiles: tuple[tuple[TileSpec, ...], ...]  # per group, row-major; tile t runs on device t
    step_s: float  # predicted step time
    devices: tuple[DeviceCost, ...] = field(default=())
    redundant: float = 0.0  # fraction of fused FLOPs computed more than once (halos)
    syncs: tuple[tuple[int, ...], ...] = ()  # per group, the BatchNorm layers whose statistics are all-reduced
    size: Pair = (0, 0)  # the fused stack's input H, W

    def bounds(self, g: int) -> list[int]:
        """Layer bounds of group ``g``'s segments: a segment ends where a BN all-reduce starts."""
        a, b = self.groups[g]
        return [a, *(self.syncs[g] if self.syncs else ()), b]

    @property
    def n_tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    def describe(self) -> dict[str, object]:
        return {"grid": list(self.grid), "groups": [list(g) for g in self.groups],
                "predicted_step_s": self.step_s, "redundant_fraction": self.redundant}


class _Model:
    """Cached pieces of the cost model for one stack, fleet and batch."""

    def __init__(self, stack: FusedStack, devices: Sequence[tuple[DeviceProfile, float]], batch: int,
                 message_s: float | None = None) -> None:
        self.stack, self.devices, self.batch, self.message_s = stack, list(devices), batch, message_s
        self.sizes = stack.sizes
        self.tiles = lru_cache(maxsize=None)(self._tiles)

    def _tiles(self, a: int, b: int, grid: Pair) -> tuple[TileSpec, ...]:
        return tuple(plan_tiles(self.stack.geoms[a:b], self.sizes[a], grid))

    def flops(self, a: int, tile: TileSpec) -> float:
        """Forward FLOPs of a tile of group starting at layer ``a`` (its halo pixels included)."""
        return self.batch * sum(f * r.area for f, r in zip(self.stack.flops_px[a:], tile.regions[1:]))

    def saved(self, a: int, tile: TileSpec) -> int:
        """Activation bytes a tile keeps for backward: every layer's input region."""
        return self.batch * BYTES * sum(c * r.area for c, r in zip(self.stack.channels[a:], tile.regions[:-1]))

    def exchange(self, prev: Sequence[TileSpec], nxt: Sequence[TileSpec], chans: int) -> tuple[list[int], list[int], list[int]]:
        """(sent bytes, received bytes, messages) per device when ``nxt`` tiles gather their
        inputs from ``prev`` outputs."""
        n = len(prev)
        sent, recv, msgs = [0] * n, [0] * n, [0] * n
        for u, t in itertools.product(range(n), range(n)):
            if u != t and (ov := prev[u].output.overlap(nxt[t].input)) is not None:
                b = self.batch * BYTES * chans * ov.area
                sent[u] += b
                recv[t] += b
                msgs[u] += 1
                msgs[t] += 1
        return sent, recv, msgs

    def work(self, a: int, tile: TileSpec, backward: bool = False) -> Workload:
        """A tile's kernels for the latency model: per layer one forward kernel (or one backward,
        ``BACKWARD`` x its FLOPs, reading and writing twice the bytes) on the tile's regions."""
        st, out = self.stack, Workload()
        for j, (f, r_in, r_out) in enumerate(zip(st.flops_px[a:], tile.regions[:-1], tile.regions[1:]), start=a):
            geom, c_in, c_out = st.geoms[j], st.channels[j], st.channels[j + 1]
            counted = self.batch * f * r_out.area
            executed = counted * (pad_lanes(c_out) if geom.kind == "conv" else 1.0)
            moved = self.batch * BYTES * (c_in * r_in.area + c_out * r_out.area)
            k = BACKWARD if backward else 1.0
            out = out + Workload.kernel(_KIND.get(geom.kind, "memory"), k * counted, k * executed,
                                        (2.0 if backward else 1.0) * moved, self.batch * (c_in if backward else c_out))
        return out

    def radio_s(self, dev: int, sent: float, recv: float, msgs: int) -> float:
        prof, _ = self.devices[dev]
        per_message = self.message_s if self.message_s is not None else (prof.rtt_s or MESSAGE_S)
        return 8.0 * sent / prof.uplink_bps + 8.0 * recv / prof.downlink_bps + msgs * per_message

    def compute_s(self, dev: int, work: Workload) -> float:
        prof, speed = self.devices[dev]
        return compute_seconds(prof, work, speed)

    def evaluate(self, grid: Pair, groups: Sequence[Pair]) -> TilingPlan:
        st, n = self.stack, grid[0] * grid[1]
        tiles = [self.tiles(a, b, grid) for a, b in groups]
        syncs = tuple(tuple(j for j in range(a, b) if st.geoms[j].kind == "bn") for a, b in groups)
        comp = [0.0] * n
        comm = [0.0] * n
        flops = [0.0] * n
        down, up, act, messages = [0] * n, [0] * n, [0] * n, [0] * n
        step = 0.0

        def phase_comm(sent: Sequence[int], recv: Sequence[int], msgs: Sequence[int]) -> float:
            times = [self.radio_s(d, sent[d], recv[d], msgs[d]) for d in range(n)]
            for d in range(n):
                comm[d] += times[d]
                up[d] += sent[d]
                down[d] += recv[d]
                messages[d] += msgs[d]
            return max(times)

        def phase_compute(work: Sequence[Workload]) -> float:
            times = [self.compute_s(d, work[d]) for d in range(n)]
            for d in range(n):
                comp[d] += times[d]
                flops[d] += work[d].counted
            return max(times)

        in_bytes = [self.batch * BYTES * st.channels[0] * t.input.area for t in tiles[0]]
        step += phase_comm([0] * n, in_bytes, [1] * n)  # the camera / data source scatters the input tiles
        boundaries = []
        for gi, ((a, _), ts) in enumerate(zip(groups, tiles)):
            if gi:
                boundaries.append(self.exchange(tiles[gi - 1], ts, st.channels[a]))
                step += 2 * phase_comm(*boundaries[-1])  # forward halos now, their gradients later
            step += phase_compute([self.work(a, t) for t in ts])
            step += phase_compute([self.work(a, t, backward=True) for t in ts])
            for j in syncs[gi] if n > 1 else ():  # BN statistics all-gathers: forward (3 C), backward (2 C)
                for words in (3, 2):
                    b = words * STAT_BYTES * st.channels[j] * (n - 1)
                    step += phase_comm([b] * n, [b] * n, [2 * (n - 1)] * n)
            for d, t in enumerate(ts):
                act[d] += self.saved(a, t)
        out_bytes = [self.batch * BYTES * st.channels[-1] * t.output.area for t in tiles[-1]]
        to_tail = [0] * n if n == 1 else [0, *out_bytes[1:]]
        to_tail_msgs = [n - 1] + [1] * (n - 1) if n > 1 else [0]
        step += 2 * phase_comm(to_tail, [sum(to_tail)] + [0] * (n - 1), to_tail_msgs)  # outputs in, gradients out
        # the tail is known by its FLOPs only (coarse); it is the small classifier end of the model
        step += phase_compute([Workload.coarse(self.batch * st.tail_train_flops)] + [Workload()] * (n - 1))
        if n > 1:
            ring = int(2 * (n - 1) / n * st.param_bytes)
            step += phase_comm([ring] * n, [ring] * n, [2 * (n - 1)] * n)
        full = self.batch * sum(f * h * w for f, (h, w) in zip(st.flops_px, self.sizes[1:]))
        computed = sum(self.flops(a, t) for (a, _), ts in zip(groups, tiles) for t in ts)
        costs = tuple(DeviceCost(comp[d], comm[d], flops[d], down[d], up[d], act[d], messages[d]) for d in range(n))
        return TilingPlan(grid, tuple(groups), tuple(tiles), step, costs, max(0.0, 1 - full / computed) if computed else 0.0,
                          syncs, st.size)


def grids(n_devices: int, out: Pair) -> list[Pair]:
    """Every rows x cols grid that uses at most ``n_devices`` tiles and fits the output."""
    return [(r, c) for r in range(1, n_devices + 1) for c in range(1, n_devices // r + 1) if r <= out[0] and c <= out[1]]


def groupings(stack: FusedStack) -> list[tuple[Pair, ...]]:
    """Contiguous groupings; a group starts at a conv or pool (activations stay with their layer)."""
    n = len(stack.geoms)
    cuts = [i for i in range(1, n) if stack.geoms[i].kind in ("conv", "maxpool", "avgpool")]
    if len(cuts) > MAX_CUTS:
        cuts = [i for i in stack.stage_ends if 0 < i < n]
    out = []
    for k in range(len(cuts) + 1):
        for chosen in itertools.combinations(cuts, k):
            edges = [0, *chosen, n]
            out.append(tuple(itertools.pairwise(edges)))
    return out


def choose_plan(
    stack: FusedStack, devices: Sequence[tuple[DeviceProfile, float]], batch: int,
    grid: Pair | None = None, groups: Sequence[Pair] | None = None, all_devices: bool = False,
    message_s: float | None = None,
) -> TilingPlan:
    """The plan with the least predicted step time among those whose activations fit every
    device's memory (the least-memory one when none fits); fixed ``grid``/``groups`` are kept.
    The planner may leave slow-radio devices out unless ``all_devices``; ``message_s`` overrides
    the devices' own ``rtt_s`` per message."""
    model = _Model(stack, devices, batch, message_s)
    out = stack.sizes[-1]
    cands_grid = [grid] if grid else [g for g in grids(len(devices), out) if not all_devices or g[0] * g[1] == len(devices)]
    if not cands_grid:
        raise FlexrayError(f"tiling: no grid of {len(devices)} tiles fits the {out[0]}x{out[1]} output")
    cands_groups = [tuple(groups)] if groups else groupings(stack)
    if grid and grid[0] * grid[1] > len(devices):
        raise FlexrayError(f"config error: method.grid: {grid[0]}x{grid[1]} tiles need as many devices; the fleet has {len(devices)}")
    plans = [model.evaluate(g, gr) for g in cands_grid for gr in cands_groups]

    def fits(p: TilingPlan) -> bool:
        return all(c.activation_bytes + 3 * stack.param_bytes <= devices[d][0].memory_bytes for d, c in enumerate(p.devices))

    ok = [p for p in plans if fits(p)]
    if ok:
        return min(ok, key=lambda p: (round(p.step_s, 9), p.n_tiles, len(p.groups)))  # ties: fewer tiles, groups
    return min(plans, key=lambda p: max(c.activation_bytes for c in p.devices))


def speed_order(devices: Sequence[tuple[DeviceProfile, float]]) -> list[int]:
    """Devices fastest first: uneven splits give the first tiles a pixel more."""
    return sorted(range(len(devices)), key=lambda i: (-devices[i][0].flops * devices[i][1], i))


__all__ = ["MESSAGE_S", "DeviceCost", "FusedStack", "TilingPlan", "choose_plan", "grids", "groupings", "speed_order"]
