"""The per-device, per-round event log, written as Parquet (pyarrow) for pandas/DuckDB/Spark."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("device", pa.int32()),
        ("name", pa.string()),
        ("profile", pa.string()),
        ("actor", pa.string()),
        ("node", pa.string()),
        ("status", pa.string()),
        ("samples", pa.int64()),
        ("flops", pa.float64()),
        ("speed", pa.float64()),
        ("wall_s", pa.float64()),
        ("download_s", pa.float64()),
        ("compute_s", pa.float64()),
        ("upload_s", pa.float64()),
        ("comm_s", pa.float64()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("energy_j", pa.float64()),
        ("bytes_down", pa.int64()),
        ("bytes_up", pa.int64()),
        ("train_loss", pa.float64()),
        ("metrics", pa.string()),
        ("spec", pa.string()),
        ("note", pa.string()),
        ("server_s", pa.float64()),  # simulated wait on the method's round service, inside start_s..end_s
        ("predicted_s", pa.float64()),  # the method's predicted latency, to compare with end_s - start_s
    ]
)


def write_events(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in SCHEMA} for r in rows], schema=SCHEMA)
    pq.write_table(table, path)
    return path


def read_events(path: str | Path) -> pa.Table:
    return pq.read_table(path)
