"""A probe for which torch ops run: the names of every aten op called while it is active, in order."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpNames(TorchDispatchMode):
    """Records ``str(func)`` of every op that reaches the dispatcher, e.g. ``aten._foreach_copy_.default``.

    Only ops on tensors go through it: a Triton kernel shows up as the host copies the
    interpreter makes of its arguments (on CPU) or not at all (on a GPU).
    """

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    def called(self, prefix: str) -> bool:
        """Whether an op whose name starts with ``prefix`` ran (``"aten._foreach_lerp_"``)."""
        return any(name.startswith(prefix) for name in self.names)


TORCH_BACKEND_OPS = ("aten._foreach_copy_", "aten._foreach_lerp_")  # how the torch backend snapshots and lerps


def device_and_other_backend() -> tuple[torch.device, str]:
    """A device and the snapshot/reposition backend it does not default to: torch on CUDA, triton on the CPU.

    Skips the test where the CPU has no Triton interpreter and there is no GPU (only torch can run).
    """
    import pytest

    import sfpo_kernels

    if torch.cuda.is_available():
        return torch.device("cuda"), "torch"
    if not sfpo_kernels.triton_interpreting():
        pytest.skip("neither CUDA nor TRITON_INTERPRET=1: only the torch backend can run here")
    return torch.device("cpu"), "triton"
