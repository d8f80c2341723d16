"""Uniform dropout baseline (Federated Dropout style, Caldas et al. 2018): the same filter dropout
rate in every layer, in DISTREAL's framework so the comparison isolates the per-layer search.

Each device picks, for its current budget, the smallest rate on ``rates`` whose local work fits
the round deadline (``rate`` forces one rate on every device instead). Training (fresh random
kept filters per mini-batch), aggregation and the device-side choice are DISTREAL's; the only
difference is the candidate set: the diagonal ``d_l = r`` for all ``l``, ranked by ``r`` (less
dropout, better convergence), with no proxy training.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from flexray.config import fractions
from flexray.methods.base import ServerData
from flexray.methods.distreal import DropoutConfig, FilterDropout
from flexray.models import filters
from flexray.models.profile import profile_model


class UniformDropoutConfig(DropoutConfig):
    rates: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75], min_length=1,
                               description="uniform rates a device may pick")
    rate: float | None = Field(None, ge=0, lt=1, description="every device and layer drops this rate")

    @field_validator("rates")
    @classmethod
    def _rates_ok(cls, v: list[float]) -> list[float]:
        return fractions(v, "dropout rates")


class UniformDropout(FilterDropout):
    name = "uniform_dropout"
    Config = UniformDropoutConfig
    cfg: UniformDropoutConfig

    def candidates(self, data: ServerData, workdir: Path) -> tuple[list[str], list[list[float]], list[Path]]:
        cfg = self.cfg
        layers = filters.droppable(self.full)
        rates = [cfg.rate] if cfg.rate is not None else cfg.rates
        points = []
        for r in rates:
            width = filters.widths(layers, {la.name: r for la in layers})
            flops = profile_model(filters.slim(self.full, width), data.dataset.input_shape).train_flops_per_sample
            points.append([*(r for _ in layers), flops, r])  # convergence rank: the rate itself
        return [la.name for la in layers], points, []
