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

from sfpo_kernels._backend import BACKENDS, triton_interpreting
from sfpo_kernels.fused_loss import GRPOLossOutput, grpo_loss, logprob_entropy
from sfpo_kernels.linear_loss import linear_grpo_loss, linear_logprob_entropy
from sfpo_kernels.loss_options import GRPOLossOptions, LossOptionError
from sfpo_kernels.reposition import Snapshot, reposition_, snapshot

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
__version__ = "0.1.0"
