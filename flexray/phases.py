"""Wall-clock marks of a run's phases (start-up, rounds, tear-down).

``benchmarks/startup.py`` sets ``FLEXRAY_PHASES_FILE`` and reads the marks back to show where the
seconds between a command and its prompt go; without the variable nothing is written. Absolute
``time.time()`` stamps, so the benchmark can line them up with its own clock around the process.
"""

from __future__ import annotations

import json
import os
import threading
import time

_marks: list[tuple[str, float]] = []
_lock = threading.Lock()


def mark(name: str) -> None:
    """Record that phase ``name`` ended now (thread-safe: start-up work overlaps in threads)."""
    with _lock:
        _marks.append((name, time.time()))


def dump() -> None:
    """Write the marks as JSON to ``$FLEXRAY_PHASES_FILE`` if it is set."""
    path = os.environ.get("FLEXRAY_PHASES_FILE")
    if path:
        with _lock:
            marks = list(_marks)
        with open(path, "w") as f:
            json.dump([{"phase": n, "t": t} for n, t in marks], f)
