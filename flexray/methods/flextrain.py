"""FlexTrain (Unsal et al., arXiv 2310.20457): one depth-elastic model; any prefix deploys.

Configuration ``k`` runs the stem, the first ``k`` residual blocks and the classifier
(``flexray.models.depth``); this method uses ``k = 1..K`` (``K`` = every block). Device ``j`` has a
fixed ``k_j`` from its capability (static tier) and trains prefix ``W~_{k_j}`` for ``local_epochs``
with ``CE(f_{k_j}(x), y) + beta * ||f_{k_j - 1}(x) - stopgrad(f_{k_j}(x))||^2`` (teacher: its own
``k_j``; student: ``k_j - 1``; no distillation term at the smallest configuration, ``k = 1``). It
sends back exactly the entries of configuration ``k_j``; the server sets every global entry to the
*uniform* mean over the updates that hold it (paper eq. 8 / Algorithm 2), the rest keep their value.

Classifier rule (``FlexTrain.head_rule``, from the model; ``flexray.models.depth``): by default
(``zero_pad``) a prefix that ends inside a narrower stage reaches the one shared classifier through
the skipped blocks' option-A identity shortcuts, i.e. its features zero-padded to the classifier's
width. With ``model.stage_heads: true`` (``stage_heads``) each narrower stage has its own linear
classifier and a prefix uses its stage's; when the student ``k_j - 1`` ends in another stage than
the teacher, the device also loads, trains (by distillation) and returns the student's head.

Static tiers: ``depths`` maps a device class to ``k``; else a device gets the largest ``k`` whose
predicted per-sample training FLOPs fit ``flops / full_depth_flops`` of the full model's (at
least 1). Planning has no input shape, so those FLOPs are profiled at ``(C, 32, 32)``; for the
global-pooled residual nets the per-``k`` *ratios* do not depend on the spatial size. ``cost``
profiles each prefix at the real input shape (once per ``k``).

Which ``k`` a device trains is the scheduler's choice (``flexray.schedule.minmax``): its static
tier above (``schedule.mode: static``) or the largest prefix meeting the round's min-max latency.
``k`` forces one configuration on every device (FedSmall).

Centralised mode (``mode: centralised``; one device, or data-parallel over many): every step
samples ``k ~ pi`` and minimises ``CE(f_k(x), y) + beta * ||f_k(x) - stopgrad(f_{k+1}(x))||^2``
(``k' = k + 1``, none at ``k = K``); devices return whole models, averaged by samples.

The squared distance is averaged over the logits (MSE, as ``F.mse_loss``), not summed: with the
sum, beta = 0.2 made the shared weights diverge at lr 0.05 (loss 2 -> 290 within three epochs on
digits); the mean keeps the paper's beta usable.

Anchor (``anchor``, flexray's option; 0 = the paper): every device deeper than ``k = 1`` also
adds ``anchor x CE(f_1(x), y)``, so the shortest prefix, which the weakest devices deploy, learns
from every device's labels instead of only from the ``k = 1`` devices and ``k = 2``'s distillation.
Under ``zero_pad`` a prefix is the full network with later residual branches removed, so this also
trains the residual stream the full model reads. Measured on CIFAR-10 (ResNet-20, 20 devices, 30
rounds, three seeds): mean device accuracy 26.9% -> 30.25%, ahead of FedSmall and FedClass (README).

BN: the student's forward pass shares the teacher's BN modules, so in training mode it updates
their running statistics too (as in the paper's shared-weight formulation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from flexray.config import MethodConfig
from flexray.errors import FlexrayError
from flexray.methods.base import (
    DeviceContext,
    Method,
    cast_like,
    check_tensors,
    evaluate_model,
    sgd_train,
    state_bytes,
    weighted_mean,
)
from flexray.models import depth, elastic
from flexray.models.profile import ModelProfile, ProfileCache, training_memory_bytes
from flexray.protocol import Cost, DeviceProfile, DeviceView, LocalData, State, SubModel, Task, Update

PROBE_HW = (32, 32)
"""Spatial size the planning FLOPs are profiled at (see module doc)."""


class FlexTrainConfig(MethodConfig):
    mode: Literal["federated", "centralised"] = Field(
        "federated", description="federated: device j trains its prefix k_j; centralised: every step samples k ~ pi"
    )
    pi: list[float] | None = Field(
        None, description="centralised: sampling weights of k = 1..K (normalised); default uniform"
    )
    beta: float = Field(0.2, ge=0, description="self-distillation weight (paper: 0.2)")
    anchor: float = Field(
        0.0, ge=0, description="federated: weight of an extra CE term at k = 1 on every deeper device (paper: 0)"
    )
    k: int | None = Field(None, ge=1, description="federated: every device trains this k (e.g. FedSmall)")
    depths: dict[str, int] = Field(default_factory=dict, description="device class -> depth configuration k (>= 1)")
    full_depth_flops: float = Field(
        100e9, gt=0, description="FLOP/s that earns the full depth; slower: largest k fitting flops/this of its FLOPs"
    )

    @field_validator("beta")
    @classmethod
    def _beta_finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"beta must be finite, got {v}")
        return v

    @field_validator("pi")
    @classmethod
    def _pi_ok(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not math.isfinite(p) or p < 0 for p in v) or sum(v) <= 0):
            raise ValueError("pi must be non-negative finite weights of k = 1..K with a positive sum")
        return v

    @field_validator("depths")
    @classmethod
    def _depths_ok(cls, v: dict[str, int]) -> dict[str, int]:
        for name, k in v.items():
            if k < 1:
                raise ValueError(f"{name}: depth configuration must be >= 1, got {k}")
        return v


class FlexTrain(Method):
    name = "flextrain"
    cfg: FlexTrainConfig
    Config: ClassVar[type[MethodConfig]] = FlexTrainConfig
    linear = False

    def __init__(self, cfg: MethodConfig, model_fn: Callable[[], nn.Module]) -> None:
        super().__init__(cfg, model_fn)
        self._residual_checked = False
        self._profiles = ProfileCache()
        self._keys: dict[int, list[str]] = {}
        self._bytes: dict[int, int] = {}

    @property
    def fcfg(self) -> FlexTrainConfig:
        return self.cfg

    # ---- shared pieces
    @property
    def full(self) -> nn.Module:
        model = super().full
        if not self._residual_checked:
            depth.block_names(model)  # one-line error for non-residual models
            self._residual_checked = True
        return model

    @property
    def max_k(self) -> int:
        return depth.num_configs(self.full)

    @property
    def configs(self) -> list[int]:
        """The depth configurations this method assigns and evaluates: 1..K."""
        return list(range(1, self.max_k + 1))

    @property
    def head_rule(self) -> str:
        return depth.head_rule(self.full)

    def derived_params(self) -> dict[str, str]:
        return {"method.head_rule": self.head_rule}

    def keys(self, k: int) -> list[str]:
        if k not in self._keys:
            self._keys[k] = depth.prefix_keys(self.full, k)
        return self._keys[k]

    def trained_configs(self, k: int) -> list[int]:
        """The configurations a device at ``k`` runs each step: ``k``, the student ``k - 1``, the anchor 1."""
        return list(dict.fromkeys([k, *([k - 1] if self.distills(k) else []), *([1] if self.anchors(k) else [])]))

    def update_keys(self, k: int) -> list[str]:
        """What a device at ``k`` loads, trains and returns: the prefixes it runs. With ``zero_pad``
        that is its own prefix; with ``stage_heads`` also the student's and anchor's heads."""
        return list(dict.fromkeys(key for c in self.trained_configs(k) for key in self.keys(c)))

    def prefix_profile(self, k: int, input_shape: tuple[int, ...]) -> ModelProfile:
        return self._profiles.get(k, input_shape, lambda: depth.depth_prefix(self.full, k))

    def distills(self, k: int) -> bool:
        return k > 1 and self.fcfg.beta > 0

    def anchors(self, k: int) -> bool:
        return k > 1 and self.fcfg.anchor > 0

    def flops_per_sample(self, k: int, input_shape: tuple[int, ...]) -> float:
        """Training FLOPs per sample at ``k``: the prefix, the student ``k - 1``, the anchor ``1``."""
        return sum(self.prefix_profile(c, input_shape).train_flops_per_sample for c in self.trained_configs(k))

    def _probe_shape(self) -> tuple[int, ...]:
        conv = next((m for m in self.full.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise FlexrayError(f"method {self.name}: the model has no Conv2d stem to probe its input channels")
        return (conv.in_channels, *PROBE_HW)

    def tier_depth(self, profile: DeviceProfile) -> int:
        """The static depth configuration of a device class (see module doc)."""
        K = self.max_k
        forced = self.fcfg.k if self.fcfg.k is not None else self.fcfg.depths.get(profile.name)
        if forced is not None:
            if forced > K:
                field = "k" if self.fcfg.k is not None else f"depths: {profile.name}"
                raise FlexrayError(f"config error: method.{field}: k={forced} exceeds the model's {K} blocks")
            return forced
        shape = self._probe_shape()
        budget = profile.flops / self.fcfg.full_depth_flops * self.flops_per_sample(K, shape)
        fits = [k for k in self.configs if self.flops_per_sample(k, shape) <= budget * (1 + 1e-9)]
        return max(fits) if fits else 1

    def _prefix_bytes(self, k: int) -> int:
        if k not in self._bytes:
            like = self.full.state_dict()
            self._bytes[k] = state_bytes({key: like[key] for key in self.update_keys(k)})
        return self._bytes[k]

    @property
    def centralised(self) -> bool:
        return self.fcfg.mode == "centralised"

    @property
    def pi(self) -> torch.Tensor:
        """Sampling distribution of k = 1..K in centralised mode."""
        w = torch.tensor(self.fcfg.pi if self.fcfg.pi is not None else [1.0] * self.max_k, dtype=torch.float64)
        if len(w) != self.max_k:
            raise FlexrayError(f"config error: method.pi: {len(w)} weights for the model's {self.max_k} configurations")
        return w / w.sum()

    def check(self) -> None:
        """Residual blocks to drop, and ``pi`` / ``k`` / ``depths`` within their number."""
        _ = self.pi if self.centralised else self.max_k
        for name, k in {"k": self.fcfg.k, **{f"depths: {n}": v for n, v in self.fcfg.depths.items()}}.items():
            if k is not None and k > self.max_k:
                raise FlexrayError(f"config error: method.{name}: k={k} exceeds the model's {self.max_k} blocks")

    # ---- the scheduler's knob (federated mode)
    def options(self) -> list[SubModel]:
        if self.centralised:
            return []
        ks = [self.fcfg.k] if self.fcfg.k is not None else list(reversed(self.configs))
        return [SubModel(k=k) for k in ks]

    def static_option(self, device: DeviceProfile) -> SubModel:
        return SubModel(k=self.tier_depth(device))

    def option_memory_bytes(self, option: SubModel, input_shape: tuple[int, ...], batch_size: int) -> float:
        """The prefix's training memory plus the student's and anchor's activations (shared weights)."""
        k = depth_of(option)
        mem = training_memory_bytes(self.prefix_profile(k, input_shape), batch_size)
        for c in self.trained_configs(k)[1:]:
            mem += batch_size * sum(layer.activation_bytes for layer in self.prefix_profile(c, input_shape).layers)
        return mem

    def device_model(self, state: State, model: nn.Module, option: SubModel | None) -> nn.Module:
        """The prefix a device deploys; with ``k`` forced (FedSmall) that prefix is the global model."""
        model.load_state_dict(state)
        k = depth_of(option) if option is not None else self.fcfg.k
        return model if k is None else depth.depth_prefix(model, k)

    # ---- server side
    def plan(self, rnd: int, devices: Sequence[DeviceView], state: State) -> list[Task]:
        if self.centralised:
            return [Task(device=d.id, round=rnd, spec=SubModel(mode="centralised")) for d in devices]
        tasks = [
            Task(device=d.id, round=rnd, spec=SubModel(k=depth_of(d.choice) if d.choice is not None else self.tier_depth(d.profile)))
            for d in devices
        ]
        self.deployed.update({t.device: depth_of(t.spec) for t in tasks})
        return tasks

    def cost(self, task: Task, device: DeviceView, profile: ModelProfile) -> Cost:
        if profile.input_shape is None:
            raise FlexrayError(f"method {self.name}: the model profile lacks input_shape; build it with profile_model")
        samples = self.cfg.local_epochs * device.num_samples
        if self.centralised:
            per = sum(float(p) * self.centralised_flops(k, profile.input_shape) for k, p in zip(self.configs, self.pi))
            return Cost(samples * per, profile.param_bytes, profile.param_bytes)
        k = depth_of(task.spec)
        nbytes = self._prefix_bytes(k)
        return Cost(samples * self.flops_per_sample(k, profile.input_shape), nbytes, nbytes)

    def validate(self, update: Update, state: State, planned: SubModel | None = None) -> str | None:
        if self.centralised:
            return super().validate(update, state, planned) or (
                None if set(update.tensors) == set(state) else "a centralised update must hold every tensor"
            )
        k = update.trained.k if update.trained is not None else None
        if k is None or not math.isfinite(float(k)) or float(k) != int(k) or int(k) not in self.configs:
            return f"update has no valid depth configuration k (got {k!r})"
        return check_tensors(update.tensors, {key: state[key].shape for key in self.update_keys(int(k))}, f"k={int(k)}")

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        """Federated: uniform mean over the updates holding each entry (eq. 8), untouched entries
        keep their value. Centralised: data-parallel, i.e. the sample-weighted mean."""
        if not updates:
            return state
        if self.centralised:
            return cast_like(weighted_mean(updates), state)
        parts = [elastic.Part(u.tensors, elastic.whole_index(u.tensors), 1.0) for u in updates]
        return cast_like(elastic.aggregate(state, parts), state)

    def evaluate(self, state: State, model: nn.Module, data: LocalData) -> dict[str, float]:
        metrics = evaluate_model(self.device_model(state, model, None), data)
        for k in self.configs:  # prefixes share the loaded model's modules
            metrics[f"acc_k{k}"] = evaluate_model(depth.depth_prefix(model, k), data)["accuracy"]
        self.add_mean_device_acc(metrics, lambda k: f"acc_k{k}")
        return metrics

    # ---- device side
    def local_update(self, task: Task, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        if self.centralised:
            return self._centralised_update(state, data, ctx)
        k = depth_of(task.spec)
        if k not in self.configs:
            raise FlexrayError(f"method {self.name}: depth configuration k={k} out of range 1..{self.max_k}")
        model = ctx.model(self.name)
        keys = self.update_keys(k)
        sub = {key: state[key] for key in keys}
        model.load_state_dict(sub, strict=False)  # entries outside the prefix are never used
        nets = {c: depth.depth_prefix(model, c) for c in self.trained_configs(k)}  # at k = 2 student = anchor
        teacher = nets[k]
        student = nets[k - 1] if self.distills(k) else None
        anchor = nets[1] if self.anchors(k) else None
        samples, loss = self._train(teacher, student, anchor, data, ctx.generator)
        trained = model.state_dict()
        tensors = {key: trained[key].detach().clone() for key in keys}
        per_sample = self.flops_per_sample(k, tuple(data.x.shape[1:]))
        return Update(
            tensors, weight=1.0, samples=samples, flops=samples * per_sample, bytes_down=state_bytes(sub),
            metrics={"train_loss": loss, "k": float(k)}, trained=SubModel(k=k),
        )

    def _train(
        self, teacher: nn.Module, student: nn.Module | None, anchor: nn.Module | None, data: LocalData,
        generator: torch.Generator,
    ) -> tuple[int, float]:
        """CE of configuration k plus beta * ||f_{k-1}(x) - stopgrad(f_k(x))||^2 (paper, eq. 4), plus
        ``anchor`` x CE of configuration 1 (flexray's option, off by default)."""

        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            out = teacher(xb)
            total = F.cross_entropy(out, yb)
            small = None
            if student is not None:
                small = student(xb)
                total = total + self.fcfg.beta * (small - out.detach()).pow(2).mean()
            if anchor is not None:  # at k = 2 the student is the anchor: one forward pass
                small = small if anchor is student else anchor(xb)
                total = total + self.fcfg.anchor * F.cross_entropy(small, yb)
            return total

        parts = list(dict.fromkeys(m for m in (teacher, student, anchor) if m is not None))
        both = teacher if len(parts) == 1 else nn.ModuleList(parts)  # every head the loss uses
        return sgd_train(both, data, self.cfg, generator, batch_loss=loss)

    def centralised_flops(self, k: int, input_shape: tuple[int, ...]) -> float:
        """Per-sample FLOPs of a centralised step at k: train f_k, forward the teacher f_{k+1}."""
        flops = self.prefix_profile(k, input_shape).train_flops_per_sample
        if k < self.max_k and self.fcfg.beta > 0:
            flops += self.prefix_profile(k + 1, input_shape).fwd_flops_per_sample
        return flops

    def _centralised_update(self, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        """Each step samples k ~ pi and minimises CE(f_k) + beta * ||f_k - stopgrad(f_{k+1})||^2."""
        model = ctx.model(self.name)
        model.load_state_dict(state)
        prefixes = {k: depth.depth_prefix(model, k) for k in self.configs}
        pi, shape = self.pi.float(), tuple(data.x.shape[1:])
        flops = 0.0

        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            nonlocal flops
            k = int(torch.multinomial(pi, 1, generator=ctx.generator)) + 1
            flops += len(xb) * self.centralised_flops(k, shape)
            out = prefixes[k](xb)
            total = F.cross_entropy(out, yb)
            if k < self.max_k and self.fcfg.beta > 0:
                with torch.no_grad():
                    target = prefixes[k + 1](xb)
                total = total + self.fcfg.beta * (out - target).pow(2).mean()
            return total

        samples, mean_loss = sgd_train(model, data, self.cfg, ctx.generator, batch_loss=loss)
        tensors = {key: v.detach().clone() for key, v in model.state_dict().items()}
        return Update(
            tensors, weight=float(len(data)), samples=samples, flops=flops, bytes_down=state_bytes(state),
            metrics={"train_loss": mean_loss},
        )


def depth_of(spec: SubModel) -> int:
    if spec.k is None:
        raise FlexrayError(f"depth method: a task without a depth k ({spec.log()}); the scheduler or plan sets it")
    return int(spec.k)
