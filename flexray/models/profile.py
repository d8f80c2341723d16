"""Per-stage cost profile of a model: counted FLOPs, parameter and activation bytes.

The scheduler predicts device latency from these numbers, so they are counted by
``torch.utils.flop_counter`` on a real forward/backward rather than estimated by formula. Work
happens on a deep copy inside ``fork_rng``: profiling must not change the model (weights,
BatchNorm statistics, grads, train/eval mode) or the global RNG stream that seeds training.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from flexray.models.blocks import stages

_BATCH = 2  # > 1 so BatchNorm in train mode works; results are divided back to per sample
_FLOAT32_BYTES = 4


def _conv_backward_flop(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: list[bool],
    out_shape: Any = None,
    **_: Any,
) -> int:
    """Each conv gradient (input, weight) costs the same multiply-adds as the forward conv.

    torch's own formula (torch 2.15 and older) ignores ``groups`` for the weight gradient, so
    it over-counts depthwise convs by their channel count (MobileNet train/forward ratios of
    ~20 instead of ~3); pytorch/pytorch#183405 fixes that upstream.
    """
    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})


@dataclass(frozen=True)
class LayerProfile:
    index: int
    name: str
    kind: str  # class name of the stage
    fwd_flops: float  # per sample, counted
    params: int
    param_bytes: int  # this stage's state_dict bytes (parameters + buffers)
    activation_bytes: int  # bytes of this stage's output per sample, as float32


@dataclass(frozen=True)
class ModelProfile:
    layers: tuple[LayerProfile, ...]
    train_flops_per_sample: float  # forward + backward, counted
    param_bytes: int  # all parameters + buffers as shipped (state_dict bytes)
    input_bytes: int
    input_shape: tuple[int, ...] | None = None  # (C, H, W) it was profiled at; lets methods profile sub-models

    @property
    def fwd_flops_per_sample(self) -> float:
        return sum(layer.fwd_flops for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)


def training_memory_bytes(profile: ModelProfile, batch_size: int) -> float:
    """Weights + grads + momentum (3x params) plus every stage's activations kept for backward."""
    acts = sum(layer.activation_bytes for layer in profile.layers) + profile.input_bytes
    return 3 * profile.param_bytes + batch_size * acts


def state_bytes(state: Mapping[str, Any]) -> int:
    """Bytes of the tensors in a state dict (non-tensor extra state is ignored)."""
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def _device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _sample_input(model: nn.Module, input_shape: tuple[int, int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(_BATCH, *input_shape, generator=g).to(_device(model), _dtype(model))


def _numel(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel()
    if isinstance(out, (tuple, list)):
        return sum(_numel(o) for o in out)
    if isinstance(out, Mapping):
        return sum(_numel(o) for o in out.values())
    return 0


def _logits(out: Any) -> torch.Tensor:
    """The classification output, also for models returning (logits, aux...) tuples."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _logits(out[0])
    if hasattr(out, "logits"):
        return out.logits
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


def _rng_devices(model: nn.Module) -> list[int]:
    dev = _device(model)
    return [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []


def _train_flops(work: nn.Module, x: torch.Tensor) -> float:
    work.train()
    work.zero_grad(set_to_none=True)
    with _counter() as counter:
        logits = _logits(work(x))
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, target)
        if loss.requires_grad:  # a fully frozen model has no backward pass to count
            loss.backward()
    return counter.get_total_flops() / _BATCH


def train_flops_per_sample(model: nn.Module, input_shape: tuple[int, int, int]) -> float:
    """Counted forward + loss + backward FLOPs per sample, in train mode."""
    with torch.random.fork_rng(devices=_rng_devices(model)):
        work = copy.deepcopy(model)
        return _train_flops(work, _sample_input(model, input_shape))


def profile_model(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelProfile:
    """Per-stage forward cost (eval mode) plus whole-model training cost, per sample."""
    input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
    with torch.random.fork_rng(devices=_rng_devices(model)):
        work = copy.deepcopy(model)
        x = _sample_input(model, input_shape)
        work.eval()
        layers = []
        with torch.no_grad():
            h: Any = x
            for i, (name, stage) in enumerate(stages(work)):
                with _counter() as counter:
                    h = stage(h)
                layers.append(
                    LayerProfile(
                        index=i,
                        name=name,
                        kind=type(stage).__name__,
                        fwd_flops=counter.get_total_flops() / _BATCH,
                        params=sum(p.numel() for p in stage.parameters()),
                        param_bytes=state_bytes(stage.state_dict()),
                        activation_bytes=_numel(h) // _BATCH * _FLOAT32_BYTES,
                    )
                )
        train = _train_flops(work, x)
    return ModelProfile(
        layers=tuple(layers),
        train_flops_per_sample=train,
        param_bytes=state_bytes(model.state_dict()),
        input_bytes=math.prod(input_shape) * _FLOAT32_BYTES,
        input_shape=input_shape,
    )


class ProfileCache:
    """Profiles of a method's sub-models (a width, a depth prefix, a pruning ratio), each built
    and profiled once: profiling runs the model forward and backward, the scheduler asks often."""

    def __init__(self) -> None:
        self._profiles: dict[tuple[Hashable, tuple[int, ...]], ModelProfile] = {}

    def get(self, key: Hashable, input_shape: tuple[int, ...], build: Callable[[], nn.Module]) -> ModelProfile:
        shape = tuple(int(s) for s in input_shape)
        if (key, shape) not in self._profiles:
            self._profiles[key, shape] = profile_model(build(), shape)  # type: ignore[arg-type]
        return self._profiles[key, shape]
