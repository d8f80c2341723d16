"""Where device actors go: their Ray options, a pre-flight check against the live nodes, and a
predicted placement for ``flexray plan --address``.

Ray waits forever for an actor it cannot place. With a fleet pinned to real boards that is the
common failure (a board is off, a label is mistyped), so every job checks the live nodes first
and fails with one line naming the fix. Ray is imported lazily: configs are validated without it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flexray.errors import FlexrayError

# Ray's label syntax (Kubernetes style): a value, "!value", "in(a,b)" or "!in(a,b)".
_NAME = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"^({_NAME}(\.{_NAME})*/)?{_NAME}$")
_SELECTOR = re.compile(rf"^!?(in\(\s*{_NAME}(\s*,\s*{_NAME})*\s*\)|{_NAME})$")
_EPS = 1e-9
LABEL_RESOURCE_AMOUNT = 0.001  # old-Ray fallback: a node advertising 1 hosts up to 1000 actors


@dataclass(frozen=True)
class ActorSpec:
    """One Ray actor: which devices it hosts and what it asks the scheduler for."""

    index: int
    devices: tuple[int, ...]
    num_cpus: float
    resources: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)  # node label selector (see check_selector)
    num_gpus: float = 0.0  # a share of one GPU (or whole GPUs), as Ray's num_gpus
    role: str = "device"  # device, tile, or the role a method's round service names (e.g. split server)
    gpu_field: str = "fleet.num_gpus_per_actor"  # the config field that sets num_gpus (named in errors)

    @property
    def label(self) -> str:
        pinned = ",".join([*self.resources, *(f"{k}={v}" for k, v in self.labels.items())]) or "sim"
        return f"actor{self.index}[{pinned}]" if not self.service else f"{self.role.replace(' ', '-')}[{pinned}]"

    @property
    def service(self) -> bool:
        """An actor of the method's round service (not one hosting devices or tiles)."""
        return self.role not in ("device", "tile")

    @property
    def pinned(self) -> bool:
        return bool(self.resources or self.labels)


def check_selector(labels: Mapping[str, str], where: str) -> None:
    """Config-time syntax check, so a typo fails before Ray starts."""
    for key, value in labels.items():
        if not _KEY.match(key):
            raise FlexrayError(f"config error: {where}.{key}: not a node label key (e.g. flexray.io/device)")
        if not isinstance(value, str) or not _SELECTOR.match(value):
            raise FlexrayError(f"config error: {where}.{key}: {value!r} is not a label selector; use v, !v, in(a,b) or !in(a,b)")


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Ray's label-selector semantics: every key's condition holds on the node's labels."""
    for key, cond in selector.items():
        negate = cond.startswith("!")
        body = cond[1:] if negate else cond
        values = {v.strip() for v in body[3:-1].split(",")} if body.startswith("in(") else {body}
        if (labels.get(key) in values) == negate:
            return False
    return True


def label_selector_supported() -> bool:
    """Ray added ``label_selector`` to actor options in 2.4x; older Ray gets a resource instead."""
    try:
        from ray._common.ray_option_utils import actor_options
    except ImportError:
        try:
            from ray._private.ray_option_utils import actor_options  # type: ignore[no-redef]
        except ImportError:
            return False
    return "label_selector" in actor_options


def label_resource(key: str, value: str) -> str:
    """The custom resource a node advertises instead of a label on Ray without label selectors."""
    return f"label:{key}={value}"


def actor_options(spec: ActorSpec) -> dict[str, Any]:
    """The ``.options(...)`` for a device actor: CPUs, custom resources and node labels."""
    resources = dict(spec.resources)
    opts: dict[str, Any] = {"num_cpus": spec.num_cpus}
    if spec.num_gpus:
        opts["num_gpus"] = spec.num_gpus
    if spec.labels and label_selector_supported():
        opts["label_selector"] = dict(spec.labels)
    else:
        for key, value in spec.labels.items():
            if not _NAME_ONLY.match(value):
                raise FlexrayError(f"fleet: node label selector {key}={value!r} needs a Ray with label selectors; use key: value")
            resources[label_resource(key, value)] = LABEL_RESOURCE_AMOUNT
    opts["resources"] = resources or None
    return opts


_NAME_ONLY = re.compile(rf"^{_NAME}$")


# ---------------------------------------------------------------- live nodes


@dataclass(frozen=True)
class Node:
    id: str
    ip: str
    resources: dict[str, float]  # totals: a busy node frees up, a missing resource never appears
    labels: dict[str, str] = field(default_factory=dict)
    head: bool = False

    @property
    def short(self) -> str:
        return f"{self.ip} {self.id[:8]}"


def live_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster (``ray.init`` must have run)."""
    import ray

    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = {k: float(v) for k, v in n.get("Resources", {}).items()}
        nodes.append(Node(n["NodeID"], n.get("NodeManagerAddress", "?"), res, dict(n.get("Labels") or {}),
                          "node:__internal_head__" in res))
    return nodes


def check_local_gpus(specs: Sequence[ActorSpec], gpus: int) -> None:
    """Before a local Ray starts (it gets this machine's ``gpus``): a fleet (device or tile actors,
    and a round service's actors) asking for more fails with one line instead of waiting forever for a GPU."""
    need = sum(s.num_gpus for s in specs)
    if need > gpus + _EPS:
        actors = [s for s in specs if not s.service]
        services = [s for s in specs if s.service and s.num_gpus]
        asked = [f"{len(actors)} actors x {actors[0].num_gpus:g} GPU"] if actors and actors[0].num_gpus else []
        asked += [f"the {s.role}'s {s.num_gpus:g} GPU" for s in services]
        if actors and actors[0].num_gpus:
            field, fix = "fleet.num_gpus_per_actor", "use 0 (CPU actors), fewer fleet.actors"
        else:
            field, fix = services[0].gpu_field, f"use 0 (a CPU {services[0].role})"
        raise FlexrayError(f"config error: {field}: {' and '.join(asked)} need {need:g} GPUs but this machine has {gpus}; "
                           f"{fix}, or a cluster with GPUs (cluster.address)")


def _need(spec: ActorSpec) -> dict[str, float]:
    need = {"CPU": float(spec.num_cpus)} if spec.num_cpus else {}
    if spec.num_gpus:
        need["GPU"] = float(spec.num_gpus)
    for k, v in spec.resources.items():
        need[k] = need.get(k, 0.0) + float(v)
    return need


def _fits(need: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in need.items())


def _eligible(spec: ActorSpec, node: Node) -> bool:
    if spec.labels and label_selector_supported():
        return selector_matches(spec.labels, node.labels)
    return all(node.resources.get(label_resource(k, v), 0.0) > 0 for k, v in spec.labels.items())


def _pinning(spec: ActorSpec) -> str:
    parts = [f"{k}: {v:g}" for k, v in spec.resources.items()] + [f"label {k}={v}" for k, v in spec.labels.items()]
    return ", ".join(parts)


def _join_hint(spec: ActorSpec) -> str:
    hint = "ray start --address HEAD:6379"
    if spec.resources:
        hint += " --resources '{" + ", ".join(f'"{k}": {max(1.0, v):g}' for k, v in spec.resources.items()) + "}'"
    if spec.labels:
        hint += " --labels " + ",".join(f"{k}={v.lstrip('!')}" for k, v in spec.labels.items())
    return hint


@dataclass(frozen=True)
class Placement:
    """Predicted node per actor, and how many nodes could host it (1 = certain)."""

    node_of: dict[int, Node]
    choices: dict[int, int]

    def describe(self, actor: int) -> str:
        n = self.choices[actor]
        return self.node_of[actor].short + (f" (1 of {n})" if n > 1 else "")


def check_placement(specs: Sequence[ActorSpec], nodes: Sequence[Node] | None = None) -> Placement:
    """Fail fast, naming the fix, when the fleet cannot be placed; else predict where it lands.

    Checks, in order: cluster totals, a node for every pinned
    actor, and a packing of all actors into the nodes' total resources (pinned first, by
    backtracking; the interchangeable simulated actors then go wherever there is room).
    """
    nodes = list(live_nodes() if nodes is None else nodes)
    have: dict[str, float] = {}
    for n in nodes:
        for k, v in n.resources.items():
            have[k] = have.get(k, 0.0) + v
    total: dict[str, float] = {}
    for s in specs:
        for k, v in _need(s).items():
            total[k] = total.get(k, 0.0) + v
    for key, amount in total.items():
        if have.get(key, 0.0) + _EPS < amount:
            fix = {"CPU": "lower fleet.actors or fleet.num_cpus_per_actor, or add nodes",
                   "GPU": "set fleet.num_gpus_per_actor: 0 (CPU) or lower it, or add GPU nodes"}.get(
                key, f"start a node with: ray start --address ... --resources '{{\"{key}\": 1}}'")
            raise FlexrayError(f"fleet: the cluster has {have.get(key, 0.0):g} {key} but the fleet needs {amount:g}; {fix}")

    candidates = {s.index: [i for i, n in enumerate(nodes) if _eligible(s, n) and _fits(_need(s), n.resources)] for s in specs}
    for s in specs:
        if not candidates[s.index]:
            raise FlexrayError(f"fleet: no node can host {s.label} ({_pinning(s)}, {s.num_cpus:g} CPU); "
                               f"{len(nodes)} nodes are alive; add one with: {_join_hint(s)}")

    free = [dict(n.resources) for n in nodes]
    pinned = sorted((s for s in specs if s.pinned), key=lambda s: len(candidates[s.index]))
    chosen: dict[int, int] = {}
    if not _pack(pinned, 0, candidates, free, chosen, budget=[20000]):
        raise FlexrayError(f"fleet: the {len(pinned)} pinned actors do not fit together on the nodes that match them "
                           f"({'; '.join(f'{s.label}: {_pinning(s)}' for s in pinned)}); lower fleet.num_cpus_per_actor or add nodes")
    for s in pinned:  # only when the search budget ran out: show the first candidate
        if s.index not in chosen:
            chosen[s.index] = candidates[s.index][0]
            _take(free[chosen[s.index]], _need(s))
    for s in (s for s in specs if not s.pinned):
        need = _need(s)
        room = [i for i in candidates[s.index] if _fits(need, free[i])]
        if not room:
            raise FlexrayError(f"fleet: {s.label} does not fit beside the pinned actors ({s.num_cpus:g} CPU); "
                               "lower fleet.actors or fleet.num_cpus_per_actor, or add nodes")
        i = max(room, key=lambda j: (free[j].get("CPU", 0.0), nodes[j].head))  # spread, as Ray does under load
        _take(free[i], need)
        chosen[s.index] = i
    return Placement({a: nodes[i] for a, i in chosen.items()}, {s.index: len(candidates[s.index]) for s in specs})


def _take(free: dict[str, float], need: Mapping[str, float], sign: float = 1.0) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0.0) - sign * v


def _pack(specs: Sequence[ActorSpec], k: int, candidates: Mapping[int, list[int]], free: list[dict[str, float]],
          chosen: dict[int, int], budget: list[int]) -> bool:
    """Backtracking placement of the pinned actors (few, and most have one candidate node)."""
    if k == len(specs):
        return True
    budget[0] -= 1
    if budget[0] < 0:
        return True  # give up proving infeasibility; Ray's own scheduler decides
    s = specs[k]
    need = _need(s)
    for i in candidates[s.index]:
        if _fits(need, free[i]):
            _take(free[i], need)
            chosen[s.index] = i
            if _pack(specs, k + 1, candidates, free, chosen, budget):
                return True
            _take(free[i], need, -1.0)
            del chosen[s.index]
    return False


def connected_placement(address: str, specs: Sequence[ActorSpec]) -> Placement:
    """Join the cluster at ``address`` just long enough to check and predict the placement."""
    import logging

    import ray

    joined = not ray.is_initialized()
    if joined:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except Exception as err:  # noqa: BLE001 - ConnectionError, AuthenticationError, ...: one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FlexrayError(f"--address {address}: cannot join the Ray cluster ({first[:200]}); "
                               "with token auth export RAY_AUTH_TOKEN (ray get-auth-token on the head)") from None
    try:
        return check_placement(specs)
    finally:
        if joined:
            ray.shutdown()
