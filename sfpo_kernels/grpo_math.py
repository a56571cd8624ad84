"""GRPO's per-token policy-gradient math: the O(N) part of the loss, on per-token log-probs and entropies.

The loss splits in two: the O(N V) part over the vocabulary (log-softmax, label
gather, entropy), which :func:`sfpo_kernels.grpo_loss` fuses into one Triton
pass (and :func:`sfpo_kernels.linear_grpo_loss` with the LM head), and the
elementwise math here, which every path runs as is: the fused ops, the eager
references of :mod:`sfpo_kernels.reference`, the benchmarks' baselines and the
trainer. It is ~1e-5 of the traffic, and autograd differentiates it exactly.

The math is verl 0.9.1's (``compute_policy_loss_vanilla``, ``kl_penalty``,
``agg_loss``), per token with log-prob ``logp``, old log-prob ``old``,
advantage ``A`` and token weight ``w`` (``response_mask``):

- ratio ``r = exp(clamp(logp - old, -20, 20))``;
- clipped loss ``pg = max(-A r, -A clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high))``;
- dual clip, for ``A < 0`` unless ``clip_ratio_c`` is None: ``pg = min(pg, -A clip_ratio_c)``;
- KL estimators of ``d = logp - ref``: ``kl``/``k1`` ``d``, ``abs`` ``|d|``,
  ``mse``/``k2`` ``d^2 / 2``, ``low_var_kl``/``k3`` ``clamp(e^-d + d - 1, -10, 10)``
  (``-d`` clamped to [-20, 20] first); a ``+`` suffix keeps the value and takes
  k2's gradient;
- aggregation (:func:`agg_loss`): ``token-mean`` ``sum w x / sum w``,
  ``token-sum`` ``sum w x``, and over the rows holding a response position the
  mean of ``sum_t w x`` (``seq-mean-token-sum``), of ``sum_t w x / sum_t w``
  (``seq-mean-token-mean``), or ``seq-mean-token-sum`` over the padded length T
  (``seq-mean-token-sum-norm``, Dr. GRPO);
- ``loss = agg(pg) - entropy_coef * agg(H) + kl_coef * agg(kl)``.

Where it departs from verl, invisibly on finite inputs: masked positions
(``w == 0``) enter as 0 through ``where`` before any arithmetic, so a NaN / inf
there never reaches the loss or a gradient; a response position with a
non-finite input makes the loss NaN (the clamp would hide ``logp = -inf``); an
empty mean is 0 (verl divides by ``0 + 1e-8``).
"""

from __future__ import annotations

import torch

from sfpo_kernels.loss_options import AGG_MODES, KL_TYPES, GRPOLossOptions, resolve_options


def check_real(name: str, t) -> None:
    """A complex tensor is refused (``ValueError`` naming ``name``): a mask, an advantage or a log-prob is real,
    and torch would drop the imaginary part without a word (``mask != 0`` would even count it)."""
    if isinstance(t, torch.Tensor) and t.is_complex():
        raise ValueError(f"{name} must be a real tensor (bool, integer or floating point), got dtype {t.dtype}")


def response_positions(mask: torch.Tensor) -> torch.Tensor:
    """The positions that count: ``mask != 0`` (a NaN weight included), as bool; a complex mask is refused."""
    if mask.dtype == torch.bool:
        return mask
    check_real("response_mask", mask)
    return mask != 0


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
    # T = 0 (no response token at all) gives 0 like every other mode, not 0 / 0.
    return loss / max(values.shape[-1], 1) if mode == "seq-mean-token-sum-norm" else loss


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_mean``: ``sum w x / sum w`` (0 when ``sum w`` is 0), NaN-safe at ``w == 0``."""
    return agg_loss(values, mask, "token-mean")


def nonfinite_at(keep: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
    """The positions in ``keep`` where any of ``values`` is not finite."""
    finite = torch.ones_like(keep)
    for v in values:
        finite = finite & torch.isfinite(v)
    return keep & ~finite


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
    ref_log_probs: torch.Tensor | None = None,
    options: GRPOLossOptions | None = None,
    **option_overrides,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``agg(pg) - entropy_coef * agg(H) + kl_coef * agg(kl)`` and the metrics, from per-token values.

    ``options`` (a :class:`GRPOLossOptions`; its ``temperature`` is not used
    here: it already shaped ``log_probs`` and ``entropy``), with any option given
    as a keyword replacing its field (:func:`resolve_options`).

    Masked positions (``response_mask == 0``) enter nothing, forward or backward,
    whatever they hold: every per-token input is replaced there by ``where``
    before any arithmetic, so their gradients are exact zeros. A response token
    with a non-finite input to the loss (log-prob, entropy, old log-prob,
    advantage, weight; the reference log-prob when ``kl_coef != 0``) is counted in
    ``nonfinite_tokens`` and makes its pg loss, hence the loss, NaN. For finite
    inputs every value is verl's.
    """
    o = resolve_options(options, option_overrides, "grpo_loss_from_log_probs")
    for name, t in (
        ("old_log_probs", old_log_probs),
        ("advantages", advantages),
        ("response_mask", response_mask),
        ("ref_log_probs", ref_log_probs),
    ):
        check_real(name, t)
    old_log_probs = old_log_probs.to(log_probs.dtype)
    advantages = advantages.to(log_probs.dtype)
    keep, w = response_weights(response_mask, log_probs.dtype)
    checked = [log_probs, entropy, old_log_probs, advantages, *(() if w is None else (w,))]
    if o.kl_coef and ref_log_probs is not None:
        checked.append(ref_log_probs)
    bad = nonfinite_at(keep, *checked)
    pg_losses, metrics = policy_loss_terms(
        log_probs, old_log_probs, advantages, response_mask, o.clip_ratio_low, o.clip_ratio_high, o.clip_ratio_c
    )
    pg_losses = torch.where(bad, torch.full_like(pg_losses, float("nan")), pg_losses)
    pg_loss = agg_loss(pg_losses, response_mask, o.loss_agg_mode)
    entropy_agg = agg_loss(entropy, response_mask, o.loss_agg_mode)  # where-masked: nothing to clean first
    loss = pg_loss - o.entropy_coef * entropy_agg if o.entropy_coef else pg_loss
    metrics["pg_loss"] = pg_loss
    metrics["entropy"] = entropy_agg
    if ref_log_probs is not None:
        ref_log_probs = ref_log_probs.to(log_probs.dtype)
        zero = torch.zeros_like(log_probs)
        kl = kl_penalty(torch.where(keep, log_probs, zero), torch.where(keep, ref_log_probs, zero), o.kl_type)
        kl = torch.where(nonfinite_at(keep, log_probs, ref_log_probs), torch.full_like(kl, float("nan")), kl)
        kl = agg_loss(kl, response_mask, o.loss_agg_mode)
        metrics["kl"] = kl
        if o.kl_coef:
            loss = loss + o.kl_coef * kl
    metrics["nonfinite_tokens"] = bad.sum()
    return loss, {k: v.detach() for k, v in metrics.items()}
