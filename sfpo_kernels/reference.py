"""Plain-PyTorch ground truth for every public op of :mod:`sfpo_kernels`.

Same signatures as the fused ops, one tensor at a time, no grouping, no
pointer tables, so a test or a benchmark can trust what it compares against.
(The fused GRPO loss reference joins this module with its kernel.)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


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
# pass, and the O(N) per-token policy-gradient math below, which both the
# reference and the fused op use as is (it is elementwise over N tokens,
# ~1e-5 of the traffic, and autograd differentiates it exactly).

from sfpo_kernels.loss_options import AGG_MODES, KL_TYPES  # noqa: E402 (re-exported: older code reads them here)


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


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate to the reference policy, verl's ``kl_penalty`` (``"+"`` suffix: k2 gradient)."""
    base = kl_type[:-1] if kl_type.endswith("+") else kl_type
    d = log_probs - ref_log_probs
    if base in ("kl", "k1"):
        value = d
    elif base == "abs":
        value = d.abs()
    elif base in ("mse", "k2"):
        value = 0.5 * d.square()
    elif base in ("low_var_kl", "k3"):
        k = torch.clamp(-d, min=-20.0, max=20.0)
        value = torch.clamp(torch.exp(k) - k - 1, min=-10.0, max=10.0)
    else:
        raise ValueError(f"kl_type={kl_type!r} is not supported; expected one of {', '.join(KL_TYPES)} (or with '+')")
    if kl_type.endswith("+") and base not in ("mse", "k2"):
        straight_through = 0.5 * d.square()  # forward value of `value`, gradient of k2
        value = straight_through - straight_through.detach() + value.detach()
    return value


def response_positions(mask: torch.Tensor) -> torch.Tensor:
    """The positions that count: ``mask != 0`` (a NaN weight included), as bool."""
    return mask if mask.dtype == torch.bool else mask != 0


def response_weights(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(keep, w)``: :func:`response_positions` and the token weights.

    ``w`` is None for a bool mask (every weight 1, nothing to multiply), else
    ``mask`` in ``dtype``: verl's ``masked_sum`` is ``sum(where(m, x, 0) * m)``,
    so a float mask weights its tokens (0.5 counts half a token, everywhere).
    """
    return response_positions(mask), None if mask.dtype == torch.bool else mask.to(dtype)


def _weighted(values: torch.Tensor, keep: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``where(keep, values, 0) * w``: NaN / inf at a masked position never leaks in (NaN * 0 = NaN)."""
    masked = torch.where(keep, values, torch.zeros_like(values))
    return masked if w is None else masked * w


def _nonzero(count: torch.Tensor) -> torch.Tensor:
    """``count``, or 1 where it is 0: a mean over nothing is 0 (verl divides 0 by 0 + 1e-8)."""
    return torch.where(count == 0, torch.ones_like(count), count)


def agg_loss(values: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """verl's ``agg_loss`` on one micro-batch; ``values``/``mask`` ``[B, T]`` (or ``[N]`` for the token modes).

    With weights ``w = mask`` (bool: 1 and 0) and ``R`` the rows holding a
    response position (``w != 0``):

    - token-mean: ``sum w x / sum w`` (0 when ``sum w`` is 0); token-sum: ``sum w x``;
    - seq-mean-token-sum: ``mean over R of sum_t w x``; seq-mean-token-mean:
      ``mean over R of (sum_t w x / sum_t w)``; seq-mean-token-sum-norm (Dr. GRPO):
      seq-mean-token-sum / T, T the padded length.

    Positions with ``w == 0`` never count, whatever ``values`` holds there; a
    non-finite weight makes the result non-finite.
    """
    keep, w = response_weights(mask, values.dtype)
    masked = _weighted(values, keep, w)
    count = keep.to(values.dtype) if w is None else w
    if mode == "token-mean":
        return masked.sum() / _nonzero(count.sum())
    if mode == "token-sum":
        return masked.sum()
    if values.dim() != 2:
        raise ValueError(f"loss_agg_mode={mode!r} needs [B, T] inputs (sequences), got shape {tuple(values.shape)}")
    rows = keep.any(-1).to(values.dtype)  # a NaN weight keeps its row (verl's sum(m) > 0 would drop it)
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        row_values = masked.sum(-1)
    elif mode == "seq-mean-token-mean":
        row_values = masked.sum(-1) / _nonzero(count.sum(-1))
    else:
        raise ValueError(f"loss_agg_mode={mode!r} is not supported; expected one of {', '.join(AGG_MODES)}")
    loss = (row_values * rows).sum() / _nonzero(rows.sum())
    return loss / values.shape[-1] if mode == "seq-mean-token-sum-norm" else loss


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_mean``: ``sum w x / sum w`` (0 when ``sum w`` is 0), NaN-safe at ``w == 0``."""
    return agg_loss(values, mask, "token-mean")


def nonfinite_at(keep: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
    """The positions in ``keep`` where any of ``values`` is not finite."""
    finite = torch.ones_like(keep)
    for v in values:
        finite = finite & torch.isfinite(v)
    return keep & ~finite


def policy_loss_terms(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped policy-gradient loss (verl's ``compute_policy_loss_vanilla``) and its metrics.

    ``ratio = exp(clamp(logp - old, -20, 20))``; ``max(-A ratio, -A clip(ratio, 1-low, 1+high))``;
    for ``A < 0`` also ``min(., -A clip_ratio_c)`` unless ``clip_ratio_c`` is None.
    Two departures from verl, neither visible on finite inputs: masked positions
    (``response_mask == 0``) enter as 0 before any arithmetic (so no NaN / inf
    there reaches the loss or, as ``0 * NaN``, its gradient), and a response
    position whose ``logp`` or ``old`` is not finite gets a NaN loss (the clamp
    would turn ``logp = -inf`` into the finite ratio ``e^-20``).
    """
    keep = response_positions(response_mask)
    zero = torch.zeros_like(log_probs)
    bad = nonfinite_at(keep, log_probs, old_log_probs)
    log_probs, old_log_probs, advantages = (torch.where(keep, t, zero) for t in (log_probs, old_log_probs, advantages))
    negative_approx_kl = torch.clamp(log_probs - old_log_probs, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clipped = torch.maximum(pg_losses1, pg_losses2)
    metrics = {
        "pg_clipfrac": masked_mean(torch.gt(pg_losses2, pg_losses1).to(ratio.dtype), response_mask),
        "ppo_kl": masked_mean(-negative_approx_kl, response_mask),
    }
    if clip_ratio_c is None:
        pg_losses = clipped
        metrics["pg_clipfrac_lower"] = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    else:
        pg_losses3 = -advantages * clip_ratio_c
        lower = torch.gt(clipped, pg_losses3) & (advantages < 0)
        metrics["pg_clipfrac_lower"] = masked_mean(lower.to(ratio.dtype), response_mask)
        pg_losses = torch.where(advantages < 0, torch.minimum(pg_losses3, clipped), clipped)
    return torch.where(bad, torch.full_like(pg_losses, float("nan")), pg_losses), metrics


def grpo_loss_from_log_probs(
    log_probs: torch.Tensor,
    entropy: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    ref_log_probs: torch.Tensor | None,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None,
    kl_coef: float,
    kl_type: str,
    entropy_coef: float,
    loss_agg_mode: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``agg(pg) - entropy_coef * agg(H) + kl_coef * agg(kl)`` and the metrics, from per-token values.

    Masked positions (``response_mask == 0``) enter nothing, forward or backward,
    whatever they hold: every per-token input is replaced there by ``where``
    before any arithmetic, so their gradients are exact zeros. A response token
    with a non-finite input to the loss (log-prob, entropy, old log-prob,
    advantage, weight; the reference log-prob when ``kl_coef != 0``) is counted in
    ``nonfinite_tokens`` and makes its pg loss, hence the loss, NaN. For finite
    inputs every value is verl's, bit for bit as before.
    """
    old_log_probs = old_log_probs.to(log_probs.dtype)
    advantages = advantages.to(log_probs.dtype)
    keep, w = response_weights(response_mask, log_probs.dtype)
    checked = [log_probs, entropy, old_log_probs, advantages, *(() if w is None else (w,))]
    if kl_coef and ref_log_probs is not None:
        checked.append(ref_log_probs)
    bad = nonfinite_at(keep, *checked)
    pg_losses, metrics = policy_loss_terms(
        log_probs, old_log_probs, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_c
    )
    pg_losses = torch.where(bad, torch.full_like(pg_losses, float("nan")), pg_losses)
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode)
    entropy_agg = agg_loss(entropy, response_mask, loss_agg_mode)  # where-masked: nothing to clean first
    loss = pg_loss - entropy_coef * entropy_agg if entropy_coef else pg_loss
    metrics["pg_loss"] = pg_loss
    metrics["entropy"] = entropy_agg
    if ref_log_probs is not None:
        ref_log_probs = ref_log_probs.to(log_probs.dtype)
        zero = torch.zeros_like(log_probs)
        kl = kl_penalty(torch.where(keep, log_probs, zero), torch.where(keep, ref_log_probs, zero), kl_type)
        kl = torch.where(nonfinite_at(keep, log_probs, ref_log_probs), torch.full_like(kl, float("nan")), kl)
        kl = agg_loss(kl, response_mask, loss_agg_mode)
        metrics["kl"] = kl
        if kl_coef:
            loss = loss + kl_coef * kl
    metrics["nonfinite_tokens"] = bad.sum()
    return loss, {k: v.detach() for k, v in metrics.items()}


def grpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    ref_log_probs: torch.Tensor | None = None,
    temperature: float = 1.0,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    kl_coef: float = 0.0,
    kl_type: str = "low_var_kl",
    entropy_coef: float = 0.0,
    loss_agg_mode: str = "token-mean",
):
    """The eager GRPO loss: :func:`logprob_entropy` then :func:`grpo_loss_from_log_probs`.

    Returns ``(loss, log_probs, entropy, metrics)`` like ``sfpo_kernels.grpo_loss``.
    """
    log_probs, entropy = logprob_entropy(logits, labels, temperature, response_mask=response_mask)
    loss, metrics = grpo_loss_from_log_probs(
        log_probs,
        entropy,
        old_log_probs,
        advantages,
        response_mask,
        ref_log_probs=ref_log_probs,
        clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high,
        clip_ratio_c=clip_ratio_c,
        kl_coef=kl_coef,
        kl_type=kl_type,
        entropy_coef=entropy_coef,
        loss_agg_mode=loss_agg_mode,
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
    hidden, weight, labels, old_log_probs, advantages, response_mask, *, bias=None, chunk_size=None, **loss_settings
):
    """:func:`grpo_loss` on :func:`lm_head_logits`; ``log_probs`` / ``entropy`` 0 at masked positions.

    Returns ``(loss, log_probs, entropy, metrics)`` like ``sfpo_kernels.linear_grpo_loss``.
    """
    loss, log_probs, entropy, metrics = grpo_loss(
        lm_head_logits(hidden, weight, bias), labels, old_log_probs, advantages, response_mask, **loss_settings
    )
    keep = response_positions(response_mask)
    zero = torch.zeros_like(log_probs)
    return loss, torch.where(keep, log_probs, zero), torch.where(keep, entropy, zero), metrics
