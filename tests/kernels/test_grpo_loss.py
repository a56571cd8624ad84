"""grpo_loss: every backend against a float64 oracle written from verl (and verl itself, when importable).

The oracle, ``helpers.oracles.verl_oracle``, is written from docs/conventions.md "Math
conventions" and verl 0.9.1's ``compute_policy_loss_vanilla``, ``kl_penalty``
and ``agg_loss`` (its docstring lists where it departs from verl, as sfpo
documents). When verl is importable, a separate test compares with verl's own
functions, with a bool mask and with fractional token weights.

Inputs come from ``helpers.oracles.make_batch``; the tests assert that some
tokens clip and some do not.

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

import dataclasses
import math

import pytest
import torch

import sfpo_kernels
from sfpo_kernels import reference
from tests.helpers.bits import assert_bit_equal, ulp
from tests.helpers.devices import kernel_devices
from tests.helpers.optional import import_or_skip
from tests.helpers.oracles import (
    ALL_METRICS,
    EPS32,
    FLOAT_METRICS,
    FP32_TINY,
    FRACTION_METRICS,
    Batch,
    Tol,
    check_close,
    check_output,
    make_batch,
    verl_oracle,
)

DEVICE = kernel_devices()[0]
# The interpreter evaluates masked-off lanes too; numpy warns about their 0 * -inf, which the kernel discards.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

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

# --------------------------------------------------------------------------- runs


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


# --------------------------------------------------------------------------- against the oracle

BASE = dict(
    temperature=1.0,
    clip_ratio_low=0.2,
    clip_ratio_high=0.2,
    clip_ratio_c=3.0,
    kl_coef=0.0,
    kl_type="low_var_kl",
    entropy_coef=0.0,
    loss_agg_mode="token-mean",
)
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
    check_output(f"{backend} vs oracle:", out, grad, want, TOL[dtype], dtype)

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
    small = Batch(
        *(
            t[keep]
            for t in (
                batch.logits,
                batch.labels,
                batch.old_log_probs,
                batch.advantages,
                batch.response_mask,
                batch.ref_log_probs,
            )
        )
    )
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
    out, _ = fused(batch, ref_log_probs=batch.ref_log_probs, **FULL)
    assert not math.isfinite(out.loss.item()), f"loss {out.loss.item()} with non-finite response logits"
    assert int(out.metrics["nonfinite_tokens"]) == 2
    want = verl_oracle(batch, TOL[dtype], **FULL)
    assert int(want.metrics["nonfinite_tokens"]) == 2
    poisoned = torch.zeros(batch.labels.shape, dtype=torch.bool, device=DEVICE)
    poisoned[b0, t0] = poisoned[b1, t1] = True
    for name, got, exact in (("log_probs", out.log_probs, want.log_probs), ("entropy", out.entropy, want.entropy)):
        assert not bool(got[poisoned].isfinite().any()), f"{name} at the poisoned tokens: {got[poisoned]}"
        check_close(name, got[~poisoned], exact[~poisoned], TOL[dtype].value * EPS32 * want.row_scale[~poisoned])


NAN, INF = float("nan"), float("inf")
MASKED_POISON = [
    pytest.param("logits", NAN, id="logits-nan"),
    pytest.param("logits", INF, id="logits-inf"),
    pytest.param("logits-row", NAN, id="logits-row-nan"),
    pytest.param("logits-row", -INF, id="logits-row-minus-inf"),
    pytest.param("old_log_probs", NAN, id="old_log_probs-nan"),
    pytest.param("old_log_probs", -INF, id="old_log_probs-minus-inf"),
    pytest.param("advantages", NAN, id="advantages-nan"),
    pytest.param("advantages", INF, id="advantages-inf"),
    pytest.param("ref_log_probs", NAN, id="ref_log_probs-nan"),
    pytest.param("ref_log_probs", INF, id="ref_log_probs-inf"),
]


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the forward still reads the row
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("field,value", MASKED_POISON)
def test_nonfinite_values_at_masked_positions_change_nothing(backend, field, value):
    """Loss, every metric and the whole logits.grad bit for bit as without the poison; the masked row's
    gradient exact zeros (the backward once computed 0 * NaN there). Every agg mode: the property suite."""
    mode = "seq-mean-token-sum"
    batch = make_batch((3, 5), 65, torch.float32, 1.0, seed=59)
    b, t = (~batch.response_mask).nonzero()[0].tolist()
    batch.labels[b, t] = 3  # a label in the vocabulary: a padding label's zero gradient would hide a NaN
    settings = dict(FULL, loss_agg_mode=mode, ref_log_probs=batch.ref_log_probs, backend=backend)
    clean, clean_grad = fused(batch, **settings)
    if field == "logits":
        batch.logits[b, t, 5] = value
    elif field == "logits-row":
        batch.logits[b, t] = value
    else:
        getattr(batch, field)[b, t] = value
    out, grad = fused(batch, **settings)
    assert math.isfinite(out.loss.item()), f"loss {out.loss.item()} with {field}={value} at a masked position"
    assert_bit_equal("loss", out.loss.detach(), clean.loss.detach())
    for name in ALL_METRICS:
        assert_bit_equal(f"metric {name}", out.metrics[name], clean.metrics[name])
    assert bool((grad[b, t] == 0).all()), f"logits.grad of the masked row: {grad[b, t]}"
    assert_bit_equal("logits.grad", grad, clean_grad)


RESPONSE_POISON = [
    pytest.param("label-logit", -INF, id="label-logit-minus-inf"),
    pytest.param("old_log_probs", INF, id="old_log_probs-inf"),
    pytest.param("old_log_probs", -INF, id="old_log_probs-minus-inf"),
    pytest.param("old_log_probs", NAN, id="old_log_probs-nan"),
    pytest.param("advantages", NAN, id="advantages-nan"),
    pytest.param("ref_log_probs", -INF, id="ref_log_probs-minus-inf"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("field,value", RESPONSE_POISON)
def test_nonfinite_inputs_at_a_response_position_give_a_nonfinite_loss(backend, field, value):
    """One poisoned response token: loss and pg_loss NaN, nonfinite_tokens 1 (as the oracle counts). The ratio's
    clamp used to hide log p = -inf (ratio e^-20) and old = +-inf, and low_var_kl's clamp ref = -inf."""
    batch = make_batch((3, 5), 65, torch.float32, 1.0, seed=83)
    b, t = batch.response_mask.nonzero()[-1].tolist()
    if field == "label-logit":
        batch.logits[b, t, batch.labels[b, t]] = value
    else:
        getattr(batch, field)[b, t] = value
    out, _ = fused(batch, ref_log_probs=batch.ref_log_probs, **FULL, backend=backend)
    assert not math.isfinite(out.loss.item()), f"loss {out.loss.item()} with {field}={value} at a response position"
    assert not math.isfinite(float(out.metrics["pg_loss"])), f"pg_loss {float(out.metrics['pg_loss'])}"
    assert int(out.metrics["nonfinite_tokens"]) == 1, f"nonfinite_tokens {int(out.metrics['nonfinite_tokens'])}"
    want = verl_oracle(batch, TOL[torch.float32], **FULL)
    assert int(want.metrics["nonfinite_tokens"]) == 1 and not math.isfinite(float(want.loss))


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


# --------------------------------------------------------------------------- token weights

# A float response_mask weights its tokens, as verl's masked_sum does: sum(where(w != 0, x, 0) * w) / sum(w).
# Dyadic weights: fp32 sums of up to 30 of them are exact, so weighted clip fractions round once.
TOKEN_WEIGHTS = (0.25, 0.5, 1.0, 1.5, 2.0)


def with_weights(batch: Batch, seed: int) -> Batch:
    """``batch`` with its bool mask replaced by weights from TOKEN_WEIGHTS at response positions, 0 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(TOKEN_WEIGHTS)[torch.randint(len(TOKEN_WEIGHTS), tuple(batch.labels.shape), generator=g)]
    return dataclasses.replace(batch, response_mask=torch.where(batch.response_mask.cpu(), w, 0.0).to(DEVICE))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", reference.AGG_MODES)
def test_token_weights_match_verl_oracle(backend, mode):
    batch = with_weights(make_batch((3, 6), 65, torch.float32, 0.7, seed=89), seed=89)
    settings = dict(FULL, loss_agg_mode=mode)
    want = verl_oracle(batch, TOL[torch.float32], **settings)
    out, grad = fused(batch, backend=backend, ref_log_probs=batch.ref_log_probs, **settings)
    check_output(f"{backend} weights vs oracle:", out, grad, want, TOL[torch.float32], torch.float32)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", reference.AGG_MODES)
def test_uniform_half_weights_halve_sums_and_keep_means(backend, mode):
    """w = 0.5 at every response position: the means are those of the bool mask and the sums half of them,
    bit for bit (halving is exact). A token mean over an unweighted sum once came out doubled."""
    batch = make_batch((3, 5), 65, torch.float32, 1.0, seed=97)
    half = dataclasses.replace(batch, response_mask=batch.response_mask.float() * 0.5)
    settings = dict(FULL, loss_agg_mode=mode, ref_log_probs=batch.ref_log_probs, backend=backend)
    (full_out, full_grad), (half_out, half_grad) = fused(batch, **settings), fused(half, **settings)
    scale = 0.5 if mode in ("token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm") else 1.0
    assert_bit_equal("loss", half_out.loss.detach(), scale * full_out.loss.detach())
    assert_bit_equal("logits.grad", half_grad, scale * full_grad)
    for name in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "nonfinite_tokens"):  # means over tokens always
        assert_bit_equal(f"metric {name}", half_out.metrics[name], full_out.metrics[name])


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_nonfinite_weight_gives_a_nonfinite_loss(backend, mode, value):
    """A NaN / inf weight is a response position with a non-finite input: counted, and the loss not finite
    (once a NaN weight's row silently dropped out of the seq-* means)."""
    batch = with_weights(make_batch((3, 5), 65, torch.float32, 1.0, seed=101), seed=101)
    b, t = batch.response_mask.nonzero()[-1].tolist()
    batch.response_mask[b, t] = value
    out, _ = fused(batch, **dict(FULL, loss_agg_mode=mode), ref_log_probs=batch.ref_log_probs, backend=backend)
    assert not math.isfinite(out.loss.item()), f"loss {out.loss.item()} with weight {value}"
    assert int(out.metrics["nonfinite_tokens"]) == 1, f"nonfinite_tokens {int(out.metrics['nonfinite_tokens'])}"


# --------------------------------------------------------------------------- verl itself


def _verl_actor_config(clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """What compute_policy_loss_vanilla reads: clip_ratio(_low/_high), get('clip_ratio_c'), global_batch_info."""
    values = dict(
        clip_ratio=clip_ratio_low,
        clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high,
        clip_ratio_c=clip_ratio_c,
    )
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
    compare_with_verl(dtype, settings, weighted=False)


@pytest.mark.parametrize("mode", reference.AGG_MODES)
def test_token_weights_match_verl_core_algos(mode):
    """A fractional response_mask: verl weights every token (masked_sum = sum(x * m)); so must we."""
    compare_with_verl(torch.float32, dict(FULL, loss_agg_mode=mode), weighted=True)


def compare_with_verl(dtype, settings, weighted):
    """Loss, metrics, log-probs, entropy and logits.grad against verl's own functions, on float64 logits."""
    import_or_skip("verl")
    from verl.trainer.ppo import core_algos
    from verl.utils import torch_functional as verl_F

    batch = make_batch((3, 6), 65, dtype, settings["temperature"], seed=73)
    if weighted:
        batch = with_weights(batch, seed=73)
    keep = batch.response_mask != 0
    mask = batch.response_mask.float()
    x = batch.logits.detach().double().requires_grad_()
    z = x / settings["temperature"]
    labels = torch.where(keep, batch.labels, 0)  # verl gathers every position
    log_probs = verl_F.logprobs_from_logits_naive(z, labels)
    entropy = verl_F.entropy_from_logits(z)
    config = _verl_actor_config(settings["clip_ratio_low"], settings["clip_ratio_high"], settings["clip_ratio_c"])
    pg_loss, pg_metrics = core_algos.compute_policy_loss_vanilla(
        batch.old_log_probs.double(),
        log_probs,
        batch.advantages.double(),
        mask,
        loss_agg_mode=settings["loss_agg_mode"],
        config=config,
    )
    entropy_agg = core_algos.agg_loss(entropy, mask, settings["loss_agg_mode"])
    kl = core_algos.agg_loss(
        core_algos.kl_penalty(log_probs, batch.ref_log_probs.double(), settings["kl_type"]),
        mask,
        settings["loss_agg_mode"],
    )
    loss = pg_loss - settings["entropy_coef"] * entropy_agg + settings["kl_coef"] * kl
    (verl_grad,) = torch.autograd.grad(loss, [x])

    out, grad = fused(batch, ref_log_probs=batch.ref_log_probs, **settings)
    want = verl_oracle(batch, TOL[dtype], **settings)  # for the tolerances, and verl against the oracle
    check_close("verl loss vs oracle", loss.detach(), want.loss, 1e-7 * (1.0 + want.loss.abs()))
    check_close("loss vs verl", out.loss, loss.detach(), want.tol["loss"] + 1e-7 * loss.detach().abs())
    check_close(
        "metric pg_loss vs verl",
        out.metrics["pg_loss"],
        pg_loss.detach(),
        want.tol["pg_loss"] + 1e-7 * pg_loss.detach().abs(),
    )
    check_close("metric entropy vs verl", out.metrics["entropy"], entropy_agg.detach(), want.tol["entropy"])
    check_close("metric kl vs verl", out.metrics["kl"], kl.detach(), want.tol["kl"])
    for name in ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"):
        verl_value = torch.as_tensor(pg_metrics[f"actor/{name}"], dtype=torch.float64)
        tol = want.tol.get(name, EPS32)
        check_close(f"metric {name} vs verl", out.metrics[name], verl_value, tol + 1e-7 * verl_value.abs())
    # verl's log-probs at masked positions are those of label 0 (it has no padding label): compare the rest
    check_close(
        "log_probs vs verl",
        out.log_probs[keep],
        log_probs.detach()[keep],
        TOL[dtype].value * EPS32 * want.row_scale[keep],
    )
    check_close(
        "entropy vs verl", out.entropy[keep], entropy.detach()[keep], TOL[dtype].value * EPS32 * want.row_scale[keep]
    )
    assert bool((out.entropy[~keep] == 0).all()) and bool((out.log_probs[~keep] == 0).all()), "masked outputs are 0"
    exact = verl_grad  # masked positions get no gradient in either
    check_close(
        "logits.grad vs verl",
        grad.double(),
        exact,
        TOL[dtype].rounding * ulp(exact.to(dtype))
        + TOL[dtype].grad * EPS32 * want.grad_scale
        + FP32_TINY * want.flush_scale
        + 1e-7 * exact.abs(),
    )
