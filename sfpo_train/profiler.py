"""Per-stage wall-clock and memory of one training iteration.

``with profiler.stage("gen"): ...`` times a stage (synchronising the GPU first
and last, so the lap holds the GPU work and not just its launch) and records its
peak memory: torch's peak allocated / reserved (peaks reset when the stage
starts) on CUDA, the process's resident set size on CPU. A stage entered several
times in one iteration (e.g. generation under dynamic sampling) accumulates.

:meth:`StageProfiler.collect` returns the iteration's readings in verl's metric
names (``timing_s/<stage>``, ``perf/max_memory_allocated_gb``, ...) plus
``memory/<stage>/...`` per stage, and starts the next iteration.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

GB = 1024**3


def process_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class StageProfiler:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._times: dict[str, float] = defaultdict(float)
        self._memory: dict[str, dict[str, float]] = {}

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str):
        self._sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self._times[name] += time.perf_counter() - start
            self._record_memory(name)

    def add_time(self, name: str, seconds: float) -> None:
        """A sub-stage timed elsewhere (e.g. SFPO's own fast/reposition/slow laps)."""
        self._times[name] += seconds

    def _record_memory(self, name: str) -> None:
        if self.cuda:
            reading = {"max_allocated_gb": torch.cuda.max_memory_allocated(self.device) / GB,
                       "max_reserved_gb": torch.cuda.max_memory_reserved(self.device) / GB}  # fmt: skip
        else:
            reading = {"rss_gb": process_rss_bytes() / GB}
        previous = self._memory.get(name, {})
        self._memory[name] = {k: max(v, previous.get(k, 0.0)) for k, v in reading.items()}

    def collect(self) -> dict[str, float]:
        out = {f"timing_s/{k}": v for k, v in self._times.items()}
        for name, reading in self._memory.items():
            out.update({f"memory/{name}/{k}": v for k, v in reading.items()})
        if self.cuda:
            out["perf/max_memory_allocated_gb"] = max((r["max_allocated_gb"] for r in self._memory.values()), default=0.0)
            out["perf/max_memory_reserved_gb"] = max((r["max_reserved_gb"] for r in self._memory.values()), default=0.0)
        out["perf/cpu_memory_used_gb"] = process_rss_bytes() / GB
        self._times.clear()
        self._memory.clear()
        return out
