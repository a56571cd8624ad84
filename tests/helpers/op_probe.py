"""A probe for which torch ops run: the names of every aten op called while it is active, in order."""

from __future__ import annotations

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
