"""Clients that share a model shape, trained together: their weights stacked on a client axis,
one ``torch.func.functional_call`` under ``vmap(grad(...))`` per step (``fleet.batch_clients``).

Each client keeps its own seeded batch order (``local_batches`` with its own generator, drawn in
``sgd_train``'s order), its short last batch and its number of steps. A step groups the clients
whose batches have the same length (and, for FjORD, the same drawn width), so no batch is padded:
BatchNorm sees exactly the client's rows and keeps per-client running statistics. So the result
equals ``sgd_train`` run client after client (to float rounding; tested at 1e-5), whatever the
chunking. Dropout draws from the process's global generator, client after client, and that order
cannot be kept, so a model with active dropout trains one client at a time.

A GPU runs a step for a whole chunk in the time one small model leaves it idle; on a CPU, vmapped
convolutions become grouped ones and are slower than client after client (measured in
``benchmarks/batched_clients.py``), which is why ``auto`` turns it on for CUDA only.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from flexray.config import MethodConfig
from flexray.methods.base import local_batches
from flexray.models.elastic import mask_logits
from flexray.protocol import LocalData, State, Workload

Tensors = dict[str, torch.Tensor]


def why_not_batched(model: nn.Module) -> str | None:
    """Why clients of this model cannot train stacked (None: they can)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{name} ({type(module).__name__}) draws from the global generator, client after client"
    return None


@dataclass(frozen=True)
class ClientResult:
    state: State  # on the CPU, like every update that crosses the object store
    samples: int
    loss: float  # mean training loss per sample, as sgd_train reports it
    work: Workload | None  # what the step loss counted (None where the method counts it itself)


class _LossModule(nn.Module):
    """Wraps a loss that calls ``net``'s modules, so ``functional_call`` can swap their weights."""

    def __init__(self, net: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.net, self.loss = net, loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(x, y)


class StepLoss:
    """One client's loss on one batch as a function of its own weights (run under ``vmap``).

    The default is ``sgd_train``'s: cross-entropy of ``model(x)``, or ``batch_loss(x, y)`` when
    given (it calls ``model``'s modules, e.g. depth prefixes sharing them). A subclass may draw a
    variant per step and client (FjORD's width) with ``draw``; clients with equal variants share a
    vmapped call."""

    def __init__(self, model: nn.Module, batch_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model = model
        self.wrapped = None if batch_loss is None else _LossModule(model, batch_loss)

    def draw(self, generator: torch.Generator) -> Hashable:
        """The variant of a client's next step, drawn right after its batch (as in ``sgd_train``)."""
        return None

    def work(self, variant: Hashable, rows: int) -> Workload | None:
        """The kernels of one step of ``rows`` samples of ``variant`` (None: the method counts)."""
        return None

    def __call__(self, variant: Hashable, params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        with mask_logits(self.model, mask):
            if self.wrapped is None:
                return F.cross_entropy(functional_call(self.model, (params, buffers), (x,)), y)
            named = {f"net.{n}": t for n, t in (params | buffers).items()}
            return functional_call(self.wrapped, named, (x, y))


def batched_sgd_train(
    model: nn.Module, datas: Sequence[LocalData], cfg: MethodConfig, generators: Sequence[torch.Generator],
    step_loss: StepLoss | None = None, prox_mu: float = 0.0, masks: Sequence[torch.Tensor] | None = None,
) -> list[ClientResult]:
    """Local SGD (``torch.optim.SGD``'s rule) for each client from ``model``'s current weights,
    all clients at once. ``prox_mu`` adds FedProx's mu/2 ||w - w_start||^2; ``masks`` are the
    clients' label masks (HeteroFL's masked classifier)."""
    model.train()
    loss_of = step_loss or StepLoss(model)
    start = {n: p.detach() for n, p in model.named_parameters()}
    k = len(datas)
    params = {n: p.unsqueeze(0).repeat(k, *([1] * p.dim())) for n, p in start.items()}
    buffers = {n: b.detach().unsqueeze(0).repeat(k, *([1] * b.dim())) for n, b in model.named_buffers()}
    momentum = {n: torch.zeros_like(p) for n, p in params.items()}
    stacked_masks = None if masks is None else torch.stack([m.to(_device(start)) for m in masks])
    batches: list[Iterator[torch.Tensor]] = [local_batches(len(d), cfg, g) for d, g in zip(datas, generators)]
    seen, loss_sum = [0] * k, [0.0] * k
    works: list[Workload | None] = [None] * k
    vmapped: dict[Hashable, Callable] = {}

    def grads_for(variant: Hashable) -> Callable:
        def loss_one(p: Tensors, b: Tensors, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None):  # noqa: ANN202
            loss = loss_of(variant, p, b, x, y, mask)
            if prox_mu:
                loss = loss + 0.5 * prox_mu * sum(((p[n] - start[n]) ** 2).sum() for n in p)
            return loss, loss.detach()

        if variant not in vmapped:
            vmapped[variant] = vmap(grad(loss_one, has_aux=True), in_dims=(0, 0, 0, 0, None if masks is None else 0))
        return vmapped[variant]

    while True:
        groups: dict[tuple[Hashable, int], list[tuple[int, torch.Tensor]]] = {}
        for i in range(k):
            idx = next(batches[i], None)
            if idx is not None:
                groups.setdefault((loss_of.draw(generators[i]), len(idx)), []).append((i, idx))
        if not groups:
            break
        for (variant, size), members in groups.items():
            everyone = len(members) == k
            rows = torch.tensor([i for i, _ in members], device=_device(start))
            x = torch.stack([datas[i].x[idx] for i, idx in members])
            y = torch.stack([datas[i].y[idx] for i, idx in members])
            p_rows = params if everyone else {n: t[rows] for n, t in params.items()}
            b_rows = buffers if everyone else {n: t[rows] for n, t in buffers.items()}
            m_rows = None if stacked_masks is None else stacked_masks[rows]
            g, losses = grads_for(variant)(p_rows, b_rows, x, y, m_rows)  # BN updates b_rows in place
            _sgd_step(params, momentum, g, rows, everyone, cfg)
            if not everyone:
                for n, t in buffers.items():
                    t[rows] = b_rows[n]
            for (i, _), loss in zip(members, losses.cpu().tolist()):  # one transfer per group
                seen[i] += size
                loss_sum[i] += loss * size
                if (w := loss_of.work(variant, size)) is not None:
                    works[i] = w if works[i] is None else works[i] + w  # type: ignore[operator]
    results = []
    for i in range(k):  # in state_dict order, like copy_state
        state = {n: (params[n] if n in params else buffers[n])[i].detach().to("cpu", copy=True) for n in model.state_dict()}
        results.append(ClientResult(state, seen[i], loss_sum[i] / max(seen[i], 1), works[i]))
    return results


def _sgd_step(params: Tensors, momentum: Tensors, g: Tensors, rows: torch.Tensor, everyone: bool, cfg: MethodConfig) -> None:
    """``torch.optim.SGD`` (no dampening, no Nesterov) on the rows that took this step."""
    for n, full in params.items():
        p = full if everyone else full[rows]
        d = g[n] + cfg.weight_decay * p if cfg.weight_decay else g[n]
        if cfg.momentum:  # the buffer starts at zero, so its first value is d, as torch's
            buf = cfg.momentum * (momentum[n] if everyone else momentum[n][rows]) + d
            if everyone:
                momentum[n] = buf
            else:
                momentum[n][rows] = buf
            d = buf
        if everyone:
            params[n] = p - cfg.lr * d
        else:
            full[rows] = p - cfg.lr * d


def _device(tensors: Tensors) -> torch.device:
    return next(iter(tensors.values())).device if tensors else torch.device("cpu")


__all__ = ["ClientResult", "StepLoss", "batched_sgd_train", "why_not_batched"]
