"""Which implementation runs an op: ``triton``, ``cuda`` (csrc/) or ``torch``.

The choice, in order of precedence: the ``backend=`` keyword of the call, the
``SFPO_BACKEND`` environment variable, then the default for the tensors' device
(``triton`` for CUDA tensors, ``torch`` for CPU tensors). With
``TRITON_INTERPRET=1`` the Triton kernels also run on CPU tensors (slowly, in
numpy): that is how CI exercises them without a GPU.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The names are importable without torch or Triton (both are imported by the functions that need them):
# a config naming a backend or an offload mode is checked before either is loaded.
BACKENDS = ("triton", "cuda", "torch")
OFFLOAD_MODES = ("none", "cpu")  # where a snapshot lives: beside the tensors, or in pinned host memory
ENV_VAR = "SFPO_BACKEND"


def requested_backend(backend: str | None) -> str | None:
    """The explicitly requested backend name (keyword first, then the env var), validated."""
    name = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if name is None:
        return None
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}={name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name.lower()


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that will run on ``device``; raises ``ValueError`` if it cannot run there."""
    from sfpo_kernels._triton_utils import triton_interpreting

    name = requested_backend(backend)
    if name is None:
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend 'triton' needs CUDA tensors, got tensors on {device}; "
            "set TRITON_INTERPRET=1 before importing sfpo_kernels to run the Triton kernels on the CPU, "
            "or use backend='torch'"
        )
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}; use backend='torch'")
    return name


def empty_for_kernel(*size, **kwargs) -> torch.Tensor:
    """``torch.empty`` for a buffer a kernel must fill completely.

    With ``SFPO_POISON_ALLOCATIONS=1`` (set by the tests) it starts as NaN, so an
    element a kernel forgets to write fails the comparison instead of passing by luck.
    """
    import torch

    out = torch.empty(*size, **kwargs)
    if os.environ.get("SFPO_POISON_ALLOCATIONS") == "1":
        out.fill_(float("nan"))
    return out
