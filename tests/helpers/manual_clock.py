"""A clock for timing tests: it stands still until told to move, so measured times become exact sums."""

from __future__ import annotations


class ManualClock:
    """``time.perf_counter`` that stands still until :meth:`advance`."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
