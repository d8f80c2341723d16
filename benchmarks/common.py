"""What the accuracy benchmarks share: one job tree shape, time-to-target and the mean over seeds.

Every benchmark runs real jobs through ``run_job`` with the same quiet tracking (no progress
bar, plots, model or checkpoints: only metrics go to MLflow), seed 0 unless told, and one local epoch of
batch 32; each script states only what it varies.
"""

from __future__ import annotations

from typing import Any


def job_tree(bench: str, name: str, uri: str, *, data: dict[str, Any], model: dict[str, Any],
             groups: list[dict[str, Any]], method: dict[str, Any], rounds: dict[str, Any],
             actors: int = 2, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """A job config tree named ``bench-name``, logged to experiment ``bench`` at ``uri``."""
    return {
        "name": f"{bench}-{name}", "seed": seed,
        "data": {"source": "npz", "test_samples": 2000, **data},
        "model": model,
        "fleet": {"actors": actors, "groups": groups},
        "method": {"local_epochs": 1, "batch_size": 32, **method},
        "rounds": rounds,
        "tracking": {"uri": uri, "experiment": bench, "progress": False, "plots": False,
                     "log_model": False, "checkpoint_every": 0},
        **extra,
    }


def time_to(history: list[dict[str, Any]], target: float, key: str = "accuracy") -> float | None:
    """Simulated seconds until ``key`` (falling back to accuracy) first reaches ``target``."""
    return next((h["sim_time_s"] for h in history if h.get(key, h.get("accuracy", 0.0)) >= target), None)


def mean(xs: list[float]) -> float:
    """Plain mean over seeds (what the multi-seed benchmarks report)."""
    return sum(xs) / len(xs)


def epoch_seconds(profile: str, model: str, width: int, samples: int, batch_size: int = 32,
                  input_shape: tuple[int, int, int] = (3, 32, 32), speed: float = 1.0) -> float:
    """Predicted compute seconds of one local epoch of the full model on a catalog class: what a
    benchmark's deadline is sized by (the per-layer clock, docs/latency.md)."""
    from flexray.config import ModelConfig
    from flexray.fleet.profiles import CATALOG
    from flexray.models import build_model, profile_model
    from flexray.protocol import compute_seconds

    prof = profile_model(build_model(ModelConfig(name=model, width=width), input_shape, 10), input_shape)
    return compute_seconds(CATALOG[profile], prof.step.epochs(samples, batch_size), speed)
