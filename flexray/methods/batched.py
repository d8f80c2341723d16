"""Clients that share a model shape, trained together: their parameters stacked on a client
axis, one ``torch.func.functional_call`` under ``vmap`` per step (``fleet.batch_clients``).

Each client keeps its own seeded batch order (``local_batches`` with its own generator), its
last short batch and its number of steps: batches are padded to the chunk's batch size with
zero-weight rows, and a client that has finished its steps stops moving. So the result equals
``sgd_train`` run client after client (to float rounding; tested at 1e-5), whatever the chunking.

A GPU runs a step for a whole chunk in the time one small model leaves it idle; on a CPU, vmapped
convolutions become grouped ones and are slower than client after client (measured in
``benchmarks/batched_clients.py``), which is why ``auto`` turns it on for CUDA only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from flexray.config import MethodConfig
from flexray.methods.base import local_batches
from flexray.protocol import LocalData, State

# Layers whose training step is not a function of (parameters, own batch) alone: BatchNorm's
# statistics would see the padding rows, dropout would draw one mask for the whole chunk.
_COUPLED = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, nn.GroupNorm, nn.LayerNorm)


def why_not_batched(model: nn.Module) -> str | None:
    """Why clients of this model cannot train stacked (None: they can)."""
    for name, module in model.named_modules():
        if isinstance(module, _COUPLED):
            return f"{name} ({type(module).__name__}) couples the rows of a batch"
    return None


@dataclass(frozen=True)
class ClientResult:
    state: State  # on the CPU, like every update that crosses the object store
    samples: int
    loss: float  # mean training loss per sample, as sgd_train reports it


def batched_sgd_train(
    model: nn.Module, datas: Sequence[LocalData], cfg: MethodConfig, generators: Sequence[torch.Generator],
    prox_mu: float = 0.0,
) -> list[ClientResult]:
    """Local SGD for each client from the model's current weights, all clients at once.

    ``prox_mu`` adds FedProx's mu/2 ||w - w_start||^2 (the start is the global model)."""
    model.train()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    device = next(iter(params.values())).device
    k = len(datas)
    stacked = {n: p.unsqueeze(0).repeat(k, *([1] * p.dim())) for n, p in params.items()}
    momentum = {n: torch.zeros_like(p) for n, p in stacked.items()}
    plans = [list(local_batches(len(d), cfg, g)) for d, g in zip(datas, generators)]
    steps = max((len(p) for p in plans), default=0)
    size = cfg.batch_size

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor):  # noqa: ANN202
        out = functional_call(model, (p, buffers), (x,))
        loss = (F.cross_entropy(out, y, reduction="none") * w).sum()
        if prox_mu:
            loss = loss + 0.5 * prox_mu * sum(((p[n] - params[n]) ** 2).sum() for n in p)
        return loss, loss.detach()

    grads_of = vmap(grad(loss_one, has_aux=True))
    seen = [0] * k
    loss_sum = [0.0] * k
    x0, y0 = datas[0].x, datas[0].y
    for t in range(steps):
        x = torch.zeros((k, size, *x0.shape[1:]), dtype=x0.dtype, device=device)
        y = torch.zeros((k, size), dtype=y0.dtype, device=device)
        w = torch.zeros((k, size), dtype=x0.dtype, device=device)
        active = torch.zeros(k, dtype=x0.dtype, device=device)
        for i, plan in enumerate(plans):
            if t < len(plan):
                idx = plan[t]
                b = len(idx)
                x[i, :b], y[i, :b], w[i, :b], active[i] = datas[i].x[idx], datas[i].y[idx], 1.0 / b, 1.0
        g, losses = grads_of(stacked, x, y, w)
        for i, plan in enumerate(plans):
            if t < len(plan):
                seen[i] += len(plan[t])
                loss_sum[i] += float(losses[i]) * len(plan[t])
        for n, p in stacked.items():
            d = g[n] + cfg.weight_decay * p if cfg.weight_decay else g[n]
            if cfg.momentum:  # torch.optim.SGD without dampening: buf = m * buf + d (buf starts at d)
                on = active.view(-1, *([1] * (p.dim() - 1)))
                momentum[n] = torch.where(on.bool(), cfg.momentum * momentum[n] + d, momentum[n])
                d = momentum[n]
            stacked[n] = p - cfg.lr * active.view(-1, *([1] * (p.dim() - 1))) * d
    results = []
    for i in range(k):  # in state_dict order, like copy_state
        state = {n: (stacked[n][i] if n in stacked else buffers[n]).detach().to("cpu", copy=True)
                 for n in model.state_dict()}
        results.append(ClientResult(state, seen[i], loss_sum[i] / max(seen[i], 1)))
    return results


__all__ = ["ClientResult", "batched_sgd_train", "why_not_batched"]
