"""DISTREAL's design-space exploration (Rapp et al., AAAI 2022, sec. 4): per-layer dropout rates.

Each candidate is a dropout vector ``d`` on a grid. Its resource cost is the predicted training
FLOPs per sample of the kept-filter sub-network (counted by ``profile_model``) and its measured
wall seconds per mini-batch step; its convergence is the validation loss of the full model after
a short proxy training in which every mini-batch drops filters at rates ``d``. NSGA-II (pymoo)
searches the grid for the two objectives (cost, loss); the front is the non-dominated set of
every candidate evaluated. Fronts are cached on disk keyed by model, input, data and search
settings, so jobs (and every round of a job) reuse them; the search runs once per model.

The proxy training runs on the device it is given (the driver's, ``ServerData.compute``); its
random draws (mini-batches, kept filters) come from a CPU generator, so a GPU search explores the
candidates a CPU one does, and the measured step times are the GPU's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from tqdm import tqdm

from flexray.config import SampleCount, fractions, sample_count
from flexray.models import filters
from flexray.models.evaluate import evaluate_model
from flexray.models.profile import profile_model
from flexray.protocol import LocalData


class DSEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    grid: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75], min_length=2,
                              description="dropout rates a layer may take")
    pop_size: int = Field(12, ge=4, description="NSGA-II population")
    generations: int = Field(6, ge=1, description="NSGA-II generations")
    proxy_samples: SampleCount = Field(
        0.1, gt=0, description="samples held out from the devices, 80% proxy training and 20% validation: a "
        "count (>= 20), or a fraction (< 1) of the training set"
    )
    proxy_steps: int = Field(50, ge=1, description="mini-batch steps of proxy training per candidate")
    proxy_batch: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    objective: Literal["predicted", "measured"] = Field(
        "predicted", description="cost objective: counted FLOPs (exact, reproducible) or measured s/step"
    )
    scaler: bool = Field(False, description="inverted dropout in the proxy training (the method's own setting)")
    cache_dir: str | None = Field(None, description="front cache; default $FLEXRAY_CACHE or ~/.cache/flexray, /dse")
    seed: int = 0

    @field_validator("grid")
    @classmethod
    def _grid_ok(cls, v: list[float]) -> list[float]:
        return fractions([*v, 0.0], "dropout rates")

    @field_validator("proxy_samples")
    @classmethod
    def _proxy_ok(cls, v: int | float) -> int | float:
        if isinstance(v, int) and v < 20:
            raise ValueError(f"proxy_samples: needs at least 20 (a validation fifth of 4), got {v}")
        return v

    def proxy_count(self, n_train: int) -> int:
        """Held-out samples for the search: at least 20 (so the validation fifth has 4)."""
        return max(20, sample_count(self.proxy_samples, n_train, "proxy_samples"))


@dataclass(frozen=True)
class Point:
    rates: tuple[float, ...]  # dropout rate per droppable layer (Front.layers order)
    flops: float  # predicted training FLOPs per sample
    step_s: float  # measured wall seconds per mini-batch step
    loss: float  # validation loss after proxy training (convergence: lower is better)
    accuracy: float


@dataclass(frozen=True)
class Front:
    layers: tuple[str, ...]
    points: tuple[Point, ...]  # the Pareto front, cheapest first
    evaluated: tuple[Point, ...]  # every candidate NSGA-II evaluated
    key: str
    objective: str = "predicted"
    full_flops: float = 0.0  # d = 0
    full_step_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Front:
        raw = json.loads(text)
        pts = {k: tuple(Point(**{**p, "rates": tuple(p["rates"])}) for p in raw[k]) for k in ("points", "evaluated")}
        return cls(**{**raw, **pts, "layers": tuple(raw["layers"])})

    def rates(self, i: int) -> dict[str, float]:
        return dict(zip(self.layers, self.points[i].rates))


def cost(p: Point, objective: str) -> float:
    return p.flops if objective == "predicted" else p.step_s


def non_dominated(points: Sequence[Point], objective: str = "predicted") -> list[Point]:
    """Points no other point beats in (cost, loss); cheapest first, duplicates by rates removed."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    uniq = list({p.rates: p for p in points}.values())
    f = np.array([[cost(p, objective), p.loss] for p in uniq])
    best = NonDominatedSorting().do(f, only_non_dominated_front=True)
    return sorted((uniq[i] for i in best), key=lambda p: (cost(p, objective), p.loss))


def cache_dir(cfg: DSEConfig) -> Path:
    root = cfg.cache_dir or os.path.join(os.environ.get("FLEXRAY_CACHE", Path.home() / ".cache" / "flexray"), "dse")
    return Path(root)


def front_key(model: nn.Module, input_shape: tuple[int, ...], data: LocalData, cfg: DSEConfig) -> str:
    """Model architecture + input + proxy data + search settings (not the cache location)."""
    h = hashlib.sha256()
    h.update(repr(model).encode())
    h.update(repr(tuple(input_shape)).encode())
    h.update(cfg.model_dump_json(exclude={"cache_dir"}).encode())
    h.update(data.x.numpy().tobytes()[: 1 << 20])
    h.update(data.y.numpy().tobytes())
    return h.hexdigest()[:16]


class _Evaluator:
    """Proxy-trains and profiles one candidate; memoised, because NSGA-II revisits grid points."""

    def __init__(self, model_fn: Callable[[], nn.Module], data: LocalData, cfg: DSEConfig,
                 input_shape: tuple[int, ...], device: torch.device | None = None) -> None:
        self.model_fn, self.cfg, self.input_shape = model_fn, cfg, tuple(input_shape)
        self.device = device or torch.device("cpu")
        n_train = max(1, int(0.8 * len(data)))
        x, y = data.x.to(self.device), data.y.to(self.device)  # moved once, used by every candidate
        self.train = LocalData(x[:n_train], y[:n_train])
        self.val = LocalData(x[n_train:], y[n_train:])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.init = {k: v.clone() for k, v in model_fn().state_dict().items()}
        with torch.random.fork_rng(devices=[]):
            self.model = model_fn().to(self.device)  # one object: its channel groups are traced once, not per candidate
        self.layers = filters.droppable(self.model)
        self.memo: dict[tuple[float, ...], Point] = {}

    def _fresh(self) -> nn.Module:
        """The shared model, back at the search's initial weights."""
        self.model.load_state_dict(self.init)
        self.model.train()
        return self.model

    def __call__(self, rates: tuple[float, ...]) -> Point:
        if rates in self.memo:
            return self.memo[rates]
        cfg = self.cfg
        model = self._fresh()
        width = filters.widths(self.layers, dict(zip((la.name for la in self.layers), rates)))
        flops = profile_model(filters.slim(model, width), self.input_shape).train_flops_per_sample  # type: ignore[arg-type]
        trainer = filters.DropoutSGD(model, width, scaler=cfg.scaler)
        g = torch.Generator().manual_seed(cfg.seed)
        times: list[float] = []
        n = len(self.train)
        for step in range(cfg.proxy_steps):
            idx = torch.randint(n, (min(cfg.proxy_batch, n),), generator=g)
            t0 = time.perf_counter()
            trainer.step(self.train.x[idx], self.train.y[idx], g, cfg.lr, cfg.momentum)
            if self.device.type == "cuda":  # a step's time is its kernels', not their launch
                torch.cuda.synchronize(self.device)
            if step >= min(2, cfg.proxy_steps - 1):  # skip warm-up steps
                times.append(time.perf_counter() - t0)
        m = evaluate_model(model, self.val)
        loss = m["loss"] if math.isfinite(m["loss"]) else 1e9
        # the fastest step: on a shared machine the others mostly measure the neighbours' load
        point = Point(tuple(rates), flops, float(min(times)), loss, m["accuracy"])
        self.memo[rates] = point
        return point


def explore(model_fn: Callable[[], nn.Module], data: LocalData, cfg: DSEConfig, input_shape: tuple[int, ...],
            use_cache: bool = True, device: torch.device | None = None, progress: bool = False) -> Front:
    """The Pareto front of per-layer dropout rates for this model (cached per model + grid),
    searched on ``device`` (the CPU by default); ``data`` stays where it is. ``progress``: a bar
    over the candidates (a search on a large model takes minutes), or a line naming the cached
    front it reuses."""
    ev = _Evaluator(model_fn, data, cfg, input_shape, device)
    key = front_key(ev._fresh(), input_shape, data, cfg)
    path = cache_dir(cfg) / f"{key}.json"
    if use_cache and path.is_file():
        if progress:
            print(f"design-space search: reusing the cached front {path} (delete it to search again)", file=sys.stderr)
        return Front.from_json(path.read_text())

    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.optimize import minimize

    grid, n_var = cfg.grid, len(ev.layers)

    class Grid(Problem):
        def __init__(self) -> None:
            super().__init__(n_var=n_var, n_obj=2, xl=0, xu=len(grid) - 1, vtype=int)

        def _evaluate(self, x: np.ndarray, out: dict, *args: object, **kwargs: object) -> None:
            pts = []
            for row in np.asarray(x).round().astype(int):
                pts.append(ev(tuple(grid[int(i)] for i in row)))
                bar.update(1)
            out["F"] = np.array([[cost(p, cfg.objective), p.loss] for p in pts])

    combos = len(grid) ** n_var
    pop = min(cfg.pop_size, combos)
    rng = np.random.default_rng(cfg.seed)
    start = rng.integers(0, len(grid), size=(pop, n_var))
    start[0], start[-1] = 0, len(grid) - 1  # always try no dropout and the cheapest corner
    algo = NSGA2(pop_size=pop, sampling=start, eliminate_duplicates=True,
                 crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                 mutation=PM(eta=20, vtype=float, repair=RoundingRepair()))
    bar = tqdm(total=pop * cfg.generations, desc=f"design-space search ({n_var} layers)", unit="candidate",
               disable=not progress, leave=False)
    with bar, torch.random.fork_rng(devices=[]):
        minimize(Grid(), algo, ("n_gen", cfg.generations), seed=cfg.seed, verbose=False)
        bar.total = bar.n  # the bound assumed no repeats; NSGA-II stops proposing new points sooner
    evaluated = tuple(ev.memo.values())
    full = ev((0.0,) * n_var)
    front = Front(tuple(la.name for la in ev.layers), tuple(non_dominated(evaluated, cfg.objective)), evaluated, key,
                  cfg.objective, full.flops, full.step_s)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(front.to_json())
    tmp.replace(path)  # atomic: concurrent jobs never read half a file
    return front


def select(points: Sequence[tuple[float, float]], budget_s: float | None) -> int:
    """Device-side choice: the best-converging point (lowest loss) whose local work fits
    ``budget_s`` compute seconds; the cheapest when none fits.

    ``points``: (predicted compute seconds of the device's local work, loss) per front point."""
    if budget_s is None:
        return min(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    fits = [i for i, (s, _) in enumerate(points) if s <= budget_s]
    if fits:
        return min(fits, key=lambda i: (points[i][1], points[i][0]))
    return min(range(len(points)), key=lambda i: points[i][0])


def plot(front: Front, path: Path) -> Path:
    """Cost vs convergence: every evaluated candidate and the front, both cost measures."""
    import matplotlib  # lazy: only a search that ran plots; Agg, as flexray.tracking.plots uses

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (attr, label, scale) in zip(axes, (("flops", "predicted MFLOPs / sample", 1e-6),
                                               ("step_s", "measured ms / step", 1e3))):
        ax.scatter([getattr(p, attr) * scale for p in front.evaluated], [p.loss for p in front.evaluated],
                   c="#bbbbbb", label="evaluated")
        pts = sorted(front.points, key=lambda p: getattr(p, attr))
        ax.plot([getattr(p, attr) * scale for p in pts], [p.loss for p in pts], "o-", c="#c44e52", label="Pareto front")
        for p in pts:
            ax.annotate(",".join(f"{r:g}" for r in p.rates), (getattr(p, attr) * scale, p.loss), fontsize=7)
        ax.set(xlabel=label, ylabel="proxy validation loss")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"DISTREAL design space ({', '.join(front.layers)}); objective: {front.objective} cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
