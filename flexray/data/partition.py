"""Split a training set across devices: iid, label-skewed (Dirichlet) or pathological (shards).

Every result is a pure function of (labels, num_devices, cfg, seed, cap), so each actor can
recompute its own devices' indices locally instead of receiving them from the driver.
"""

from __future__ import annotations

import numpy as np

from flexray.config import PartitionConfig
from flexray.errors import FlexrayError

DIRICHLET_TRIES = 100  # re-draws before giving up on "every device gets >= 1 sample"


def partition(
    labels: np.ndarray, num_devices: int, cfg: PartitionConfig, seed: int, cap: int | None = None,
    hold_out: int = 0,
) -> list[np.ndarray]:
    """One sorted int64 index array per device into the training set; the arrays are disjoint.

    ``hold_out`` samples (drawn uniformly, seeded) go to no device: the server's proxy set
    (``MethodConfig.held_out``); the devices split the rest."""
    labels = np.asarray(labels).reshape(-1)
    if hold_out:
        if hold_out >= len(labels):
            raise FlexrayError(
                f"config error: method: holds out {hold_out} of {len(labels)} training samples for the server and "
                "leaves the devices none; lower its proxy_samples"
            )
        keep = np.sort(np.random.default_rng([seed, 1]).permutation(len(labels))[hold_out:])
        parts = partition(labels[keep], num_devices, cfg, seed, cap)
        return [keep[p] for p in parts]
    n = len(labels)
    if num_devices < 1:
        raise FlexrayError(f"config error: fleet.groups: the fleet has {num_devices} devices; it needs at least one")
    if n < num_devices:
        raise FlexrayError(
            f"data error: data.partition: {n} training samples cannot give each of {num_devices} devices one; "
            "use fewer devices (fleet.groups.*.count) or a larger dataset"
        )
    if cap is not None and cap < 1:
        raise FlexrayError(f"config error: data.samples_per_device: must be >= 1 (got {cap})")
    rng = np.random.default_rng(seed)
    if cfg.kind == "iid":
        parts = np.array_split(rng.permutation(n), num_devices)
    elif cfg.kind == "dirichlet":
        parts = _dirichlet(labels, num_devices, cfg.alpha, rng)
    elif cfg.kind == "shards":
        parts = _shards(labels, num_devices, cfg.shards_per_device, rng)
    else:  # pragma: no cover - PartitionConfig's Literal forbids it
        raise FlexrayError(f"config error: data.partition.kind: unknown kind {cfg.kind!r}; use iid, dirichlet or shards")
    if cap is not None:
        parts = [p if len(p) <= cap else rng.permutation(p)[:cap] for p in parts]
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(labels: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Hsu et al. 2019 per-class Dir(alpha) split, with the NIID-Bench / FedLab balancing rule.

    The balancing rule (a device already holding more than N/num_devices samples gets no share
    of later classes) keeps one device from swallowing most of the data at small alpha.
    """
    n = len(labels)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
        sizes = np.zeros(num_devices, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_devices, alpha))
            p = p * (sizes < n / num_devices)
            total = p.sum()
            p = p / total if total > 0 else np.full(num_devices, 1.0 / num_devices)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for d, chunk in enumerate(np.split(idx, cuts)):
                parts[d].append(chunk)
                sizes[d] += len(chunk)
        if sizes.min() >= 1:
            return [np.concatenate(p) for p in parts]
    raise FlexrayError(
        f"data error: data.partition.alpha: dirichlet alpha={alpha} left a device empty in {DIRICHLET_TRIES} "
        f"draws ({n} samples, {len(classes)} classes, {num_devices} devices); raise the alpha or use fewer devices"
    )


def _shards(labels: np.ndarray, num_devices: int, per_device: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al. 2017: label-sorted shards, so a device sees about ``per_device`` classes."""
    num_shards = num_devices * per_device
    if len(labels) < num_shards:
        raise FlexrayError(
            f"data error: data.partition.shards_per_device: {len(labels)} training samples cannot make "
            f"{num_shards} shards ({num_devices} devices x {per_device}); lower it or use fewer devices"
        )
    # Shuffle first so that the order within a class (hence which samples share a shard) is seeded.
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    shards = np.array_split(order, num_shards)
    owner = rng.permutation(num_shards).reshape(num_devices, per_device)
    return [np.concatenate([shards[s] for s in row]) for row in owner]
