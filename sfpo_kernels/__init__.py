"""Fused kernels for Slow-Fast Policy Optimization (SFPO).

Stage II of every SFPO iteration, on any list of tensors, one launch per
(device, dtype) group:

- :func:`snapshot` -> :class:`Snapshot` (``.restore_``, ``.values``, ``.nbytes``)
- :func:`reposition_`: ``t <- snap + alpha * (t - snap)`` in place

and the GRPO loss with the log-softmax over the vocabulary fused into one pass
forward and one backward (no fp32 ``[tokens, vocab]`` temporaries):

- :func:`grpo_loss` -> :class:`GRPOLossOutput` ``(loss, log_probs, entropy, metrics)``; its options
  are one :class:`GRPOLossOptions` (``options=``) or its fields by name
- :func:`logprob_entropy`: the fused pass alone (old-policy / reference log-probs)
- :func:`linear_grpo_loss`, :func:`linear_logprob_entropy`: the same with the LM head fused in
  (``hidden @ weight.T`` chunk by chunk: no ``[tokens, vocab]`` logits at all)

Backends: ``triton`` (default for CUDA tensors), ``cuda`` (the C++ kernels of
``csrc/``, built lazily with nvcc), ``torch`` (``torch._foreach_*``; default for
CPU tensors). Choose with ``backend=`` or ``SFPO_BACKEND``. Plain-PyTorch ground
truth lives in :mod:`sfpo_kernels.reference`.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and IDEs resolve the names to
    from sfpo_kernels._backend import BACKENDS
    from sfpo_kernels._triton_utils import triton_interpreting
    from sfpo_kernels.fused_loss import GRPOLossOutput, grpo_loss, logprob_entropy
    from sfpo_kernels.linear_loss import linear_grpo_loss, linear_logprob_entropy
    from sfpo_kernels.loss_options import GRPOLossOptions, LossOptionError
    from sfpo_kernels.reposition import Snapshot, reposition_, snapshot

# public name -> the module defining it. Loaded on first use: importing the package (or a torch-free
# module of it, such as loss_options) does not import torch or Triton, so a command line can check its
# arguments before paying for them.
_HOMES = {
    "BACKENDS": "_backend",
    "triton_interpreting": "_triton_utils",
    "GRPOLossOutput": "fused_loss",
    "grpo_loss": "fused_loss",
    "logprob_entropy": "fused_loss",
    "linear_grpo_loss": "linear_loss",
    "linear_logprob_entropy": "linear_loss",
    "GRPOLossOptions": "loss_options",
    "LossOptionError": "loss_options",
    "Snapshot": "reposition",
    "reposition_": "reposition",
    "snapshot": "reposition",
}
__all__ = [
    "BACKENDS",
    "GRPOLossOptions",
    "GRPOLossOutput",
    "LossOptionError",
    "Snapshot",
    "grpo_loss",
    "linear_grpo_loss",
    "linear_logprob_entropy",
    "logprob_entropy",
    "reposition_",
    "snapshot",
    "triton_interpreting",
]
assert sorted(__all__) == sorted(_HOMES)  # one home per public name


def __getattr__(name: str):
    import importlib

    if name in _HOMES:
        value = getattr(importlib.import_module(f"sfpo_kernels.{_HOMES[name]}"), name)
        globals()[name] = value  # found directly from now on
        return value
    try:  # a submodule not imported yet (``sfpo_kernels.reposition.OFFLOAD_MODES``)
        return importlib.import_module(f"sfpo_kernels.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"sfpo_kernels.{name}":
            raise
    raise AttributeError(f"module 'sfpo_kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"
