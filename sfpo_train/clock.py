"""The one wall clock every timed stage uses: SFPO's stage laps, the trainer's profiler, ``sfpo demo``, the benchmarks.

On CUDA it waits for the device before reading the time, so a lap holds the GPU
work a stage queued and not only its launch; on the CPU it is plain
``time.perf_counter``.
"""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a no-op for the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageClock:
    """Laps of wall-clock time on ``device``: each :meth:`lap` is the time since the previous one (or the start)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.last = self.now()

    def now(self) -> float:
        """``time.perf_counter()`` once the device's queued work is done."""
        synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self.now()
        elapsed, self.last = now - self.last, now
        return elapsed
