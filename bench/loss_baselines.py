"""What the fused GRPO loss is measured against: the eager vocabulary pass as verl writes it, and Liger-Kernel.

Only the O(N V) part differs between the rows: every PyTorch row hands its
per-token log-probs and entropies to
:func:`sfpo_kernels.grpo_math.grpo_loss_from_log_probs`, the same O(N)
policy-gradient math ``sfpo_kernels.grpo_loss`` uses.

Byte limit of the vocabulary pass (what ``test_bench_grpo_loss.py`` divides by
the time): forward reads the ``[N, V]`` logits once; forward + backward reads
them twice and writes ``dlogits`` once. The eager path below moves far more:
for bf16 logits, the forward alone writes and re-reads five fp32 ``[N, V]``
tensors (the upcast, the division, log-softmax, softmax, softmax * z), about
50 bytes per logit against the 2 of the limit, and holds three of them
(log-softmax, softmax, z) for the backward.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from sfpo_kernels.grpo_math import grpo_loss_from_log_probs
from sfpo_kernels.loss_options import GRPOLossOptions, resolve_options

# --------------------------------------------------------------------------- verl's eager vocabulary pass


def verl_logprob_entropy(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """Per-token ``log p(label)`` and entropy, the way verl's eager path computes them.

    ``logits.float()`` (fp32 upcast of the whole ``[..., V]`` tensor), divided by
    the temperature, ``log_softmax`` + ``gather`` of the label
    (``verl.utils.torch_functional.logprobs_from_logits_naive``), then the entropy
    as a second pass over the same fp32 tensor: ``logsumexp(z) - sum(softmax(z) * z)``
    (``entropy_from_logits``). Labels must lie in ``[0, V)``.
    """
    z = logits.float() / temperature
    log_probs = torch.log_softmax(z, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    probs = torch.softmax(z, dim=-1)
    entropy = torch.logsumexp(z, dim=-1) - torch.sum(probs * z, dim=-1)
    return log_probs, entropy


def verl_grpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    ref_log_probs: torch.Tensor | None = None,
    options: GRPOLossOptions | None = None,
    **option_overrides,
):
    """:func:`verl_logprob_entropy` then the shared policy-loss math; ``(loss, log_probs, entropy, metrics)``.

    Options as ``sfpo_kernels.grpo_loss`` takes them (``options=`` and/or
    :class:`GRPOLossOptions` fields by name); same outputs.
    """
    options = resolve_options(options, option_overrides, "verl_grpo_loss")
    log_probs, entropy = verl_logprob_entropy(logits, labels, options.temperature)
    loss, metrics = grpo_loss_from_log_probs(
        log_probs, entropy, old_log_probs, advantages, response_mask, ref_log_probs=ref_log_probs, options=options
    )
    return loss, log_probs, entropy, metrics


@functools.cache
def compiled(name: str) -> Callable:
    """``torch.compile`` of one of this module's eager functions (``"grpo_loss"``, ``"logprob_entropy"``).

    ``dynamic=False``: one static graph per shape, as a fixed micro-batch shape
    would get (automatic dynamic shapes would switch to a symbolic graph once a
    second shape is seen, and the second shape would time a different kernel).
    """
    fn = {"grpo_loss": verl_grpo_loss, "logprob_entropy": verl_logprob_entropy}[name]
    return torch.compile(fn, dynamic=False)


# --------------------------------------------------------------------------- Liger-Kernel's Triton GRPO loss


def liger_grpo_loss_fn() -> Callable | None:
    """Liger-Kernel's ``triton_grpo_loss``, or None where ``liger_kernel`` is not importable.

    Its call (``liger_kernel.transformers.grpo_loss``, 0.5.x to 0.8.x):
    ``triton_grpo_loss(logits, old_logp, ref_logp, completion_ids, advantages,
    completion_mask, temperature, beta, eps_low, eps_high, inplace, ...)`` with
    ``logits`` a contiguous ``[B, T + 1, V]`` tensor (the last position of each
    sequence is ignored and gets a zero gradient), ``completion_ids`` /
    ``old_logp`` / ``ref_logp`` / ``completion_mask`` ``[B, T]`` and
    ``advantages`` one per sequence, ``[B]``. With ``reduce=False`` (passed where
    the keyword exists; older releases lack it and never reduce) it returns the
    per-token ``(loss, kl, is_clipped)``.
    """
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError:
        return None
    params = inspect.signature(triton_grpo_loss).parameters
    expected = (
        "logits",
        "old_logp",
        "ref_logp",
        "completion_ids",
        "advantages",
        "completion_mask",
        "temperature",
        "beta",
        "eps_low",
        "eps_high",
        "inplace",
    )
    if list(params)[: len(expected)] != list(expected):
        raise RuntimeError(f"liger_kernel's triton_grpo_loss has an unexpected signature {list(params)}")
    if "reduce" in params:  # per-token outputs whatever this release's default
        return functools.partial(triton_grpo_loss, reduce=False)
    return triton_grpo_loss


def liger_grpo_loss(
    triton_grpo_loss: Callable,
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_log_probs: torch.Tensor,
    seq_advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    ref_log_probs: torch.Tensor | None,
    temperature: float,
    clip_ratio_low: float,
    clip_ratio_high: float,
    kl_coef: float,
) -> torch.Tensor:
    """Token-mean of Liger's per-token loss: ``logits`` ``[B, T + 1, V]``, the rest ``[B, T]``, advantages ``[B]``.

    Liger's loss has no entropy term and no dual clip, its KL is always k3, and
    its kernels skip the logits of masked (padding) tokens, only zero-filling
    their gradient: it does less than the other rows, which process every token.
    ``inplace=False``, like ``sfpo_kernels.grpo_loss``'s default, so both
    allocate a ``dlogits`` buffer.
    """
    per_token = triton_grpo_loss(
        logits,
        old_log_probs,
        ref_log_probs,
        labels,
        seq_advantages,
        response_mask,
        temperature=temperature,
        beta=kl_coef,
        eps_low=clip_ratio_low,
        eps_high=clip_ratio_high,
        inplace=False,
    )[0]
    mask = response_mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)
