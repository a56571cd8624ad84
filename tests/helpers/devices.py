"""Where the tests can run: the GPU, or the CPU with Triton's interpreter (switched on in conftest.py)."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def kernel_devices() -> list[str]:
    """Where the Triton kernels can run in this process: the GPU, or the CPU through the interpreter."""
    return ["cuda"] if HAS_CUDA else ["cpu"]
