"""FjORD (Horvath et al., NeurIPS 2021, arXiv 2102.13451): ordered dropout. A device of
capability ``p_max`` holds the leading-channel sub-model of width ``p_max``; at every local step
it samples ``p`` uniformly from the allowed rates up to ``p_max`` (the paper's uniform-5 set
0.2, 0.4, ..., 1 by default) and trains only the leading ``ceil(p * C)`` channels, so every
narrower model nested in it stays usable on its own.

Optional self-distillation (paper sec. 3.3): the ``p_max`` model is the teacher of the sampled
``p``: loss = CE + ``distill_weight`` * T^2 * KL(student_T || stopgrad(teacher_T)). Static BN
defaults on (running statistics differ per width); the scaler and masked classifier are
HeteroFL's and default off.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import ExitStack
from itertools import chain

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from flexray.methods.base import DeviceContext, copy_state, sgd_train
from flexray.methods.batched import StepLoss, Tensors
from flexray.methods.width import WidthConfig, WidthMethod, rate_of
from flexray.models import elastic
from flexray.models.profile import state_bytes
from flexray.protocol import LocalData, State, StepProfile, Task, Update, Workload

UNIFORM_5 = (1.0, 0.8, 0.6, 0.4, 0.2)
"""The paper's width set ("uniform-5", sec. 5). HeteroFL's halvings down to 1/16 (flexray's
default before 2026-12-07) spend a fifth of every device's steps on a 1/16-width model, one
channel of the quickstart cnn's 16: the full model reached 72% sync and 67-77% async there,
92% with this set."""


class FjORDConfig(WidthConfig):
    rates: list[float] = Field(
        default_factory=lambda: list(UNIFORM_5), min_length=1,
        description="allowed width rates; the paper's uniform-5 set (sec. 5), sampled uniformly up to p_max")
    scaler: bool = Field(False, description="HeteroFL scaler: each layer's input x full/kept fan-in")
    masked_classifier: bool = Field(False, description="train and average only the classifier rows of local labels")
    distill: bool = Field(False, description="self-distillation from the device's p_max model")
    distill_weight: float = Field(1.0, ge=0, description="weight of the distillation term")
    temperature: float = Field(1.0, gt=0, description="distillation softmax temperature")


class OrderedDropout(nn.Module):
    """The ``p_max`` model whose training forward runs a random nested width ``p`` per step.

    The width-``p`` forward is the width-``p`` architecture called with leading *views* of the
    ``p_max`` parameters and buffers, so gradients and BN statistics land in the ``p_max`` model
    and one optimizer serves every width.
    """

    def __init__(
        self, base: nn.Module, skeletons: dict[float, nn.Module], rates: Sequence[float], generator: torch.Generator,
        steps: dict[float, StepProfile], teacher: StepProfile, distill: bool,
    ) -> None:
        super().__init__()
        self.base = base
        self.skeletons = skeletons  # plain dict: not submodules, their own weights are never used
        self.rates, self.generator = list(rates), generator
        self.steps, self.teacher_step, self.distill = steps, teacher, distill
        self.shapes = {p: {k: v.shape for k, v in m.state_dict().items()} for p, m in skeletons.items()}
        self.work = Workload()
        self.student: torch.Tensor | None = None
        self.teacher: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.base(x)
        p = self.rates[int(torch.randint(len(self.rates), (1,), generator=self.generator))]
        self.work = self.work + self.steps[p].step(len(x))
        self.teacher = None
        if p == max(self.rates):
            return self.base(x)
        shapes = self.shapes[p]
        own = chain(self.base.named_parameters(), self.base.named_buffers())
        tensors = {k: elastic.leading_view(v, shapes[k]) for k, v in own}
        self.student = functional_call(self.skeletons[p], tensors, (x,))
        if self.distill:
            with torch.no_grad():
                self.teacher = self.base(x)
            self.work = self.work + self.teacher_step.step(len(x))
        return self.student

    def distill_loss(self, temperature: float, weight: float) -> torch.Tensor:
        if self.teacher is None or self.student is None:
            return torch.zeros(())
        t = temperature
        kl = F.kl_div(F.log_softmax(self.student / t, 1), F.softmax(self.teacher / t, 1), reduction="batchmean")
        return weight * t * t * kl


class StackedOrderedDropout(StepLoss):
    """``OrderedDropout`` for stacked clients: each client draws its step's width ``p`` with its
    own generator, and the clients that drew the same ``p`` run the width-``p`` architecture on
    leading views of their stacked ``p_max`` weights (the teacher, if distilling, on all of them)."""

    def __init__(self, od: OrderedDropout, temperature: float, weight: float) -> None:
        super().__init__(od.base)
        self.od, self.temperature, self.weight = od, temperature, weight

    def draw(self, generator: torch.Generator) -> Hashable:
        return self.od.rates[int(torch.randint(len(self.od.rates), (1,), generator=generator))]

    def work(self, variant: Hashable, rows: int) -> Workload:
        p = float(variant)  # type: ignore[arg-type]
        work = self.od.steps[p].step(rows)
        return work + self.od.teacher_step.step(rows) if self.od.distill and p < max(self.od.rates) else work

    def __call__(self, variant: Hashable, params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        od, p = self.od, float(variant)  # type: ignore[arg-type]
        if p == max(od.rates):
            return super().__call__(variant, params, buffers, x, y, mask)
        shapes, skeleton = od.shapes[p], od.skeletons[p]
        views = {k: elastic.leading_view(v, shapes[k]) for k, v in (params | buffers).items()}
        with elastic.mask_logits(skeleton, mask):
            student = functional_call(skeleton, views, (x,))
        loss = F.cross_entropy(student, y)
        if od.distill:
            with elastic.mask_logits(od.base, mask):
                teacher = functional_call(od.base, ({k: v.detach() for k, v in params.items()}, buffers), (x,))
            t = self.temperature
            kl = F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher.detach() / t, 1), reduction="batchmean")
            loss = loss + self.weight * t * t * kl
        return loss


class FjORD(WidthMethod):
    name = "fjord"
    Config = FjORDConfig
    cfg: FjORDConfig

    def allowed(self, p_max: float) -> list[float]:
        return sorted(p for p in self.wcfg.rates if p <= p_max)

    def step_of(self, rate: float, input_shape: tuple[int, ...]) -> StepProfile:
        """The expected step: p is uniform over the allowed rates (teacher forward if distilling)."""
        rates = self.allowed(rate)
        step = sum((self.sub_profile(p, input_shape).step for p in rates[1:]), self.sub_profile(rates[0], input_shape).step)
        if self.cfg.distill:  # steps that ran a narrower width
            step = step + self.sub_profile(rate, input_shape).forward_step * sum(p < rate for p in rates)
        return step * (1.0 / len(rates))

    def ordered_dropout(self, p_max: float, shape: tuple[int, ...], ctx: DeviceContext) -> OrderedDropout:
        base = ctx.model(f"{self.name}:{p_max}", lambda: self.build(p_max))
        rates = self.allowed(p_max)
        skeletons = {p: ctx.model(f"{self.name}:{p}", lambda p=p: self.build(p)) for p in rates if p < p_max}
        steps = {p: self.sub_profile(p, shape).step for p in rates}
        return OrderedDropout(base, skeletons, rates, ctx.generator, steps, self.sub_profile(p_max, shape).forward_step,
                              self.cfg.distill)

    def local_update(self, task: Task, state: State, data: LocalData, ctx: DeviceContext) -> Update:
        cfg = self.cfg
        p_max = rate_of(task.spec)
        sub = elastic.extract(state, self.index(p_max, task.round))
        od = self.ordered_dropout(p_max, tuple(data.x.shape[1:]), ctx)
        od.base.load_state_dict(sub)
        labels = self.label_mask(data, state)
        extra = (lambda _m: od.distill_loss(cfg.temperature, cfg.distill_weight)) if cfg.distill else None
        with ExitStack() as stack:  # every width's classifier masks the labels the device lacks
            for m in (od.base, *od.skeletons.values()):
                stack.enter_context(elastic.mask_logits(m, labels))
            samples, loss = sgd_train(od, data, self.cfg, ctx.generator, extra)
        return self.finish(copy_state(od.base), labels, p_max, len(data), samples, od.work, state_bytes(sub), loss)

    def sub_model(self, rate: float, rnd: int, ctx: DeviceContext) -> nn.Module:
        return ctx.model(f"{self.name}:{rate}", lambda: self.build(rate))

    def step_loss(self, model: nn.Module, rate: float, shape: tuple[int, ...], ctx: DeviceContext) -> StepLoss:
        od = self.ordered_dropout(rate, shape, ctx)
        return StackedOrderedDropout(od, self.cfg.temperature, self.cfg.distill_weight)
