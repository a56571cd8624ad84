"""Multi-tensor copy and lerp: one Triton kernel launch for any number of tensors.

SFPO's Stage II touches every trainable parameter twice per iteration: a copy
into the snapshot before the fast trajectory, and the reposition
``t <- snap + alpha * (t - snap)`` after it. A model has hundreds to thousands
of parameter tensors, so a Python loop of per-tensor ops is launch-bound and a
concatenate-then-split copy doubles the traffic. Instead each (device, dtype)
group gets a device-side **pointer table** (:mod:`sfpo_kernels._pointer_table`
describes its layout and builds it) and one launch of the kernels here, whose
program ``j`` handles chunk ``j`` of the table: up to ``CHUNK`` elements of one
tensor, in blocks of ``BLOCK``. The same table drives the CUDA C++ kernels in
``csrc/multi_tensor.cu``; :mod:`sfpo_kernels.reposition` picks the backend.

Byte traffic per element (the limit both kernels are measured against):
copy reads 1 and writes 1 element; lerp reads 2 and writes 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sfpo_kernels._pointer_table import PointerTable
from sfpo_kernels._triton_utils import KERNELS_INTERPRETED, store_rounded

# GPU launch shape: 64Ki elements per program keeps the grid small for
# billion-parameter models (~23k programs at 1.5B) while a single tiny tensor
# still gets its own program. The interpreter uses small blocks so CI's small
# tensors still cross block and chunk boundaries.
GPU_BLOCK, GPU_CHUNK, GPU_NUM_WARPS = 4096, 65536, 8
INTERPRETER_BLOCK, INTERPRETER_CHUNK = 64, 256


def launch_shape(device: torch.device) -> tuple[int, int]:
    """(BLOCK, CHUNK) in elements for kernels running on ``device``."""
    if device.type == "cuda" and not KERNELS_INTERPRETED:
        return GPU_BLOCK, GPU_CHUNK
    return INTERPRETER_BLOCK, INTERPRETER_CHUNK


# --------------------------------------------------------------------------- kernels


@triton.jit
def _chunk_of_program(
    a_addr,
    b_addr,
    numel,
    chunk_tensor,
    chunk_start,
    type_witness,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """This program's chunk: typed pointers to tensor i of lists a and b, and its element range.

    Returns ``(p_a, p_b, start, full_stop, stop)``: ``[start, full_stop)`` is a
    whole number of BLOCKs (loaded without masks, so Triton can vectorise);
    ``[full_stop, stop)`` is the masked tail, shorter than one BLOCK.
    """
    i_c = tl.program_id(0).to(tl.int64)
    i_t = tl.load(chunk_tensor + i_c)
    # Chunks start at multiples of CHUNK by construction (_pointer_table.build_pointer_table).
    start = tl.multiple_of(tl.load(chunk_start + i_c), CHUNK)
    stop = tl.minimum(start + CHUNK, tl.load(numel + i_t))
    p_a = tl.load(a_addr + i_t).to(type_witness.dtype)
    p_b = tl.load(b_addr + i_t).to(type_witness.dtype)
    if ALIGNED:  # the host checked every address of the table is 16-byte aligned: 128-bit accesses
        p_a = tl.multiple_of(p_a, 16)
        p_b = tl.multiple_of(p_b, 16)
    full_stop = start + (stop - start) // BLOCK * BLOCK
    return p_a, p_b, start, full_stop, stop


@triton.jit
def _mt_copy_kernel(
    src_addr,  # *int64 [n]: data_ptr of each source tensor
    dst_addr,  # *int64 [n]: data_ptr of each destination tensor
    numel,  # *int64 [n]: elements per tensor
    chunk_tensor,  # *int64 [c]: tensor index of each chunk
    chunk_start,  # *int64 [c]: first element of each chunk
    type_witness,  # *T: any tensor of the group's dtype; gives the element type
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """dst[i][k] = src[i][k] for every element of every tensor i; bit copy."""
    p_src, p_dst, start, full_stop, stop = _chunk_of_program(
        src_addr, dst_addr, numel, chunk_tensor, chunk_start, type_witness, CHUNK, BLOCK, ALIGNED
    )
    for off in range(start, full_stop, BLOCK):
        o_k = off + tl.arange(0, BLOCK)  # [BLOCK]
        tl.store(p_dst + o_k, tl.load(p_src + o_k))
    if full_stop < stop:
        o_k = full_stop + tl.arange(0, BLOCK)
        m_k = o_k < stop
        tl.store(p_dst + o_k, tl.load(p_src + o_k, mask=m_k), mask=m_k)


@triton.jit
def _lerp_block(p_param, p_snap, o_k, m_k, coeff, small, MASKED: tl.constexpr):
    """One block of ``param = fma(coeff, snap - param, small ? param : snap)``, rounded once."""
    if MASKED:
        b_t = tl.load(p_param + o_k, mask=m_k).to(coeff.dtype)
        b_s = tl.load(p_snap + o_k, mask=m_k).to(coeff.dtype)
    else:
        b_t = tl.load(p_param + o_k).to(coeff.dtype)
        b_s = tl.load(p_snap + o_k).to(coeff.dtype)
    b_out = tl.fma(coeff + tl.zeros_like(b_t), b_s - b_t, tl.where(small, b_t, b_s))
    store_rounded(p_param + o_k, b_out, m_k, MASKED)


@triton.jit
def _mt_lerp_kernel(
    param_addr,  # *int64 [n]: data_ptr of each tensor to update in place
    snap_addr,  # *int64 [n]: data_ptr of its snapshot (device or pinned host memory)
    numel,  # *int64 [n]
    chunk_tensor,  # *int64 [c]
    chunk_start,  # *int64 [c]
    type_witness,  # *T
    weight: tl.float64,  # 1 - alpha, as a runtime float: no recompile per value
    COMPUTE_FP64: tl.constexpr,  # fp64 tensors compute in fp64, all others in fp32
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """param = torch.lerp(param, snap, weight), i.e. snap + (1 - weight) * (param - snap).

    Two-branch lerp exactly as ATen evaluates it: for ``w < 0.5``
    ``fma(w, snap - t, t)``, else ``fma(w - 1, snap - t, snap)``, so fp32 results
    equal ``torch._foreach_lerp_``. Low-precision inputs are widened, computed in
    fp32 and rounded once. ``w == 0`` and ``w == 1`` equal ``t`` / ``snap`` for
    finite values but not for every bit pattern (``-0.0 + 0`` is ``+0.0``, a NaN in
    ``snap - t`` survives), which is why ``reposition_`` never launches this kernel
    at alpha 1 or 0: it leaves the tensors alone, or copies the snapshot back.
    """
    p_param, p_snap, start, full_stop, stop = _chunk_of_program(
        param_addr, snap_addr, numel, chunk_tensor, chunk_start, type_witness, CHUNK, BLOCK, ALIGNED
    )
    # tl.full rather than .to(): the interpreter passes the float through untyped.
    if COMPUTE_FP64:
        w = tl.full([], weight, tl.float64)
    else:
        w = tl.full([], weight, tl.float32)
    small = w < 0.5
    coeff = tl.where(small, w, w - 1.0)
    for off in range(start, full_stop, BLOCK):
        o_k = off + tl.arange(0, BLOCK)  # [BLOCK]
        _lerp_block(p_param, p_snap, o_k, o_k < stop, coeff, small, MASKED=False)
    if full_stop < stop:
        o_k = full_stop + tl.arange(0, BLOCK)
        _lerp_block(p_param, p_snap, o_k, o_k < stop, coeff, small, MASKED=True)


# --------------------------------------------------------------------------- launchers


def triton_copy_(table: PointerTable, src_is_a: bool, witness: torch.Tensor) -> None:
    """Copy every tensor of one list of the table into the other, one Triton launch."""
    a_addr, b_addr, numel, chunk_tensor, chunk_start = table.columns
    src, dst = (a_addr, b_addr) if src_is_a else (b_addr, a_addr)
    _mt_copy_kernel[(table.n_chunks,)](
        src,
        dst,
        numel,
        chunk_tensor,
        chunk_start,
        witness,
        CHUNK=table.chunk,
        BLOCK=table.block,
        ALIGNED=table.aligned,
        num_warps=GPU_NUM_WARPS,
    )


def triton_lerp_(table: PointerTable, weight: float, witness: torch.Tensor) -> None:
    """``a[i] = torch.lerp(a[i], b[i], weight)`` for every tensor of the table, one Triton launch."""
    a_addr, b_addr, numel, chunk_tensor, chunk_start = table.columns
    _mt_lerp_kernel[(table.n_chunks,)](
        a_addr,
        b_addr,
        numel,
        chunk_tensor,
        chunk_start,
        witness,
        weight,
        COMPUTE_FP64=witness.dtype == torch.float64,
        CHUNK=table.chunk,
        BLOCK=table.block,
        ALIGNED=table.aligned,
        num_warps=GPU_NUM_WARPS,
    )
