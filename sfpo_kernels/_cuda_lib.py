"""Build (with nvcc) and load (with ctypes) the CUDA C++ backend in ``csrc/``.

The library is plain CUDA, not a torch extension: it takes the same int64
pointer table as the Triton kernels and the raw ``cudaStream_t`` of torch's
current stream, so it builds without torch headers and loads into any torch
build. It is compiled on first use for the current GPU's architecture and
cached under ``$SFPO_CACHE_DIR`` (default ``~/.cache/sfpo``), keyed by the
source hash, the architecture and the nvcc version.

The cache is code this process will run, so it is guarded: the directory is
created with mode 0700 (one that others may write to is refused), each library
has its sha256 recorded beside it (``<lib>.sha256``) when it is built, and a
library whose bytes no longer match (or that has no record) is rebuilt, with a
warning, before it is loaded. A per-library ``<lib>.lock`` (``fcntl.flock``)
serialises the check and the build, so concurrent processes build it once and
never see a library without its record (nvcc's output differs from build to
build, so two unsynchronised builds could pair one's library with the other's hash).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

from sfpo_kernels._pointer_table import PointerTable

SOURCE_NAME = "multi_tensor.cu"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def source_path() -> Path:
    """``csrc/multi_tensor.cu``: from a source checkout, else the copy shipped in the wheel."""
    checkout = Path(__file__).resolve().parent.parent / "csrc" / SOURCE_NAME
    if checkout.is_file():
        return checkout
    shipped = Path(__file__).resolve().parent / "csrc" / SOURCE_NAME
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"cannot find {SOURCE_NAME} next to the package (looked at {checkout} and {shipped})")


def nvcc_path() -> str:
    """The nvcc to build with: ``$NVCC``, else the one on the PATH, else ``$CUDA_HOME/bin/nvcc``."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"))
    for c in candidates:
        if c and Path(c).is_file():
            return c
    raise RuntimeError("the 'cuda' backend needs nvcc (set NVCC or CUDA_HOME, or put nvcc on the PATH)")


def cache_dir() -> Path:
    return Path(os.environ.get("SFPO_CACHE_DIR", Path.home() / ".cache" / "sfpo"))


def build(arch: str, out_dir: Path | None = None) -> Path:
    """Compile ``csrc/multi_tensor.cu`` for ``arch`` (e.g. ``"sm_90"``) and return the ``.so`` path.

    Reuses a cached build with the same source, architecture and nvcc whose
    bytes match its recorded sha256; writes atomically, under a lock, so
    concurrent processes never load a half-written or unrecorded library.
    """
    if not (isinstance(arch, str) and re.fullmatch(r"sm_\d+a?", arch)):
        raise ValueError(f"arch={arch!r} is not a CUDA architecture like 'sm_90'")
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    _private_dir(out_dir)  # before anything else: a directory others control is refused whatever else holds
    src = source_path()
    nvcc = nvcc_path()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(src.read_bytes() + arch.encode() + version.encode()).hexdigest()[:16]
    lib = out_dir / f"libsfpo_multi_tensor-{arch}-{key}.so"
    with _locked(lib.with_name(lib.name + ".lock")):
        problem = _cached_problem(lib)
        if problem is None:
            return lib
        if problem != "missing":
            warnings.warn(f"sfpo cuda backend: the cached library {lib} {problem}; rebuilding it", stacklevel=2)
        _compile(nvcc, src, arch, lib)
    return lib


def _private_dir(path: Path) -> None:
    """Create ``path`` with mode 0700; refuse an existing one that is a symlink, another user's, or writable by others.

    The recorded sha256 beside each library catches a corrupted or swapped file;
    only this check keeps other users from replacing both the library and its record.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    hint = "; set SFPO_CACHE_DIR to a directory of your own (it is created 0700)"
    if stat.S_ISLNK(info.st_mode):
        raise RuntimeError(f"the sfpo cache directory {path} is a symlink: a library there could be replaced{hint}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise RuntimeError(
            f"the sfpo cache directory {path} belongs to uid {info.st_uid}, not to you "
            f"(uid {os.getuid()}): a library there could be replaced{hint}"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeError(
            f"the sfpo cache directory {path} is writable by other users (mode "
            f"{stat.filemode(info.st_mode)}): a library there could be replaced; chmod 700 it{hint}"
        )


def _digest_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached_problem(lib: Path) -> str | None:
    """Why the cached ``lib`` cannot be loaded ("missing", ...), or None when it matches its recorded sha256."""
    if not lib.is_file():
        return "missing"
    digest = _digest_path(lib)
    if not digest.is_file():
        return f"has no recorded sha256 ({digest.name})"
    recorded = digest.read_text().strip()
    actual = _sha256(lib)
    if actual != recorded:
        return f"does not match its recorded sha256 (recorded {recorded[:16]}..., found {actual[:16]}...)"
    return None


def _compile(nvcc: str, src: Path, arch: str, lib: Path) -> None:
    """nvcc into a temporary directory, then the sha256 record and the library renamed into place."""
    compute = "compute_" + arch[3:]
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        tmp_lib = Path(tmp) / lib.name
        cmd = [
            nvcc,
            "-O3",
            "-std=c++17",
            "-shared",
            "-Xcompiler",
            "-fPIC",
            "-lineinfo",
            f"-gencode=arch={compute},code={arch}",
            "-o",
            str(tmp_lib),
            str(src),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed building {src} for {arch}:\n{proc.stderr}")
        tmp_digest = Path(tmp) / _digest_path(lib).name
        tmp_digest.write_text(_sha256(tmp_lib) + "\n")
        os.replace(tmp_digest, _digest_path(lib))
        os.replace(tmp_lib, lib)


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive ``flock`` on ``path`` (created 0600) for the ``with`` block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@cache
def load(arch: str) -> ctypes.CDLL:
    """Build if needed (or if the cached copy fails its sha256 check) and load the library for ``arch``; cached per
    process."""
    lib = ctypes.CDLL(str(build(arch)))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sfpo_mt_copy.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ctypes.c_int, ptr]
    lib.sfpo_mt_lerp.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ctypes.c_double, ptr]
    lib.sfpo_mt_copy.restype = lib.sfpo_mt_lerp.restype = ctypes.c_int
    lib.sfpo_mt_last_error.restype = ctypes.c_char_p
    return lib


def _device_lib(device: torch.device) -> tuple[ctypes.CDLL, int]:
    major, minor = torch.cuda.get_device_capability(device)
    stream = torch.cuda.current_stream(device).cuda_stream
    return load(f"sm_{major}{minor}"), stream


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"sfpo cuda backend: {what} failed: {lib.sfpo_mt_last_error().decode()}")


def copy_(table: PointerTable, src_is_a: bool, elem_size: int, device: torch.device) -> None:
    """Launch ``sfpo_mt_copy`` on the current stream of ``device``."""
    lib, stream = _device_lib(device)
    with torch.cuda.device(device):
        status = lib.sfpo_mt_copy(
            table.data.data_ptr(), table.n_tensors, table.n_chunks, table.chunk, elem_size, int(src_is_a), stream
        )
    _check(lib, status, "copy")


def lerp_(table: PointerTable, weight: float, dtype: torch.dtype, device: torch.device) -> None:
    """Launch ``sfpo_mt_lerp`` (``a = lerp(a, b, weight)``) on the current stream of ``device``."""
    lib, stream = _device_lib(device)
    with torch.cuda.device(device):
        status = lib.sfpo_mt_lerp(
            table.data.data_ptr(), table.n_tensors, table.n_chunks, table.chunk, DTYPE_CODES[dtype], weight, stream
        )
    _check(lib, status, "lerp")
