"""Bit-level helpers of the kernel tests: bit equality, ulp, seeded tensors."""

from __future__ import annotations

import torch


def make_tensors(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of ``x.dtype`` at each element of ``x`` (in float64)."""
    mantissa_bits = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[x.dtype]
    exponent = torch.floor(torch.log2(x.double().abs().clamp_min(torch.finfo(x.dtype).tiny)))
    return torch.exp2(exponent - mantissa_bits)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bit_equal(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, name
    diff = (bits(got) != bits(want)).sum().item()
    assert diff == 0, f"{name}: {diff} of {got.numel()} elements differ in their bits"
