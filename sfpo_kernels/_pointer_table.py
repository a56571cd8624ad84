"""The pointer table that lets one kernel launch cover any number of tensors.

For each (device, dtype) group, :mod:`sfpo_kernels.reposition` builds a
device-side **pointer table** once (the technique of Triton's grouped-GEMM
tutorial) and hands it to one launch of a multi-tensor kernel, whose programs
each handle one chunk of one tensor:

    table (int64, on the tensors' device), n tensors and c chunks:
        a_addr[n]        data_ptr of tensor i in list a (e.g. the parameters)
        b_addr[n]        address paired with tensor i (e.g. its slot in the snapshot buffer)
        numel[n]         elements of tensor i
        chunk_tensor[c]  which tensor chunk j belongs to
        chunk_start[c]   first element of chunk j within that tensor

Program ``j`` processes elements ``[chunk_start[j], min(chunk_start[j] + CHUNK,
numel))`` of tensor ``chunk_tensor[j]`` in blocks of ``BLOCK``. Chunks sit on
grid axis 0, so there is no 65535 limit. The same table drives the Triton
kernels of :mod:`sfpo_kernels.multi_tensor` and the CUDA C++ kernels in
``csrc/multi_tensor.cu`` (through :mod:`sfpo_kernels._cuda_lib`).

Plain torch: the launch shape (BLOCK, CHUNK) comes from the caller
(:func:`sfpo_kernels.multi_tensor.launch_shape`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# Offsets of tensors inside a flat snapshot buffer are rounded up to this many
# bytes so every view starts 16-byte aligned (vector loads in csrc/).
STORAGE_ALIGN_BYTES = 64


@dataclass(frozen=True)
class PointerTable:
    """The device-side table for one (device, dtype) group; see the module docstring."""

    data: torch.Tensor  # int64 [3n + 2c] on the group's device
    n_tensors: int
    n_chunks: int
    block: int
    chunk: int
    aligned: bool  # every address 16-byte aligned: the kernels use 128-bit accesses

    @property
    def columns(self) -> tuple[torch.Tensor, ...]:
        """Views ``(a_addr, b_addr, numel, chunk_tensor, chunk_start)``."""
        n, c = self.n_tensors, self.n_chunks
        return tuple(
            self.data.narrow(0, off, size) for off, size in ((0, n), (n, n), (2 * n, n), (3 * n, c), (3 * n + c, c))
        )


def build_pointer_table(
    a: list[torch.Tensor], b_addr: list[int], device: torch.device, *, block: int, chunk: int
) -> PointerTable:
    """Table pairing tensor ``a[i]`` with the memory at address ``b_addr[i]`` (same numel and dtype).

    ``a`` are contiguous, non-empty tensors; ``b_addr`` are typically offsets
    into a snapshot's flat buffer, which needs no tensor view to be addressed.
    ``block`` and ``chunk`` (elements) are the launch shape of the kernels that
    will read the table.

    Built on the host with vectorised torch ops (a 1.5B-parameter model has
    ~23k chunks) and copied to ``device`` asynchronously from pinned memory.
    """
    n = len(a)
    numel = torch.tensor([t.numel() for t in a], dtype=torch.int64)
    chunks_per_tensor = (numel + chunk - 1) // chunk
    chunk_tensor = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), chunks_per_tensor)
    first_chunk = torch.cumsum(chunks_per_tensor, 0) - chunks_per_tensor
    chunk_start = (torch.arange(chunk_tensor.numel(), dtype=torch.int64) - first_chunk[chunk_tensor]) * chunk
    addresses = torch.tensor([t.data_ptr() for t in a] + list(b_addr), dtype=torch.int64)
    host = torch.cat([addresses, numel, chunk_tensor, chunk_start])
    aligned = bool((addresses % 16 == 0).all())
    if device.type == "cuda":
        host = host.pin_memory()
        data = torch.empty_like(host, device=device)
        data.copy_(host, non_blocking=True)
    else:
        data = host
    return PointerTable(data, n, chunk_tensor.numel(), block, chunk, aligned)


_TABLE_CACHE: OrderedDict[tuple, PointerTable] = OrderedDict()
TABLE_CACHE_SIZE = 8


def pointer_table(
    a: list[torch.Tensor], b_addr: list[int], device: torch.device, *, block: int, chunk: int
) -> PointerTable:
    """:func:`build_pointer_table`, cached by content (addresses, sizes and launch shape).

    SFPO snapshots the same parameters every iteration and the caching
    allocator usually hands back the same snapshot buffer, so the table for
    iteration s+1 is byte-identical to iteration s's: rebuild only on change.
    """
    key = (device, tuple(t.data_ptr() for t in a), tuple(b_addr), tuple(t.numel() for t in a), block, chunk)
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = _TABLE_CACHE[key] = build_pointer_table(a, b_addr, device, block=block, chunk=chunk)
        if len(_TABLE_CACHE) > TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    return table
