"""FlexTrain (Unsal et al., arXiv 2310.20457): one depth-elastic model; any prefix deploys.

Configuration ``k`` runs the stem, the first ``k`` residual blocks and the classifier
(``flexray.models.depth``); this method uses ``k = 1..K`` (``K`` = every block). Device ``j`` has a
fixed ``k_j`` from its capability (static tier) and trains prefix ``W~_{k_j}`` for ``local_epochs``
with ``CE(f_{k_j}(x), y) + beta * ||f_{k_j - 1}(x) - stopgrad(f_{k_j}(x))||^2`` (teacher: its own
``k_j``; student: ``k_j - 1``). The weakest tier, the shallowest ``k`` the server has assigned so
far, and ``k = 1`` train on labels only (the paper; tasks carry ``mode: labels``). It sends back
exactly the entries of configuration ``k_j``. ``aggregation: paper`` (default,
Algorithm 2): every global entry becomes the uniform mean over the round's devices ``C``, a device
that did not train it entering with its current global value. ``coverage``: the uniform mean over
the updates holding it, the rest keep their value. Async rounds (``flexray.methods.policy``):
``C`` is one arrival under FedAsync (both rules mix in only what it trained) and the buffer under
FedBuff (``buffer_rule``: ``paper`` averages an entry over every buffered arrival).

Classifier rule (``FlexTrain.head_rule``; ``flexray.models.depth``): ``zero_pad`` by default;
with ``stage_heads`` a device whose student ends in another stage also trains and returns its head.

Static tiers: ``depths`` maps a device class to ``k``; else a device gets the largest ``k`` whose
training step, profiled at ``(C, 32, 32)`` (planning has no input shape; the per-``k`` ratios
barely depend on it) and timed by the device's latency model, takes at most ``flops /
full_depth_flops`` of its full-depth step (at least 1; with a FLOPs-only profile: of its FLOPs).
The scheduler (``flexray.schedule.minmax``) picks that tier or the largest prefix meeting the
round's min-max latency; ``k`` forces one configuration on every device (FedSmall).

Centralised mode (``mode: centralised``; one device, or data-parallel over many): every step
samples ``k ~ pi`` and minimises ``CE(f_k(x), y) + beta * ||f_k(x) - stopgrad(f_{k+1}(x))||^2``
(``k' = k + 1``, none at ``k = K``); devices return whole models, averaged by samples.
``stochastic_depth: p`` also drops block ``l`` of ``f_k`` with probability ``l / K x p`` per step
(Huang et al. 2016's linear rule) to its parameter-free shortcut; teacher and evaluation run every
block, unscaled (a dropped block is a skipped layer, as in a prefix); FLOPs count the whole prefix.

The distance is between the two configurations' class probabilities (softmax), summed over
classes (``distance: probs``, at most 2 per sample). The paper writes ``||f_{k-1}(x) - f_k(x)||^2``
without saying whether ``f`` ends in logits or probabilities; on logits (``distance: logits``,
averaged over them) it diverges: the student and the teacher share the stem, the early blocks and
the classifier, so pulling the student's logits toward the teacher's also moves the teacher's, and
the unbounded squared gap feeds itself. On the quickstart (resnet8, the fast devices at k = 3 and
the others at k = 1) the laptops' loss went 1.4 -> 28 -> 1074 in three rounds and the global model
ended at 17%; whether it blows up depended on the plan and the rule (minmax 81%, static 17%,
coverage 26%), which is what made FlexTrain look fragile. On probabilities every setting learns
(docs/elastic.md, "Self-distillation distance").

Anchor (``anchor``, flexray's option; 0 = the paper): every device deeper than ``k = 1`` also
adds ``anchor x CE(f_1(x), y)``, so the shortest prefix, which the weakest devices deploy, learns
from every device's labels (docs/elastic.md, "The anchor", has the measurements).

BN: the student shares the teacher's BN modules, so it updates their running statistics too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from flexray.config import MethodConfig
from flexray.errors import FlexrayError
from flexray.methods.base import (
    DeviceContext, Method, cast_like, check_tensors, evaluate_model, sgd_train, state_bytes, weighted_mean,
)
from flexray.methods.batched import StepLoss, batched_sgd_train, why_not_batched
from flexray.models import depth, elastic
from flexray.models.profile import ModelProfile, ProfileCache, training_memory_bytes
from flexray.protocol import (
    Cost, DeviceProfile, DeviceView, Knob, LocalData, State, StepProfile, SubModel, Task, Update, Workload,
    compute_seconds,
)

PROBE_HW = (32, 32)
"""Spatial size the planning FLOPs are profiled at (see module doc)."""
LABELS = "labels"
"""``Depth.mode`` of a weakest-tier task: no self-distillation."""


@dataclass(frozen=True)
class Depth(Knob):
    """The depth methods' knob (FlexTrain, FedClass)."""

    k: int | None = None  # depth prefix, in blocks
    mode: str | None = None  # LABELS: no self-distillation; "centralised": the whole elastic model, data-parallel


class FlexTrainConfig(MethodConfig):
    mode: Literal["federated", "centralised"] = Field(
        "federated", description="federated: device j trains its prefix k_j; centralised: every step samples k ~ pi"
    )
    pi: list[float] | None = Field(
        None, description="centralised: sampling weights of k = 1..K (normalised); default uniform"
    )
    beta: float = Field(0.2, ge=0, allow_inf_nan=False, description="self-distillation weight (paper: 0.2)")
    distance: Literal["probs", "logits"] = Field(
        "probs", description="self-distillation distance: squared L2 between the configurations' class "
        "probabilities (bounded), or their raw logits (diverges on the quickstart: module doc)")
    anchor: float = Field(
        0.0, ge=0, description="federated: weight of an extra CE term at k = 1 on every deeper device (paper: 0)"
    )
    k: int | None = Field(None, ge=1, description="federated: every device trains this k (e.g. FedSmall)")
    aggregation: Literal["paper", "coverage"] = Field("paper", description="federated: paper: each entry the mean "
        "over the round's devices, untrained ones entering with its global value; coverage: over those that trained it")
    stochastic_depth: float = Field(
        0.0, ge=0, lt=1, description="centralised: drop probability of the last block, linear in depth (Huang 2016)"
    )
    depths: dict[str, int] = Field(default_factory=dict, description="device class -> depth configuration k (>= 1)")
    full_depth_flops: float = Field(
        100e9, gt=0, description="FLOP/s that earns the full depth; slower: largest k fitting flops/this of its FLOPs"
    )

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
        self._bytes: dict[tuple[int, bool], int] = {}

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

    def buffer_rule(self) -> Literal["coverage", "devices"]:
        """How a FedBuff buffer averages an entry (``flexray.methods.policy.BufferRule``)."""
        return "devices" if self.fcfg.aggregation == "paper" and not self.centralised else "coverage"

    def keys(self, k: int) -> list[str]:
        if k not in self._keys:
            self._keys[k] = depth.prefix_keys(self.full, k)
        return self._keys[k]

    def trained_configs(self, k: int, labels: bool = False) -> list[int]:
        """The configurations a device at ``k`` runs each step: ``k``, the student ``k - 1``, the anchor 1."""
        student = [k - 1] if self.distills(k, labels) else []
        return list(dict.fromkeys([k, *student, *([1] if self.anchors(k) else [])]))

    def update_keys(self, k: int, labels: bool = False) -> list[str]:
        """What a device at ``k`` loads, trains and returns: the prefixes it runs. With ``zero_pad``
        that is its own prefix; with ``stage_heads`` also the student's and anchor's heads."""
        return list(dict.fromkeys(key for c in self.trained_configs(k, labels) for key in self.keys(c)))

    def prefix_profile(self, k: int, input_shape: tuple[int, ...]) -> ModelProfile:
        return self._profiles.get(k, input_shape, lambda: depth.depth_prefix(self.full, k))

    def distills(self, k: int, labels: bool = False) -> bool:
        return k > 1 and self.fcfg.beta > 0 and not labels

    def anchors(self, k: int) -> bool:
        return k > 1 and self.fcfg.anchor > 0

    def step_of(self, k: int, input_shape: tuple[int, ...], labels: bool = False) -> StepProfile:
        """One step at ``k``: the prefix's, plus the passes of the student ``k - 1`` and the anchor
        ``1`` trained in the same step (each from its own traced kernels)."""
        first, *others = self.trained_configs(k, labels)
        step = self.prefix_profile(first, input_shape).step
        for c in others:
            prof = self.prefix_profile(c, input_shape)
            step = step + (prof.parts.passes if prof.parts is not None else prof.step)
        return step

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
        shape, batch = self._probe_shape(), self.cfg.batch_size
        took = {k: compute_seconds(profile, self.step_of(k, shape).step(batch)) for k in self.configs}
        budget = profile.flops / self.fcfg.full_depth_flops * took[K]  # that share of its own full-depth step
        fits = [k for k in self.configs if took[k] <= budget * (1 + 1e-9)]
        return max(fits) if fits else 1

    def _prefix_bytes(self, k: int, labels: bool = False) -> int:
        if (k, labels) not in self._bytes:
            like = self.full.state_dict()
            self._bytes[k, labels] = state_bytes({key: like[key] for key in self.update_keys(k, labels)})
        return self._bytes[k, labels]

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
        if self.fcfg.stochastic_depth and not self.centralised:
            raise FlexrayError("config error: method.stochastic_depth: applies to centralised training only; "
                               "set method.mode: centralised or remove it")
        for name, k in {"k": self.fcfg.k, **{f"depths: {n}": v for n, v in self.fcfg.depths.items()}}.items():
            if k is not None and k > self.max_k:
                raise FlexrayError(f"config error: method.{name}: k={k} exceeds the model's {self.max_k} blocks")

    # ---- the scheduler's knob (federated mode)
    def options(self) -> list[SubModel]:
        if self.centralised:
            return []
        ks = [self.fcfg.k] if self.fcfg.k is not None else list(reversed(self.configs))
        return [SubModel(Depth(k)) for k in ks]

    def static_option(self, device: DeviceProfile) -> SubModel:
        return SubModel(Depth(self.tier_depth(device)))

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
            return [Task(device=d.id, round=rnd, spec=SubModel(Depth(mode="centralised"))) for d in devices]
        ks = {d.id: depth_of(d.choice) if d.choice is not None else self.tier_depth(d.profile) for d in devices}
        self.deployed.update(ks)
        weakest = min(self.deployed.values(), default=1)
        mode = {k: LABELS if k == weakest and self.distills(k) else None for k in ks.values()}
        return [Task(device=i, round=rnd, spec=SubModel(Depth(k, mode[k]))) for i, k in ks.items()]

    def cost(self, task: Task, device: DeviceView, profile: ModelProfile) -> Cost:
        if profile.input_shape is None:
            raise FlexrayError(f"method {self.name}: the model profile lacks input_shape; build it with profile_model")
        epochs = (device.num_samples, self.cfg.batch_size, self.cfg.local_epochs)
        if self.centralised:
            mix = [self.centralised_step(k, profile.input_shape) * float(p) for k, p in zip(self.configs, self.pi)]
            return Cost(sum(mix[1:], mix[0]).epochs(*epochs), profile.param_bytes, profile.param_bytes)
        k, labels = depth_of(task.spec), mode_of(task.spec) == LABELS
        nbytes = self._prefix_bytes(k, labels)
        return Cost(self.step_of(k, profile.input_shape, labels).epochs(*epochs), nbytes, nbytes)

    def validate(self, update: Update, state: State, planned: SubModel | None = None) -> str | None:
        if self.centralised:
            return super().validate(update, state, planned) or (
                None if set(update.tensors) == set(state) else "a centralised update must hold every tensor"
            )
        trained = update.trained.of(Depth) if update.trained is not None else None
        k = trained.k if trained is not None else None
        if trained is None or k is None or not math.isfinite(float(k)) or float(k) != int(k) or int(k) not in self.configs:
            return f"update has no valid depth configuration k (got {k!r})"
        keys = self.update_keys(int(k), trained.mode == LABELS)
        return check_tensors(update.tensors, {key: state[key].shape for key in keys}, f"k={int(k)}")

    def aggregate(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        """Federated, ``paper``: every entry becomes the uniform mean over the round's devices, a
        device that did not train it entering with its current value (Algorithm 2); ``coverage``:
        the mean over the updates holding it, the rest keep their value. Centralised:
        data-parallel, i.e. the sample-weighted mean."""
        if not updates:
            return state
        if self.centralised:
            return cast_like(weighted_mean(updates), state)
        paper = self.fcfg.aggregation == "paper"
        held = [{**state, **u.tensors} if paper else u.tensors for u in updates]
        parts = [elastic.Part(t, elastic.whole_index(t), 1.0) for t in held]
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
        k, labels, model, keys = self._load(task, state, ctx)
        teacher, student, anchor = self._nets(model, k, labels)
        parts = list(dict.fromkeys(m for m in (teacher, student, anchor) if m is not None))
        both = teacher if len(parts) == 1 else nn.ModuleList(parts)  # every head the loss uses
        samples, loss = sgd_train(both, data, self.cfg, ctx.generator, batch_loss=self._loss(teacher, student, anchor))
        trained = model.state_dict()
        return self._update(task, {key: trained[key].detach().to("cpu", copy=True) for key in keys}, samples, loss, data)

    # BatchesClients: the devices of one depth configuration share a shape (federated mode).
    def batch_key(self, task: Task, ctx: DeviceContext) -> Hashable | None:
        if self.centralised or why_not_batched(ctx.model(self.name)) is not None:
            return None
        return (depth_of(task.spec), mode_of(task.spec))

    def local_updates(
        self, tasks: Sequence[Task], state: State, datas: Sequence[LocalData], generators: Sequence[torch.Generator],
        ctx: DeviceContext,
    ) -> list[Update]:
        k, labels, model, keys = self._load(tasks[0], state, ctx)
        loss = StepLoss(model, self._loss(*self._nets(model, k, labels)))
        results = batched_sgd_train(model, datas, self.cfg, generators, loss)
        return [self._update(task, {key: r.state[key] for key in keys}, r.samples, r.loss, d)
                for task, r, d in zip(tasks, results, datas)]

    def _load(self, task: Task, state: State, ctx: DeviceContext) -> tuple[int, bool, nn.Module, list[str]]:
        k, labels = depth_of(task.spec), mode_of(task.spec) == LABELS
        if k not in self.configs:
            raise FlexrayError(f"method {self.name}: depth configuration k={k} out of range 1..{self.max_k}")
        model = ctx.model(self.name)
        keys = self.update_keys(k, labels)
        model.load_state_dict({key: state[key] for key in keys}, strict=False)  # entries outside the prefix are never used
        return k, labels, model, keys

    def _nets(self, model: nn.Module, k: int, labels: bool) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
        """Teacher f_k, student f_{k-1} and anchor f_1 (at k = 2 the student is the anchor)."""
        nets = {c: depth.depth_prefix(model, c) for c in self.trained_configs(k, labels)}
        return nets[k], nets[k - 1] if self.distills(k, labels) else None, nets[1] if self.anchors(k) else None

    def _update(self, task: Task, tensors: State, samples: int, loss: float, data: LocalData) -> Update:
        k, labels = depth_of(task.spec), mode_of(task.spec) == LABELS
        step = self.step_of(k, tuple(data.x.shape[1:]), labels)
        n = len(data)
        return Update(
            tensors, weight=1.0, samples=samples, work=step.trained(n, self.cfg.batch_size, samples),
            bytes_down=state_bytes(tensors),
            metrics={"train_loss": loss, "k": float(k)}, trained=SubModel(Depth(k, mode_of(task.spec))),
        )

    def _loss(
        self, teacher: nn.Module, student: nn.Module | None, anchor: nn.Module | None,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """CE of configuration k plus beta * ||f_{k-1}(x) - stopgrad(f_k(x))||^2 (paper, eq. 4), plus
        ``anchor`` x CE of configuration 1 (flexray's option, off by default)."""

        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            out = teacher(xb)
            total = F.cross_entropy(out, yb)
            small = None
            if student is not None:
                small = student(xb)
                total = total + self.fcfg.beta * self.distance(small, out.detach())
            if anchor is not None:  # at k = 2 the student is the anchor: one forward pass
                small = small if anchor is student else anchor(xb)
                total = total + self.fcfg.anchor * F.cross_entropy(small, yb)
            return total

        return loss

    def distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``||f_{k-1}(x) - f_k(x)||^2`` per sample, averaged over the batch, on the class
        probabilities (``distance: probs``, bounded) or the raw logits (``logits``; see module doc)."""
        if self.fcfg.distance == "logits":
            return (student - teacher).pow(2).mean()
        return (F.softmax(student, 1) - F.softmax(teacher, 1)).pow(2).sum(1).mean()

    def centralised_step(self, k: int, input_shape: tuple[int, ...]) -> StepProfile:
        """A centralised step at k: train f_k, forward the teacher f_{k+1}."""
        step = self.prefix_profile(k, input_shape).step
        if k < self.max_k and self.fcfg.beta > 0:
            step = step + self.prefix_profile(k + 1, input_shape).forward_step
        return step

    def _centralised_update(self, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        """Each step samples k ~ pi and minimises CE(f_k) + beta * ||f_k - stopgrad(f_{k+1})||^2,
        ``f_k``'s blocks dropped by ``stochastic_depth``."""
        model = ctx.model(self.name)
        model.load_state_dict(state)
        prefixes = {k: depth.depth_prefix(model, k) for k in self.configs}
        pi, shape = self.pi.float(), tuple(data.x.shape[1:])
        drop = depth.drop_probs(self.max_k, self.fcfg.stochastic_depth)
        work = Workload()

        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            nonlocal work
            k = int(torch.multinomial(pi, 1, generator=ctx.generator)) + 1
            work = work + self.centralised_step(k, shape).step(len(xb))
            net = prefixes[k]
            if self.fcfg.stochastic_depth > 0:
                keep = (torch.rand(self.max_k, generator=ctx.generator) >= drop).tolist()
                net = depth.depth_subnet(model, [i < k and on for i, on in enumerate(keep)])
            out = net(xb)
            total = F.cross_entropy(out, yb)
            if k < self.max_k and self.fcfg.beta > 0:
                with torch.no_grad():
                    target = prefixes[k + 1](xb)
                total = total + self.fcfg.beta * self.distance(out, target)
            return total

        samples, mean_loss = sgd_train(model, data, self.cfg, ctx.generator, batch_loss=loss)
        tensors = {key: v.detach().clone() for key, v in model.state_dict().items()}
        return Update(
            tensors, weight=float(len(data)), samples=samples, work=work, bytes_down=state_bytes(state),
            metrics={"train_loss": mean_loss},
        )


def depth_of(spec: SubModel) -> int:
    knob = spec.of(Depth)
    if knob is None or knob.k is None:
        raise FlexrayError(f"depth method: a task without a depth k ({spec.log()}); the scheduler or plan sets it")
    return int(knob.k)


def mode_of(spec: SubModel) -> str | None:
    knob = spec.of(Depth)
    return knob.mode if knob is not None else None
