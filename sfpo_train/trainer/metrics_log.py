"""A run's metrics on disk: ``metrics.jsonl`` (one object per step) and ``metrics.csv`` (the same, as a table)."""

from __future__ import annotations

import json
import math
import os
import warnings

from sfpo_train.trainer.run_guard import RunWarning, write_atomic, writing


class MetricsLog:
    """``metrics.jsonl`` and ``metrics.csv`` in the run directory; rows use verl's metric names."""

    def __init__(self, run_dir: str):
        self.jsonl = os.path.join(run_dir, "metrics.jsonl")
        self.csv = os.path.join(run_dir, "metrics.csv")

    def append(self, metrics: dict) -> None:
        with writing(self.jsonl), open(self.jsonl, "a") as f:  # a failed write leaves a torn last line at most
            f.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")

    def read(self) -> list[dict]:
        """The rows; a torn (unparseable) last line, what a kill mid-write leaves, is dropped with a warning.

        A bad line anywhere else is a ``ValueError`` naming the file and the line.
        """
        if not os.path.exists(self.jsonl):
            return []
        with open(self.jsonl) as f:
            lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
        rows = []
        for i, (number, line) in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i < len(lines) - 1:
                    raise ValueError(
                        f"{self.jsonl}, line {number}: not a JSON row ({e}); only a torn last line "
                        "(a kill mid-write) is dropped on its own"
                    ) from None
                warnings.warn(
                    f"{self.jsonl}, line {number}: dropped a torn last row ({len(line)} characters, {e})",
                    RunWarning,
                    stacklevel=2,
                )
        return rows

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (a resumed run re-does them), and a torn last line; one atomic rewrite."""
        rows = [r for r in self.read() if r.get("training/global_step", 0) <= step]
        write_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))

    def write_csv(self) -> None:
        import pandas as pd

        rows = self.read()
        if rows:
            write_atomic(self.csv, pd.DataFrame(rows).to_csv(index=False))


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; pandas reads null back as NaN
    return value
