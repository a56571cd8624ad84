"""Triton pieces shared by every kernel module: the rounded store and interpreter detection.

- :func:`store_rounded` writes an fp32/fp64 block into any element type, rounded
  once to nearest even. On the GPU that is the cast itself (``cvt.rn.bf16.f32``:
  the hardware rounds to nearest even); under the interpreter, whose own bf16
  cast truncates, bf16 goes through :func:`_fp32_to_bf16_rtne`, on the bits, so
  both round identically. The choice is the constexpr :data:`ROUND_BF16_ON_BITS`,
  fixed when the kernels are built: the GPU never pays the integer emulation.
  :mod:`sfpo_kernels.multi_tensor` (reposition) and :mod:`sfpo_kernels.fused_loss`
  (dlogits) store through it.
- :data:`KERNELS_INTERPRETED` / :func:`triton_interpreting`: whether sfpo's
  ``triton.jit`` functions were built for Triton's CPU interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _built_by_jit():
    """Never launched: whether ``triton.jit`` built it tells how every sfpo kernel is built."""


# triton.jit reads TRITON_INTERPRET when it wraps a function, i.e. at import: what
# counts is how sfpo's functions were built, not the variable's value now.
KERNELS_INTERPRETED = not isinstance(_built_by_jit, triton.runtime.JITFunction)
ROUND_BF16_ON_BITS = tl.constexpr(KERNELS_INTERPRETED)  # the interpreter's bf16 cast truncates


@triton.jit
def _fp32_to_bf16_rtne(x):
    """Round fp32 to bf16, to nearest even, NaN to the canonical 0x7FC0 (as torch does).

    Done on the bits so the GPU and the Triton interpreter (whose own bf16
    cast truncates) give identical results.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = tl.where(x != x, 0x7FC0, rounded)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_rounded(p, b_value, m, MASKED: tl.constexpr):
    """Store an fp32/fp64 block into ``p``'s element type, rounded once to nearest even."""
    elem_ty = p.dtype.element_ty
    b_out = b_value.to(elem_ty)  # Triton's downcast rounds to nearest even: cvt.rn on the GPU
    if ROUND_BF16_ON_BITS:  # noqa: SIM102 -- two compile-time branches, each a plain constexpr
        if elem_ty == tl.bfloat16:
            b_out = _fp32_to_bf16_rtne(b_value)
    if MASKED:
        tl.store(p, b_out, mask=m)
    else:
        tl.store(p, b_out)


def triton_interpreting() -> bool:
    """True when sfpo's Triton kernels run in the CPU interpreter.

    That is decided when :mod:`sfpo_kernels` is first imported (``triton.jit``
    reads ``TRITON_INTERPRET`` then): set the variable before the import.
    """
    return KERNELS_INTERPRETED
