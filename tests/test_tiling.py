"""Tile geometry and the tiled executor, in-process and in float64: tiled == single device."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from flexray.errors import FlexrayError
from flexray.fleet.profiles import CATALOG
from flexray.models.tiling import LayerGeom, Region, feature_sizes, layer_geom, plan_tiles, split
from flexray.runtime.tiled import TiledStep, TileHost, fused_stack, split_model
from flexray.schedule.tiling import choose_plan, groupings

OPT = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}


def random_model(rng: random.Random, channels: int = 2, size: int = 23) -> tuple[nn.Sequential, int]:
    """2-3 fused stages of random conv (kernel, stride, padding, dilation) + activation + pool,
    then a linear classifier; returns the model and its fused-stage count."""
    stages, c, s = [], channels, (size, size)
    for _ in range(rng.randint(2, 3)):
        layers = []
        for _ in range(rng.randint(1, 2)):
            k = rng.choice([1, 2, 3, 5])
            g = LayerGeom("conv", (k, k), (rng.choice([1, 1, 2]),) * 2, (rng.randint(0, k // 2 + 1),) * 2, (rng.choice([1, 2]),) * 2)
            if min(g.out_size(s)) < 3:
                g = LayerGeom("conv", (3, 3), (1, 1), (1, 1), (1, 1))
            out = rng.randint(2, 4)
            layers += [nn.Conv2d(c, out, g.kernel, g.stride, g.padding, g.dilation), rng.choice([nn.ReLU(), nn.Tanh()])]
            c, s = out, g.out_size(s)
        k = rng.choice([2, 3])
        pool = rng.choice([nn.MaxPool2d(k, rng.randint(1, k), rng.randint(0, k // 2), dilation=rng.choice([1, 2])),
                           nn.AvgPool2d(k, rng.randint(1, k), rng.randint(0, k // 2))])
        ps = layer_geom(pool).out_size(s)
        if min(ps) >= 2:
            layers.append(pool)
            s = ps
        stages.append(nn.Sequential(*layers))
    head = nn.Sequential(nn.Flatten(1), nn.Linear(c * s[0] * s[1], 3))
    return nn.Sequential(*stages, head).double(), len(stages)


def hosts_for(model: nn.Module, fused: int, plan, data=None) -> list[TileHost]:
    return [TileHost(r, copy.deepcopy(model), fused, plan, OPT, data) for r in range(plan.n_tiles)]


def test_split_covers_unevenly():
    assert split(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split(5, 5) == [(i, i + 1) for i in range(5)]


def test_halo_regions_by_hand():
    # two 3x3/pad-1 convs on 8x8 split in two rows: each tile needs 2 extra rows (one per conv)
    g = LayerGeom("conv", (3, 3), (1, 1), (1, 1), (1, 1))
    top, bottom = plan_tiles([g, g], (8, 8), (2, 1))
    assert top.output == Region(0, 4, 0, 8) and bottom.output == Region(4, 8, 0, 8)
    assert top.regions[1] == Region(0, 5, 0, 8) and top.input == Region(0, 6, 0, 8)
    assert bottom.regions[1] == Region(3, 8, 0, 8) and bottom.input == Region(2, 8, 0, 8)
    assert top.pads[0] == (1, 1, 1, 0) and bottom.pads[0] == (1, 1, 0, 1)  # (left, right, top, bottom)
    # a stride-2 pool halves the region; the conv row/col 8 the pool's floor drops is never computed
    p = LayerGeom("maxpool", (2, 2), (2, 2))
    tiles = plan_tiles([g, p], (9, 9), (2, 2))
    assert [t.output for t in tiles] == [Region(0, 2, 0, 2), Region(0, 2, 2, 4), Region(2, 4, 0, 2), Region(2, 4, 2, 4)]
    assert tiles[3].input == Region(3, 9, 3, 9) and tiles[3].pads[0] == (0, 0, 0, 0)
    assert tiles[0].input == Region(0, 5, 0, 5) and tiles[0].pads[0] == (1, 0, 1, 0)


def test_grid_finer_than_output_is_a_one_line_error():
    with pytest.raises(FlexrayError, match="method.grid"):
        plan_tiles([LayerGeom("maxpool", (2, 2), (2, 2))], (4, 4), (3, 1))


@pytest.mark.parametrize("seed", range(12))
def test_tiled_equals_single_device_float64(seed, one_torch_thread):
    """Random stacks, grids (uneven) and groupings: forward output, every weight gradient, and
    the weights after 3 SGD-momentum steps equal the single-device ones (tol 1e-5, float64)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model, fused = random_model(rng)
    layers, geoms, tail, _ = split_model(model, fused)
    out_size = feature_sizes(geoms, (23, 23))[-1]
    grid = (rng.randint(1, min(3, out_size[0])), rng.randint(1, min(3, out_size[1])))
    stack = fused_stack(model, (2, 23, 23), fused)
    grouping = rng.choice(groupings(stack))
    devices = [(CATALOG["rpi3"], 1.0)] * (grid[0] * grid[1])
    plan = choose_plan(stack, devices, 4, grid=grid, groups=grouping)
    runner = TiledStep(plan, hosts_for(model, fused, plan))

    ref = copy.deepcopy(model)
    layers, _, tail, _ = split_model(ref, fused)
    opt = torch.optim.SGD(ref.parameters(), **OPT)
    for step in range(3):
        x = torch.randn(4, 2, 23, 23, dtype=torch.float64)
        y = torch.randint(0, 3, (4,))
        fmap = x
        for m in layers:
            fmap = m(fmap)
        loss = nn.functional.cross_entropy(tail(fmap), y)
        opt.zero_grad()
        loss.backward()
        outs, grads = runner.backprop(x, y)
        if step == 0:  # fused-stack output and each device's summed weight gradients
            got = torch.zeros_like(fmap)
            for t, o in zip(plan.tiles[-1], outs):
                got[(..., *t.output.within(Region(0, fmap.shape[2], 0, fmap.shape[3])))] = torch.from_numpy(o)
            torch.testing.assert_close(got, fmap.detach(), atol=1e-5, rtol=0)
            for i, p in enumerate(ref.parameters()):
                total = torch.as_tensor(sum(g[i] for g in grads if g[i] is not None))
                torch.testing.assert_close(total, p.grad, atol=1e-5, rtol=0)
        opt.step()
        runner.apply(grads)
    for host in runner.hosts:
        for a, b in zip(host.model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_memory_and_redundancy_shrink_with_tiles(one_torch_thread):
    """Measured saved-activation bytes per device fall roughly as 1/N; halos add redundant compute."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                        nn.MaxPool2d(2)), nn.Sequential(nn.Flatten(1), nn.Linear(8 * 16 * 16, 4)))
    stack = fused_stack(model, (3, 32, 32), 1)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    peaks, plans = {}, {}
    for n, grid in ((1, (1, 1)), (4, (2, 2))):
        plans[n] = choose_plan(stack, [(CATALOG["rpi3"], 1.0)] * n, 2, grid=grid, groups=[(0, 5)])
        runner = TiledStep(plans[n], hosts_for(model, 1, plans[n]))
        runner.step(x, y)
        peaks[n] = max(h.stats["peak_activation_bytes"] for h in runner.hosts)
    assert peaks[4] <= 1.3 * peaks[1] / 4
    assert plans[1].redundant == 0.0 and 0.0 < plans[4].redundant < 0.3
    assert plans[4].step_s > 0 and all(d.activation_bytes > 0 for d in plans[4].devices)


def test_planner_prefers_grouping_when_halos_are_costly():
    """A deep stack of 5x5 convs on a 4-device fast-radio fleet: with cheap messages regrouping
    beats one fused group; when every message costs a lot, the planner stops regrouping."""
    layers = [m for _ in range(6) for m in (nn.Conv2d(8, 8, 5, padding=2), nn.ReLU())]
    model = nn.Sequential(nn.Sequential(*layers), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 2)))
    stack = fused_stack(model, (8, 32, 32), 1)
    devs = [(CATALOG["rpi4"], 1.0)] * 4
    best = choose_plan(stack, devs, 8, message_s=0.0)
    single = choose_plan(stack, devs, 8, groups=[(0, len(layers))], message_s=0.0)
    assert best.step_s <= single.step_s
    assert best.redundant < single.redundant
    assert len(best.groups) > 1 and best.n_tiles > 1
    slow_msgs = choose_plan(stack, devs, 8, grid=best.grid, message_s=10.0)
    assert len(slow_msgs.groups) == 1
    assert choose_plan(stack, devs, 8, grid=best.grid, groups=best.groups, message_s=0.5).step_s > best.step_s + 0.5


def test_untileable_stage_is_a_one_line_error():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.Sequential(nn.Flatten(1), nn.Linear(4, 2)))
    with pytest.raises(FlexrayError, match="method.fused_stages.*BatchNorm2d"):
        split_model(model, 1)
