"""The kernels of one training step, counted: the input of the per-layer latency model.

A training step (forward, loss, backward, optimizer) is traced once at the ATen level with a
``TorchDispatchMode``, the way ``torch.utils.flop_counter`` counts FLOPs: every kernel the step
launches is classified by kind (dense conv, grouped/depthwise conv, matmul, memory-bound) and
gets its counted FLOPs and the bytes it reads and writes. The step is traced at two batch sizes;
every count is affine in the batch (weights and optimizer state are fixed per step, activations
scale with the batch), so two traces give the fixed and per-sample part of any batch size.
``flexray.protocol.compute_seconds`` turns the sums into time with a device's calibrated rates.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from flexray.models.profile import _conv_backward_flop, _device, _dtype, _logits, _rng_devices
from flexray.protocol import StepProfile, Workload

_aten = torch.ops.aten
_CONV = {_aten.convolution, _aten._convolution, _aten.convolution_backward, _aten.cudnn_convolution,
         _aten._slow_conv2d_forward, _aten.convolution_overrideable}
_GROUPS_ARG = {_aten.convolution: 8, _aten._convolution: 8, _aten.convolution_backward: 9}
_TRACE_BATCHES = (2, 4)
LANES = 16
"""Channel blocking of conv and matmul kernels (oneDNN on AVX-512: 16 fp32 lanes; cuDNN and
tensor cores tile channels in 8s and 16s): a layer with 4 channels runs as if it had 16."""


QUERY_TILE = 32
"""Attention kernels (flash attention on CPU, most GPU kernels) work in tiles of 32 queries:
65 tokens cost as much as 96."""


def _pad(n: int, to: int = LANES) -> float:
    return float(-(-n // to) * to) / max(n, 1)


def _lane_factor(packet: Any, args: tuple) -> float:
    """Executed / counted FLOPs: the vectorised channel dim of dense convs and matmuls rounded
    up to ``LANES`` (output channels forward and for the weight gradient, input channels for
    the input gradient; a matmul's output features; attention's head dim)."""
    if packet in (_aten.convolution, _aten._convolution, _aten.convolution_backward):
        i = _GROUPS_ARG[packet]
        if len(args) > i and int(args[i]) > 1:
            return 1.0
        if packet is not _aten.convolution_backward:
            return _pad(int(args[1].shape[0]))
        w, mask = args[2], args[10]
        parts = [_pad(int(w.shape[1])) if mask[0] else 0.0, _pad(int(w.shape[0])) if mask[1] else 0.0]
        return sum(parts) / max(int(bool(mask[0])) + int(bool(mask[1])), 1)
    if packet in _ATTENTION and len(args) > 1 and isinstance(args[1], torch.Tensor):
        q = args[1] if packet is _aten._scaled_dot_product_flash_attention_for_cpu_backward else args[0]
        return _pad(int(q.shape[-1])) * _pad(int(q.shape[-2]), QUERY_TILE)
    if packet in (_aten.mm, _aten.bmm, _aten.addmm, _aten.baddbmm):
        return _pad(int(args[-1].shape[-1]))
    return 1.0


def _flops(packet: Any, args: tuple, kwargs: dict, out: Any) -> float:
    if packet is _aten.convolution_backward:
        shapes = [a.shape if isinstance(a, torch.Tensor) else a for a in args]
        return float(_conv_backward_flop(*shapes))
    if packet is _aten._scaled_dot_product_flash_attention_for_cpu:
        return float(sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape))
    if packet is _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        return float(sdpa_backward_flop_count(args[0].shape, args[1].shape, args[2].shape, args[3].shape))
    if packet in flop_registry:
        return float(flop_registry[packet](*args, **kwargs, out_val=out))
    return 0.0


def _is_view(func: Any) -> bool:
    """Ops that only make a new view (view, t, expand, detach ...) launch no kernel."""
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _rows(out: Any) -> float:
    """Planes (N x C of an image tensor) or rows (all but the last dim) of a kernel's first output."""
    flat, _ = tree_flatten(out)
    t = next((t for t in flat if isinstance(t, torch.Tensor)), None)
    if t is None or t.dim() == 0:
        return 1.0
    dims = t.shape[:2] if t.dim() == 4 else t.shape[:-1]
    return float(math.prod(int(d) for d in dims))


def _tensor_bytes(values: Any) -> float:
    flat, _ = tree_flatten(values)
    return float(sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor)))


_ATTENTION = {_aten._scaled_dot_product_flash_attention_for_cpu, _aten._scaled_dot_product_flash_attention_for_cpu_backward,
              *(p for p in flop_registry if "attention" in str(p))}
_POOL = {p for p in (getattr(_aten, n, None) for n in dir(_aten) if "pool" in n) if p is not None}
_NORM = {p for p in (getattr(_aten, n, None) for n in dir(_aten) if "norm" in n) if p is not None}


def _kind(packet: Any, args: tuple, flops: float) -> str:
    if packet in _CONV:
        i = _GROUPS_ARG.get(packet)
        return "grouped" if i is not None and len(args) > i and int(args[i]) > 1 else "conv"
    if packet in _ATTENTION:
        return "attention"
    if packet in _POOL:
        return "pool"
    if packet in _NORM:
        return "norm"
    return "matmul" if flops > 0 else "memory"


class _KernelTrace(TorchDispatchMode):
    """Sums kernels, FLOPs and bytes moved by kind over everything dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.work = Workload()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_view(func):
            return out
        packet = func.overloadpacket
        flops = _flops(packet, args, kwargs, out)
        moved = _tensor_bytes(args) + _tensor_bytes(kwargs) + _tensor_bytes(out)
        kind = _kind(packet, args, flops)
        self.work = self.work + Workload.kernel(kind, flops, flops * _lane_factor(packet, args), moved, _rows(out))
        return out


def _trace_step(work: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]) -> Workload:
    with _KernelTrace() as trace:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(work(x), y)
        if loss.requires_grad:
            loss.backward()
            opt.step()
    return trace.work + Workload(steps=1.0)


def _ce(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_logits(out), y)


def step_profile(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int | None = None, momentum: float = 0.9,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = _ce,
) -> StepProfile:
    """The fixed and per-sample kernel counts of one SGD training step of ``model``.

    Work happens on a deep copy inside ``fork_rng``: the model, its statistics and the training
    RNG stream are untouched. The first step of each trace is a warm-up (momentum buffers appear
    on the first ``opt.step``), the second is the one counted."""
    with torch.random.fork_rng(devices=_rng_devices(model)):
        counts = []
        for b in _TRACE_BATCHES:
            work = copy.deepcopy(model).train()
            params = [p for p in work.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params or [torch.zeros(1, requires_grad=True)], lr=1e-6, momentum=momentum)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, *input_shape, generator=g).to(_device(model), _dtype(model))
            with torch.no_grad():
                classes = num_classes or _logits(work.eval()(x[:1])).shape[-1]
            work.train()
            y = torch.randint(0, classes, (b,), generator=g).to(x.device)
            _trace_step(work, x, y, opt, loss_fn)
            counts.append(_trace_step(work, x, y, opt, loss_fn))
    (b1, w1), (b2, w2) = zip(_TRACE_BATCHES, counts)
    per_sample = (w2 - w1) * (1.0 / (b2 - b1))
    fixed = w1 - per_sample * b1
    return StepProfile(fixed=fixed.clip(), per_sample=per_sample.clip())
