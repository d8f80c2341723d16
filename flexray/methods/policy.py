"""Aggregation policies for asynchronous rounds, applied to any method's updates.

In async rounds a device trains on the model version current at its launch and its update lands
later, when the server has moved on. A policy decides how such an update changes the model:

- ``fedasync`` (Xie et al., 2019, arXiv 1903.03934): mix each arrival in at once,
  ``w <- (1 - a) w + a w_k`` with ``a = alpha * s(staleness)``.
- ``fedbuff`` (Nguyen et al., AISTATS 2022, arXiv 2106.06639): buffer the deltas of ``K``
  arrivals and step once by their mean, ``w <- w + server_lr * mean_k s(t_k) d_k``.

The method is never asked to understand staleness: the policy lets the method aggregate the
arrival against the version the device started from (``method.aggregate(version, base,
updates)``, so a sub-model's indices, FedRolex's rolling offset or REFT's kept filters are the
ones the device trained), and takes the *difference to that base* as the arrival's contribution.
Entries the device did not train (outside its width slice, depth prefix, kept filters or cut)
have no difference and are left alone: an entry is mixed in only by the devices that trained it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from flexray.methods.base import Method, State, Update, cast_like

Staleness = Literal["constant", "polynomial", "hinge"]


@dataclass(frozen=True)
class AsyncPolicy:
    """How arrivals change the global model; ``rounds.async_policy`` and its fields build it."""

    kind: Literal["fedasync", "fedbuff"] = "fedasync"
    alpha: float = 0.6  # fedasync: mixing weight of a fresh update
    staleness: Staleness = "polynomial"
    a: float = 0.5  # polynomial exponent / hinge slope
    b: int = 4  # hinge: staleness tolerated at full weight
    buffer_size: int = 10  # fedbuff: K arrivals per server step
    server_lr: float = 1.0  # fedbuff: server step size
    max_staleness: int | None = None  # discard staler arrivals; None keeps all

    def scale(self, staleness: int) -> float:
        """s(t): how much an update computed ``staleness`` versions ago still counts."""
        if self.staleness == "polynomial":
            return float((staleness + 1) ** (-self.a))
        if self.staleness == "hinge":
            return 1.0 if staleness <= self.b else 1.0 / (self.a * (staleness - self.b) + 1.0)
        return 1.0


@runtime_checkable
class HasPolicy(Protocol):
    """A method that brings its own policy (the ``fedasync`` and ``fedbuff`` names): applied in
    sync rounds too, where every update is fresh and a round's updates are one buffer."""

    def policy(self) -> AsyncPolicy: ...


@runtime_checkable
class BufferRule(Protocol):
    """A method that says how a FedBuff step averages an entry: over the arrivals that trained it
    (``coverage``, also without this) or over every buffered arrival, one that did not train it
    adding no change (``devices``: FlexTrain's ``aggregation: paper``, the buffer being its round)."""

    def buffer_rule(self) -> Literal["coverage", "devices"]: ...


@dataclass
class _Arrival:
    delta: dict[str, torch.Tensor]  # float64, zero where the device trained nothing
    mask: dict[str, torch.Tensor]  # bool: the entries the device trained
    scale: float


class Arrivals:
    """Applies a policy to the updates of one method as they land (checkpointed with the run)."""

    def __init__(self, policy: AsyncPolicy, method: Method) -> None:
        self.policy, self.method = policy, method
        self.buffer: list[_Arrival] = []
        self.discarded = 0

    def arrive(self, version: int, base: State, state: State, updates: Sequence[Update], staleness: int) -> State | None:
        """The new global model after one device's landing (its client and server parts), or None
        while a FedBuff buffer fills or the arrival is discarded as too stale."""
        if not updates:
            return None
        p = self.policy
        if p.max_staleness is not None and staleness > p.max_staleness:
            self.discarded += 1
            return None
        arrival = self._contribution(version, base, updates, p.scale(staleness))
        if p.kind == "fedasync":
            return self._mix(state, base, arrival, p.alpha * arrival.scale)
        self.buffer.append(arrival)
        return self._flush(state) if len(self.buffer) >= p.buffer_size else None

    def round(self, rnd: int, state: State, updates: Sequence[Update]) -> State:
        """A synchronous round under the policy: every update is fresh. FedAsync mixes the round's
        aggregate in as one arrival; FedBuff steps by the mean of the round's deltas."""
        if not updates:
            return state
        if self.policy.kind == "fedasync":
            return self._mix(state, state, self._contribution(rnd, state, updates, 1.0), self.policy.alpha)
        self.buffer.extend(self._contribution(rnd, state, [u], 1.0) for u in updates)
        return self._flush(state)

    def _contribution(self, version: int, base: State, updates: Sequence[Update], scale: float) -> _Arrival:
        candidate = self.method.aggregate(version, base, updates)
        whole = self.method.linear and all(set(u.tensors) == set(base) for u in updates)
        delta, mask = {}, {}
        for k, ref in base.items():
            d = candidate[k].to(torch.float64) - ref.to(torch.float64)
            delta[k] = d
            mask[k] = torch.ones_like(d, dtype=torch.bool) if whole else d != 0
        return _Arrival(delta, mask, scale)

    def _mix(self, state: State, base: State, arrival: _Arrival, a: float) -> State:
        """FedAsync: ``(1 - a) w + a w_k`` on the entries the arrival trained, ``w_k = base + delta``."""
        out = {}
        for k, w in state.items():
            w64 = w.to(torch.float64)
            mixed = (1 - a) * w64 + a * (base[k].to(torch.float64) + arrival.delta[k])
            out[k] = torch.where(arrival.mask[k], mixed, w64)
        return cast_like(out, state)

    def _flush(self, state: State) -> State:
        """FedBuff: one step by the buffered deltas, each entry averaged over the arrivals that trained
        it (or over all of them, for a ``BufferRule`` method's ``devices``)."""
        lr, out = self.policy.server_lr, {}
        every = isinstance(self.method, BufferRule) and self.method.buffer_rule() == "devices"
        for k, w in state.items():
            num = sum(a.scale * a.delta[k] for a in self.buffer)
            den = sum(a.mask[k].to(torch.float64) for a in self.buffer)
            den = torch.where(den > 0, torch.full_like(den, float(len(self.buffer))), den) if every else den
            step = torch.where(den > 0, num / den.clamp_min(1.0), torch.zeros_like(num))
            out[k] = w.to(torch.float64) + lr * step
        self.buffer = []
        return cast_like(out, state)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": [(a.delta, a.mask, a.scale) for a in self.buffer], "discarded": self.discarded}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.buffer = [_Arrival(d, m, s) for d, m, s in saved.get("buffer", [])]
        self.discarded = int(saved.get("discarded", 0))
