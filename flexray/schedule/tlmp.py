"""TLMP: choose every client's cut and server share so the slowest client finishes first.

After Wen et al., "Training Latency Minimization for Model-Splitting Allowed Federated Edge
Learning" (arXiv 2307.11532). A synchronous round lasts as long as its slowest client, whose
latency with cut ``l`` and server share ``theta`` is

    T_i(l, theta) = A_i(l) + B_i(l) / theta
    A_i(l) = C_i(l) + D_i (8 up_l / R_up_i + 8 down_l / R_down_i) + 8 m_l (1 / R_down_i + 1 / R_up_i) + rtt_i n_i(l)
    B_i(l) = S_i(l)

(D samples per round, up/down smashed bytes per sample, m client-model bytes, C and S the
client's and the server's compute seconds for its round at cut l from the per-layer latency
model -- the paper's D c_l / f_i and D s_l / F_server when a profile has only FLOP/s -- and
n the messages: one round trip per step when split, the model's down- and upload). Cut ``L`` is plain FL:
no server work, no smashed data, the whole model up and down. Minimise max_i T_i subject to
sum(theta) <= 1 and each client's memory. As in the paper the cut is made continuous by a
regression fitted to the per-cut profile, then the two blocks alternate -- shares given cuts
(bisection on the target latency), cuts given shares -- and the cuts are rounded to integers with
a neighbour check (here the regression runs through each client's latency terms, in log space).
Everything is numpy over all clients at once: 10,000 clients solve in well under a second.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.interpolate import PchipInterpolator

from flexray.errors import FlexrayError
from flexray.models.split import LABEL_BYTES, SplitPoint
from flexray.protocol import DeviceProfile, coefficients

_STEPS = 2  # grid points per unit of cut in the continuous search


@dataclass(frozen=True)
class Clients:
    """Per-client arrays (length N) for one round: what the traces and profiles say now."""

    coef: np.ndarray  # (N, F): seconds per unit of Workload.features() at the current trace speed
    uplink_bps: np.ndarray
    downlink_bps: np.ndarray
    memory_bytes: np.ndarray
    samples: np.ndarray  # samples trained this round (local_epochs x shard)
    steps: np.ndarray  # optimizer steps this round (local_epochs x batches of the shard)
    rtt_s: np.ndarray | None = None  # round-trip time per message (None: 0)

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    def of(cls, profiles: Sequence[DeviceProfile], speeds: Sequence[float], samples: Sequence[float],
           steps: Sequence[float]) -> Clients:
        return cls(
            coef=np.array([coefficients(p) for p in profiles], dtype=float) / np.asarray(speeds, dtype=float)[:, None],
            uplink_bps=np.array([p.uplink_bps for p in profiles], dtype=float),
            downlink_bps=np.array([p.downlink_bps for p in profiles], dtype=float),
            memory_bytes=np.array([p.memory_bytes for p in profiles], dtype=float),
            samples=np.asarray(samples, dtype=float), steps=np.asarray(steps, dtype=float),
            rtt_s=np.array([p.rtt_s for p in profiles], dtype=float),
        )

    def compute_s(self, fixed: np.ndarray, per_sample: np.ndarray) -> np.ndarray:
        """(N, L) seconds of ``steps`` steps over ``samples`` for per-cut step features (F, L)."""
        return (self.coef @ fixed) * self.steps[:, None] + (self.coef @ per_sample) * self.samples[:, None]


@dataclass(frozen=True)
class Terms:
    """A (N x L) and B (N x L) of the latency model; cut index j means cut j + 1."""

    A: np.ndarray
    B: np.ndarray
    feasible: np.ndarray  # memory fits
    unmasked: np.ndarray  # A where memory does not fit too (what the cut regression runs through)

    def latency(self, cuts: np.ndarray, theta: np.ndarray) -> np.ndarray:
        rows = np.arange(len(cuts))
        a, b = self.A[rows, cuts - 1], self.B[rows, cuts - 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(b > 0, a + b / theta, a)


@dataclass(frozen=True)
class Plan:
    cuts: np.ndarray  # 1..L per client; L = no split
    theta: np.ndarray  # server share per client, sums to <= 1
    latency: np.ndarray  # predicted per-client latency (s)
    fit_error: float  # max relative error of the cut regression at the integer cuts
    iterations: int
    solve_s: float

    @property
    def max_latency(self) -> float:
        return float(self.latency.max()) if len(self.latency) else 0.0


def _features(steps: Sequence[object]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([s.fixed.features() for s in steps], dtype=float).T,  # type: ignore[attr-defined]
            np.array([s.per_sample.features() for s in steps], dtype=float).T)  # type: ignore[attr-defined]


def terms(clients: Clients, points: Sequence[SplitPoint], server: DeviceProfile) -> Terms:
    up = np.array([p.uplink_bytes_per_sample for p in points], dtype=float)
    down = np.array([p.downlink_bytes_per_sample for p in points], dtype=float)
    m = np.array([p.client_model_bytes for p in points], dtype=float)
    mem = np.array([p.client_memory_bytes for p in points])
    d = clients.samples[:, None].astype(float)
    ul, dl = clients.uplink_bps[:, None], clients.downlink_bps[:, None]
    split = np.array([p.split for p in points], dtype=float)
    rtt = clients.rtt_s[:, None] if clients.rtt_s is not None else np.zeros((len(clients), 1))
    messages = 2.0 + split[None, :] * clients.steps[:, None]
    C = clients.compute_s(*_features([p.client_step for p in points]))
    s_fixed, s_per = _features([p.server_step for p in points])
    sc = np.array(coefficients(server), dtype=float)  # the server at its whole capacity (theta = 1)
    B = (clients.steps[:, None] * (sc @ s_fixed)[None, :] + clients.samples[:, None] * (sc @ s_per)[None, :]) * split[None, :]
    A = C + d * (8 * up / ul + 8 * down / dl) + 8 * m * (1 / dl + 1 / ul) + rtt * messages
    feasible = mem[None, :] <= clients.memory_bytes[:, None]
    return Terms(np.where(feasible, A, np.inf), B, feasible, A)


def required_share(a: np.ndarray, b: np.ndarray, target: float) -> np.ndarray:
    """Least theta that lets latency a + b / theta meet ``target`` (inf when none can). Options
    with b = 0 must come with ``a`` nudged down one ulp (``_zero_share``) so they meet T = a."""
    d = target - a
    return np.divide(b, d, out=np.full(np.shape(a), np.inf), where=d > 0)


def _zero_share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(b > 0, a, np.nextafter(a, -np.inf))


def solve_shares(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """Shares given cuts: the least target T with sum_i b_i / (T - a_i) <= 1, by bisection on T
    (inf when some client cannot run its cut)."""
    if not np.isfinite(a).all():
        return np.inf, np.zeros_like(a)
    target, _, theta = min_target(a[:, None], b[:, None])
    return target, theta


def min_target(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The least target T that every client meets with one of its options (columns of the N x k
    ``a``, ``b``; inf = unavailable) within sum(theta) <= 1. Each client takes the option that
    needs the least share at T; that total falls monotonically in T, so bisect on T.
    Returns (T, chosen column per client, shares)."""
    n = a.shape[0]
    if n == 0:
        return 0.0, np.zeros(0, dtype=int), np.zeros(0)
    if not np.isfinite(a.min(axis=1)).all():
        raise ValueError("a client has no available option")
    lo = float(a.min(axis=1).max())
    a = _zero_share(a, b)
    at, bt = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)  # (k, N): reduce over the short axis fast
    need = lambda t: float(required_share(at, bt, t).min(axis=0).sum())
    if need(lo) <= 1.0:
        target = lo
    else:
        hi = float(np.where(b > 0, a + b * n, a).min(axis=1).max())  # equal shares 1/n meet this
        hi = hi * (1 + 1e-9) + 1e-300
        while hi - lo > 1e-10 * hi:  # bisection; hi stays feasible throughout
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if need(mid) <= 1.0 else (mid, hi)
        target = hi
    shares = required_share(a, b, target)
    choice = np.argmin(shares, axis=1)
    return target, choice, shares[np.arange(n), choice]


# ---------------------------------------------------------------- the regression (continuous cut)


@dataclass(frozen=True)
class CutFit:
    """Smooth curves in the split cut x (1..L-1) through the log of client FLOPs, server FLOPs,
    uplink bytes and client-model bytes (all positive, spread over orders of magnitude).

    Shape-preserving cubics (PCHIP): per-stage costs jump (a head stage costs almost nothing),
    which a low-order polynomial cannot follow -- its error reaches 100s of percent on ResNets and
    strands the relaxation far from the integer optimum. ``error`` is therefore the regression's
    leave-one-out error: how far the curve without a cut lands from that cut's true cost."""

    curves: tuple[PchipInterpolator, ...]
    max_cut: int  # L - 1, the largest split cut
    error: float  # max relative leave-one-out error over the interior cuts and the four curves

    def at(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """(client flops, server flops, uplink bytes, downlink bytes) per sample, and model bytes."""
        c, s, up, m = (np.exp(f(x)) for f in self.curves)
        return c, s, up, np.maximum(up - LABEL_BYTES, 0.0), m


def fit_cuts(points: Sequence[SplitPoint]) -> CutFit | None:
    """The curves through the split cuts; None when the model has no split cut."""
    split = [p for p in points if p.split]
    if not split:
        return None
    x = np.array([p.cut for p in split], dtype=float)
    cols = [np.log(np.maximum([getattr(p, f) for p in split], 1.0)) for f in
            ("client_flops", "server_flops", "uplink_bytes_per_sample", "client_model_bytes")]
    if len(x) == 1:  # one split cut: constant curves
        x, cols = np.array([x[0], x[0] + 1e-9]), [np.repeat(c, 2) for c in cols]
    curves = tuple(PchipInterpolator(x, c) for c in cols)
    err = 0.0
    for i in range(1, len(x) - 1):  # leave each interior cut out, predict it from the others
        keep = np.arange(len(x)) != i
        for c in cols:
            guess = float(PchipInterpolator(x[keep], c[keep])(x[i]))
            err = max(err, abs(np.exp(guess - c[i]) - 1.0))
    return CutFit(curves, round(float(x.max())), err)


def _continuous_terms(fit: CutFit, tm: Terms, max_split: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A and B on a fine grid of real cuts x in [1, L-1]: shape-preserving cubics through each
    client's terms at the integer split cuts, in log space (inf past memory)."""
    xs = np.linspace(1.0, float(fit.max_cut), _STEPS * max(fit.max_cut - 1, 1) + 1)  # every integer is on it
    x = np.arange(1, fit.max_cut + 1, dtype=float)

    def curve(v: np.ndarray) -> np.ndarray:
        logs = np.log(np.maximum(v[:, : fit.max_cut], 1e-300))
        if fit.max_cut == 1:
            return np.repeat(np.exp(logs), len(xs), axis=1)
        return np.exp(PchipInterpolator(x, logs, axis=1)(xs))

    a = np.where(xs[None, :] <= max_split[:, None] + 1e-9, curve(tm.unmasked), np.inf)
    return xs, a, curve(tm.B)


# ---------------------------------------------------------------- the solver


def tlmp(clients: Clients, points: Sequence[SplitPoint], server: DeviceProfile, allow_fl: bool = True,
         max_iter: int = 20) -> Plan:
    """Alternating optimisation of cuts and shares, then integer rounding with a neighbour check."""
    t0 = time.perf_counter()
    tm = terms(clients, points, server)
    n, L = tm.A.shape
    feasible = tm.feasible.copy()
    if not allow_fl:
        feasible[:, L - 1] = False
    _check_feasible(feasible)
    split_ok = feasible[:, : L - 1]
    max_split = np.where(split_ok.any(1), L - 1 - np.argmax(split_ok[:, ::-1], axis=1), 0)
    fit = fit_cuts(points)
    rows = np.arange(n)
    A = np.where(feasible, tm.A, np.inf)

    def best_of(cands: np.ndarray, score: np.ndarray) -> np.ndarray:
        ok = (cands >= 1) & (cands <= L)
        cl = np.clip(cands, 1, L)
        sc = np.where(ok & feasible[rows[:, None], cl - 1], score(cl), np.inf)
        return cl[rows, np.argmin(sc, axis=1)]

    theta = np.full(n, 1.0 / n)
    if fit is not None:
        # The continuous relaxation: every client on the fitted curves (or FL), shares by bisection.
        xs, a_x, b_x = _continuous_terms(fit, tm, max_split)
        _, pick, theta = min_target(np.column_stack([a_x, A[:, L - 1]]), np.column_stack([b_x, tm.B[:, L - 1]]))
        x_rel = np.append(xs, L)[pick]
        relaxed = np.stack([np.floor(x_rel), np.ceil(x_rel)], axis=1).astype(int)
    else:
        relaxed = np.full((n, 2), L)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    it = 0
    for it in range(1, max_iter + 1):
        # Cuts given shares: each client's best real cut, rounded down/up, against plain FL.
        th = np.maximum(theta, 1e-12)[:, None]
        if fit is not None:
            x = xs[np.argmin(a_x + b_x / th, axis=1)]
            cands = np.stack([np.floor(x), np.ceil(x), np.full(n, L)], axis=1).astype(int)
        else:
            cands = np.full((n, 1), L)
        cuts = best_of(cands, lambda cl: A[rows[:, None], cl - 1] + tm.B[rows[:, None], cl - 1] / th)  # noqa: B023
        # Shares given cuts.
        target, theta = solve_shares(A[rows, cuts - 1], tm.B[rows, cuts - 1])
        if best is not None and target >= best[0] * (1 - 1e-9):
            break
        best = (target, cuts, theta)
    assert best is not None
    target, cuts, theta = best
    # Neighbour check: each client may move up to three cuts, back to its rounded relaxed cut, or
    # to plain FL; the least target
    # reachable with those options (and the share each then needs) is found by bisection. Moves
    # only ever lower the target; repeat around the new cuts until nothing moves.
    for _ in range(4 * L):
        cands = np.clip(np.column_stack([*(cuts + k for k in range(-3, 4)), np.full(n, L), relaxed]), 1, L)
        ok = feasible[rows[:, None], cands - 1]
        a_c = np.where(ok, A[rows[:, None], cands - 1], np.inf)
        t_new, pick, th_new = min_target(a_c, tm.B[rows[:, None], cands - 1])
        new = cands[rows, pick]
        if t_new > target * (1 - 1e-12) or np.array_equal(new, cuts):
            break
        cuts, target, theta = new, t_new, th_new
    target, theta = solve_shares(A[rows, cuts - 1], tm.B[rows, cuts - 1])  # hand out any spare share
    latency = tm.latency(cuts, theta)
    return Plan(cuts, theta, latency, fit.error if fit else 0.0, it, time.perf_counter() - t0)


def exact_minmax(clients: Clients, points: Sequence[SplitPoint], server: DeviceProfile, allow_fl: bool = True) -> Plan:
    """The exact optimum over integer cuts and continuous shares, without regression: bisect on
    the target T, every client taking the cut that needs the least share to meet it. O(N L log)
    like TLMP; a reference for TLMP at any fleet size (brute force stops at ~8 clients)."""
    t0 = time.perf_counter()
    tm = terms(clients, points, server)
    L = tm.A.shape[1]
    feasible = tm.feasible.copy()
    if not allow_fl:
        feasible[:, L - 1] = False
    _check_feasible(feasible)
    _, pick, _ = min_target(np.where(feasible, tm.A, np.inf), tm.B)
    cuts = pick + 1
    rows = np.arange(len(cuts))
    _, theta = solve_shares(tm.A[rows, pick], tm.B[rows, pick])
    return Plan(cuts, theta, tm.latency(cuts, np.maximum(theta, 1e-300)), 0.0, 1, time.perf_counter() - t0)


def _check_feasible(feasible: np.ndarray) -> None:
    bad = np.flatnonzero(~feasible.any(axis=1))
    if len(bad):
        raise FlexrayError(
            f"schedule: client {int(bad[0])} cannot hold even the first stage in memory at this batch size; "
            "lower method.batch_size or use a device class with more memory"
        )


# ---------------------------------------------------------------- baselines and reference


def plan_for(tm: Terms, cuts: np.ndarray, theta: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """(max latency, shares) of given cuts; optimal shares by bisection unless ``theta`` is given."""
    rows = np.arange(len(cuts))
    a, b = tm.A[rows, cuts - 1], tm.B[rows, cuts - 1]
    if theta is None:
        target, theta = solve_shares(a, b)
        return target, theta
    return float(tm.latency(cuts, theta).max()), theta


def baselines(clients: Clients, points: Sequence[SplitPoint], server: DeviceProfile) -> dict[str, float]:
    """Max latency of: FL only (no split), the best single cut for all (optimal shares), and
    equal server shares (each client then picks its own best cut). inf = some client cannot run it."""
    tm = terms(clients, points, server)
    n, L = tm.A.shape
    fl = float(tm.A[:, L - 1].max())
    fixed = min(plan_for(tm, np.full(n, cut))[0] for cut in range(1, L + 1))
    theta = np.full(n, 1.0 / n)
    with np.errstate(divide="ignore"):
        per_cut = np.where(tm.B > 0, tm.A + tm.B / theta[:, None], tm.A)
    equal = float(per_cut.min(axis=1).max())
    return {"fl_only": fl, "fixed_cut": fixed, "equal_shares": equal}


def brute_force(clients: Clients, points: Sequence[SplitPoint], server: DeviceProfile, grid: int = 10_000,
                chunk: int = 200_000) -> tuple[float, np.ndarray]:
    """Reference optimum for small fleets: every combination of cuts x shares on a grid of
    1/``grid`` steps. For each combination the least target whose grid shares sum to <= 1 is
    found by bisection (feasibility is monotone in the target)."""
    tm = terms(clients, points, server)
    n = tm.A.shape[0]
    options = [np.flatnonzero(tm.feasible[i]) for i in range(n)]
    best, best_cuts = np.inf, np.zeros(n, dtype=int)
    combos_iter = itertools.product(*options)
    while True:
        block = np.array(list(itertools.islice(combos_iter, chunk)), dtype=int)
        if not len(block):
            break
        a, b = tm.A[np.arange(n), block], tm.B[np.arange(n), block]  # (C, N)
        lo = a.max(axis=1)
        nsplit = np.maximum((b > 0).sum(axis=1), 1)
        hi = np.max(a + b * nsplit[:, None], axis=1) * (1 + 1e-6) + 1e-12
        hi = np.where((b > 0).any(axis=1), hi, lo)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            ok = _grid_ok(a, b, mid, grid)
            hi = np.where(ok, mid, hi)
            lo = np.where(ok, lo, mid)
        ok_lo = _grid_ok(a, b, lo, grid)  # lo itself meets (e.g. no split client at all)
        target = np.where(ok_lo, lo, hi)
        k = int(np.argmin(target))
        if target[k] < best:
            best, best_cuts = float(target[k]), block[k] + 1
    return best, best_cuts


def _grid_ok(a: np.ndarray, b: np.ndarray, target: np.ndarray, grid: int) -> np.ndarray:
    t = target[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        units = np.where(b > 0, np.ceil(grid * b / (t - a) - 1e-9), 0.0)
    meets = np.where(b > 0, t > a, a <= t)
    return meets.all(axis=1) & (np.where(meets, units, 0).sum(axis=1) <= grid)
