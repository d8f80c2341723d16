"""FedProx (Li et al., 2020): FedAvg plus a proximal term mu/2 ||w - w_global||^2 that keeps
heterogeneous devices' local models near the global one."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from torch import nn

from flexray.config import MethodConfig
from flexray.methods.fedavg import FedAvg
from flexray.protocol import State


class FedProxConfig(MethodConfig):
    mu: float = Field(0.01, ge=0, description="proximal strength; 0 is FedAvg")


class FedProx(FedAvg):
    name = "fedprox"
    Config = FedProxConfig
    cfg: FedProxConfig

    def prox_mu(self) -> float:
        return self.cfg.mu

    def extra_loss(self, state: State) -> Callable[[nn.Module], torch.Tensor]:
        mu = self.cfg.mu
        anchors: dict[str, torch.Tensor] = {}

        def prox(model: nn.Module) -> torch.Tensor:
            if not anchors:
                anchors.update({n: state[n].detach().to(p.device) for n, p in model.named_parameters()})
            return 0.5 * mu * sum(((p - anchors[n]) ** 2).sum() for n, p in model.named_parameters())

        return prox
