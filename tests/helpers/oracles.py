"""Independent float64 oracles of the kernel tests, written from docs/conventions.md's formulas and verl, not from the package.

:func:`token_oracle`: per-token log-prob, entropy and the analytic dlogits

    dz = (g_logp * (onehot(y) - p) + g_H * p * (mu - z)) / temperature

with the scales the tests' tolerances are built from (see test_logprob_entropy.py).

:func:`verl_oracle`: the GRPO loss, every metric and logits.grad, written from
docs/conventions.md "Math conventions" and verl 0.9.1's ``compute_policy_loss_vanilla``,
``kl_penalty`` and ``agg_loss``: per-row Python loops for the sequence modes,
token weights ``w = response_mask`` as verl's ``masked_sum`` applies them
(``sum(where(w != 0, x, 0) * w)``), entropy as ``-sum p log p``, gradients by
float64 autograd, and the tolerance of each scalar (see test_grpo_loss.py). It
departs from verl where sfpo documents it does: ``clip_ratio_c=None`` turns the
dual clip off; a mean over zero tokens or zero rows is 0 (verl divides 0 by 0);
a row counts in the ``seq-*`` means when it holds a position with ``w != 0``;
a response token with a non-finite log-prob, entropy, old log-prob, advantage
or weight (ref log-prob with ``kl_coef``) has a NaN pg loss and is counted in
``nonfinite_tokens``, and one with a non-finite log-prob or ref log-prob a NaN
kl. verl's ``+ 1e-8`` guards in its means are left out (a relative 1e-8, far
below every tolerance).

:func:`make_batch`: GRPO inputs on which fp32 and float64 clip the same tokens.
:func:`check_close`, :func:`check_grad`, :func:`check_output`: the comparisons,
each output by name, with a test file's :class:`Tol`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tests.helpers.bits import ulp
from tests.helpers.devices import kernel_devices

EPS32 = 2.0**-23  # fp32 unit roundoff
FLOAT_METRICS = ("pg_loss", "ppo_kl", "entropy", "kl")
FRACTION_METRICS = ("pg_clipfrac", "pg_clipfrac_lower")
ALL_METRICS = {*FLOAT_METRICS, *FRACTION_METRICS, "nonfinite_tokens"}


FP32_TINY = 2.0**-126  # smallest normal fp32


@dataclass
class Oracle:
    log_probs: torch.Tensor  # float64, shaped like labels
    entropy: torch.Tensor
    grad: torch.Tensor  # float64, shaped like logits
    row_scale: torch.Tensor  # S, shaped like labels
    grad_scale: torch.Tensor  # S * G, shaped like logits
    flush_scale: torch.Tensor  # what an element can lose when p flushes to zero, shaped like logits


def token_oracle(logits, labels, temperature, g_logp, g_h) -> Oracle:
    """float64 log-prob, entropy and dlogits (analytic) for upstream gradients ``g_logp``/``g_h`` (None = 0)."""
    z = logits.detach().double() / temperature
    vocab = z.shape[-1]
    valid = (labels >= 0) & (labels < vocab)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    mu = torch.where(p > 0, p * z, torch.zeros_like(z)).sum(-1, keepdim=True)  # p = 0 at z = -inf: no 0 * inf
    z_label = z.gather(-1, safe.unsqueeze(-1))
    log_probs = torch.where(valid, (z_label - lse).squeeze(-1), torch.zeros_like(lse.squeeze(-1)))
    entropy = (lse - mu).squeeze(-1)
    onehot = torch.nn.functional.one_hot(safe, vocab).double() * valid.unsqueeze(-1)
    g_logp = torch.zeros_like(log_probs) if g_logp is None else g_logp.double()
    g_h = torch.zeros_like(entropy) if g_h is None else g_h.double()
    g_logp = (g_logp * valid).unsqueeze(-1)  # a padding label's log-prob is the constant 0
    g_h = g_h.unsqueeze(-1)
    p_mu_z = torch.where(p > 0, p * (mu - z), torch.zeros_like(z))
    grad = (g_logp * (onehot - p) + g_h * p_mu_z) / temperature
    finite_z = torch.where(torch.isfinite(z), z.abs(), torch.zeros_like(z))
    row_scale = 1.0 + finite_z.amax(-1) + math.log(vocab)
    mu_z = torch.where(p > 0, (mu - z).abs(), torch.zeros_like(z))
    grad_scale = (g_logp.abs() * (p + onehot) + g_h.abs() * p * (mu_z + 1.0)) / temperature
    flush_scale = torch.where(p < FP32_TINY, (g_logp.abs() + g_h.abs() * (mu_z + 1.0)) / temperature, 0.0)
    return Oracle(log_probs, entropy, grad, row_scale, grad_scale * row_scale.unsqueeze(-1), flush_scale)


# --------------------------------------------------------------------------- GRPO loss


@dataclass(frozen=True)
class Tol:
    value: float  # log-prob, entropy per token: multiples of eps * S
    agg: float  # loss/metrics: fp32 arithmetic of the O(N) part, multiples of eps * M
    grad: float  # logits.grad, fp32 arithmetic: multiples of eps * S * G
    rounding: float  # logits.grad, final rounding: multiples of ulp_dtype(exact)


@dataclass
class Batch:
    logits: torch.Tensor  # [B, T, V] or [N, V], logits dtype
    labels: torch.Tensor
    old_log_probs: torch.Tensor  # fp32, shaped like labels
    advantages: torch.Tensor
    response_mask: torch.Tensor  # bool, or float token weights
    ref_log_probs: torch.Tensor

    def args(self):
        return self.logits, self.labels, self.old_log_probs, self.advantages, self.response_mask


def _masked_sum(values, w):
    """verl's masked_sum: ``sum(where(w != 0, x, 0) * w)`` (float64 weights ``w``)."""
    return (torch.where(w != 0, values, torch.zeros_like(values)) * w).sum()


def _masked_mean(values, w):
    """verl's masked_mean less its 1e-8: ``sum w x / sum w``; 0 when ``sum w`` is 0."""
    count = float(w.sum())
    return _masked_sum(values, w) / count if count else _masked_sum(values, w) * 0.0


def oracle_agg(values, w, mode):
    """verl 0.9.1 agg_loss on one micro-batch, dp_size 1, weights ``w``; empty means are 0."""
    if mode == "token-mean":
        return _masked_mean(values, w)
    if mode == "token-sum":
        return _masked_sum(values, w)
    assert values.dim() == 2
    per_row = []
    for row_values, row_w in zip(values, w):
        if not bool((row_w != 0).any()):
            continue  # fully masked sequences never count
        row = _masked_sum(row_values, row_w)
        per_row.append(row / float(row_w.sum()) if mode == "seq-mean-token-mean" else row)
    loss = torch.stack(per_row).mean() if per_row else _masked_sum(values, w) * 0.0
    return loss / values.shape[-1] if mode == "seq-mean-token-sum-norm" else loss


def oracle_kl(log_probs, ref_log_probs, kl_type):
    """verl 0.9.1 kl_penalty: the estimate of kl_type; with '+', its value but k2's gradient."""
    base = kl_type.rstrip("+")
    d = log_probs - ref_log_probs
    if base in ("kl", "k1"):
        value = d
    elif base == "abs":
        value = d.abs()
    elif base in ("mse", "k2"):
        value = 0.5 * d * d
    else:  # low_var_kl / k3: exp(k) - k - 1 for k = ref - logp, both clamped for stability
        k = torch.clamp(-d, -20.0, 20.0)
        value = torch.clamp(torch.exp(k) - k - 1.0, -10.0, 10.0)
    if kl_type.endswith("+") and base not in ("mse", "k2"):
        k2 = 0.5 * d * d
        value = value.detach() + (k2 - k2.detach())
    return value


@dataclass
class Expected:
    loss: torch.Tensor
    log_probs: torch.Tensor
    entropy: torch.Tensor
    metrics: dict
    grad: torch.Tensor  # d loss / d logits, float64
    tol: dict  # name -> absolute tolerance (0-d) for loss and float metrics
    row_scale: torch.Tensor
    grad_scale: torch.Tensor
    flush_scale: torch.Tensor


def verl_oracle(
    batch: Batch,
    tol: Tol,
    *,
    temperature=1.0,
    clip_ratio_low=0.2,
    clip_ratio_high=0.2,
    clip_ratio_c=3.0,
    kl_coef=0.0,
    kl_type="low_var_kl",
    entropy_coef=0.0,
    loss_agg_mode="token-mean",
    with_ref=True,
) -> Expected:
    x = batch.logits.detach().double().requires_grad_()
    z = x / temperature
    log_softmax = z - torch.logsumexp(z, dim=-1, keepdim=True)
    vocab = z.shape[-1]
    valid = (batch.labels >= 0) & (batch.labels < vocab)
    picked = log_softmax.gather(-1, torch.where(valid, batch.labels, 0).unsqueeze(-1)).squeeze(-1)
    log_probs = torch.where(valid, picked, torch.zeros_like(picked))
    p = log_softmax.exp()
    entropy = -(p * torch.where(p > 0, log_softmax, torch.zeros_like(log_softmax))).sum(-1)
    w = batch.response_mask.double()  # bool: weights 1 and 0
    mask = w != 0
    old = batch.old_log_probs.double()
    adv = batch.advantages.double()

    # compute_policy_loss_vanilla
    negative_approx_kl = torch.clamp(log_probs - old, -20.0, 20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    metrics = {
        "pg_clipfrac": _masked_mean((pg_losses2 > pg_losses1).double(), w),
        "ppo_kl": _masked_mean(-negative_approx_kl, w),
    }
    if clip_ratio_c is None:
        pg_losses = clip_pg_losses1
        metrics["pg_clipfrac_lower"] = torch.zeros((), dtype=torch.float64)
    else:
        pg_losses3 = -adv * clip_ratio_c
        metrics["pg_clipfrac_lower"] = _masked_mean(((clip_pg_losses1 > pg_losses3) & (adv < 0)).double(), w)
        pg_losses = torch.where(adv < 0, torch.minimum(pg_losses3, clip_pg_losses1), clip_pg_losses1)

    # sfpo's rule for non-finite inputs at response positions: a NaN pg loss, counted
    inputs = [log_probs, entropy, old, adv, w] + ([batch.ref_log_probs] if with_ref and kl_coef else [])
    bad = mask & ~torch.stack([torch.isfinite(t) for t in inputs]).all(0)
    pg_losses = torch.where(bad, math.nan, pg_losses)
    metrics["pg_loss"] = oracle_agg(pg_losses, w, loss_agg_mode)
    metrics["entropy"] = oracle_agg(entropy, w, loss_agg_mode)
    loss = metrics["pg_loss"] - entropy_coef * metrics["entropy"]
    magnitude = {
        "pg_loss": oracle_agg(pg_losses.abs(), w, loss_agg_mode),
        "entropy": oracle_agg(entropy.abs(), w, loss_agg_mode),
        "ppo_kl": _masked_mean(negative_approx_kl.abs(), w),
    }
    magnitude["loss"] = magnitude["pg_loss"] + abs(entropy_coef) * magnitude["entropy"]
    if with_ref:
        ref = batch.ref_log_probs.double()
        kl = oracle_kl(log_probs, ref, kl_type)
        kl = torch.where(mask & ~(torch.isfinite(log_probs) & torch.isfinite(ref)), math.nan, kl)
        metrics["kl"] = oracle_agg(kl, w, loss_agg_mode)
        magnitude["kl"] = oracle_agg(kl.abs(), w, loss_agg_mode)
        loss = loss + kl_coef * metrics["kl"]
        magnitude["loss"] = magnitude["loss"] + abs(kl_coef) * magnitude["kl"]
    metrics["nonfinite_tokens"] = bad.sum()

    # float64 sensitivities of each scalar to the per-token log-prob and entropy (for the tolerances)
    row_scale = token_oracle(batch.logits, batch.labels, temperature, None, None).row_scale
    tols = {}
    for name in ("loss", *(m for m in FLOAT_METRICS if m in metrics)):
        value = loss if name == "loss" else metrics[name]
        g_lp, g_h = torch.autograd.grad(value, [log_probs, entropy], retain_graph=True, allow_unused=True)
        sens = sum(((g.abs() * row_scale).sum() if g is not None else 0.0) for g in (g_lp, g_h))
        tols[name] = tol.value * EPS32 * sens + tol.agg * EPS32 * magnitude[name].detach()
    g_logp, g_h = torch.autograd.grad(loss, [log_probs, entropy], retain_graph=True, create_graph=True)
    # d g_logp_i / d logp_i (g_logp_i depends on no other token's log-prob)
    (dg_logp,) = torch.autograd.grad(g_logp.sum(), [log_probs], retain_graph=True, allow_unused=True)
    dg_logp = torch.zeros_like(g_logp) if dg_logp is None else dg_logp
    (grad,) = torch.autograd.grad(loss, [x])
    scales = token_oracle(batch.logits, batch.labels, temperature, g_logp.detach().abs() + dg_logp.abs(), g_h.detach())
    return Expected(
        loss=loss.detach(),
        # the op's outputs: 0 at masked positions (the kernels skip those rows; verl's values there are unused)
        log_probs=torch.where(mask, log_probs, 0.0).detach(),
        entropy=torch.where(mask, entropy, 0.0).detach(),
        metrics={k: v.detach() for k, v in metrics.items()},
        grad=grad,
        tol=tols,
        row_scale=row_scale,
        grad_scale=scales.grad_scale,
        flush_scale=scales.flush_scale,
    )


# log-prob - old log-prob: inside the clip range, outside it on either side, beyond the dual clip (3 = e^1.1)
# and beyond the +-20 clamp of the ratio's exponent.
RATIO_OFFSETS = (0.05, -0.05, 0.12, -0.15, 0.4, -0.4, 1.5, -1.2, 1.3, 25.0, -25.0)
# log-prob - reference log-prob: small and large, both signs; -3 puts low_var_kl past its clamp at 10.
REF_OFFSETS = (0.1, -0.1, 0.5, -0.5, 1.0, -3.0)


def make_batch(shape, vocab, dtype, temperature, seed=0, masked_row=True, mask=None) -> Batch:
    """Random logits, labels, a response mask with holes (and row 1 fully masked when there are 3+ rows).

    ``mask``: this bool response mask instead. Old and reference log-probs are
    the exact log-probs moved by fixed offsets, so the ratios sit well inside or
    outside every clip bound (never within 1e-2 of one) and the fp32 and
    float64 paths clip the same tokens: the clip fractions must agree exactly.
    """
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    if mask is None:
        mask = torch.rand(shape, generator=g) > 0.25
        mask.view(-1)[0] = True
        if masked_row and len(shape) == 2 and shape[0] >= 3:
            mask[1] = False
    mask = mask.cpu()
    labels[~mask & (torch.rand(shape, generator=g) > 0.3)] = -100  # padding labels where masked
    exact_log_probs = token_oracle(logits, labels, temperature, None, None).log_probs
    n = labels.numel()

    def pick(values):
        return torch.tensor(values, dtype=torch.float64)[torch.randint(len(values), (n,), generator=g)]

    ratio_offsets, ref_offsets = pick(RATIO_OFFSETS), pick(REF_OFFSETS)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    advantages = sign * (0.5 + 1.5 * torch.rand(n, generator=g))
    device = kernel_devices()[0]
    return Batch(
        logits=logits.to(device),
        labels=labels.to(device),
        old_log_probs=(exact_log_probs - ratio_offsets.view(shape)).float().to(device),
        advantages=advantages.view(shape).float().to(device),
        response_mask=mask.to(device),
        ref_log_probs=(exact_log_probs - ref_offsets.view(shape)).float().to(device),
    )


# --------------------------------------------------------------------------- comparisons


def _fail(name, got, exact, tol, bad):
    idx = bad.nonzero()[0].tolist() if bad.dim() else []
    return (
        f"{name}: {int(bad.sum())} of {bad.numel()} off; first at {idx}: got {got[bad].flatten()[0].item()!r}, "
        f"exact {exact[bad].flatten()[0].item()!r}, tol {tol[bad].flatten()[0].item():.3g}"
    )


def check_close(name, got, exact, tol):
    got, exact = got.detach().double(), exact.detach().double()
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(exact)
    bad = ~((got - exact).abs() <= tol)
    assert not bool(bad.any()), _fail(name, got, exact, tol, bad)


def check_grad(name, got, want: Expected | Oracle, t: Tol, dtype, index=...):
    """logits.grad per element: ``rounding * ulp_dtype(exact) + grad * eps * grad_scale (+ flush)``."""
    exact = want.grad[index]
    assert got.dtype == dtype and got.shape == exact.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    tol = t.rounding * ulp(exact.to(dtype)) + t.grad * EPS32 * want.grad_scale[index]
    tol = tol + FP32_TINY * want.flush_scale[index]
    check_close(name, got, exact, tol)


def check_metrics(label, metrics: dict, want) -> None:
    """The op's metrics against ``want.metrics``: the same names, detached 0-d tensors, each within its bound."""
    assert set(metrics) == set(want.metrics), f"{label} metrics: {sorted(metrics)} != {sorted(want.metrics)}"
    for name, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad, f"{label} metric {name} must be a detached 0-d tensor"
    for name in FLOAT_METRICS:
        if name in want.metrics:
            check_close(f"{label} metric {name}", metrics[name], want.metrics[name], want.tol[name])
    for name in FRACTION_METRICS:
        check_close(f"{label} metric {name}", metrics[name], want.metrics[name], EPS32)
    assert int(metrics["nonfinite_tokens"]) == int(want.metrics["nonfinite_tokens"]), f"{label} nonfinite_tokens"


def check_output(label, out, grad, want: Expected, t: Tol, dtype):
    """Every output of grpo_loss and its gradient against ``want``, each by name."""
    loss, log_probs, entropy, metrics = out
    assert loss.dim() == 0 and loss.dtype == torch.float32, f"{label} loss: {loss.dtype} {tuple(loss.shape)}"
    for name, got, exact in (("log_probs", log_probs, want.log_probs), ("entropy", entropy, want.entropy)):
        assert got.dtype == torch.float32, f"{label} {name}: {got.dtype}"
        check_close(f"{label} {name}", got, exact, t.value * EPS32 * want.row_scale)
    check_close(f"{label} loss", loss, want.loss, want.tol["loss"])
    check_metrics(label, metrics, want)
    check_grad(f"{label} logits.grad", grad, want, t, dtype)
