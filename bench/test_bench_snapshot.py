"""``snapshot`` and ``Snapshot.restore_`` over a whole model's parameters.

Rows: the three sfpo backends (offload "none" and, on a GPU, "cpu") and the
baselines of ``baselines.py``: a ``clone`` per tensor, the SFPO authors'
``p.data.clone()`` / ``p.data.copy_(s)`` loops, ``torch._foreach_copy_`` and, on a
GPU, a pageable host copy per tensor. Traffic: a copy reads N and writes N
bytes; offloaded, N bytes cross the bus, which is then the limit. ``snapshot``
is timed with its allocation (a new snapshot each call, as SFPO takes one per
iteration); ``restore_`` into an existing one.
"""

from __future__ import annotations

import functools

import pytest
import torch

import sfpo_kernels
from bench import baselines

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BACKENDS = ["triton", "cuda", "torch"]


@pytest.mark.parametrize("offload", ["none", "cpu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_snapshot(benchmark, bench, dtype, backend, offload):
    bench.skip_unless_runs(backend, offload)
    work = bench.workload(DTYPES[dtype])
    fn = functools.partial(sfpo_kernels.snapshot, work.params, offload=offload, backend=backend)
    bytes_moved, limit = (2 * work.nbytes, "d2d") if offload == "none" else (work.nbytes, "d2h")
    bench.run(
        benchmark,
        fn,
        work=work,
        op="snapshot",
        impl=f"sfpo_kernels.snapshot[{backend}]",
        backend=backend,
        bytes_moved=bytes_moved,
        limit=limit,
        offload=offload,
        slow=bench.is_slow(backend, offload),
    )


@pytest.mark.parametrize("offload", ["none", "cpu"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_restore(benchmark, bench, dtype, backend, offload):
    bench.skip_unless_runs(backend, offload)
    work = bench.workload(DTYPES[dtype])
    snap = sfpo_kernels.snapshot(work.params, offload=offload, backend=backend)
    fn = functools.partial(snap.restore_, work.params, backend=backend)
    bytes_moved, limit = (2 * work.nbytes, "d2d") if offload == "none" else (work.nbytes, "h2d")
    bench.run(
        benchmark,
        fn,
        work=work,
        op="restore",
        impl=f"Snapshot.restore_[{backend}]",
        backend=backend,
        bytes_moved=bytes_moved,
        limit=limit,
        offload=offload,
        slow=bench.is_slow(backend, offload),
    )


@pytest.mark.parametrize("impl", list(baselines.SNAPSHOT_TRAFFIC))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_snapshot_baseline(benchmark, bench, dtype, impl):
    offload = "cpu" if impl == "to_cpu" else "none"
    if offload == "cpu" and bench.device.type != "cuda":
        pytest.skip("a host copy of CPU tensors is the clone row")
    work = bench.workload(DTYPES[dtype])
    fn = functools.partial(getattr(baselines, f"snapshot_{impl}"), work.params)
    bench.run(
        benchmark,
        fn,
        work=work,
        op="snapshot",
        impl=impl,
        backend="baseline",
        bytes_moved=baselines.SNAPSHOT_TRAFFIC[impl] * work.nbytes,
        limit="d2h" if offload == "cpu" else "d2d",
        offload=offload,
        slow=offload == "cpu",
    )


@pytest.mark.parametrize("impl", list(baselines.RESTORE_TRAFFIC))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_restore_baseline(benchmark, bench, dtype, impl):
    work = bench.workload(DTYPES[dtype])
    snaps = [p.detach().clone() for p in work.params]
    fn = functools.partial(getattr(baselines, f"restore_{impl}"), work.params, snaps)
    bench.run(
        benchmark,
        fn,
        work=work,
        op="restore",
        impl=impl,
        backend="baseline",
        bytes_moved=baselines.RESTORE_TRAFFIC[impl] * work.nbytes,
    )
