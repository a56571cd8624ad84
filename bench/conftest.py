"""Shared setup for the sfpo_kernels benchmarks (``pytest bench/ --benchmark-only``).

- Shapes: the parameter list of a Qwen2.5-1.5B-shaped model on a GPU, the same
  structure scaled down ("tiny") on the CPU; ``SFPO_BENCH_SIZE=tiny|1.5b``
  overrides. Shapes are computed from the config numbers; nothing is downloaded.
- Timing: pytest-benchmark's pedantic mode, warm-up rounds first, the device
  synchronised before each round and inside the timed call, so a round times
  the GPU work, not the launch.
- Limits: the bandwidth of one big ``dst.copy_(src)`` of the same total bytes,
  measured in this run on this device (host<->device pinned copies for
  ``offload="cpu"``), so every row reports "percent of copy".
- Threads: torch's thread count is chosen as ``sfpo train`` chooses it (``sfpo_train/cli/threads.py``:
  ``OMP_NUM_THREADS`` when set, else from the size of the shapes, the CPUs and the load) before the
  first benchmark, and the reason is printed in the header.
- ``extra_info`` of every benchmark: bytes moved, GB/s, percent of copy,
  launches per call, tensor count, elements, device, torch/triton versions,
  torch threads and why, git revision. ``--benchmark-json`` saves it all; with ``SFPO_BENCH_RESULTS``
  naming a directory and no ``--benchmark-json``, pytest-benchmark writes its
  JSON there (this file writes nothing itself).

Unlike ``tests/conftest.py`` this file does not switch ``TRITON_INTERPRET`` on:
the Triton rows run on the CPU only when the caller set it, since the
interpreter is orders of magnitude slower than the kernels it stands for.
"""

from __future__ import annotations

import functools
import gc
import math
import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton

from sfpo_kernels import triton_interpreting
from sfpo_train.clock import StageClock, synchronize

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE_ENV = "SFPO_BENCH_SIZE"
RESULTS_ENV = "SFPO_BENCH_RESULTS"
GIT_REV_ENV = "SFPO_GIT_REV"


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Qwen2-style decoder that fix its parameter shapes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = True


SHAPES = {
    # Qwen2.5-1.5B: 1,543,714,304 parameters in 338 tensors.
    "1.5b": ModelShape(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, head_dim=128, vocab=151936),
    # The same structure (GQA, q/k/v biases, RMSNorms, tied embeddings), 131,648
    # parameters in 26 tensors: small enough for Triton's CPU interpreter.
    "tiny": ModelShape(hidden=64, intermediate=192, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=512),
}


def param_shapes(shape_name: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter, in ``model.named_parameters()`` order."""
    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape set {shape_name!r}; expected one of {', '.join(SHAPES)}")
    c = SHAPES[shape_name]
    q_out, kv_out = c.heads * c.head_dim, c.kv_heads * c.head_dim
    out = [("model.embed_tokens.weight", (c.vocab, c.hidden))]
    for i in range(c.layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", (q_out, c.hidden)),
            (f"{p}.self_attn.q_proj.bias", (q_out,)),
            (f"{p}.self_attn.k_proj.weight", (kv_out, c.hidden)),
            (f"{p}.self_attn.k_proj.bias", (kv_out,)),
            (f"{p}.self_attn.v_proj.weight", (kv_out, c.hidden)),
            (f"{p}.self_attn.v_proj.bias", (kv_out,)),
            (f"{p}.self_attn.o_proj.weight", (c.hidden, q_out)),
            (f"{p}.mlp.gate_proj.weight", (c.intermediate, c.hidden)),
            (f"{p}.mlp.up_proj.weight", (c.intermediate, c.hidden)),
            (f"{p}.mlp.down_proj.weight", (c.hidden, c.intermediate)),
            (f"{p}.input_layernorm.weight", (c.hidden,)),
            (f"{p}.post_attention_layernorm.weight", (c.hidden,)),
        ]
    out.append(("model.norm.weight", (c.hidden,)))
    if not c.tied_embeddings:
        out.append(("lm_head.weight", (c.vocab, c.hidden)))
    return out


def param_list(shape_name: str, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Fresh standard-normal parameters (``requires_grad=True``) with the shapes of ``shape_name``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _, shape in param_shapes(shape_name):
        t = torch.empty(shape, dtype=dtype, device=device)
        t.normal_(generator=gen)
        out.append(torch.nn.Parameter(t))
    return out


def bench_size() -> str:
    """``$SFPO_BENCH_SIZE``, else "1.5b" with a GPU and "tiny" without."""
    size = os.environ.get(SIZE_ENV) or ("1.5b" if torch.cuda.is_available() else "tiny")
    if size not in SHAPES:
        raise pytest.UsageError(f"{SIZE_ENV}={size!r}; expected one of {', '.join(SHAPES)}")
    return size


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------- machine info


def git_revision() -> str:
    """``git rev-parse --short HEAD`` of this checkout (``-dirty`` if it has changes), else ``$SFPO_GIT_REV``."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        if rev:
            return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get(GIT_REV_ENV) or "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


@functools.cache
def torch_threads_line() -> str:
    """Choose and set torch's thread count for the benchmarks (``sfpo_train/cli/threads.py``: ``OMP_NUM_THREADS``
    wins; else from the size of the shapes benchmarked, the CPUs and the load), once; the line saying why."""
    from sfpo_train.cli import threads

    parameters = sum(math.prod(shape) for _, shape in param_shapes(bench_size()))
    return threads.configure(parameters=parameters)


@functools.cache
def sfpo_machine_info() -> dict[str, str]:
    device = bench_device()
    threads_line = torch_threads_line()  # sets the count first
    return {
        "device": device_name(device),
        "torch_threads": str(torch.get_num_threads()),
        "threads_reason": threads_line,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "git_rev": git_revision(),
        "size": bench_size(),
        "triton_interpret": str(triton_interpreting()),
    }


def device_slug() -> str:
    """The device name as a file-name part: "nvidia-h100-80gb-hbm3", "cpu"."""
    device = bench_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------- timing


def time_call(fn: Callable[[], object], device: torch.device, *, rounds: int, warmup: int) -> float:
    """Median seconds of ``fn()`` (synchronised), outside pytest-benchmark: for the copy probes."""
    for _ in range(warmup):
        fn()
    clock = StageClock(device)
    times = []
    for _ in range(rounds):
        clock.lap()
        fn()
        times.append(clock.lap())
    return statistics.median(times)


# Copy-bandwidth probes, keyed by (kind, bytes): measured once per session.
_COPY_GBPS: dict[tuple[str, int], float] = {}


def copy_bandwidth(kind: str, nbytes: int, device: torch.device) -> float:
    """GB/s (1e9 bytes/s) of one ``dst.copy_(src)`` of ``nbytes`` bytes on ``device``.

    ``kind``: "d2d" (same device; counts bytes read plus written, 2 * nbytes
    per copy, as the ops' traffic is counted), "d2h" / "h2d" (between the GPU
    and pinned host memory; counts the bytes crossing the bus, nbytes).
    """
    key = (kind, nbytes)
    if key not in _COPY_GBPS:
        host = torch.device("cpu")
        src_dev, dst_dev = {"d2d": (device, device), "d2h": (device, host), "h2d": (host, device)}[kind]
        pin = device.type == "cuda"
        src = torch.empty(nbytes, dtype=torch.uint8, device=src_dev, pin_memory=pin and src_dev.type == "cpu")
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_dev, pin_memory=pin and dst_dev.type == "cpu")
        src.fill_(1)
        big = nbytes >= 2**28
        seconds = time_call(lambda: dst.copy_(src, non_blocking=True), device, rounds=10 if big else 50, warmup=3)
        _COPY_GBPS[key] = (2 if kind == "d2d" else 1) * nbytes / seconds / 1e9
        del src, dst
    return _COPY_GBPS[key]


# --------------------------------------------------------------------------- launch counting


def count_launches(fn: Callable[[], object], device: torch.device) -> dict[str, object]:
    """Device operations of one call of ``fn``, counted with ``torch.profiler``.

    Returns ``launches`` (kernels + memcpys), ``kernels``, ``memcpys`` (memsets included)
    and ``device_ops`` (the distinct names with their counts, to check the
    count by) on a GPU; "n/a" on the CPU (nothing is launched there).
    Synchronisation records are not operations and are left out.
    """
    na = {"launches": "n/a", "kernels": "n/a", "memcpys": "n/a"}
    if device.type != "cuda":
        return na
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()  # compiled and cached before the profiled call
        synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            synchronize(device)
        names: dict[str, int] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and "sync" not in e.name.lower():
                names[e.name] = names.get(e.name, 0) + 1
        if not names:
            return {**na, "launch_count_error": "the profiler recorded no device operation"}
        memcpys = sum(n for name, n in names.items() if name.lower().startswith(("memcpy", "memset")))
        kernels = sum(names.values()) - memcpys
        ops = sorted(names.items(), key=lambda kv: -kv[1])
        summary = "; ".join(f"{n}x {name[:80]}" for name, n in ops[:6]) + ("; ..." if len(ops) > 6 else "")
        return {"launches": kernels + memcpys, "kernels": kernels, "memcpys": memcpys, "device_ops": summary}
    except Exception as err:  # the profiler is a convenience: a row without counts beats no row
        return {**na, "launch_count_error": f"{type(err).__name__}: {err}"}


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict[str, object]:
    """Device memory one call of ``fn`` allocates at its peak, above what was allocated before it.

    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    ``memory_allocated`` before the call: the temporaries, saved activations and
    outputs of ``fn``, not the inputs. Returns ``peak_mem_bytes`` and
    ``peak_mem_mib``; "n/a" on the CPU.
    """
    if device.type != "cuda":
        return {"peak_mem_bytes": "n/a", "peak_mem_mib": "n/a"}
    gc.collect()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    return {"peak_mem_bytes": int(peak), "peak_mem_mib": round(peak / 2**20, 1)}


# --------------------------------------------------------------------------- the fixture the benchmarks use


@dataclass(frozen=True)
class Workload:
    """One benchmark's inputs and what its numbers are measured against."""

    params: list[torch.Tensor]
    device: torch.device
    size: str

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def nbytes(self) -> int:
        """N: the bytes of all parameters (what one copy reads, and writes)."""
        return sum(p.numel() * p.element_size() for p in self.params)


class Bench:
    """What every benchmark does: build inputs, time, count launches, fill ``extra_info``."""

    def __init__(self) -> None:
        self.device = bench_device()
        self.size = bench_size()

    def workload(self, dtype: torch.dtype) -> Workload:
        return Workload(param_list(self.size, dtype, self.device), self.device, self.size)

    def skip_unless_runs(self, backend: str, offload: str = "none") -> None:
        """``pytest.skip`` with the reason when ``backend`` / ``offload`` cannot run (sensibly) here."""
        on_gpu = self.device.type == "cuda"
        if offload == "cpu" and not on_gpu:
            pytest.skip("offload='cpu' moves copies of CUDA tensors to the host; for CPU tensors it is offload='none'")
        if backend == "cuda" and not on_gpu:
            pytest.skip("backend 'cuda' needs a CUDA device")
        if backend == "triton" and not on_gpu and not triton_interpreting():
            pytest.skip("backend 'triton' on the CPU needs TRITON_INTERPRET=1 in the environment before the run")
        if backend == "triton" and triton_interpreting() and self.size != "tiny":
            pytest.skip(f"the Triton interpreter runs only the tiny shapes ({SIZE_ENV}={self.size})")

    def is_slow(self, backend: str, offload: str = "none") -> bool:
        """Interpreted Triton or PCIe-bound offload: fewer rounds."""
        return (backend == "triton" and triton_interpreting()) or offload == "cpu"

    def rounds(self, *, slow: bool = False) -> tuple[int, int]:
        """(rounds, warm-up rounds). ``slow``: the Triton interpreter or PCIe-bound offload."""
        if slow:
            return (2, 1) if self.device.type == "cpu" else (5, 1)
        return (30, 3) if self.device.type == "cpu" or self.size == "tiny" else (20, 3)

    def run(
        self,
        benchmark,
        fn: Callable[[], object],
        *,
        work: Workload,
        op: str,
        impl: str,
        backend: str,
        bytes_moved: int,
        limit: str = "d2d",
        offload: str = "none",
        slow: bool = False,
    ) -> None:
        """Time ``fn`` (synchronised) and record its numbers in ``benchmark.extra_info``.

        ``bytes_moved``: the bytes ``fn`` moves through the link named by
        ``limit``: device memory for "d2d" (reads + writes), the host bus for
        "d2h" / "h2d". ``limit`` also names the copy that "percent of copy"
        compares against (of ``work.nbytes``, measured in this run).
        """
        if os.environ.get("SFPO_POISON_ALLOCATIONS") == "1":
            pytest.skip(
                "SFPO_POISON_ALLOCATIONS=1 (set by tests/conftest.py) NaN-fills every snapshot; "
                "run bench/ in a pytest process of its own"
            )
        device = self.device
        dtype = work.params[0].dtype

        def timed() -> None:
            fn()
            synchronize(device)

        rounds, warmup = self.rounds(slow=slow)
        benchmark.group = f"{op} {str(dtype).removeprefix('torch.')} offload={offload}"
        benchmark.pedantic(timed, setup=lambda: synchronize(device), rounds=rounds, warmup_rounds=warmup, iterations=1)

        info = benchmark.extra_info
        info.update(sfpo_machine_info())
        info.update(
            op=op,
            impl=impl,
            backend=backend,
            dtype=str(dtype).removeprefix("torch."),
            offload=offload,
            n_tensors=len(work.params),
            numel=work.numel,
            param_bytes=work.nbytes,
            bytes_moved=bytes_moved,
            limit=f"{limit} copy",
        )
        copy_gbps = copy_bandwidth(limit, work.nbytes, device)
        info["copy_gbps"] = round(copy_gbps, 2)
        stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
        if stats is not None and stats.median > 0:
            gbps = bytes_moved / stats.median / 1e9
            info["gbps"] = round(gbps, 4)
            info["pct_of_copy"] = round(100.0 * gbps / copy_gbps, 3)
        info.update(count_launches(fn, device))


@pytest.fixture(scope="session")
def bench() -> Bench:
    return Bench()


@pytest.fixture(autouse=True)
def _free_memory():
    """Each benchmark starts with the previous one's tensors gone (1.5B fp32 is 6 GB a copy)."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- pytest hooks


def pytest_report_header(config):
    return f"sfpo: {torch_threads_line()}"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """The torch thread count (before any benchmark runs); ``SFPO_BENCH_RESULTS=DIR`` and no ``--benchmark-json``:
    pytest-benchmark writes its JSON into DIR."""
    torch_threads_line()
    results = os.environ.get(RESULTS_ENV)
    if not results or getattr(config.option, "benchmark_json", None) is not None:
        return
    if not Path(results).is_dir():
        raise pytest.UsageError(f"{RESULTS_ENV}={results!r} is not a directory")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config.option.benchmark_json = Path(results) / f"bench-{device_slug()}-{stamp}.json"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["sfpo"] = sfpo_machine_info()


def pytest_benchmark_update_commit_info(config, commit_info):
    if not commit_info.get("id") and os.environ.get(GIT_REV_ENV):
        commit_info["id"] = os.environ[GIT_REV_ENV]


_skipped: list[dict] = []  # {"name", "reason"} of every row that skipped in this run


def pytest_runtest_logreport(report):
    """Collect why rows skipped (a marker skips at setup, ``pytest.skip`` in the body at call)."""
    if report.skipped and report.when in ("setup", "call") and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        _skipped.append({"name": report.nodeid.rpartition("::")[2], "reason": reason})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The JSON keeps the skipped rows and their reasons, for ``bench/summary.py``."""
    from bench.summary import SKIPPED_KEY

    output_json[SKIPPED_KEY] = list(_skipped)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """At the end of ``pytest bench/ --benchmark-only``: sfpo against each baseline as ratios, with the device,
    the spread, what CPU numbers cannot say, and why rows skipped."""
    session = getattr(config, "_benchmarksession", None)
    records = [b.as_dict(include_data=False) for b in getattr(session, "benchmarks", None) or []]
    if not records and not _skipped:
        return
    import pandas as pd

    from bench.summary import summary_lines

    frame = pd.json_normalize(records)
    if not frame.empty:
        frame["median_ms"] = frame["stats.median"] * 1e3
    device = sfpo_machine_info().get("device", str(bench_device()))
    terminalreporter.write_sep("=", f"sfpo vs baselines on {device} (median times; >1x: sfpo faster)")
    for line in summary_lines(frame, device, _skipped):
        terminalreporter.write_line(line)
