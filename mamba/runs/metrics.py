"""Reading a run's metrics file: the JSON lines mamba.training.metrics_file.JSONLinesLogger
writes, one {"batch": n, "<metric>": value, ...} per batch (and per eval). No Composer here, so
plots and tests read a run without importing the trainer."""
from __future__ import annotations

import json


def read_metrics(path: str) -> list[dict]:
    """All lines of a metrics file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> dict[int, float]:
    """{batch: value} of one metric over metrics-file rows; a batch logged again (a resumed
    run repeats its last batches' lines) keeps its last value."""
    return {r["batch"]: r[key] for r in rows if key in r}
