"""Peak CPU memory of one call, from the allocator: what ``torch.cuda.max_memory_allocated`` gives on a GPU.

PyTorch's CPU allocator reports every allocation and free to the profiler when it
records memory (``torch.profiler.profile(profile_memory=True)``); summing those
reports in time order gives the bytes the call's own allocations hold at each
moment, and their maximum is its peak (the profiler knows nothing of blocks
allocated before it started, so freeing one of those does not lower the
count). Python objects and allocations outside torch are not in it. The profiler slows the call, so the
peak is measured in a call of its own, never a timed one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def cpu_allocator_peak(fn: Callable[[], object]) -> dict[str, object]:
    """``peak_alloc_bytes`` / ``peak_alloc_mib``: the most bytes of ``fn()``'s own allocations torch's CPU allocator
    held at once; ``peak_alloc_error`` instead when the profiler gave no memory records."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError as e:  # a torch whose profiler keeps its records elsewhere
        return {"peak_alloc_error": f"no allocator records from torch {torch.__version__}'s profiler ({e})"}
    if not events:
        return {"peak_alloc_error": "the profiler recorded no allocation"}
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() == torch.autograd.DeviceType.CPU:
            held += event.nbytes()
            peak = max(peak, held)
    return {"peak_alloc_bytes": int(peak), "peak_alloc_mib": round(peak / 2**20, 1)}
