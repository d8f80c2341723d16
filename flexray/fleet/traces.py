"""Time-varying speed and availability of a device, over *simulated* seconds.

Traces are queried per device per round and shipped to Ray actors, so they are plain picklable
objects with O(1) or O(log n) queries and no hidden state that depends on query order.
"""

from __future__ import annotations

import bisect
import csv
import math
from array import array
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from flexray.config import TraceConfig
from flexray.errors import FlexrayError


class Trace(ABC):
    @abstractmethod
    def speed(self, t: float) -> float:
        """Multiplier on ``profile.flops`` at simulated time ``t``; always > 0."""

    @abstractmethod
    def available(self, t: float) -> bool:
        """Whether the device can take work at simulated time ``t``."""

    @abstractmethod
    def available_between(self, t0: float, t1: float) -> bool:
        """Online for the whole of [t0, t1]: a task that spans an outage is lost."""


class ConstantTrace(Trace):
    def __init__(self, speed: float = 1.0) -> None:
        self._speed = float(speed)

    def speed(self, t: float) -> float:
        return self._speed

    def available(self, t: float) -> bool:
        return True

    def available_between(self, t0: float, t1: float) -> bool:
        return True

    def __repr__(self) -> str:
        return f"ConstantTrace(speed={self._speed})"


class PeriodicTrace(Trace):
    """A daily-cycle style device: speed swings sinusoidally, online for the first ``duty``
    fraction of each period (e.g. a phone that trains only while charging at night)."""

    def __init__(
        self, speed: float, amplitude: float, period_s: float, duty: float, min_speed: float, max_speed: float
    ) -> None:
        self.base, self.amplitude = float(speed), float(amplitude)
        self.period_s, self.duty = float(period_s), float(duty)
        self.min_speed, self.max_speed = float(min_speed), float(max_speed)

    def speed(self, t: float) -> float:
        s = self.base * (1.0 + self.amplitude * math.sin(2.0 * math.pi * t / self.period_s))
        return min(max(s, self.min_speed), self.max_speed)

    def available(self, t: float) -> bool:
        return self.duty >= 1.0 or (t % self.period_s) < self.duty * self.period_s

    def available_between(self, t0: float, t1: float) -> bool:
        if self.duty >= 1.0:
            return True
        window_end = (t0 // self.period_s) * self.period_s + self.duty * self.period_s
        return self.available(t0) and t1 < window_end

    def __repr__(self) -> str:
        return (
            f"PeriodicTrace(speed={self.base}, amplitude={self.amplitude}, "
            f"period_s={self.period_s}, duty={self.duty})"
        )


class RandomWalkTrace(Trace):
    """Log-speed random walk, one N(0, sigma) step every ``step_s`` seconds.

    Steps are generated lazily in chunks, each chunk from its own generator seeded by
    ``(seed, chunk index)`` and always in chunk order, so a value depends only on the seed and
    ``t``: never on which times were asked before, nor on whether the trace was pickled.
    The walk itself is clamped to [min_speed, max_speed] (not only its output), so it does
    not stick to a bound after wandering far past it.
    """

    CHUNK = 1024  # steps per chunk: ~17 simulated hours at the default 60 s step

    def __init__(
        self,
        seed: int,
        speed: float,
        sigma: float,
        step_s: float,
        min_speed: float,
        max_speed: float,
        p_offline: float = 0.0,
    ) -> None:
        self.seed = int(seed) % 2**64  # SeedSequence wants a non-negative entropy
        self.sigma, self.step_s, self.p_offline = float(sigma), float(step_s), float(p_offline)
        self.lo, self.hi = math.log(min_speed), math.log(max_speed)
        self.start = min(max(math.log(speed), self.lo), self.hi)
        self._reset_cache()

    def _reset_cache(self) -> None:
        # array/bytearray, not lists: 8 and 1 bytes a step for thousands of devices x days
        self._speeds = array("d")
        self._online = bytearray()
        self._x = self.start  # log-speed at the last generated step

    def _extend(self, n_steps: int) -> None:
        while len(self._speeds) < n_steps:
            chunk = len(self._speeds) // self.CHUNK
            rng = np.random.default_rng([self.seed, chunk])
            steps = rng.normal(0.0, self.sigma, self.CHUNK).tolist()
            online = (rng.random(self.CHUNK) >= self.p_offline).astype(np.uint8).tobytes()
            if chunk == 0:
                steps[0] = 0.0  # step 0 sits at the configured speed
            x, lo, hi, out = self._x, self.lo, self.hi, []
            for d in steps:
                x = min(max(x + d, lo), hi)
                out.append(math.exp(x))
            self._x = x
            self._speeds.extend(out)
            self._online.extend(online)

    def _index(self, t: float) -> int:
        k = int(t // self.step_s) if t > 0 else 0
        if k >= len(self._speeds):
            self._extend(k + 1)
        return k

    def speed(self, t: float) -> float:
        return self._speeds[self._index(t)]

    def available(self, t: float) -> bool:
        return self._online[self._index(t)] == 1

    def available_between(self, t0: float, t1: float) -> bool:
        k1 = self._index(t1)
        return all(self._online[self._index(t0) : k1 + 1])

    def __getstate__(self) -> dict:
        # Ship the recipe, not the cache: it regenerates identically and keeps payloads small.
        state = self.__dict__.copy()
        state.update(_speeds=array("d"), _online=bytearray(), _x=self.start)
        return state

    def __repr__(self) -> str:
        return (
            f"RandomWalkTrace(seed={self.seed}, sigma={self.sigma}, step_s={self.step_s}, "
            f"p_offline={self.p_offline})"
        )


class ReplayTrace(Trace):
    """Measured speed/availability, piecewise constant: the last row with ``time_s <= t``
    holds until the next one; times before the first row use the first row."""

    def __init__(self, times: list[float], speeds: list[float], online: list[bool], source: str = "") -> None:
        self.times, self.speeds, self.online, self.source = times, speeds, online, source

    def _row(self, t: float) -> int:
        return max(bisect.bisect_right(self.times, t) - 1, 0)

    def speed(self, t: float) -> float:
        return self.speeds[self._row(t)]

    def available(self, t: float) -> bool:
        return self.online[self._row(t)]

    def available_between(self, t0: float, t1: float) -> bool:
        return all(self.online[self._row(t0) : self._row(t1) + 1])

    def __repr__(self) -> str:
        return f"ReplayTrace({self.source!r}, rows={len(self.times)})"


# ---------------------------------------------------------------- replay files

_FIX = "give a CSV or Parquet file with columns time_s, speed[, available]"


def _read_columns(path: Path) -> dict[str, list]:
    """Column name -> raw values, from Parquet (by suffix) or CSV."""
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq  # lazy: only replay traces need it

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a bad file
            raise FlexrayError(f"trace file {path}: not a readable Parquet file ({err}); {_FIX}") from None
        return {name.strip(): table.column(name).to_pylist() for name in table.column_names}
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: tolerate Excel's BOM
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise FlexrayError(f"trace file {path}: file is empty; {_FIX}")
        names = [h.strip() for h in header]
        cols: dict[str, list] = {n: [] for n in names}
        for line, row in enumerate(reader, start=2):
            if not row or all(not v.strip() for v in row):
                continue
            if len(row) != len(names):
                raise FlexrayError(
                    f"trace file {path}: line {line} has {len(row)} fields, the header has {len(names)}; fix that line"
                )
            for n, v in zip(names, row):
                cols[n].append(v.strip())
    return cols


def _floats(path: Path, name: str, values: list) -> list[float]:
    out = []
    for i, v in enumerate(values):
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            raise FlexrayError(
                f"trace file {path}: column {name} row {i + 1} is {v!r}, not a finite number; fix that row"
            )
        out.append(x)
    return out


def load_replay(path: str | Path, scale: float = 1.0) -> ReplayTrace:
    """Read and validate a replay trace; every mistake is a one-line FlexrayError."""
    p = Path(path)
    if not p.is_file():
        raise FlexrayError(f"trace file not found: {p}; set trace.path to an existing file ({_FIX})")
    cols = _read_columns(p)
    for name in ("time_s", "speed"):
        if name not in cols:
            raise FlexrayError(
                f"trace file {p}: missing column {name!r} (found: {', '.join(cols) or 'none'}); {_FIX}"
            )
    times = _floats(p, "time_s", cols["time_s"])
    if not times:
        raise FlexrayError(f"trace file {p}: no data rows; {_FIX}")
    speeds = _floats(p, "speed", cols["speed"])
    for i in range(1, len(times)):
        if times[i] <= times[i - 1]:
            raise FlexrayError(
                f"trace file {p}: column time_s must strictly increase (row {i + 1}: {times[i]} after "
                f"{times[i - 1]}); sort the rows and drop duplicate times"
            )
    for i, s in enumerate(speeds):
        if s <= 0:
            raise FlexrayError(
                f"trace file {p}: column speed must be > 0 (row {i + 1} is {s}); "
                "use a small positive speed, with available=0 for offline spells"
            )
    online = [True] * len(times)
    if "available" in cols:
        flags = _floats(p, "available", cols["available"])
        for i, a in enumerate(flags):
            if a not in (0.0, 1.0):
                raise FlexrayError(
                    f"trace file {p}: column available must be 0 or 1 (row {i + 1} is {a}); fix that row"
                )
        online = [a == 1.0 for a in flags]
    return ReplayTrace(times, [s * scale for s in speeds], online, source=str(p))


def build_trace(cfg: TraceConfig, seed: int) -> Trace:
    """The trace a device group's config describes; ``seed`` only matters for random_walk."""
    if cfg.kind == "constant":
        return ConstantTrace(cfg.speed)
    if cfg.kind == "periodic":
        return PeriodicTrace(cfg.speed, cfg.amplitude, cfg.period_s, cfg.duty, cfg.min_speed, cfg.max_speed)
    if cfg.kind == "random_walk":
        return RandomWalkTrace(seed, cfg.speed, cfg.sigma, cfg.step_s, cfg.min_speed, cfg.max_speed, cfg.p_offline)
    if cfg.kind == "replay":
        if not cfg.path:
            raise FlexrayError(f"trace.path: required for kind=replay; {_FIX}")
        # cfg.speed (default 1) scales the measured multipliers, e.g. to model a faster unit.
        return load_replay(cfg.path, scale=cfg.speed)
    raise FlexrayError(f"trace.kind: unknown kind {cfg.kind!r}; use constant, periodic, random_walk or replay")
