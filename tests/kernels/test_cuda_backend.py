"""The 'cuda' backend: csrc/multi_tensor.cu built with nvcc, loaded with ctypes.

Everywhere nvcc runs (CI included, no GPU needed): the library builds for more
than one architecture, holds device code for exactly the architecture asked
for, is reused from its cache, exports its three C symbols, loads without a
GPU and reports its own errors; the cache is private (0700) and a cached
library that does not match its recorded sha256 is rebuilt before it is loaded;
the backend refuses CPU tensors before it writes anything.

On a GPU: the cuda, triton and torch backends and ``sfpo_kernels.reference``
agree bit for bit over every dtype, odd sizes and views that start off the
16-byte grid, and ``offload="cpu"`` matches ``offload="none"`` while keeping the
copy out of GPU memory.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import re
import shutil
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import sfpo_kernels
from sfpo_kernels import _cuda_lib, reference
from sfpo_kernels import multi_tensor as mt
from tests.helpers.bits import assert_bit_equal
from tests.helpers.devices import HAS_CUDA, requires_cuda

# Tolerances, one table for the file.
#   "values": every comparison of tensor values is exact. Copies are bit copies;
#     every backend and the reference evaluate the same two-branch fma lerp in
#     promote(dtype, fp32) and round once to nearest-even, so any difference in
#     any bit is a bug, not rounding.
#   "table_bytes_per_entry" / "allocator_block": an offloaded snapshot may still
#     put its pointer table on the GPU (int64: 3 entries per tensor + 2 per
#     chunk), which the caching allocator rounds up to whole 512-byte blocks.
#     That is metadata; the copy itself (tens of MB here) must not be there.
TOLERANCES = {"values": 0, "table_bytes_per_entry": 8, "allocator_block": 512}

ARCHS = ("sm_90", "sm_80")  # Hopper (the lent GPUs) and a second one: builds are per architecture
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ALPHAS = [0.0, 0.3, 0.8, 1.0]  # 0.3 and 0.8 take the two branches of the lerp (weight 0.7 and 0.2)

# ---------------------------------------------------------------- build (no GPU needed)


def _fatbin_entries(lib: Path) -> list[tuple[str, int]]:
    """(kind, sm) of every device-code entry nvcc embedded in ``lib``: ("elf", 90) is a cubin for sm_90.

    Reads the fat-binary containers (magic 0xBA55ED50, 16-byte header, then
    entries of ``kind:u16 _:u16 header_size:u32 payload_size:u64 ... arch:u32``
    with ``arch`` at byte 28), the format cuobjdump lists.
    """
    data = lib.read_bytes()
    magic = struct.pack("<I", 0xBA55ED50)
    entries = []
    at = data.find(magic)
    while at >= 0:
        _, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, at)
        entry, end = at + header_size, at + header_size + fat_size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            entries.append(({1: "ptx", 2: "elf"}.get(kind, f"kind{kind}"), arch))
            entry += entry_header + payload
        at = data.find(magic, end)
    return entries


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Both architectures built into a fresh directory, concurrently (nvcc takes ~10 s a build)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on the PATH: the cuda backend cannot be built here")
    out_dir = tmp_path_factory.mktemp("sfpo_cuda_build")
    with ThreadPoolExecutor(len(ARCHS)) as pool:
        paths = dict(zip(ARCHS, pool.map(lambda arch: _cuda_lib.build(arch, out_dir=out_dir), ARCHS)))
    return paths


@pytest.fixture()
def loaded(built, monkeypatch) -> ctypes.CDLL:
    """The sm_90 library through ``_cuda_lib.load`` (its ctypes signatures), from the build above.

    ``load`` is cached per process; calling the wrapped function keeps this
    test's library out of that cache.
    """
    monkeypatch.setenv("SFPO_CACHE_DIR", str(built["sm_90"].parent))
    return _cuda_lib.load.__wrapped__("sm_90")


def test_builds_one_library_per_architecture_with_that_architectures_code(built):
    assert built["sm_90"] != built["sm_80"]
    for arch, lib in built.items():
        assert lib.is_file() and lib.suffix == ".so", arch
        assert f"-{arch}-" in lib.name, f"{arch}: the file name must carry the architecture, got {lib.name}"
        entries = _fatbin_entries(lib)
        sm = int(arch[3:])
        assert entries, f"{arch}: no device code embedded in {lib.name}"
        assert set(entries) == {("elf", sm)}, f"{arch}: expected only sm_{sm} cubins, found {entries}"
    expected = sorted(p.name + suffix for p in built.values() for suffix in ("", ".lock", ".sha256"))
    assert sorted(p.name for p in built["sm_90"].parent.iterdir()) == expected, "the build left temporary files behind"


def test_second_build_reuses_the_cached_library(built, monkeypatch):
    lib = built["sm_90"]
    before = lib.stat().st_mtime_ns
    files_before = sorted(lib.parent.iterdir())
    assert _cuda_lib.build("sm_90", out_dir=lib.parent) == lib
    monkeypatch.setenv("SFPO_CACHE_DIR", str(lib.parent))  # the default out_dir is $SFPO_CACHE_DIR
    assert _cuda_lib.build("sm_90") == lib
    assert lib.stat().st_mtime_ns == before, "the cached library was rebuilt"
    assert sorted(lib.parent.iterdir()) == files_before


def _recorded_sha256(lib: Path) -> str:
    return lib.with_name(lib.name + ".sha256").read_text().strip()


def test_build_records_the_sha256_in_a_private_cache_directory(tmp_path, monkeypatch):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on the PATH: the cuda backend cannot be built here")
    cache = tmp_path / "home" / "cache" / "sfpo"  # created by the build
    monkeypatch.setenv("SFPO_CACHE_DIR", str(cache))
    lib = _cuda_lib.build("sm_90")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700, f"cache directory mode {stat.filemode(cache.stat().st_mode)}"
    assert _recorded_sha256(lib) == hashlib.sha256(lib.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "tamper, message",
    [
        pytest.param("flip-byte", "does not match its recorded sha256", id="library-changed"),
        pytest.param("drop-record", "has no recorded sha256", id="record-missing"),
    ],
)
def test_a_tampered_cached_library_is_rebuilt_before_it_is_loaded(built, tmp_path, monkeypatch, tamper, message):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    src = built["sm_90"]
    lib = cache / src.name
    shutil.copy(src, lib)
    shutil.copy(src.with_name(src.name + ".sha256"), cache)
    monkeypatch.setenv("SFPO_CACHE_DIR", str(cache))
    assert _cuda_lib.build("sm_90") == lib  # intact: reused as it is
    data = bytearray(lib.read_bytes())
    if tamper == "flip-byte":
        data[len(data) // 2] ^= 0xFF  # what a planted library would look like: other bytes under the same name
        lib.write_bytes(bytes(data))
    else:
        lib.with_name(lib.name + ".sha256").unlink()
    with pytest.warns(UserWarning, match=re.escape(f"cached library {lib} {message}")):
        loaded = _cuda_lib.load.__wrapped__("sm_90")
    assert hasattr(loaded, "sfpo_mt_lerp")
    rebuilt = lib.read_bytes()
    assert rebuilt != bytes(data), "the tampered bytes are still there"
    assert _recorded_sha256(lib) == hashlib.sha256(rebuilt).hexdigest()


def test_a_cache_directory_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(RuntimeError, match=f"cache directory {shared} is writable by other users"):
        _cuda_lib.build("sm_90", out_dir=shared)
    assert list(shared.iterdir()) == [], "a refused cache must not be written"


def test_a_symlinked_or_foreign_cache_directory_is_refused(tmp_path, monkeypatch):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(private, target_is_directory=True)
    with pytest.raises(RuntimeError, match=f"cache directory {link} is a symlink"):
        _cuda_lib.build("sm_90", out_dir=link)
    monkeypatch.setattr(_cuda_lib.os, "getuid", lambda: private.stat().st_uid + 1)  # as another user sees it
    with pytest.raises(RuntimeError, match=f"cache directory {private} belongs to uid"):
        _cuda_lib.build("sm_90", out_dir=private)
    assert list(private.iterdir()) == []


def test_library_loads_without_a_gpu_and_exports_the_c_api(built):
    for arch, path in built.items():
        lib = ctypes.CDLL(str(path))  # cudart is linked statically: no driver needed to load
        for symbol in ("sfpo_mt_copy", "sfpo_mt_lerp", "sfpo_mt_last_error"):
            assert hasattr(lib, symbol), f"{arch}: {symbol} is not exported"


def test_library_reports_bad_arguments_through_last_error(loaded):
    table = torch.zeros(5, dtype=torch.int64)  # never read: every call below returns before a launch
    assert loaded.sfpo_mt_lerp(table.data_ptr(), 1, 1, 256, 9, 0.5, None) == -1
    assert loaded.sfpo_mt_last_error() == b"unsupported dtype code 9"
    assert loaded.sfpo_mt_copy(table.data_ptr(), 1, 1, 256, 3, 1, None) == -1
    assert loaded.sfpo_mt_last_error() == b"unsupported element size 3"
    assert loaded.sfpo_mt_lerp(table.data_ptr(), 1, 0, 256, 0, 0.5, None) == 0, "no chunks: nothing to launch"


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the launch would run; this checks the no-driver error path")
def test_launch_without_a_driver_fails_with_the_cuda_error(loaded):
    table = torch.zeros(5, dtype=torch.int64)
    assert loaded.sfpo_mt_copy(table.data_ptr(), 1, 1, 256, 3, 1, None) == -1  # known message first
    for name, call in (
        ("copy", lambda: loaded.sfpo_mt_copy(table.data_ptr(), 1, 1, 256, 4, 1, None)),
        ("lerp", lambda: loaded.sfpo_mt_lerp(table.data_ptr(), 1, 1, 256, 0, 0.5, None)),
    ):
        status = call()
        message = loaded.sfpo_mt_last_error().decode()
        assert status > 0, f"{name}: a launch with no usable driver must return the cudaError_t, got {status}"
        assert message and "unsupported" not in message, f"{name}: last_error not set by the failed launch: {message!r}"


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param("sm90", id="no-underscore"),
        pytest.param("compute_90", id="virtual-arch"),
        pytest.param("SM_90", id="upper-case"),
        pytest.param("sm_", id="no-number"),
        pytest.param("sm_9x", id="letter-in-number"),
        pytest.param("sm_a", id="suffix-only"),
        pytest.param("sm_90aa", id="double-suffix"),
        pytest.param(90, id="not-a-string"),
    ],
)
def test_bad_arch_raises_value_error_before_building(arch, tmp_path):
    out_dir = tmp_path / "never_created"
    with pytest.raises(ValueError, match="is not a CUDA architecture") as info:
        _cuda_lib.build(arch, out_dir=out_dir)
    assert repr(arch) in str(info.value)
    assert not out_dir.exists(), "a rejected architecture must not create anything"


# ---------------------------------------------------------------- the 'cuda' backend refuses CPU tensors


def test_cuda_backend_on_cpu_tensors_raises_before_writing(monkeypatch):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(7, generator=g), torch.randn(3, 4, generator=g, dtype=torch.float64)]
    theta0 = [p.clone() for p in params]
    snap = sfpo_kernels.snapshot(params, backend="torch")
    for p in params:
        p.add_(1.0)
    before = [p.clone() for p in params]
    versions = [p._version for p in params]

    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        sfpo_kernels.snapshot(params, backend="cuda")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        sfpo_kernels.reposition_(params, snap, 0.5, backend="cuda")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        snap.restore_(params, backend="cuda")
    monkeypatch.setenv("SFPO_BACKEND", "cuda")  # the same through the environment
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        sfpo_kernels.reposition_(params, snap, 0.5)

    for i, (p, b) in enumerate(zip(params, before)):
        assert_bit_equal(f"tensors[{i}] after the refused calls", p, b)
    assert [p._version for p in params] == versions, "a refused call marked the tensors modified"
    monkeypatch.delenv("SFPO_BACKEND")
    sfpo_kernels.reposition_(params, snap, 0.0)  # the snapshot is still usable: back to theta_0
    for i, (p, t0) in enumerate(zip(params, theta0)):
        assert_bit_equal(f"tensors[{i}] restored by the torch backend", p, t0)


# ---------------------------------------------------------------- on a GPU: all backends agree

# Element counts: 1; below one 16-byte vector for every dtype; not a multiple of
# the vector; one vector exactly; crossing the 64Ki-element GPU chunk; many
# small ones (so one launch covers ~40 tensors). Some are 2-D.
SHAPES = [(1,), (3,), (7,), (8,), (33,), (5, 3), (1000,), (257, 3), (4097,), (65537,), (70001,)]
SHAPES += [(k % 11 + 1,) for k in range(30)]
BACKENDS = ("cuda", "triton", "torch")
LAYOUTS = [
    pytest.param("standalone", id="own-allocations"),  # every tensor 512-byte aligned: vector path
    pytest.param("misaligned", id="odd-offset-views"),  # views of one buffer, none 16-byte aligned: scalar path
    pytest.param("mixed", id="alternating-views"),  # every other view 16-byte aligned: both paths in one launch
]
SENTINEL = 7.0  # what the bytes between views hold; a kernel writing past a view changes them


def _values(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]


def _place(values: list[torch.Tensor], layout: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Copies of ``values`` on the GPU, laid out as ``layout`` says; and the shared buffer if any."""
    if layout == "standalone":
        return [v.cuda() for v in values], None
    vec = 16 // values[0].element_size()  # elements per 16 bytes
    buf = torch.full((sum(v.numel() + vec + 1 for v in values) + vec,), SENTINEL, dtype=values[0].dtype, device="cuda")
    out, off = [], 1
    for k, v in enumerate(values):
        if layout == "mixed" and k % 2:
            off = -(-off // vec) * vec
        elif off % vec == 0:
            off += 1
        view = buf[off : off + v.numel()].view(v.shape)
        view.copy_(v)
        out.append(view)
        off += v.numel() + 1  # at least one sentinel element between views
    aligned = [t.data_ptr() % 16 == 0 for t in out]  # the layout is what its name says
    assert aligned == [layout == "mixed" and k % 2 == 1 for k in range(len(out))]
    return out, buf


def _untouched(buf: torch.Tensor | None, views: list[torch.Tensor]) -> torch.Tensor | None:
    """The elements of ``buf`` outside every view (they must still hold the sentinel)."""
    if buf is None:
        return None
    outside = torch.ones(buf.numel(), dtype=torch.bool, device=buf.device)
    elem = buf.element_size()
    for v in views:
        start = (v.data_ptr() - buf.data_ptr()) // elem
        outside[start : start + v.numel()] = False
    return buf[outside]


def _check_sentinel(name: str, buf: torch.Tensor | None, views: list[torch.Tensor]) -> None:
    gaps = _untouched(buf, views)
    if gaps is not None:
        assert_bit_equal(name, gaps, torch.full_like(gaps, SENTINEL))


@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_backends_and_reference_agree_bit_for_bit(layout, dtype, alpha):
    theta0, theta_k = _values(dtype, seed=0), _values(dtype, seed=1)
    expected = [t.cuda() for t in theta_k]
    reference.reposition_(expected, reference.snapshot([t.cuda() for t in theta0]), alpha)

    for backend in BACKENDS:
        params, buf = _place(theta0, layout)
        snap = sfpo_kernels.snapshot(params, backend=backend)
        for p, t in zip(params, theta_k):
            p.copy_(t)
        sfpo_kernels.reposition_(params, snap, alpha, backend=backend)
        torch.cuda.synchronize()
        for i, (p, e) in enumerate(zip(params, expected)):
            assert_bit_equal(f"{backend} tensor[{i}] (shape {tuple(p.shape)}, alpha {alpha})", p, e)
        _check_sentinel(f"{backend}: elements between the views", buf, params)


@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_snapshot_restore_round_trip(layout, dtype):
    theta0 = _values(dtype, seed=2)
    params, buf = _place(theta0, layout)
    snap = sfpo_kernels.snapshot(params, backend="cuda")
    for i, (v, t0) in enumerate(zip(snap.values(), theta0)):
        assert_bit_equal(f"snapshot value[{i}]", v.cpu(), t0)
    for p in params:
        p.mul_(-2.0).add_(3.0)
    snap.restore_(params, backend="cuda")
    torch.cuda.synchronize()
    for i, (p, t0) in enumerate(zip(params, theta0)):
        assert_bit_equal(f"restored tensor[{i}] (shape {tuple(p.shape)})", p.cpu(), t0)
    _check_sentinel("elements between the views after snapshot and restore", buf, params)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_offload_cpu_equals_offload_none(backend, dtype, alpha):
    theta0, theta_k = _values(dtype, seed=3), _values(dtype, seed=4)
    results = {}
    for offload in ("none", "cpu"):
        params, buf = _place(theta0, "mixed")
        snap = sfpo_kernels.snapshot(params, offload=offload, backend=backend)
        if offload == "cpu":
            for i, (v, t0) in enumerate(zip(snap.values(), theta0)):
                assert v.device.type == "cpu" and v.is_pinned(), f"offloaded value[{i}] is on {v.device}"
                assert_bit_equal(f"offloaded snapshot value[{i}]", v, t0)
        for p, t in zip(params, theta_k):
            p.copy_(t)
        sfpo_kernels.reposition_(params, snap, alpha, backend=backend)
        torch.cuda.synchronize()
        _check_sentinel(f"offload={offload}: elements between the views", buf, params)
        results[offload] = [p.cpu() for p in params]
        snap.restore_(params, backend=backend)
        torch.cuda.synchronize()
        for i, (p, t0) in enumerate(zip(params, theta0)):
            assert_bit_equal(f"offload={offload}: restored tensor[{i}]", p.cpu(), t0)
    for i, (a, b) in enumerate(zip(results["cpu"], results["none"])):
        assert_bit_equal(f"tensor[{i}] offload=cpu vs none", a, b)


def _table_allowance(params: list[torch.Tensor]) -> int:
    """GPU bytes one pointer table for ``params`` may take (see TOLERANCES)."""
    chunk = mt.launch_shape(params[0].device)[1]
    entries = 3 * len(params) + 2 * sum(math.ceil(p.numel() / chunk) for p in params)
    block = TOLERANCES["allocator_block"]
    return math.ceil(entries * TOLERANCES["table_bytes_per_entry"] / block) * block


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_offloaded_snapshot_takes_no_gpu_memory(backend):
    g = torch.Generator(device="cuda").manual_seed(5)
    params = [torch.randn(n, device="cuda", generator=g) for n in (4_000_000, 1_000_003, 17)]  # 20 MB fp32
    allowance = 0 if backend == "torch" else _table_allowance(params)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()

    snap = sfpo_kernels.snapshot(params, offload="cpu", backend=backend)
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    assert grown <= allowance, f"offloaded snapshot of {snap.nbytes} B grew GPU memory by {grown} B"

    if backend != "torch":  # zero-copy reposition: no staging buffer either, not even for a moment
        torch.cuda.reset_peak_memory_stats()
        sfpo_kernels.reposition_(params, snap, 0.5, backend=backend)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        assert peak <= allowance, f"offloaded reposition peaked {peak} B above the parameters"

    # The control: the same snapshot kept on the GPU shows up in memory_allocated.
    on_gpu = sfpo_kernels.snapshot(params, offload="none", backend=backend)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before - grown >= on_gpu.nbytes
