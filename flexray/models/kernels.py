"""The kernels of one training step, counted: the input of the per-layer latency model.

A training step (forward, loss, backward, optimizer) is traced once at the ATen level with a
``TorchDispatchMode``, the way ``torch.utils.flop_counter`` counts FLOPs: every kernel the step
launches is classified by kind (``flexray.protocol.KINDS``) and gets its counted FLOPs, its
executed FLOPs (vectorised dims rounded up to the hardware's tile), the bytes it reads and writes
and the rows it loops over. ``torch.utils.module_tracker`` attributes each kernel, backward ones
included, to the model's stage, so a split's client and server parts are costed from the same
trace. The step is traced at two batch sizes; every count is affine in the batch (weights and
optimizer state are fixed per step, activations scale), so two traces give any batch size.
``flexray.protocol.compute_seconds`` turns the counts into time with a device's calibrated rates.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import conv_flop_count, flop_registry, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.module_tracker import ModuleTracker

from flexray.protocol import StepProfile, Workload

_aten = torch.ops.aten
_CONV = {_aten.convolution, _aten._convolution, _aten.convolution_backward, _aten.cudnn_convolution,
         _aten._slow_conv2d_forward, _aten.convolution_overrideable}
_GROUPS_ARG = {_aten.convolution: 8, _aten._convolution: 8, _aten.convolution_backward: 9}
_CPU_ATTENTION = (_aten._scaled_dot_product_flash_attention_for_cpu, _aten._scaled_dot_product_flash_attention_for_cpu_backward)
_ATTENTION = {*_CPU_ATTENTION, *(p for p in flop_registry if "attention" in str(p))}
_POOL = {p for p in (getattr(_aten, n, None) for n in dir(_aten) if "pool" in n) if p is not None}
_NORM = {p for p in (getattr(_aten, n, None) for n in dir(_aten) if "norm" in n) if p is not None}
_TRACE_BATCHES = (2, 4)  # > 1 so BatchNorm trains; two points fix the affine fit

LANES = 16
"""Channel blocking of conv and matmul kernels (oneDNN on AVX-512: 16 fp32 lanes; cuDNN and
tensor cores tile channels in 8s and 16s): a layer with 4 output channels runs as if it had 16."""
QUERY_TILE = 32
"""Attention kernels (flash attention on CPU, most GPU kernels) work in tiles of 32 queries:
65 tokens cost as much as 96."""


def conv_backward_flop(
    grad_out_shape: list[int], x_shape: list[int], w_shape: list[int], _bias: Any, _stride: Any, _padding: Any,
    _dilation: Any, transposed: bool, _output_padding: Any, _groups: int, output_mask: list[bool],
    out_shape: Any = None, **_: Any,
) -> int:
    """Each conv gradient (input, weight) costs the same multiply-adds as the forward conv.

    torch's own formula (torch 2.15 and older) ignores ``groups`` for the weight gradient, so
    it over-counts depthwise convs by their channel count (MobileNet train/forward ratios of
    ~20 instead of ~3); pytorch/pytorch#183405 fixes that upstream.
    """
    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def rng_devices(model: nn.Module) -> list[int]:
    dev = model_device(model)
    return [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []


def logits_of(out: Any) -> torch.Tensor:
    """The classification output, also for models returning (logits, aux...) tuples."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return logits_of(out[0])
    if hasattr(out, "logits"):
        return out.logits
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


def pad_lanes(n: int, to: int = LANES) -> float:
    """How much work ``n`` channels cost as executed: rounded up to a multiple of ``to``, over ``n``."""
    return float(-(-n // to) * to) / max(n, 1)



def _flops(packet: Any, args: tuple, kwargs: dict, out: Any) -> float:
    if packet is _aten.convolution_backward:
        return float(conv_backward_flop(*[a.shape if isinstance(a, torch.Tensor) else a for a in args]))
    if packet is _CPU_ATTENTION[0]:
        return float(sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape))
    if packet is _CPU_ATTENTION[1]:
        return float(sdpa_backward_flop_count(args[0].shape, args[1].shape, args[2].shape, args[3].shape))
    if packet in flop_registry:
        return float(flop_registry[packet](*args, **kwargs, out_val=out))
    return 0.0


def _lane_factor(packet: Any, args: tuple) -> float:
    """Executed / counted FLOPs: the vectorised dim of dense convs and matmuls rounded up to
    ``LANES`` (output channels forward and for the weight gradient, input channels for the input
    gradient; a matmul's output features), attention's head dim and query count to its tiles."""
    if packet in (_aten.convolution, _aten._convolution, _aten.convolution_backward):
        i = _GROUPS_ARG[packet]
        if len(args) > i and int(args[i]) > 1:
            return 1.0
        if packet is not _aten.convolution_backward:
            return pad_lanes(int(args[1].shape[0]))
        w, mask = args[2], args[10]
        parts = [pad_lanes(int(w.shape[1])) if mask[0] else 0.0, pad_lanes(int(w.shape[0])) if mask[1] else 0.0]
        return sum(parts) / max(int(bool(mask[0])) + int(bool(mask[1])), 1)
    if packet in _ATTENTION and len(args) > 1 and isinstance(args[1], torch.Tensor):
        q = args[1] if packet is _CPU_ATTENTION[1] else args[0]
        return pad_lanes(int(q.shape[-1])) * pad_lanes(int(q.shape[-2]), QUERY_TILE)
    if packet in (_aten.mm, _aten.bmm, _aten.addmm, _aten.baddbmm):
        return pad_lanes(int(args[-1].shape[-1]))
    return 1.0


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


def _is_view(func: Any) -> bool:
    """Ops that only make a new view (view, t, expand, detach ...) launch no kernel."""
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _tensor_bytes(values: Any) -> float:
    flat, _ = tree_flatten(values)
    return float(sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor)))


def _rows(out: Any, kind: str) -> float:
    """What a kernel loops over outside its vectorised dim, from its first output: a dense conv's
    output positions (N x H x W), an image tensor's planes (N x C), else rows (all but the last dim)."""
    flat, _ = tree_flatten(out)
    t = next((t for t in flat if isinstance(t, torch.Tensor)), None)
    if t is None or t.dim() == 0:
        return 1.0
    if t.dim() == 4 and kind not in ("conv", "grouped") and t.shape[2] * t.shape[3] == 1:
        dims = t.shape[:1]  # (N, C, 1, 1) is channels-last too: kernels vectorise over C, one row per sample
    elif t.dim() == 4:
        dims = (t.shape[0], t.shape[2], t.shape[3]) if kind == "conv" else t.shape[:2]
    else:
        dims = t.shape[:-1]
    return float(math.prod(int(d) for d in dims))


class _KernelTrace(TorchDispatchMode):
    """Sums every kernel dispatched inside it into the bucket of the stage running it."""

    def __init__(self, tracker: ModuleTracker, stage_names: dict[str, int]) -> None:
        super().__init__()
        self.tracker, self.stage_names = tracker, stage_names
        self.bucket = "rest"
        self.work: dict[int | str, Workload] = {}

    def _where(self) -> int | str:
        for name in self.tracker.parents:
            if name in self.stage_names:
                return self.stage_names[name]
        return self.bucket

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_view(func):
            return out
        packet = func.overloadpacket
        flops = _flops(packet, args, kwargs, out)
        moved = _tensor_bytes(args) + _tensor_bytes(kwargs) + _tensor_bytes(out)
        kind = _kind(packet, args, flops)
        one = Workload.kernel(kind, flops, flops * _lane_factor(packet, args), moved, _rows(out, kind))
        key = self._where()
        self.work[key] = self.work.get(key, Workload()) + one
        return out


@dataclass(frozen=True)
class StepParts:
    """One SGD step of a staged model, by part: each stage's forward and backward kernels, the
    loss's and the optimizer's. ``whole`` is their sum with the step itself counted once."""

    stages: tuple[StepProfile, ...]
    loss: StepProfile
    optimizer: StepProfile

    @property
    def whole(self) -> StepProfile:
        return sum(self.stages, self.loss + self.optimizer) + _ONE_STEP

    @property
    def passes(self) -> StepProfile:
        """Forward and backward with the loss, no optimizer step: a second head trained in the
        same step (a distilled student, an anchor) adds this."""
        return sum(self.stages, self.loss)

    def part(self, lo: int, hi: int, loss: bool, optimizer_share: float) -> StepProfile:
        """Stages ``[lo, hi)`` trained as a step of their own (a split's client or server part)."""
        total = sum(self.stages[lo:hi], _ONE_STEP + self.optimizer * optimizer_share)
        return total + self.loss if loss else total


_ONE_STEP = StepProfile(Workload(steps=1.0), Workload())


def _stage_map(model: nn.Module) -> dict[str, int]:
    root = type(model).__name__
    if isinstance(model, nn.Sequential):
        return {f"{root}.{name}": i for i, (name, _) in enumerate(model.named_children())}
    return {root: 0}


def _ce(out: Any, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(out), y)


def _trace(work: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
           loss_fn: Callable[[Any, torch.Tensor], torch.Tensor], n_stages: int) -> tuple[list[Workload], Workload, Workload]:
    tracker = ModuleTracker()
    with tracker, _KernelTrace(tracker, _stage_map(work)) as trace:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(work(x), y)
        if loss.requires_grad:
            loss.backward()
            trace.bucket = "optimizer"
            opt.step()
    stage_work = [trace.work.get(i, Workload()) for i in range(n_stages)]
    return stage_work, trace.work.get("rest", Workload()), trace.work.get("optimizer", Workload())


def step_parts(
    model: nn.Module, input_shape: tuple[int, ...], momentum: float = 0.9,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = _ce,
) -> StepParts:
    """The fixed and per-sample kernel counts of one SGD training step of ``model``, by stage.

    Work happens on deep copies inside ``fork_rng``: the model, its statistics and the training
    RNG stream are untouched. Each batch size runs a warm-up step first (momentum buffers appear
    on the first ``opt.step``); the second step is the one counted."""
    n_stages = len(model) if isinstance(model, nn.Sequential) else 1
    traces = []
    with torch.random.fork_rng(devices=rng_devices(model)):
        for b in _TRACE_BATCHES:
            work = copy.deepcopy(model)
            params = [p for p in work.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params or [torch.zeros(1, requires_grad=True)], lr=1e-6, momentum=momentum)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, *input_shape, generator=g).to(model_device(model), model_dtype(model))
            with torch.no_grad():
                classes = logits_of(work.eval()(x[:1])).shape[-1] if loss_fn is _ce else 1
            work.train()
            y = torch.randint(0, classes, (b,), generator=g).to(x.device)
            _trace(work, x, y, opt, loss_fn, n_stages)
            traces.append(_trace(work, x, y, opt, loss_fn, n_stages))
    (b1, (s1, l1, o1)), (b2, (s2, l2, o2)) = zip(_TRACE_BATCHES, traces)

    def affine(w1: Workload, w2: Workload) -> StepProfile:
        per_sample = (w2 - w1) * (1.0 / (b2 - b1))
        return StepProfile(fixed=(w1 - per_sample * b1).clip(), per_sample=per_sample.clip())

    return StepParts(tuple(affine(a, b) for a, b in zip(s1, s2)), affine(l1, l2), affine(o1, o2))


def step_profile(model: nn.Module, input_shape: tuple[int, ...], momentum: float = 0.9,
                 loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] = _ce) -> StepProfile:
    """One whole SGD step of ``model`` (see ``step_parts``)."""
    return step_parts(model, input_shape, momentum, loss_fn).whole
