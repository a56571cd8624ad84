"""Plain-PyTorch ground truth for every public op of :mod:`sfpo_kernels`.

Same signatures as the fused ops, one tensor at a time, no grouping, no
pointer tables, so a test or a benchmark can trust what it compares against.
The GRPO loss references materialise the ``[..., V]`` logits and their fp32
softmax; the per-token policy-gradient math after them is
:mod:`sfpo_kernels.grpo_math`, the one the fused ops run too.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Re-exported: older code imports the per-token math and the option names from here.
from sfpo_kernels.grpo_math import (  # noqa: F401
    agg_loss,
    grpo_loss_from_log_probs,
    kl_penalty,
    masked_mean,
    nonfinite_at,
    policy_loss_terms,
    response_positions,
    response_weights,
)
from sfpo_kernels.loss_options import (  # noqa: F401
    AGG_MODES,
    KL_TYPES,
    GRPOLossOptions,
    resolve_options,
)


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

    Computed in ``promote(dtype, fp32)`` and rounded once to ``t.dtype``. ``alpha``
    1 leaves ``t`` as it is and 0 copies ``snap``: exact for every bit pattern
    (a lerp with weight 0 or 1 is exact for finite values only: ``-0.0`` and NaN).
    Traffic: read 2N, write N (the limit a fused kernel can reach).
    """
    pairs = list(zip(tensors, snap, strict=True))  # a count mismatch fails at every alpha, 1 included
    if alpha == 1.0:
        return
    with torch.no_grad():
        for t, s in pairs:
            if alpha == 0.0:
                t.copy_(s)
                continue
            ct = _opmath(t.dtype)
            t.copy_(torch.lerp(t.to(ct), s.to(device=t.device, dtype=ct), 1.0 - alpha))


# ----------------------------------------------------------------------------- GRPO loss
#
# The loss splits in two: the O(N V) part over the vocabulary (log-softmax,
# label gather, entropy), which sfpo_kernels.grpo_loss fuses into one Triton
# pass and which logprob_entropy below materialises, and the O(N) per-token
# policy-gradient math of sfpo_kernels.grpo_math, which the references and the
# fused ops share (it is elementwise over N tokens, ~1e-5 of the traffic).


def logprob_entropy(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, *, response_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(label)`` and entropy of ``softmax(logits / temperature)``, as verl's eager path.

    ``logits`` ``[..., V]``, ``labels`` ``[...]`` (any integer dtype); both outputs
    ``[...]`` in ``promote(logits.dtype, fp32)``, differentiable w.r.t. ``logits``.
    Labels outside ``[0, V)`` (padding, -100) give log-prob 0. Rows where
    ``response_mask`` (``[...]``) is 0 get outputs 0 and an exactly zero gradient
    whatever their values (as the Triton kernels, which skip such rows): ``where``,
    not a product, so a NaN/inf there never meets the 0. Traffic: the upcast, log-softmax and softmax
    each write and re-read an fp32 ``[..., V]`` temporary -- the memory the fused
    kernel never allocates.
    """
    labels = labels.to(torch.int64)  # gather takes int64 indices; uint8/int16/int32 labels are as good
    z = logits.to(_opmath(logits.dtype)) / temperature
    if response_mask is not None:  # same values; backward: where() hands the masked rows exact zeros
        z = torch.where(response_positions(response_mask).unsqueeze(-1), z, z.detach())
    vocab = z.shape[-1]
    valid = (labels >= 0) & (labels < vocab)
    log_softmax = torch.log_softmax(z, dim=-1)
    log_probs = log_softmax.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    p = torch.softmax(z, dim=-1)
    # p * z is 0 * -inf = NaN at masked vocabulary entries; their term is 0 (and so is its gradient).
    entropy = torch.logsumexp(z, dim=-1) - (p * torch.where(p > 0, z, torch.zeros_like(z))).sum(-1)
    log_probs = torch.where(valid, log_probs, torch.zeros_like(log_probs))
    if response_mask is not None:
        kept = response_positions(response_mask)
        log_probs, entropy = (torch.where(kept, x, torch.zeros_like(x)) for x in (log_probs, entropy))
    return log_probs, entropy


def grpo_loss(
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
    """The eager GRPO loss: :func:`logprob_entropy` then :func:`grpo_loss_from_log_probs`.

    Options as ``sfpo_kernels.grpo_loss`` takes them (``options=`` and/or the
    option keywords of :class:`GRPOLossOptions`). Returns ``(loss, log_probs,
    entropy, metrics)`` like ``sfpo_kernels.grpo_loss``.
    """
    options = resolve_options(options, option_overrides, "grpo_loss")
    log_probs, entropy = logprob_entropy(logits, labels, options.temperature, response_mask=response_mask)
    loss, metrics = grpo_loss_from_log_probs(
        log_probs, entropy, old_log_probs, advantages, response_mask, ref_log_probs=ref_log_probs, options=options
    )
    return loss, log_probs, entropy, metrics


# ----------------------------------------------------------------------------- the LM head fused in


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden @ weight.T + bias``: the ``[..., V]`` logits the fused linear ops never materialise.

    Traffic: writes ``N V`` logits (and their gradient backward), the memory
    :mod:`sfpo_kernels.linear_loss` keeps to one chunk of rows.
    """
    return torch.nn.functional.linear(hidden, weight, bias)


def linear_logprob_entropy(hidden, weight, labels, temperature=1.0, *, bias=None, chunk_size=None, response_mask=None):
    """:func:`logprob_entropy` on :func:`lm_head_logits` (``chunk_size`` is accepted and ignored).

    Positions where ``response_mask`` is 0 get log-prob and entropy 0 and a zero gradient.
    """
    log_probs, entropy = logprob_entropy(
        lm_head_logits(hidden, weight, bias), labels, temperature, response_mask=response_mask
    )
    if response_mask is None:
        return log_probs, entropy
    keep = response_positions(response_mask)
    return torch.where(keep, log_probs, torch.zeros_like(log_probs)), torch.where(
        keep, entropy, torch.zeros_like(entropy)
    )


def linear_grpo_loss(
    hidden,
    weight,
    labels,
    old_log_probs,
    advantages,
    response_mask,
    *,
    bias=None,
    chunk_size=None,
    ref_log_probs=None,
    options: GRPOLossOptions | None = None,
    **option_overrides,
):
    """:func:`grpo_loss` on :func:`lm_head_logits`; ``log_probs`` / ``entropy`` 0 at masked positions.

    Returns ``(loss, log_probs, entropy, metrics)`` like ``sfpo_kernels.linear_grpo_loss``.
    """
    options = resolve_options(options, option_overrides, "linear_grpo_loss")
    loss, log_probs, entropy, metrics = grpo_loss(
        lm_head_logits(hidden, weight, bias),
        labels,
        old_log_probs,
        advantages,
        response_mask,
        ref_log_probs=ref_log_probs,
        options=options,
    )
    keep = response_positions(response_mask)
    zero = torch.zeros_like(log_probs)
    return loss, torch.where(keep, log_probs, zero), torch.where(keep, entropy, zero), metrics
