"""``reposition_``: t <- snap + alpha * (t - snap), in place, over a whole model's parameters.

Rows: the three sfpo backends (offload "none" and, on a GPU, "cpu") and two
baselines from ``baselines.py``: ``torch._foreach_lerp_`` called directly and
the SFPO authors' per-parameter loop. Traffic: a fused lerp reads 2N and writes
N bytes (N: the bytes of all parameters); with the snapshot in pinned host
memory N of them cross the bus, which is then the limit.
"""

from __future__ import annotations

import functools

import pytest
import torch

import sfpo_kernels
from bench import baselines

ALPHA = 0.8  # 1 - alpha = 0.2 < 0.5: the lerp's first branch, as in SFPO's usual alpha range
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BACKENDS = ["triton", "cuda", "torch"]


@pytest.mark.parametrize("offload", ["none", "cpu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_reposition(benchmark, bench, dtype, backend, offload):
    bench.skip_unless_runs(backend, offload)
    work = bench.workload(DTYPES[dtype])
    snap = sfpo_kernels.snapshot(work.params, offload=offload, backend=backend)
    fn = functools.partial(sfpo_kernels.reposition_, work.params, snap, ALPHA, backend=backend)
    bytes_moved, limit = (3 * work.nbytes, "d2d") if offload == "none" else (work.nbytes, "h2d")
    bench.run(
        benchmark,
        fn,
        work=work,
        op="reposition",
        impl=f"sfpo_kernels.reposition_[{backend}]",
        backend=backend,
        bytes_moved=bytes_moved,
        limit=limit,
        offload=offload,
        slow=bench.is_slow(backend, offload),
    )


@pytest.mark.parametrize("impl", list(baselines.REPOSITION_TRAFFIC))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_reposition_baseline(benchmark, bench, dtype, impl):
    work = bench.workload(DTYPES[dtype])
    snaps = [p.detach().clone() for p in work.params]
    fn = functools.partial(getattr(baselines, f"reposition_{impl}"), work.params, snaps, ALPHA)
    bench.run(
        benchmark,
        fn,
        work=work,
        op="reposition",
        impl=impl,
        backend="baseline",
        bytes_moved=baselines.REPOSITION_TRAFFIC[impl] * work.nbytes,
    )
