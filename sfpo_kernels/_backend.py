"""Which implementation runs an op: ``triton``, ``cuda`` (csrc/) or ``torch``.

The choice, in order of precedence: the ``backend=`` keyword of the call, the
``SFPO_BACKEND`` environment variable, then the default for the tensors' device
(``triton`` for CUDA tensors, ``torch`` for CPU tensors). With
``TRITON_INTERPRET=1`` the Triton kernels also run on CPU tensors (slowly, in
numpy): that is how CI exercises them without a GPU.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "cuda", "torch")
ENV_VAR = "SFPO_BACKEND"


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


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
    name = requested_backend(backend)
    if name is None:
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend 'triton' needs CUDA tensors, got tensors on {device}; "
            "set TRITON_INTERPRET=1 to run the Triton kernels on the CPU, or use backend='torch'"
        )
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}; use backend='torch'")
    return name
