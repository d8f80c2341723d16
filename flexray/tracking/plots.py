"""Run plots logged as MLflow artifacts: accuracy vs simulated time, Gantt, energy per device."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_COLORS = {"download": "#4c72b0", "compute": "#55a868", "upload": "#c44e52"}


def accuracy_vs_time(history: Sequence[dict[str, float]], path: Path) -> Path:
    pts = [(h["sim_time_s"], h["accuracy"]) for h in history if "accuracy" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    ax.set(xlabel="simulated time (s)", ylabel="test accuracy", title="Accuracy vs simulated time")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def gantt(rows: Sequence[dict[str, Any]], last_rounds: int, path: Path) -> Path:
    """Per-device bars of download / compute / upload for the last rounds; stragglers hatched."""
    if not rows:
        return _save(plt.subplots()[0], path)
    first = max(r["round"] for r in rows) - last_rounds + 1
    rows = [r for r in rows if r["round"] >= first]
    devices = sorted({(r["device"], r["name"]) for r in rows})
    ypos = {d[0]: i for i, d in enumerate(devices)}
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(devices) + 1)))
    for r in rows:
        t = r["start_s"]
        for part, dur in (("download", r["download_s"]), ("compute", r["compute_s"]), ("upload", r["upload_s"])):
            hatch = "//" if r["status"] == "straggler" else None
            ax.barh(ypos[r["device"]], dur, left=t, color=_COLORS[part], hatch=hatch, edgecolor="none")
            t += dur
    ax.set_yticks(range(len(devices)), [d[1] for d in devices], fontsize=7)
    ax.set(xlabel="simulated time (s)", title=f"Device timeline, rounds {first}..")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(handles, list(_COLORS), loc="lower right", fontsize=7)
    return _save(fig, path)


def energy_per_device(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    total: dict[str, float] = defaultdict(float)
    for r in rows:
        total[r["name"]] += r["energy_j"]
    names = sorted(total, key=lambda n: int(n.rsplit("-", 1)[-1]) if n.rsplit("-", 1)[-1].isdigit() else n)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(names)), [total[n] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
    ax.set(ylabel="energy (J)", title="Energy per device (whole run)")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
