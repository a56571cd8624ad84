"""Plain-PyTorch ground truth for every public op of :mod:`sfpo_kernels`.

Same signatures as the fused ops, one tensor at a time, no grouping, no
pointer tables, so a test or a benchmark can trust what it compares against.
(The fused GRPO loss reference joins this module with its kernel.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """promote(dtype, fp32): bf16/fp16 compute in fp32, fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def snapshot(tensors: Iterable[torch.Tensor], *, offload: str = "none") -> list[torch.Tensor]:
    """A detached copy of each tensor (on the CPU when ``offload="cpu"``).

    Traffic: read N, write N bytes, for N the bytes of all tensors.
    """
    with torch.no_grad():
        return [t.detach().to("cpu", copy=True) if offload == "cpu" else t.detach().clone() for t in tensors]


def restore_(tensors: Iterable[torch.Tensor], snap: list[torch.Tensor]) -> None:
    """``t.copy_(s)`` for each pair. Traffic: read N, write N."""
    with torch.no_grad():
        for t, s in zip(tensors, snap, strict=True):
            t.copy_(s)


def reposition_(tensors: Iterable[torch.Tensor], snap: list[torch.Tensor], alpha: float) -> None:
    """``t <- snap + alpha * (t - snap)`` for each pair, as ``torch.lerp(t, snap, 1 - alpha)``.

    Computed in ``promote(dtype, fp32)`` and rounded once to ``t.dtype``; the
    two-branch lerp makes ``alpha`` 1 and 0 exact. Traffic: read 2N, write N
    (the limit a fused kernel can reach).
    """
    with torch.no_grad():
        for t, s in zip(tensors, snap, strict=True):
            ct = _opmath(t.dtype)
            t.copy_(torch.lerp(t.to(ct), s.to(device=t.device, dtype=ct), 1.0 - alpha))
