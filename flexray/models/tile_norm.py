"""BatchNorm and dropout on spatial tiles, exactly as on one device.

Training-mode BatchNorm couples every position of the map, so a tile cannot normalise alone.
Each tile owns a disjoint cell of the BN's input map (the cells cover it; the tile computes its
cell, plus the halo the later layers need). Forward: every tile sends (count, sum, centred sum
of squares) of its owned positions per channel; all tiles combine them in rank order (Chan's
parallel variance, stable in float32) into the whole map's mean and variance, normalise their
whole region with them and update the running statistics as one device does.

Backward: with ``dy`` a tile's gradient at the BN output, one device's input gradient is
``w / sigma * (dy - mean(dy) - xhat * mean(dy * xhat))``. A halo position's true ``dy`` is the
sum of the partial ``dy`` of every tile that computed it, so the global sums are the sum over
tiles of ``sum(dy)`` and ``sum(dy * xhat)`` over each tile's *whole* region; the two mean terms
are position-wise and go to the position's owner only, so the tiles' input gradients again add
up to the true one where halos overlap.

Dropout draws the whole map's mask from a per-step seed (the same bits ``F.dropout`` draws
after ``torch.manual_seed(seed)``), and each tile takes its slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


def local_stats(x: torch.Tensor) -> np.ndarray:
    """(count, sum, centred sum of squares) per channel of the owned positions ``x``, float64."""
    xd = x.detach().double()
    count = float(xd.numel() // xd.shape[1])
    total = xd.sum((0, 2, 3))
    m2 = ((xd - total[None, :, None, None] / max(count, 1.0)) ** 2).sum((0, 2, 3))
    return np.stack([np.full(xd.shape[1], count), total.cpu().numpy(), m2.cpu().numpy()])  # travels as numpy


def combine(stats: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, float]:
    """The whole map's (mean, biased variance, count) from every tile's ``local_stats``, in rank order."""
    count = sum(float(s[0, 0]) for s in stats)
    mean = sum(s[1] for s in stats) / count
    m2 = sum(s[2] + s[0] * (s[1] / np.maximum(s[0], 1.0) - mean) ** 2 for s in stats)
    return mean, m2 / count, count


def update_running(m: nn.BatchNorm2d, mean: np.ndarray, var: np.ndarray, count: float) -> None:
    """Running statistics as ``F.batch_norm`` updates them on one device (unbiased variance)."""
    if not m.track_running_stats or m.running_mean is None or m.running_var is None:
        return
    with torch.no_grad():
        m.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
        mom = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)  # type: ignore[arg-type]
        unbiased = var * count / max(count - 1.0, 1.0)
        like = m.running_mean
        m.running_mean.mul_(1 - mom).add_(torch.as_tensor(mean, dtype=like.dtype, device=like.device), alpha=mom)
        m.running_var.mul_(1 - mom).add_(torch.as_tensor(unbiased, dtype=like.dtype, device=like.device), alpha=mom)


@dataclass
class TileNorm:
    """One BN on one tile. Its output is ``x * s + t`` with ``s = w / sigma``: autograd then
    keeps ``x`` (the tensor the previous segment produced anyway), as one device's BN does."""

    m: nn.BatchNorm2d
    x: torch.Tensor  # the BN input on the tile's region (detached view)
    mean: torch.Tensor  # per channel, shaped for broadcasting
    invstd: torch.Tensor
    count: float
    own: tuple[slice, slice]  # owned cell within the tile's region
    sums: np.ndarray | None = None  # [sum(dy), sum(dy * xhat)] over the whole region, set by backward

    @classmethod
    def apply(cls, m: nn.BatchNorm2d, x: torch.Tensor, stats: Sequence[np.ndarray],
              own: tuple[slice, slice]) -> tuple[TileNorm, torch.Tensor]:
        """Normalise ``x`` (the tile's region) with the whole map's statistics; returns the
        record and the output, whose backward gives ``x`` only the local part of its gradient."""
        mean, var, count = combine(stats)
        update_running(m, mean, var, count)
        mu = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
        invstd = torch.as_tensor(1.0 / np.sqrt(var + m.eps), dtype=x.dtype, device=x.device)[None, :, None, None]
        if m.affine:
            scale = m.weight[None, :, None, None] * invstd
            y = x * scale + (m.bias[None, :, None, None] - mu * scale)
        else:
            y = (x - mu) * invstd
        rec = cls(m, x.detach(), mu, invstd, count, own)
        if y.requires_grad:
            y.register_hook(rec._capture)
        return rec, y

    def xhat(self, idx: tuple[object, ...] = (...,)) -> torch.Tensor:
        return (self.x[idx] - self.mean) * self.invstd

    def _capture(self, dy: torch.Tensor) -> None:
        self.sums = torch.stack([dy.sum((0, 2, 3)), (dy * self.xhat()).sum((0, 2, 3))]).double().cpu().numpy()

    def local_sums(self) -> np.ndarray:
        return self.sums if self.sums is not None else np.zeros((2, self.x.shape[1]))

    def input_grad(self, local: torch.Tensor | None, sums: Sequence[np.ndarray]) -> torch.Tensor:
        """The tile's gradient at the BN input: the local part plus, on owned positions, the
        mean terms from every tile's ``local_sums`` (summed in rank order)."""
        total = sum(sums)
        a = torch.as_tensor(total[0] / self.count, dtype=self.x.dtype, device=self.x.device)[None, :, None, None]
        b = torch.as_tensor(total[1] / self.count, dtype=self.x.dtype, device=self.x.device)[None, :, None, None]
        scale = self.invstd if not self.m.affine else self.invstd * self.m.weight.detach()[None, :, None, None]
        dx = torch.zeros_like(self.x) if local is None else local.clone()
        idx = (..., *self.own)
        dx[idx] -= scale * (a + self.xhat(idx) * b)
        return dx


def dropout_mask(seed: int, shape: Sequence[int], p: float, dtype: torch.dtype) -> torch.Tensor:
    """The whole map's scaled keep-mask, the bits ``F.dropout`` draws after ``torch.manual_seed(seed)``
    on the CPU; drawn on the CPU wherever the tile computes, so every device draws the same bits."""
    if p >= 1.0:
        return torch.zeros(*shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(*shape, dtype=dtype).bernoulli_(1 - p, generator=gen).div_(1 - p)
