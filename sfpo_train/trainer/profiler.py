"""Per-stage wall-clock and memory of one training iteration.

``with profiler.stage("gen"): ...`` times a stage and records its memory:

- time: ``time.perf_counter`` around the stage; on CUDA the device is
  synchronised when the stage starts and ends, so a lap holds the GPU work the
  stage queued and not just its launch. A stage entered several times in one
  iteration (generation under dynamic sampling, ``optimizer`` once per
  mini-batch) accumulates.
- memory on CUDA: torch's peak allocated and reserved bytes during the stage
  (``reset_peak_memory_stats`` when it starts; a stage that encloses others keeps
  the largest peak of its whole span), and from NVML (``nvidia-ml-py``) the
  device's used memory and its utilisation (percent of the last sample period a
  kernel ran) when the stage ends. NVML is optional: without it (or without a
  GPU) those two readings are simply absent.
- memory on CPU: the process's resident set size when the stage ends (the
  largest over its entries).

Stages nest. The time of ``step`` not covered by the stages directly inside it
(LR scheduler, batch assembly, Python between stages, the profiler's own
bookkeeping) is reported as ``timing_s/other``, so the top-level stages plus
``other`` add up to ``timing_s/step`` exactly. ``perf/profiler_overhead_s`` is
the time spent in the profiler's bookkeeping (peak resets, memory and NVML
reads, dictionary updates; not the synchronisations, which wait for work the
stages did) and ``perf/profiler_overhead_frac`` that time over ``timing_s/step``.

:meth:`StageProfiler.collect` returns the iteration's readings in verl's metric
names (``timing_s/<stage>``, ``perf/max_memory_allocated_gb``,
``perf/max_memory_reserved_gb``, ``perf/cpu_memory_used_gb``) plus
``memory/<stage>/<reading>`` per stage, and starts the next iteration.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sfpo_train.clock import synchronize

GB = 1024**3
STEP = "step"  # the stage whose unattributed remainder is timing_s/other


def process_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def process_peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (``VmHWM``; 0 where unavailable)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def nvml_handle(device: torch.device):
    """The NVML handle of a CUDA ``device``, or None (no NVML library, no driver, not CUDA, MIG without a match).

    Matched by UUID so ``CUDA_VISIBLE_DEVICES`` reordering cannot point NVML at
    another GPU; by index where torch exposes no UUID.
    """
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            text = str(uuid)
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}")
            except pynvml.NVMLError:
                pass
        if os.environ.get("CUDA_VISIBLE_DEVICES"):
            return None  # torch's index is not NVML's index here; no reading beats a wrong GPU's reading
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # ImportError, NVMLError (no driver), anything else: NVML is a convenience
        return None


def nvml_reading(handle) -> dict[str, float]:
    """``device_used_gb`` and ``gpu_util_pct`` from NVML; empty if the query fails."""
    try:
        import pynvml

        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        return {"device_used_gb": memory.used / GB, "gpu_util_pct": float(util.gpu)}
    except Exception:
        return {}


@dataclass
class _Open:
    """A stage that has started and not ended: its name, start time and the peaks seen before a child reset them."""

    name: str
    start: float
    peak_allocated: int = 0
    peak_reserved: int = 0


class StageProfiler:
    """Per-stage time and memory of one iteration; see the module docstring for what is measured."""

    def __init__(self, device: torch.device, *, use_nvml: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._nvml = nvml_handle(self.device) if (self.cuda and use_nvml) else None
        self._stack: list[_Open] = []
        self._times: dict[str, float] = defaultdict(float)
        self._child_times: dict[str, float] = defaultdict(float)  # parent -> time of its direct child stages
        self._memory: dict[str, dict[str, float]] = {}
        self._overhead = 0.0

    @property
    def has_nvml(self) -> bool:
        return self._nvml is not None

    def _sync(self) -> None:
        """Wait for the work queued on the device (CUDA only); the wait is never counted as overhead."""
        synchronize(self.device)

    def _reset_peaks(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def _fold_peaks(self, stages) -> None:
        """Fold the current peak counters into ``stages`` before a reset (or at their end) loses them."""
        allocated = torch.cuda.max_memory_allocated(self.device)
        reserved = torch.cuda.max_memory_reserved(self.device)
        for s in stages:
            s.peak_allocated = max(s.peak_allocated, allocated)
            s.peak_reserved = max(s.peak_reserved, reserved)

    @contextmanager
    def stage(self, name: str):
        # The wait is the enclosing stages' queued work (e.g. the backward before ``optimizer``): it lands in
        # their time and peaks, not this one's, and is not the profiler's overhead, so the clock starts after it.
        self._sync()
        t0 = time.perf_counter()
        if self.cuda:
            if self._stack:
                self._fold_peaks(self._stack)
            self._reset_peaks()
        opened = _Open(name, time.perf_counter())
        self._stack.append(opened)
        self._overhead += opened.start - t0
        try:
            yield
        finally:
            self._sync()
            end = time.perf_counter()
            elapsed = end - opened.start
            self._stack.pop()
            self._times[name] += elapsed
            if self._stack:
                self._child_times[self._stack[-1].name] += elapsed
            self._record_memory(opened)
            self._overhead += time.perf_counter() - end

    def add_time(self, name: str, seconds: float) -> None:
        """A sub-stage timed elsewhere (e.g. SFPO's own fast/reposition/slow laps); not a child for ``other``."""
        self._times[name] += seconds

    def _record_memory(self, opened: _Open) -> None:
        if self.cuda:
            self._fold_peaks([opened])
            reading = {"max_allocated_gb": opened.peak_allocated / GB, "max_reserved_gb": opened.peak_reserved / GB}
            if self._nvml is not None:
                reading.update(nvml_reading(self._nvml))
        else:
            reading = {"rss_gb": process_rss_bytes() / GB}
        previous = self._memory.get(opened.name, {})
        self._memory[opened.name] = {k: max(v, previous.get(k, 0.0)) for k, v in reading.items()}

    def collect(self) -> dict[str, float]:
        """This iteration's readings (names in the module docstring); clears them for the next one."""
        start = time.perf_counter()
        out = {f"timing_s/{k}": v for k, v in self._times.items()}
        if STEP in self._times:
            # >= 0 up to float rounding: children run inside their parent's span
            out["timing_s/other"] = max(0.0, self._times[STEP] - self._child_times[STEP])
        for name, reading in self._memory.items():
            out.update({f"memory/{name}/{k}": v for k, v in reading.items()})
        if self.cuda:
            out["perf/max_memory_allocated_gb"] = max(
                (r["max_allocated_gb"] for r in self._memory.values()), default=0.0
            )
            out["perf/max_memory_reserved_gb"] = max((r["max_reserved_gb"] for r in self._memory.values()), default=0.0)
            used = [r["device_used_gb"] for r in self._memory.values() if "device_used_gb" in r]
            if used:
                out["perf/gpu_memory_used_gb"] = max(used)
        out["perf/cpu_memory_used_gb"] = process_rss_bytes() / GB
        out["perf/cpu_memory_peak_gb"] = process_peak_rss_bytes() / GB
        self._overhead += time.perf_counter() - start
        out["perf/profiler_overhead_s"] = self._overhead
        if self._times.get(STEP, 0.0) > 0:
            out["perf/profiler_overhead_frac"] = self._overhead / self._times[STEP]
        self._times.clear()
        self._child_times.clear()
        self._memory.clear()
        self._overhead = 0.0
        return out
