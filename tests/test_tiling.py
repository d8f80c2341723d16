"""Tile geometry and the tiled executor, in-process and in float64: tiled == single device."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from flexray.config import ModelConfig
from flexray.errors import FlexrayError
from flexray.fleet.profiles import CATALOG
from flexray.models import build_model
from flexray.models.blocks import Head
from flexray.models.tile_norm import dropout_mask
from flexray.models.tiling import LayerGeom, Region, feature_sizes, layer_geom, plan_tiles, run_tile, split
from flexray.tiled.actor import TiledStep, TileHost, fused_stack, split_model
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
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2)),
                          nn.Sequential(nn.Flatten(1), nn.Linear(4, 2)))
    with pytest.raises(FlexrayError, match="method.fused_stages.*Upsample.*darknet19") as err:
        split_model(model, 1)
    assert "\n" not in str(err.value)


def tiled_vs_single(model: nn.Module, fused: int, shape: tuple[int, int, int], grid, groups, batch: int = 4,
                    seed: int = 7) -> float:
    """Max abs difference between one tiled step and one device's (float64): the fused output,
    every summed weight gradient, and every host's fused BatchNorm running statistics. The
    reference applies the masks ``dropout_mask`` draws for the step's seed to the fused dropouts."""
    stack = fused_stack(model, shape, fused)
    plan = choose_plan(stack, [(CATALOG["rpi3"], 1.0)] * (grid[0] * grid[1]), batch, grid=grid, groups=groups)
    hosts = hosts_for(model, fused, plan)
    runner = TiledStep(plan, hosts, seed=seed)
    step_seed = runner.step_seed()
    ref = copy.deepcopy(model)
    layers, _, tail, _ = split_model(ref, fused)
    x, y = torch.randn(batch, *shape, dtype=torch.float64), torch.randint(0, 3, (batch,))
    fmap = x
    for i, m in enumerate(layers):
        drop = isinstance(m, nn.Dropout)
        fmap = fmap * dropout_mask(step_seed * 1009 + i, fmap.shape, m.p, fmap.dtype) if drop else m(fmap)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed)
        nn.functional.cross_entropy(tail(fmap), y).backward()
    outs, grads = runner.backprop(x, y)
    full = Region(0, fmap.shape[2], 0, fmap.shape[3])
    diffs = [(torch.from_numpy(o) - fmap[(..., *t.output.within(full))]).abs().max() for t, o in zip(plan.tiles[-1], outs)]
    for i, p in enumerate(ref.parameters()):
        diffs.append((torch.as_tensor(sum(g[i] for g in grads if g[i] is not None)) - p.grad).abs().max())
    fused_bn = [m for m in layers if isinstance(m, nn.BatchNorm2d)]
    for h in hosts:
        mine = [m for m in h.layers if isinstance(m, nn.BatchNorm2d)]
        for a, b in zip(mine, fused_bn):
            diffs += [(a.running_mean - b.running_mean).abs().max(), (a.running_var - b.running_var).abs().max(),
                      (a.num_batches_tracked - b.num_batches_tracked).abs().double()]
    assert len(fused_bn) == 0 or any(b.num_batches_tracked == 1 for b in fused_bn)
    return float(max(d.detach() for d in diffs))


def bn_model(rng: random.Random, size: int = 19) -> nn.Sequential:
    """Random fused stages of conv - BatchNorm - in-place LeakyReLU/ReLU (- dropout) - pool."""
    stages, c, s = [], 2, (size, size)
    for i in range(3):
        out = rng.randint(2, 4)
        k = rng.choice([1, 3, 5])
        layers = [nn.Conv2d(c, out, k, padding=k // 2, bias=rng.random() < 0.5), nn.BatchNorm2d(out),
                  rng.choice([nn.LeakyReLU(0.1, inplace=True), nn.ReLU(inplace=True)])]
        s = layer_geom(layers[0]).out_size(s)
        if i == 1:
            layers.append(nn.Dropout(0.3))
        if min(s) >= 4:
            layers.append(nn.MaxPool2d(2))
            s = (s[0] // 2, s[1] // 2)
        stages.append(nn.Sequential(*layers))
        c = out
    return nn.Sequential(*stages, nn.Sequential(nn.Flatten(1), nn.Linear(c * s[0] * s[1], 3))).double()


@pytest.mark.parametrize("seed", range(4))
def test_batchnorm_dropout_inplace_tiles_equal_single_device(seed, one_torch_thread):
    """BN (all-reduced statistics over owned positions), in-place activations and dropout (the
    whole map's mask, sliced) inside fused groups, random grids and groupings: tiled == one device."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = bn_model(rng)
    stack = fused_stack(model, (2, 19, 19), 3)
    out = stack.sizes[-1]
    grid = (rng.randint(1, min(3, out[0])), rng.randint(1, min(3, out[1])))
    diff = tiled_vs_single(model, 3, (2, 19, 19), grid, rng.choice(groupings(stack)))
    assert diff <= 1e-5, f"max abs diff {diff:.3g} (grid {grid})"


def test_vgg11_bn_tiles_equal_single_device(one_torch_thread):
    """torchvision's vgg11_bn (in-place ReLU, BN after every conv): its first four feature stages
    tiled 2x2 in two groups. Its 100M-weight classifier runs untiled on device 0 either way, so it
    is swapped for a linear head to keep three float64 copies small."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="torchvision:vgg11_bn"), (3, 32, 32), 3)
    model.head = Head(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(512, 3))
    model = model.double()
    assert isinstance(model.features0[2], nn.ReLU) and model.features0[2].inplace
    diff = tiled_vs_single(model, 4, (3, 32, 32), (2, 2), [(0, 8), (8, 15)], batch=2)
    print(f"vgg11_bn max abs diff {diff:.3g}")
    assert diff <= 1e-5, f"vgg11_bn: max abs diff {diff:.3g}"


def test_darknet19_tiles_equal_single_device(one_torch_thread):
    """The zoo's Darknet-19 (conv - BN - LeakyReLU(0.1) throughout), width 4: three stages tiled 3x1."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="darknet19", width=4), (3, 24, 24), 3).double()
    assert isinstance(model.conv3[5], nn.LeakyReLU) and model.conv3[5].negative_slope == 0.1
    diff = tiled_vs_single(model, 3, (3, 24, 24), (3, 1), [(0, 8), (8, 18)])
    print(f"darknet19 max abs diff {diff:.3g}")
    assert diff <= 1e-5, f"darknet19: max abs diff {diff:.3g}"


def test_eval_mode_batchnorm_is_pointwise_on_tiles():
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.MaxPool2d(2)]
    for m in layers:
        m.eval()
    layers[1].running_mean.uniform_()
    geoms = [layer_geom(m) for m in layers]
    x = torch.randn(2, 2, 10, 10)
    ref = nn.Sequential(*copy.deepcopy(layers))(x)
    for t in plan_tiles(geoms, (10, 10), (2, 2)):
        got = run_tile(layers, geoms, t, x[:, :, t.input.h0:t.input.h1, t.input.w0:t.input.w1])
        torch.testing.assert_close(got, ref[(..., *t.output.within(Region(0, 5, 0, 5)))])


def test_planner_charges_batchnorm_all_reduces():
    """The same stack with a BN after each conv: two extra all-gathers per BN -> more messages,
    more bytes and a longer predicted step on the same grid and grouping; none on one device."""
    def stack(bn: bool):
        layers = [m for c in (4, 8) for m in (nn.Conv2d(c if c == 4 else 4, c if c == 4 else 4, 3, padding=1),
                                              *([nn.BatchNorm2d(4)] if bn else []), nn.ReLU())]
        return fused_stack(nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), *layers),
                                         nn.Sequential(nn.Flatten(1), nn.Linear(4 * 16 * 16, 2))), (4, 16, 16), 1)
    devs = [(CATALOG["rpi4"], 1.0)] * 4
    plain, norm = stack(False), stack(True)
    p0 = choose_plan(plain, devs, 8, grid=(2, 2), groups=[(0, len(plain.geoms))])
    p1 = choose_plan(norm, devs, 8, grid=(2, 2), groups=[(0, len(norm.geoms))])
    assert p1.syncs == ((2, 5),) and p0.syncs == ((),)
    assert all(b.messages == a.messages + 2 * 2 * 2 * 3 for a, b in zip(p0.devices, p1.devices))  # 2 BN x 2 phases x 2(n-1)
    assert all(b.bytes_up > a.bytes_up for a, b in zip(p0.devices, p1.devices))
    assert p1.step_s > p0.step_s + 4 * 3 * 0.003
    one = choose_plan(norm, devs[:1], 8, grid=(1, 1), groups=[(0, len(norm.geoms))])
    assert one.devices[0].messages == choose_plan(plain, devs[:1], 8, grid=(1, 1)).devices[0].messages


def test_darknet19_is_yolov2_backbone():
    """At width 32 on 224x224 / 1000 classes: 19 convs (the last a 1x1 classifier), 5 max-pools,
    conv - BN - LeakyReLU(0.1) everywhere, ~20.8M weights, every stage before the head tileable."""
    model = build_model(ModelConfig(name="darknet19"), (3, 224, 224), 1000)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and convs[-1].kernel_size == (1, 1) and convs[-1].out_channels == 1000
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 18
    assert 20.8e6 < sum(p.numel() for p in model.parameters()) < 20.9e6
    assert feature_sizes(split_model(model, 6)[1], (224, 224))[-1] == (7, 7)
