"""grpo_loss: every backend against a float64 oracle written here from verl (and verl itself, when importable).

The oracle (``verl_oracle``) is written from DESIGN.md "Math conventions" and
verl 0.9.1's ``compute_policy_loss_vanilla``, ``kl_penalty`` and ``agg_loss``:
per-row Python loops for the sequence modes, ``where``-masking like verl's
``masked_sum``, entropy as ``-sum p log p``, gradients by float64 autograd. It
departs from verl where sfpo documents it does: ``clip_ratio_c=None`` turns the
dual clip off, and a mean over zero tokens or zero rows is 0 (verl divides 0 by
0); verl's ``+ 1e-8`` guards in its means are left out (a relative 1e-8, far
below every tolerance here). When verl is importable, a separate test compares
with verl's own functions.

Old and reference log-probs are the exact log-probs moved by fixed offsets, so
the ratios sit well inside or outside every clip bound (never within 1e-2 of
one) and the fp32 and float64 paths clip the same tokens: the clip fractions
must then agree exactly, and the tests assert that some tokens clip and some
do not.

Tolerances (eps = 2^-23; the kernel and the O(N) loss math run in fp32 whatever
the logits' dtype; S is the row scale 1 + max|z| + log V):

- log_probs, entropy: ``value * eps * S`` per token (as in test_logprob_entropy).
- loss and each float metric m: ``value * eps * sum_i S_i (|dm/dlogp_i| + |dm/dH_i|)``
  (the per-token errors above, propagated with the float64 sensitivities) plus
  ``agg * eps * M``, M the same aggregate of absolute per-token values: the fp32
  ratio, products and sums, a few roundings per token over <= 30 tokens.
- clip fractions: ``eps`` (k/n rounded once; a token clipped differently costs 1/n).
- logits.grad per element: ``rounding * ulp_dtype(exact) + grad * eps * S * G`` with
  ``G = ((|g_logp| + |dg_logp/dlogp|) (p + onehot) + |g_H| p (|mu - z| + 1)) / temperature``:
  the kernel's own error as in test_logprob_entropy, plus the error of the
  upstream g_logp, computed from an fp32 log-prob (its derivative times that
  log-prob's error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from helpers.bits import assert_bit_equal, ulp
from helpers.devices import kernel_devices
from helpers.optional import import_or_skip
from helpers.oracles import FP32_TINY, token_oracle

import sfpo_kernels
from sfpo_kernels import reference

DEVICE = kernel_devices()[0]
# The interpreter evaluates masked-off lanes too; numpy warns about their 0 * -inf, which the kernel discards.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
EPS32 = 2.0**-23


@dataclass(frozen=True)
class Tol:
    value: float  # log-prob, entropy per token: multiples of eps * S
    agg: float  # loss/metrics: fp32 arithmetic of the O(N) part, multiples of eps * M
    grad: float  # logits.grad, fp32 arithmetic: multiples of eps * S * G
    rounding: float  # logits.grad, final rounding: multiples of ulp_dtype(exact)


TOL = {
    # Measured worst cases over this file's inputs (interpreter): at most 1/6 of each bound (per-token values
    # 1.2 eps S, loss and metrics 0.45 eps (sens + M), grads' fp32 part < 1); the rest is room for the GPU's
    # exp/log approximations and other summation orders. A wrong clip bound, sign or weight costs ~1e4 and
    # more of these units.
    torch.float32: Tol(value=8.0, agg=8.0, grad=8.0, rounding=0.5),
    # bf16 logits enter the same fp32 arithmetic exactly: the same bounds; dlogits is rounded to nearest
    # bf16 once (half an ulp of its 8 significant bits).
    torch.bfloat16: Tol(value=8.0, agg=8.0, grad=8.0, rounding=0.5),
}
DTYPES = [torch.float32, torch.bfloat16]
FLOAT_METRICS = ("pg_loss", "ppo_kl", "entropy", "kl")
FRACTION_METRICS = ("pg_clipfrac", "pg_clipfrac_lower")
ALL_METRICS = {*FLOAT_METRICS, *FRACTION_METRICS, "nonfinite_tokens"}

# log-prob - old log-prob: inside the clip range, outside it on either side, beyond the dual clip (3 = e^1.1)
# and beyond the +-20 clamp of the ratio's exponent.
RATIO_OFFSETS = (0.05, -0.05, 0.12, -0.15, 0.4, -0.4, 1.5, -1.2, 1.3, 25.0, -25.0)
# log-prob - reference log-prob: small and large, both signs; -3 puts low_var_kl past its clamp at 10.
REF_OFFSETS = (0.1, -0.1, 0.5, -0.5, 1.0, -3.0)


# --------------------------------------------------------------------------- inputs


@dataclass
class Batch:
    logits: torch.Tensor  # [B, T, V] or [N, V], logits dtype
    labels: torch.Tensor
    old_log_probs: torch.Tensor  # fp32, shaped like labels
    advantages: torch.Tensor
    response_mask: torch.Tensor  # bool
    ref_log_probs: torch.Tensor

    def args(self):
        return self.logits, self.labels, self.old_log_probs, self.advantages, self.response_mask


def make_batch(shape, vocab, dtype, temperature, seed=0, masked_row=True) -> Batch:
    """Random logits, labels, a response mask with holes (and row 1 fully masked when there are 3+ rows)."""
    g = torch.Generator().manual_seed(seed)
    logits = (2.0 * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.25
    mask.view(-1)[0] = True
    if masked_row and len(shape) == 2 and shape[0] >= 3:
        mask[1] = False
    labels[~mask & (torch.rand(shape, generator=g) > 0.3)] = -100  # padding labels where masked
    exact_log_probs = token_oracle(logits, labels, temperature, None, None).log_probs
    n = labels.numel()
    def pick(values):
        return torch.tensor(values, dtype=torch.float64)[torch.randint(len(values), (n,), generator=g)]

    ratio_offsets, ref_offsets = pick(RATIO_OFFSETS), pick(REF_OFFSETS)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    advantages = sign * (0.5 + 1.5 * torch.rand(n, generator=g))
    return Batch(
        logits=logits.to(DEVICE),
        labels=labels.to(DEVICE),
        old_log_probs=(exact_log_probs - ratio_offsets.view(shape)).float().to(DEVICE),
        advantages=advantages.view(shape).float().to(DEVICE),
        response_mask=mask.to(DEVICE),
        ref_log_probs=(exact_log_probs - ref_offsets.view(shape)).float().to(DEVICE),
    )


# --------------------------------------------------------------------------- oracle


def _masked_sum(values, mask):
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def _masked_mean(values, mask):
    """Mean over the response tokens (verl's masked_mean less its 1e-8); 0 when there are none."""
    count = int(mask.sum())
    return _masked_sum(values, mask) / count if count else _masked_sum(values, mask) * 0.0


def oracle_agg(values, mask, mode):
    """verl 0.9.1 agg_loss on one micro-batch, dp_size 1; empty means are 0."""
    if mode == "token-mean":
        return _masked_mean(values, mask)
    if mode == "token-sum":
        return _masked_sum(values, mask)
    assert values.dim() == 2
    per_row = []
    for row_values, row_mask in zip(values, mask):
        if not bool(row_mask.any()):
            continue  # fully masked sequences never count
        row = _masked_sum(row_values, row_mask)
        per_row.append(row / int(row_mask.sum()) if mode == "seq-mean-token-mean" else row)
    loss = torch.stack(per_row).mean() if per_row else _masked_sum(values, mask) * 0.0
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


def verl_oracle(batch: Batch, tol: Tol, *, temperature=1.0, clip_ratio_low=0.2, clip_ratio_high=0.2,
                clip_ratio_c=3.0, kl_coef=0.0, kl_type="low_var_kl", entropy_coef=0.0,
                loss_agg_mode="token-mean", with_ref=True) -> Expected:  # fmt: skip
    x = batch.logits.detach().double().requires_grad_()
    z = x / temperature
    log_softmax = z - torch.logsumexp(z, dim=-1, keepdim=True)
    vocab = z.shape[-1]
    valid = (batch.labels >= 0) & (batch.labels < vocab)
    picked = log_softmax.gather(-1, torch.where(valid, batch.labels, 0).unsqueeze(-1)).squeeze(-1)
    log_probs = torch.where(valid, picked, torch.zeros_like(picked))
    p = log_softmax.exp()
    entropy = -(p * torch.where(p > 0, log_softmax, torch.zeros_like(log_softmax))).sum(-1)
    mask = batch.response_mask.bool()
    old = batch.old_log_probs.double()
    adv = batch.advantages.double()

    # compute_policy_loss_vanilla
    negative_approx_kl = torch.clamp(log_probs - old, -20.0, 20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    metrics = {
        "pg_clipfrac": _masked_mean((pg_losses2 > pg_losses1).double(), mask),
        "ppo_kl": _masked_mean(-negative_approx_kl, mask),
    }
    if clip_ratio_c is None:
        pg_losses = clip_pg_losses1
        metrics["pg_clipfrac_lower"] = torch.zeros((), dtype=torch.float64)
    else:
        pg_losses3 = -adv * clip_ratio_c
        metrics["pg_clipfrac_lower"] = _masked_mean(((clip_pg_losses1 > pg_losses3) & (adv < 0)).double(), mask)
        pg_losses = torch.where(adv < 0, torch.minimum(pg_losses3, clip_pg_losses1), clip_pg_losses1)

    metrics["pg_loss"] = oracle_agg(pg_losses, mask, loss_agg_mode)
    metrics["entropy"] = oracle_agg(entropy, mask, loss_agg_mode)
    loss = metrics["pg_loss"] - entropy_coef * metrics["entropy"]
    magnitude = {
        "pg_loss": oracle_agg(pg_losses.abs(), mask, loss_agg_mode),
        "entropy": oracle_agg(entropy.abs(), mask, loss_agg_mode),
        "ppo_kl": _masked_mean(negative_approx_kl.abs(), mask),
    }
    magnitude["loss"] = magnitude["pg_loss"] + abs(entropy_coef) * magnitude["entropy"]
    if with_ref:
        kl = oracle_kl(log_probs, batch.ref_log_probs.double(), kl_type)
        metrics["kl"] = oracle_agg(kl, mask, loss_agg_mode)
        magnitude["kl"] = oracle_agg(kl.abs(), mask, loss_agg_mode)
        loss = loss + kl_coef * metrics["kl"]
        magnitude["loss"] = magnitude["loss"] + abs(kl_coef) * magnitude["kl"]
    finite = torch.isfinite(log_probs) & torch.isfinite(entropy)
    metrics["nonfinite_tokens"] = (mask & ~finite).sum()

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
    scales = token_oracle(batch.logits, batch.labels, temperature, g_logp.detach().abs() + dg_logp.abs(),
                          g_h.detach())  # fmt: skip
    return Expected(
        loss=loss.detach(),
        log_probs=log_probs.detach(),
        entropy=entropy.detach(),
        metrics={k: v.detach() for k, v in metrics.items()},
        grad=grad,
        tol=tols,
        row_scale=row_scale,
        grad_scale=scales.grad_scale,
        flush_scale=scales.flush_scale,
    )


# --------------------------------------------------------------------------- checks


def fused(batch: Batch, backend="triton", **settings):
    """sfpo_kernels.grpo_loss with backward: ``(output, logits.grad)``."""
    x = batch.logits.detach().clone().requires_grad_()
    out = sfpo_kernels.grpo_loss(x, *batch.args()[1:], backend=backend, **settings)
    (grad,) = torch.autograd.grad(out.loss, [x])
    return out, grad


def reference64(batch: Batch, **settings):
    """sfpo_kernels.reference.grpo_loss on the float64 logits: ``(loss, log_probs, entropy, metrics, grad)``."""
    x = batch.logits.detach().double().requires_grad_()
    loss, log_probs, entropy, metrics = reference.grpo_loss(x, *batch.args()[1:], **settings)
    (grad,) = torch.autograd.grad(loss, [x])
    return loss.detach(), log_probs.detach(), entropy.detach(), metrics, grad


def _fail(name, got, exact, tol, bad):
    idx = bad.nonzero()[0].tolist() if bad.dim() else []
    return (f"{name}: {int(bad.sum())} of {bad.numel()} off; first at {idx}: got {got[bad].flatten()[0].item()!r}, "
            f"exact {exact[bad].flatten()[0].item()!r}, tol {tol[bad].flatten()[0].item():.3g}")  # fmt: skip


def check_close(name, got, exact, tol):
    got, exact = got.detach().double(), exact.detach().double()
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(exact)
    bad = ~((got - exact).abs() <= tol)
    assert not bool(bad.any()), _fail(name, got, exact, tol, bad)


def check_grad(name, got, want: Expected, dtype, index=...):
    exact = want.grad[index]
    assert got.dtype == dtype and got.shape == exact.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    t = TOL[dtype]
    tol = t.rounding * ulp(exact.to(dtype)) + t.grad * EPS32 * want.grad_scale[index]
    tol = tol + FP32_TINY * want.flush_scale[index]
    check_close(name, got, exact, tol)


def check_output(label, out, grad, want: Expected, dtype):
    """Every output of grpo_loss and its gradient against ``want``, each by name."""
    t = TOL[dtype]
    loss, log_probs, entropy, metrics = out
    assert loss.dim() == 0 and loss.dtype == torch.float32, f"{label} loss: {loss.dtype} {tuple(loss.shape)}"
    for name, got, exact in (("log_probs", log_probs, want.log_probs), ("entropy", entropy, want.entropy)):
        assert got.dtype == torch.float32, f"{label} {name}: {got.dtype}"
        check_close(f"{label} {name}", got, exact, t.value * EPS32 * want.row_scale)
    check_close(f"{label} loss", loss, want.loss, want.tol["loss"])
    assert set(metrics) == set(want.metrics), f"{label} metrics: {sorted(metrics)} != {sorted(want.metrics)}"
    for name, value in metrics.items():
        assert value.dim() == 0 and not value.requires_grad, f"{label} metric {name} must be a detached 0-d tensor"
    for name in FLOAT_METRICS:
        if name in want.metrics:
            check_close(f"{label} metric {name}", metrics[name], want.metrics[name], want.tol[name])
    for name in FRACTION_METRICS:
        check_close(f"{label} metric {name}", metrics[name], want.metrics[name], EPS32)
    assert int(metrics["nonfinite_tokens"]) == int(want.metrics["nonfinite_tokens"]), f"{label} nonfinite_tokens"
    check_grad(f"{label} logits.grad", grad, want, dtype)


# --------------------------------------------------------------------------- against the oracle

BASE = dict(temperature=1.0, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0, kl_coef=0.0,
            kl_type="low_var_kl", entropy_coef=0.0, loss_agg_mode="token-mean")  # fmt: skip
FULL = dict(BASE, temperature=0.7, kl_coef=0.1, entropy_coef=0.01)  # every term on

CASES = [
    *(pytest.param(dict(FULL, loss_agg_mode=mode), (3, 6), 65, id=f"agg-{mode}") for mode in reference.AGG_MODES),
    *(pytest.param(dict(BASE, kl_coef=0.1, kl_type=kl), (3, 5), 65, id=f"kl-{kl}") for kl in reference.KL_TYPES),
    pytest.param(dict(BASE, kl_coef=0.1, kl_type="low_var_kl+"), (3, 5), 65, id="kl-low_var_kl+"),
    pytest.param(dict(BASE, kl_coef=0.1, kl_type="abs+"), (3, 5), 65, id="kl-abs+"),
    pytest.param(dict(BASE, clip_ratio_c=None), (3, 6), 65, id="dual-clip-off"),
    pytest.param(dict(BASE, clip_ratio_low=0.2, clip_ratio_high=0.28), (3, 6), 65, id="clip-asymmetric"),
    pytest.param(dict(BASE, entropy_coef=-0.05, loss_agg_mode="seq-mean-token-mean"), (3, 5), 7, id="entropy-coef"),
    pytest.param(dict(BASE, temperature=1.3, kl_coef=0.05, kl_type="k3"), (2, 4), 200, id="temperature-1.3-V200"),
    pytest.param(dict(FULL, loss_agg_mode="token-mean"), (13,), 65, id="packed-token-mean"),
    pytest.param(dict(FULL, loss_agg_mode="token-sum"), (13,), 64, id="packed-token-sum"),
    pytest.param(dict(FULL), (1,), 65, id="packed-N1"),
    pytest.param(dict(FULL, loss_agg_mode="seq-mean-token-mean"), (4, 1), 65, id="T1"),
    pytest.param(dict(FULL, loss_agg_mode="seq-mean-token-sum"), (1, 5), 65, id="B1"),
]


def _case_batch(settings, shape, vocab, dtype) -> Batch:
    return make_batch(shape, vocab, dtype, settings["temperature"], seed=len(shape) * 100 + vocab)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings,shape,vocab", CASES)
def test_each_backend_matches_verl_oracle(backend, dtype, settings, shape, vocab):
    """Loss, log-probs, entropy, every metric and logits.grad of each backend against the oracle.

    Not against :mod:`sfpo_kernels.reference`: ``backend="torch"`` runs that very code.
    """
    batch = _case_batch(settings, shape, vocab, dtype)
    want = verl_oracle(batch, TOL[dtype], **settings)
    out, grad = fused(batch, backend=backend, ref_log_probs=batch.ref_log_probs, **settings)
    check_output(f"{backend} vs oracle:", out, grad, want, dtype)

    if settings == dict(FULL, loss_agg_mode="token-mean") and len(shape) == 2:
        # The inputs do what they are for: some tokens clip, some do not, and the dual clip acts.
        for name in FRACTION_METRICS:
            assert 0.0 < float(want.metrics[name]) < 1.0, f"{name} = {float(want.metrics[name])}: inputs too tame"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings,shape,vocab", CASES)
def test_float64_reference_matches_verl_oracle(dtype, settings, shape, vocab):
    """sfpo_kernels.reference.grpo_loss on float64 logits: the oracle's math to float64 precision (1e-12)."""
    batch = _case_batch(settings, shape, vocab, dtype)
    want = verl_oracle(batch, TOL[dtype], **settings)
    loss64, lp64, h64, metrics64, grad64 = reference64(batch, ref_log_probs=batch.ref_log_probs, **settings)
    check_close("reference64 loss", loss64, want.loss, 1e-12 * (1.0 + want.loss.abs()))
    check_close("reference64 log_probs", lp64, want.log_probs, 1e-12 * want.row_scale)
    check_close("reference64 entropy", h64, want.entropy, 1e-12 * want.row_scale)
    assert set(metrics64) == set(want.metrics), f"reference64 metrics: {sorted(metrics64)} != {sorted(want.metrics)}"
    for name in ALL_METRICS:
        check_close(f"reference64 metric {name}", metrics64[name], want.metrics[name], 1e-12)
    check_close("reference64 logits.grad", grad64, want.grad, 1e-12 * (want.grad.abs().amax() + 1e-30))


@pytest.mark.parametrize("base", ["low_var_kl", "kl", "abs"])
def test_plus_kl_has_base_value_and_k2_gradient(base):
    """'+' is a straight-through estimator: forward value of the base estimate, gradient of k2."""
    batch = make_batch((3, 5), 65, torch.float32, 1.0, seed=41)
    settings = dict(BASE, kl_coef=0.2, entropy_coef=0.01, ref_log_probs=batch.ref_log_probs)
    plus, grad_plus = fused(batch, **dict(settings, kl_type=base + "+"))
    plain, _ = fused(batch, **dict(settings, kl_type=base))
    k2, grad_k2 = fused(batch, **dict(settings, kl_type="k2"))
    assert_bit_equal("loss: '+' vs base", plus.loss.detach(), plain.loss.detach())
    assert_bit_equal("metric kl: '+' vs base", plus.metrics["kl"], plain.metrics["kl"])
    assert_bit_equal("logits.grad: '+' vs k2", grad_plus, grad_k2)
    assert not torch.equal(plus.loss, k2.loss), "the '+' loss must not be k2's value"


@pytest.mark.parametrize("mode", reference.AGG_MODES)
def test_fully_masked_rows_change_nothing(mode):
    """An all-masked row changes nothing: the loss and metrics are those of the batch without it (T, by
    which seq-mean-token-sum-norm divides, stays), and its logits get zero gradient."""
    batch = make_batch((3, 4), 65, torch.float32, 1.0, seed=43)
    assert not bool(batch.response_mask[1].any())
    out, grad = fused(batch, ref_log_probs=batch.ref_log_probs, **dict(FULL, loss_agg_mode=mode))
    keep = torch.tensor([0, 2], device=DEVICE)
    small = Batch(*(t[keep] for t in (batch.logits, batch.labels, batch.old_log_probs, batch.advantages,
                                      batch.response_mask, batch.ref_log_probs)))  # fmt: skip
    want = verl_oracle(small, TOL[torch.float32], **dict(FULL, loss_agg_mode=mode))
    check_close(f"loss without the masked row ({mode})", out.loss, want.loss, want.tol["loss"])
    for name in FLOAT_METRICS:
        check_close(f"metric {name} without the masked row", out.metrics[name], want.metrics[name], want.tol[name])
    assert bool((grad[1] == 0).all()), "logits.grad of the fully masked row must be 0"


LAYOUTS = [
    *(pytest.param((3, 4), mode, id=f"BTV-{mode}") for mode in reference.AGG_MODES),
    pytest.param((7,), "token-mean", id="NV-token-mean"),
    pytest.param((7,), "token-sum", id="NV-token-sum"),
]


@pytest.mark.parametrize("shape,mode", LAYOUTS)
def test_fully_masked_batch_gives_zero_loss_and_zero_gradient(shape, mode):
    batch = make_batch(shape, 65, torch.bfloat16, 1.0, seed=47)
    batch.response_mask.zero_()
    batch.labels.fill_(-100)
    out, grad = fused(batch, ref_log_probs=batch.ref_log_probs, **dict(FULL, loss_agg_mode=mode))
    assert out.loss.item() == 0.0, f"loss {out.loss.item()}"
    for name in ALL_METRICS:
        assert float(out.metrics[name]) == 0.0, f"metric {name} = {float(out.metrics[name])}"
    assert bool(grad.isfinite().all()) and bool((grad == 0).all()), "logits.grad must be all zeros"
    assert bool(out.entropy.isfinite().all()) and bool((out.log_probs == 0).all())


# --------------------------------------------------------------------------- non-finite inputs, labels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_logits_at_response_positions_are_counted(dtype):
    batch = make_batch((3, 5), 65, dtype, 1.0, seed=53)
    response = batch.response_mask.nonzero().tolist()
    (b0, t0), (b1, t1) = response[0], response[-1]
    batch.logits[b0, t0, 3] = float("nan")
    batch.logits[b1, t1, 64] = float("inf")
    out, grad = fused(batch, ref_log_probs=batch.ref_log_probs, **FULL)
    assert not math.isfinite(out.loss.item()), f"loss {out.loss.item()} with non-finite response logits"
    assert int(out.metrics["nonfinite_tokens"]) == 2
    want = verl_oracle(batch, TOL[dtype], **FULL)
    assert int(want.metrics["nonfinite_tokens"]) == 2
    poisoned = torch.zeros(batch.labels.shape, dtype=torch.bool, device=DEVICE)
    poisoned[b0, t0] = poisoned[b1, t1] = True
    for name, got, exact in (("log_probs", out.log_probs, want.log_probs), ("entropy", out.entropy, want.entropy)):
        assert not bool(got[poisoned].isfinite().any()), f"{name} at the poisoned tokens: {got[poisoned]}"
        check_close(name, got[~poisoned], exact[~poisoned], TOL[dtype].value * EPS32 * want.row_scale[~poisoned])


MASKED_POISON = [
    pytest.param("logits", float("nan"), id="logits-nan"),
    pytest.param("logits", float("inf"), id="logits-inf"),
    pytest.param("old_log_probs", float("nan"), id="old_log_probs-nan"),
    pytest.param("advantages", float("inf"), id="advantages-inf"),
]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("field,value", MASKED_POISON)
def test_nonfinite_values_at_masked_positions_change_nothing(mode, field, value):
    batch = make_batch((3, 5), 65, torch.float32, 1.0, seed=59)
    b, t = (~batch.response_mask).nonzero()[0].tolist()
    settings = dict(FULL, loss_agg_mode=mode, ref_log_probs=batch.ref_log_probs)
    clean, clean_grad = fused(batch, **settings)
    target = getattr(batch, field)
    if field == "logits":
        target[b, t, 5] = value
    else:
        target[b, t] = value
    out, grad = fused(batch, **settings)
    assert math.isfinite(out.loss.item()), f"loss {out.loss.item()} with {field}={value} at a masked position"
    assert_bit_equal("loss", out.loss.detach(), clean.loss.detach())
    for name in ALL_METRICS:
        assert_bit_equal(f"metric {name}", out.metrics[name], clean.metrics[name])
    others = torch.ones(batch.labels.shape, dtype=torch.bool, device=DEVICE)
    others[b, t] = False
    assert_bit_equal("logits.grad elsewhere", grad[others], clean_grad[others])


@pytest.mark.parametrize("bad_label", [-1, -100, 65, 1000])
def test_labels_outside_vocab_at_response_positions(bad_label):
    batch = make_batch((2, 4), 65, torch.float32, 1.0, seed=61)
    b, t = batch.response_mask.nonzero()[-1].tolist()
    batch.labels[b, t] = bad_label
    with pytest.raises(ValueError, match=r"labels.*outside \[0, 65\)"):
        sfpo_kernels.grpo_loss(*batch.args(), backend="triton")
    out, grad = fused(batch, check_labels=False)  # unchecked: log-prob 0 there, the rest as usual
    assert out.log_probs[b, t].item() == 0.0
    assert bool(grad.isfinite().all())


def test_padding_labels_at_masked_positions_are_fine():
    batch = make_batch((3, 4), 65, torch.float32, 1.0, seed=67)
    batch.labels[~batch.response_mask] = -100
    out, _ = fused(batch, **FULL, ref_log_probs=batch.ref_log_probs)
    assert math.isfinite(out.loss.item())
    assert bool((out.log_probs[~batch.response_mask] == 0).all())


# --------------------------------------------------------------------------- verl itself


def _verl_actor_config(clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """What compute_policy_loss_vanilla reads: clip_ratio(_low/_high), get('clip_ratio_c'), global_batch_info."""
    values = dict(clip_ratio=clip_ratio_low, clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                  clip_ratio_c=clip_ratio_c)  # fmt: skip
    # Called after import_or_skip("verl"): with verl installed, any error here fails the test.
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **values)


VERL_CASES = [
    *(pytest.param(dict(FULL, loss_agg_mode=mode), id=f"agg-{mode}") for mode in reference.AGG_MODES),
    *(pytest.param(dict(BASE, kl_coef=0.1, kl_type=kl), id=f"kl-{kl}") for kl in (*reference.KL_TYPES, "k3+")),
    pytest.param(dict(BASE, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0), id="clip-asymmetric"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings", VERL_CASES)
def test_matches_verl_core_algos(dtype, settings):
    import_or_skip("verl")
    from verl.trainer.ppo import core_algos
    from verl.utils import torch_functional as verl_F

    batch = make_batch((3, 6), 65, dtype, settings["temperature"], seed=73)
    mask = batch.response_mask.float()
    x = batch.logits.detach().double().requires_grad_()
    z = x / settings["temperature"]
    labels = torch.where(batch.response_mask, batch.labels, 0)  # verl gathers every position
    log_probs = verl_F.logprobs_from_logits_naive(z, labels)
    entropy = verl_F.entropy_from_logits(z)
    config = _verl_actor_config(settings["clip_ratio_low"], settings["clip_ratio_high"], settings["clip_ratio_c"])
    pg_loss, pg_metrics = core_algos.compute_policy_loss_vanilla(
        batch.old_log_probs.double(), log_probs, batch.advantages.double(), mask,
        loss_agg_mode=settings["loss_agg_mode"], config=config,
    )  # fmt: skip
    entropy_agg = core_algos.agg_loss(entropy, mask, settings["loss_agg_mode"])
    kl = core_algos.agg_loss(core_algos.kl_penalty(log_probs, batch.ref_log_probs.double(), settings["kl_type"]),
                             mask, settings["loss_agg_mode"])  # fmt: skip
    loss = pg_loss - settings["entropy_coef"] * entropy_agg + settings["kl_coef"] * kl
    (verl_grad,) = torch.autograd.grad(loss, [x])

    out, grad = fused(batch, ref_log_probs=batch.ref_log_probs, **settings)
    want = verl_oracle(batch, TOL[dtype], **settings)  # for the tolerances, and verl against the oracle
    check_close("verl loss vs oracle", loss.detach(), want.loss, 1e-7 * (1.0 + want.loss.abs()))
    check_close("loss vs verl", out.loss, loss.detach(), want.tol["loss"] + 1e-7 * loss.detach().abs())
    check_close("metric pg_loss vs verl", out.metrics["pg_loss"], pg_loss.detach(),
                want.tol["pg_loss"] + 1e-7 * pg_loss.detach().abs())  # fmt: skip
    check_close("metric entropy vs verl", out.metrics["entropy"], entropy_agg.detach(), want.tol["entropy"])
    check_close("metric kl vs verl", out.metrics["kl"], kl.detach(), want.tol["kl"])
    for name in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
        verl_value = torch.as_tensor(pg_metrics[f"actor/{name}"], dtype=torch.float64)
        tol = want.tol[name] if name in want.tol else EPS32
        check_close(f"metric {name} vs verl", out.metrics[name], verl_value, tol + 1e-7 * verl_value.abs())
    # verl's log-probs at masked positions are those of label 0 (it has no padding label): compare the rest
    check_close("log_probs vs verl", out.log_probs[batch.response_mask], log_probs.detach()[batch.response_mask],
                TOL[dtype].value * EPS32 * want.row_scale[batch.response_mask])  # fmt: skip
    check_close("entropy vs verl", out.entropy, entropy.detach(), TOL[dtype].value * EPS32 * want.row_scale)
    exact = verl_grad  # masked positions get no gradient in either
    check_close("logits.grad vs verl", grad.double(), exact,
                TOL[dtype].rounding * ulp(exact.to(dtype)) + TOL[dtype].grad * EPS32 * want.grad_scale
                + FP32_TINY * want.flush_scale + 1e-7 * exact.abs())  # fmt: skip
