"""Spatial tile geometry for fused conv/pool stacks (arXiv 2409.09083).

A tile of a group's *output* needs a larger region of each layer's input (its halo). Walking
the layers backwards from the output tile gives that region per layer; regions are clipped to
the feature map and the clipped part is re-created as explicit padding, so a tile computed with
``padding=0`` on its padded region equals the same pixels of the full-map computation, at the
edges too. Backward uses the same regions: the gradient a tile sends to a layer's input lands
on exactly the (clipped) input region it read, and overlapping halos are summed. A BatchNorm's
region is widened to the tile's owned cell of its map, so the tiles together normalise every
position one device would (``models/tile_norm.py`` does the statistics).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flexray.errors import FlexrayError

Pair = tuple[int, int]
POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Hardswish, nn.Identity)


def _pair(v: int | Sequence[int]) -> Pair:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class LayerGeom:
    """Spatial behaviour of one layer; ``kind`` is conv | maxpool | avgpool | pointwise | bn | dropout
    (bn and dropout are pointwise in space, but need the whole map's statistics / mask)."""

    kind: str
    kernel: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)

    def out_size(self, size: Pair) -> Pair:
        return tuple(  # type: ignore[return-value]
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(size, self.kernel, self.stride, self.padding, self.dilation)
        )

    def needed(self, lo: int, hi: int, dim: int, n_in: int) -> tuple[int, int, int, int]:
        """Input rows [a, b) that output rows [lo, hi) read, clipped, plus the (low, high) padding."""
        k, s, p, d = self.kernel[dim], self.stride[dim], self.padding[dim], self.dilation[dim]
        a, b = lo * s - p, (hi - 1) * s - p + d * (k - 1) + 1
        return max(a, 0), min(b, n_in), max(0, -a), max(0, b - n_in)


def layer_geom(m: nn.Module) -> LayerGeom | None:
    """Geometry of a tileable layer, or None when a tile cannot compute it (string padding,
    ceil-mode pools, layers that are not spatial, ...)."""
    if isinstance(m, nn.Conv2d):
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            return None
        return LayerGeom("conv", _pair(m.kernel_size), _pair(m.stride), _pair(m.padding), _pair(m.dilation))
    if isinstance(m, nn.MaxPool2d) and not m.ceil_mode and not m.return_indices:
        stride = m.stride if m.stride is not None else m.kernel_size
        return LayerGeom("maxpool", _pair(m.kernel_size), _pair(stride), _pair(m.padding), _pair(m.dilation))
    if isinstance(m, nn.AvgPool2d) and not m.ceil_mode and m.count_include_pad and m.divisor_override is None:
        stride = m.stride if m.stride is not None else m.kernel_size
        return LayerGeom("avgpool", _pair(m.kernel_size), _pair(stride), _pair(m.padding))
    if isinstance(m, POINTWISE):  # in-place ones run out of place on tiles (``run_layer``)
        return LayerGeom("pointwise")
    if isinstance(m, nn.BatchNorm2d):
        return LayerGeom("bn")
    if isinstance(m, nn.Dropout):
        return LayerGeom("dropout")
    return None


def leaves(module: nn.Module) -> list[nn.Module]:
    """A stage's layers in execution order (nested ``nn.Sequential`` flattened)."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in leaves(child)]
    return [module]


def tileable_prefix(stages: Sequence[nn.Module]) -> int:
    """How many leading stages are made only of tileable layers (the last stage never is:
    it is the classifier)."""
    n = 0
    for stage in stages[:-1]:
        if not all(layer_geom(m) is not None for m in leaves(stage)):
            break
        n += 1
    return n


def split(n: int, parts: int) -> list[Pair]:
    """[lo, hi) bounds of ``parts`` near-equal pieces of ``n`` (the first ones one larger)."""
    edges = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), parts)])
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


@dataclass(frozen=True)
class Region:
    h0: int
    h1: int
    w0: int
    w1: int

    @property
    def area(self) -> int:
        return max(0, self.h1 - self.h0) * max(0, self.w1 - self.w0)

    def overlap(self, other: Region) -> Region | None:
        r = Region(max(self.h0, other.h0), min(self.h1, other.h1), max(self.w0, other.w0), min(self.w1, other.w1))
        return r if r.h1 > r.h0 and r.w1 > r.w0 else None

    def within(self, outer: Region) -> tuple[slice, slice]:
        """Slices selecting this region from a tensor that holds ``outer``."""
        return slice(self.h0 - outer.h0, self.h1 - outer.h0), slice(self.w0 - outer.w0, self.w1 - outer.w0)


@dataclass(frozen=True)
class TileSpec:
    """One tile of a group: ``regions[i]`` is the clipped region of layer i's input it reads
    (``regions[-1]`` is its output tile) and ``pads[i]`` the (left, right, top, bottom) padding
    layer i adds back. ``regions[i + 1]`` is also what layer i computes, halo included.
    ``owned[i]`` is, for a BatchNorm, the tile's cell of its map (the cells partition the map);
    its input region then covers that cell and its output is cut to what the next layer reads."""

    index: int
    regions: tuple[Region, ...]
    pads: tuple[tuple[int, int, int, int], ...]
    owned: tuple[Region | None, ...] = ()

    @property
    def input(self) -> Region:
        return self.regions[0]

    @property
    def output(self) -> Region:
        return self.regions[-1]


def feature_sizes(geoms: Sequence[LayerGeom], size: Pair) -> list[Pair]:
    """Spatial size of every layer's input, and of the last output."""
    sizes = [size]
    for g in geoms:
        sizes.append(g.out_size(sizes[-1]))
        if min(sizes[-1]) < 1:
            raise FlexrayError(f"tiling: input {size[0]}x{size[1]} shrinks to nothing at layer {len(sizes) - 1}")
    return sizes


def plan_tiles(geoms: Sequence[LayerGeom], size: Pair, grid: Pair) -> list[TileSpec]:
    """Tiles of an ``grid`` (rows x cols) split of the stack's output, row-major, with every
    layer's input region and padding; uneven splits give the first rows/cols one more pixel."""
    sizes = feature_sizes(geoms, size)
    out_h, out_w = sizes[-1]
    if grid[0] > out_h or grid[1] > out_w:
        raise FlexrayError(f"tiling: grid {grid[0]}x{grid[1]} is finer than the {out_h}x{out_w} output; use a coarser method.grid")
    tiles = []
    for ri, (h0, h1) in enumerate(split(out_h, grid[0])):
        for ci, (w0, w1) in enumerate(split(out_w, grid[1])):
            region = Region(h0, h1, w0, w1)
            regions, pads, owned = [region], [], []
            for g, (n_h, n_w) in zip(reversed(geoms), reversed(sizes[:-1])):
                cell = None
                if g.kind == "bn":  # the tiles together must normalise the whole map
                    (a, b), (c, d) = split(n_h, grid[0])[ri], split(n_w, grid[1])[ci]
                    cell = Region(a, b, c, d)
                    if cell.area:
                        region = Region(min(region.h0, a), max(region.h1, b), min(region.w0, c), max(region.w1, d))
                a, b, top, bottom = g.needed(region.h0, region.h1, 0, n_h)
                c, d, left, right = g.needed(region.w0, region.w1, 1, n_w)
                region = Region(a, b, c, d)
                regions.append(region)
                pads.append((left, right, top, bottom))
                owned.append(cell)
            tiles.append(TileSpec(len(tiles), tuple(reversed(regions)), tuple(reversed(pads)), tuple(reversed(owned))))
    return tiles


def _conv(m: nn.Conv2d, pad: tuple[int, int, int, int], x: torch.Tensor) -> torch.Tensor:
    """A conv with (left, right, top, bottom) zero padding and no copy of ``x``: the conv pads
    both sides by the larger amount and the extra outputs are cut off (a view). An explicit
    ``F.pad`` would copy the tile forward and backward and keep the copy for backward (~20% of
    a one-tile step, and memory a tile does not need)."""
    left, right, top, bottom = pad
    ph, pw = max(top, bottom), max(left, right)
    (sh, sw), (dh, dw), (kh, kw) = m.stride, m.dilation, m.kernel_size
    if (ph - top) % sh or (pw - left) % sw:  # the cut would not fall on an output: pad explicitly
        return F.conv2d(F.pad(x, pad), m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
    y = F.conv2d(x, m.weight, m.bias, m.stride, (ph, pw), m.dilation, m.groups)
    if (top, bottom, left, right) == (ph, ph, pw, pw):
        return y
    out_h = (x.shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
    h0, w0 = (ph - top) // sh, (pw - left) // sw
    return y[:, :, h0:h0 + out_h, w0:w0 + out_w]


def out_of_place(m: nn.Module) -> nn.Module:
    """``m`` without ``inplace``: an in-place activation would overwrite a tile that autograd
    saved or that is a leaf (a halo-assembled input); out of place it saves the same bytes."""
    if not getattr(m, "inplace", False):
        return m
    m = copy.copy(m)
    m.inplace = False
    return m


def run_layer(m: nn.Module, g: LayerGeom, pad: tuple[int, int, int, int], x: torch.Tensor) -> torch.Tensor:
    """Layer ``m`` on a clipped tile with its (left, right, top, bottom) edge padding; BatchNorm
    and dropout as pointwise (right in eval mode; training runs them through ``run_span``)."""
    if g.kind == "conv":
        assert isinstance(m, nn.Conv2d)
        return _conv(m, pad, x)
    if g.kind == "maxpool":
        x = F.pad(x, pad, value=float("-inf")) if any(pad) else x
        return F.max_pool2d(x, g.kernel, g.stride, 0, g.dilation)
    if g.kind == "avgpool":
        return F.avg_pool2d(F.pad(x, pad) if any(pad) else x, g.kernel, g.stride, 0)
    return out_of_place(m)(x)


Special = Callable[[int, torch.Tensor], torch.Tensor]  # (group-relative layer index, its input) -> output


def run_span(layers: Sequence[nn.Module], geoms: Sequence[LayerGeom], tile: TileSpec, lo: int, hi: int,
             x: torch.Tensor, special: Special | None = None) -> torch.Tensor:
    """Layers ``lo..hi-1`` of a group (indices relative to it) on one tile: ``x`` holds
    ``tile.regions[lo]``; returns ``tile.regions[hi]``. ``special`` runs training-mode dropout
    (and whatever else needs more than the tile); a BatchNorm's output is cut to the next region."""
    for i in range(lo, hi):
        m, g = layers[i], geoms[i]
        if special is not None and g.kind == "dropout" and m.training:
            x = special(i, x)
        else:
            x = run_layer(m, g, tile.pads[i], x)
        if g.kind == "bn" and tile.regions[i + 1] != tile.regions[i]:
            x = x[(..., *tile.regions[i + 1].within(tile.regions[i]))]
    return x


def run_tile(layers: Sequence[nn.Module], geoms: Sequence[LayerGeom], tile: TileSpec, x: torch.Tensor) -> torch.Tensor:
    """The fused stack on one tile: ``x`` holds ``tile.input``; returns ``tile.output``
    (BatchNorm and dropout pointwise: eval mode)."""
    return run_span(layers, geoms, tile, 0, len(layers), x)


Tile = torch.Tensor | np.ndarray  # tiles travel between actors as numpy (Ray reads those zero-copy)


def _piece(t: Tile, idx: tuple[Any, ...]) -> torch.Tensor:
    return torch.from_numpy(np.array(t[idx])) if isinstance(t, np.ndarray) else t[idx]


def _zeros(region: Region, like: Tile) -> torch.Tensor:
    dtype = like.dtype if isinstance(like, torch.Tensor) else torch.from_numpy(np.empty(0, like.dtype)).dtype
    return torch.zeros(*like.shape[:2], region.h1 - region.h0, region.w1 - region.w0, dtype=dtype)


def assemble(region: Region, parts: Sequence[tuple[Region, Tile]]) -> torch.Tensor:
    """The ``region`` of a feature map, copied from the tiles that cover it."""
    out = _zeros(region, parts[0][1])
    for r, t in parts:
        ov = r.overlap(region)
        if ov is not None:
            out[(..., *ov.within(region))] = _piece(t, (..., *ov.within(r)))
    return out


def scatter_add(region: Region, parts: Sequence[tuple[Region, Tile]]) -> torch.Tensor:
    """Gradient on ``region``: the sum of every tile's input-gradient that overlaps it (halos add up)."""
    out = _zeros(region, parts[0][1])
    for r, t in parts:
        ov = r.overlap(region)
        if ov is not None:
            out[(..., *ov.within(region))] += _piece(t, (..., *ov.within(r)))
    return out


def layer_stats(layers: Sequence[nn.Module], channels: int, size: Pair) -> tuple[list[float], list[int]]:
    """Counted forward FLOPs per output pixel per sample of each layer (torch's flop counter,
    as in ``models/profile.py``), so a tile's cost = this x the pixels it computes, halo
    included; and the channel count of every layer's input and of the last output."""
    from torch.utils.flop_counter import FlopCounterMode

    geoms = [layer_geom(m) for m in layers]
    sizes = feature_sizes(geoms, size)  # type: ignore[arg-type]
    flops, chans = [], [channels]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        dtype = next((p.dtype for m in layers for p in m.parameters()), torch.float32)
        x = torch.randn(1, channels, *size, dtype=dtype)
        for m, g, (h, w) in zip(layers, geoms, sizes[1:]):
            tile = plan_tiles([g], (x.shape[2], x.shape[3]), (1, 1))[0]  # type: ignore[list-item]
            with FlopCounterMode(display=False) as counter:
                if g.kind == "bn":  # pointwise cost, without touching the running statistics
                    ones = torch.ones(x.shape[1], dtype=x.dtype)
                    x = F.batch_norm(x, ones * 0, ones, m.weight, m.bias, False, 0.0, m.eps)  # type: ignore[arg-type]
                else:
                    x = run_layer(m, g, tile.pads[0], x)  # type: ignore[arg-type]
            flops.append(counter.get_total_flops() / (h * w))
            chans.append(int(x.shape[1]))
    return flops, chans
