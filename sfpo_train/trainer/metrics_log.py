"""A run's metrics on disk: ``metrics.jsonl`` (one object per step) and ``metrics.csv`` (the same, as a table)."""

from __future__ import annotations

import json
import math
import os


class MetricsLog:
    """``metrics.jsonl`` and ``metrics.csv`` in the run directory; rows use verl's metric names."""

    def __init__(self, run_dir: str):
        self.jsonl = os.path.join(run_dir, "metrics.jsonl")
        self.csv = os.path.join(run_dir, "metrics.csv")

    def append(self, metrics: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")

    def read(self) -> list[dict]:
        if not os.path.exists(self.jsonl):
            return []
        with open(self.jsonl) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (a resumed run re-does them)."""
        rows = [r for r in self.read() if r.get("training/global_step", 0) <= step]
        with open(self.jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def write_csv(self) -> None:
        import pandas as pd

        rows = self.read()
        if rows:
            pd.DataFrame(rows).to_csv(self.csv, index=False)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; pandas reads null back as NaN
    return value
