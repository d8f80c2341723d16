"""Per-stage cost profile of a model: counted FLOPs, parameter and activation bytes.

The scheduler predicts device latency from these numbers, so they are counted by
``torch.utils.flop_counter`` on a real forward/backward rather than estimated by formula. Work
happens on a deep copy inside ``fork_rng``: profiling must not change the model (weights,
BatchNorm statistics, grads, train/eval mode) or the global RNG stream that seeds training.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from flexray.models.blocks import stages
from flexray.models.kernels import StepParts, conv_backward_flop, logits_of, model_device, model_dtype, rng_devices, step_parts
from flexray.protocol import StepProfile, Workload

_BATCH = 2  # > 1 so BatchNorm in train mode works; results are divided back to per sample
_FLOAT32_BYTES = 4


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop})


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
    parts: StepParts | None = None  # the kernels of one SGD step, by stage: what the latency model costs

    @property
    def step(self) -> StepProfile:
        """One SGD step's kernel counts (a profile built without them: FLOPs only, the coarse form)."""
        if self.parts is None:
            from_flops = Workload.coarse(self.train_flops_per_sample)
            return StepProfile(Workload(steps=1.0), from_flops)
        return self.parts.whole

    @property
    def forward_step(self) -> StepProfile:
        """A forward pass alone (a distillation teacher's): the step's kernels scaled by counted
        forward / training FLOPs, for lack of a trace of the forward alone."""
        return self.step * (self.fwd_flops_per_sample / max(self.train_flops_per_sample, 1.0))

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


def _sample_input(model: nn.Module, input_shape: tuple[int, int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(_BATCH, *input_shape, generator=g).to(model_device(model), model_dtype(model))


def _numel(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel()
    if isinstance(out, (tuple, list)):
        return sum(_numel(o) for o in out)
    if isinstance(out, Mapping):
        return sum(_numel(o) for o in out.values())
    return 0


def _train_flops(work: nn.Module, x: torch.Tensor) -> float:
    work.train()
    work.zero_grad(set_to_none=True)
    with _counter() as counter:
        logits = logits_of(work(x))
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, target)
        if loss.requires_grad:  # a fully frozen model has no backward pass to count
            loss.backward()
    return counter.get_total_flops() / _BATCH


def train_flops_per_sample(model: nn.Module, input_shape: tuple[int, int, int]) -> float:
    """Counted forward + loss + backward FLOPs per sample, in train mode."""
    with torch.random.fork_rng(devices=rng_devices(model)):
        work = copy.deepcopy(model)
        return _train_flops(work, _sample_input(model, input_shape))


_MEMO: OrderedDict[str, ModelProfile] = OrderedDict()
_MEMO_SIZE = 256


def fingerprint(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """What a profile depends on: every module's type and plain settings (incl. those its repr
    leaves out, e.g. attention heads), every tensor's name, shape, dtype and device, the input
    shape. Weights' values are not in it: counts and bytes do not depend on them."""
    h = hashlib.sha256(repr(tuple(input_shape)).encode())
    for name, module in model.named_modules():
        plain = sorted((k, v) for k, v in vars(module).items()
                       if not k.startswith("_") and isinstance(v, (int, float, str, tuple, type(None))))
        h.update(f"{name}|{type(module).__module__}.{type(module).__qualname__}|{plain}".encode())
    for key, value in model.state_dict().items():
        h.update(f"{key}|{tuple(value.shape)}|{value.dtype}|{value.device}".encode())
    return h.hexdigest()


def profile_model(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelProfile:
    """Per-stage forward cost (eval mode) plus whole-model training cost, per sample. Remembered
    per process by ``fingerprint``: a sweep, every method of a plan and every job of a warm
    actor profile a model once (tracing a torchvision model's step takes seconds)."""
    input_shape = tuple(int(s) for s in input_shape)  # type: ignore[assignment]
    key = fingerprint(model, input_shape)
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    profile = _profile(model, input_shape)
    _MEMO[key] = profile
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return profile


def _profile(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelProfile:
    with torch.random.fork_rng(devices=rng_devices(model)):
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
    parts = step_parts(model, input_shape)
    # The trace also counts what torch's counter has no formula for (CPU flash attention).
    train = max(train, parts.whole.per_sample.counted)
    return ModelProfile(
        layers=tuple(layers),
        train_flops_per_sample=train,
        param_bytes=state_bytes(model.state_dict()),
        input_bytes=math.prod(input_shape) * _FLOAT32_BYTES,
        input_shape=input_shape,
        parts=parts,
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
