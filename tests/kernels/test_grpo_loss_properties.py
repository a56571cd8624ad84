"""Properties of grpo_loss and logprob_entropy on tiny random inputs (hypothesis), both backends.

- Masked positions never change anything: whatever a masked position holds
  (NaN, +-inf, huge values, padding labels) in the logits, labels,
  old/reference log-probs, advantages or upstream gradients, the loss, every
  metric and logits.grad are bit for bit those of the clean call, and the
  masked rows' gradient is exactly 0.
- Results equal the independent float64 oracle of ``helpers.oracles``
  (``verl_oracle``, ``token_oracle``) within test_grpo_loss.py's and
  test_logprob_entropy.py's tolerances, for bool masks and token weights.
- A rejected call changes nothing: it raises ``ValueError`` and leaves every
  input tensor bit for bit as it was, with no gradient.

Hypothesis draws the structure (backend, dtype, shape, V, settings, which
positions are masked, the poison values); a drawn seed fills the bulk values
through torch's generator, so an example stays cheap under the interpreter.
``derandomize=True`` and no example database: every run (CI included) tests the
same examples; ``max_examples`` keeps the whole file well under a minute on two
CPU cores.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers.bits import assert_bit_equal
from tests.helpers.devices import kernel_devices
from tests.helpers.optional import import_or_skip
from tests.helpers.oracles import (
    ALL_METRICS,
    EPS32,
    Batch,
    Tol,
    check_close,
    check_grad,
    check_output,
    make_batch,
    token_oracle,
    verl_oracle,
)

import_or_skip("hypothesis")  # the test extra installs it; the GPU machine's image may not
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sfpo_kernels
from sfpo_kernels import reference

DEVICE = kernel_devices()[0]
# The poisons run through the interpreter's numpy, which warns about what the kernels then discard.
NUMPY_WARNINGS = (
    "invalid value encountered",
    "overflow encountered",
    "divide by zero encountered",
    "All-NaN slice encountered",
)
pytestmark = [pytest.mark.filterwarnings(f"ignore:{message}:RuntimeWarning") for message in NUMPY_WARNINGS]
# test_grpo_loss.py's and test_logprob_entropy.py's bounds: the same arithmetic on the same kind of inputs
# (make_batch), so the same derivation (see those files' docstrings).
TOL = {dtype: Tol(value=8.0, agg=8.0, grad=8.0, rounding=0.5) for dtype in (torch.float32, torch.bfloat16)}
PROPERTY = settings(
    max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)

BACKENDS = ("triton", "torch")
# INTERPRETER_BLOCK_V is 64: one partial block, exactly one block, one block and a 1-wide tail, two and a tail.
VOCABS = (1, 7, 64, 65, 130)
POISON = (float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 0.0)
TOKEN_WEIGHTS = (0.25, 0.5, 1.0, 1.5, 2.0)  # dyadic: the fp32 sums are exact (see test_grpo_loss.py)


# --------------------------------------------------------------------------- strategies


@dataclasses.dataclass
class Problem:
    backend: str
    dtype: torch.dtype
    batch: Batch
    options: dict  # grpo_loss keywords


@st.composite
def problems(draw, weights: bool = False) -> Problem:
    """A valid grpo_loss call: [B, T] or packed [N], any V of VOCABS, every option, a drawn response mask
    (with ``weights``, sometimes token weights from TOKEN_WEIGHTS instead of bools)."""
    packed = draw(st.booleans())
    shape = (draw(st.integers(1, 6)),) if packed else (draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    n = shape[0] if packed else shape[0] * shape[1]
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n))).view(shape)
    temperature = draw(st.sampled_from((1.0, 0.7, 1.3)))
    dtype = draw(st.sampled_from(tuple(TOL)))
    batch = make_batch(
        shape, draw(st.sampled_from(VOCABS)), dtype, temperature, seed=draw(st.integers(0, 2**16)), mask=mask
    )
    if weights and draw(st.booleans()):
        w = torch.tensor([draw(st.sampled_from(TOKEN_WEIGHTS)) for _ in range(n)]).view(shape)
        batch = dataclasses.replace(batch, response_mask=torch.where(mask, w, 0.0).to(DEVICE))
    modes = reference.AGG_MODES if not packed else ("token-mean", "token-sum")
    options = {
        "temperature": temperature,
        "clip_ratio_c": draw(st.sampled_from((3.0, None))),
        "clip_ratio_high": draw(st.sampled_from((0.2, 0.28))),
        "kl_coef": draw(st.sampled_from((0.0, 0.1))),
        "kl_type": draw(st.sampled_from((*reference.KL_TYPES, "low_var_kl+"))),
        "entropy_coef": draw(st.sampled_from((0.0, 0.01, -0.05))),
        "loss_agg_mode": draw(st.sampled_from(modes)),
        "ref_log_probs": batch.ref_log_probs,
    }
    return Problem(draw(st.sampled_from(BACKENDS)), dtype, batch, options)


def run_loss(problem: Problem, batch: Batch | None = None):
    """grpo_loss forward and backward: ``(output, logits.grad)``."""
    batch = problem.batch if batch is None else batch
    x = batch.logits.detach().clone().requires_grad_()
    options = dict(problem.options, ref_log_probs=batch.ref_log_probs)
    out = sfpo_kernels.grpo_loss(x, *batch.args()[1:], backend=problem.backend, **options)
    (grad,) = torch.autograd.grad(out.loss, [x])
    return out, grad


def poisoned(draw, batch: Batch) -> Batch:
    """``batch`` with every masked position overwritten: logits rows, labels, old/ref log-probs, advantages."""
    keep = batch.response_mask != 0
    vocab = batch.logits.shape[-1]
    logits, labels = batch.logits.clone(), batch.labels.clone()
    sides = {name: getattr(batch, name).clone() for name in ("old_log_probs", "advantages", "ref_log_probs")}
    for index in (~keep).nonzero().tolist():
        index = tuple(index)
        row = torch.tensor([draw(st.sampled_from(POISON)) for _ in range(min(vocab, 3))], dtype=logits.dtype)
        logits[index] = row.repeat(vocab)[:vocab].to(DEVICE)
        labels[index] = draw(st.sampled_from((-100, -1, 0, vocab, vocab + 1000)))
        for t in sides.values():
            t[index] = draw(st.sampled_from(POISON))
    return dataclasses.replace(batch, logits=logits, labels=labels, **sides)


# --------------------------------------------------------------------------- masked positions change nothing


@PROPERTY
@given(problem=problems(weights=True), data=st.data())
def test_masked_positions_never_change_loss_metrics_or_gradient(problem, data):
    clean, clean_grad = run_loss(problem)
    out, grad = run_loss(problem, poisoned(data.draw, problem.batch))
    assert_bit_equal("loss", out.loss.detach(), clean.loss.detach())
    for name in ALL_METRICS & set(clean.metrics):
        assert_bit_equal(f"metric {name}", out.metrics[name], clean.metrics[name])
    assert_bit_equal("logits.grad", grad, clean_grad)
    keep = problem.batch.response_mask != 0
    assert bool((grad[~keep] == 0).all()), "logits.grad of masked rows must be exactly 0"


@PROPERTY
@given(problem=problems(), data=st.data())
def test_logprob_entropy_masked_rows_never_change_the_rest(problem, data):
    """logprob_entropy(response_mask=...): masked rows (any logits, NaN upstream gradients) get zero gradient;
    the response rows' outputs and gradient are bit for bit those of the clean call."""
    batch, temperature = problem.batch, problem.options["temperature"]
    keep = batch.response_mask
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    g_logp, g_h = (torch.randn(keep.shape, generator=g).to(DEVICE) for _ in range(2))

    def run(logits, labels, g_logp, g_h):
        x = logits.detach().clone().requires_grad_()
        lp, h = sfpo_kernels.logprob_entropy(x, labels, temperature, response_mask=keep, backend=problem.backend)
        (grad,) = torch.autograd.grad([lp, h], [x], [g_logp, g_h])
        return lp.detach(), h.detach(), grad

    want_lp, want_h, want_grad = run(batch.logits, batch.labels, g_logp, g_h)
    dirty = poisoned(data.draw, batch)
    nan = torch.full_like(g_logp, float("nan"))
    lp, h, grad = run(dirty.logits, dirty.labels, torch.where(keep, g_logp, nan), torch.where(keep, g_h, nan))
    assert_bit_equal("log_probs of response rows", lp[keep], want_lp[keep])
    assert_bit_equal("entropy of response rows", h[keep], want_h[keep])
    assert_bit_equal("logits.grad", grad, want_grad)
    assert bool((grad[~keep] == 0).all()), "logits.grad of masked rows must be exactly 0"


# --------------------------------------------------------------------------- the float64 oracle


@PROPERTY
@given(problem=problems(weights=True))
def test_grpo_loss_equals_the_float64_oracle(problem):
    options = {k: v for k, v in problem.options.items() if k != "ref_log_probs"}
    want = verl_oracle(problem.batch, TOL[problem.dtype], **options)
    out, grad = run_loss(problem)
    check_output(f"{problem.backend} vs oracle:", out, grad, want, TOL[problem.dtype], problem.dtype)


@PROPERTY
@given(problem=problems(), data=st.data())
def test_logprob_entropy_equals_the_float64_oracle(problem, data):
    batch, temperature, dtype = problem.batch, problem.options["temperature"], problem.dtype
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    g_logp, g_h = (torch.randn(batch.labels.shape, generator=g).to(DEVICE) for _ in range(2))
    x = batch.logits.detach().clone().requires_grad_()
    lp, h = sfpo_kernels.logprob_entropy(x, batch.labels, temperature, backend=problem.backend)
    (grad,) = torch.autograd.grad([lp, h], [x], [g_logp, g_h])
    want = token_oracle(batch.logits, batch.labels, temperature, g_logp, g_h)
    check_close("log_probs", lp, want.log_probs, TOL[dtype].value * EPS32 * want.row_scale)
    check_close("entropy", h, want.entropy, TOL[dtype].value * EPS32 * want.row_scale)
    check_grad("logits.grad", grad, want, TOL[dtype], dtype)


# --------------------------------------------------------------------------- rejected calls


def _shape_plus_one(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)


# name -> (what to change: keyword -> f(problem) giving its bad value, the name the error must mention)
REJECTIONS = {
    "temperature": ({"temperature": lambda p: 0.0}, "temperature"),
    "clip_ratio_c": ({"clip_ratio_c": lambda p: 1.0}, "clip_ratio_c"),
    "clip_ratio_low": ({"clip_ratio_low": lambda p: float("nan")}, "clip_ratio_low"),
    "kl_type": ({"kl_type": lambda p: "k4"}, "kl_type"),
    "loss_agg_mode": ({"loss_agg_mode": lambda p: "seq-sum"}, "loss_agg_mode"),
    "kl_without_ref": ({"kl_coef": lambda p: 0.1, "ref_log_probs": lambda p: None}, "ref_log_probs"),
    "old_log_probs_shape": ({"old_log_probs": lambda p: _shape_plus_one(p.batch.old_log_probs)}, "old_log_probs"),
    "advantages_shape": ({"advantages": lambda p: _shape_plus_one(p.batch.advantages)}, "advantages"),
    "mask_shape": ({"response_mask": lambda p: _shape_plus_one(p.batch.response_mask)}, "response_mask"),
    "labels_float": ({"labels": lambda p: p.batch.labels.float()}, "labels"),
    "label_outside_vocab": ({"labels": lambda p: p.batch.labels.clamp_min(0) + p.batch.logits.shape[-1]}, "labels"),
    "backend": ({"backend": lambda p: "tritonx"}, "backend"),
}


@PROPERTY
@given(problem=problems(weights=True), rejection=st.sampled_from(sorted(REJECTIONS)), inplace=st.booleans())
def test_a_rejected_call_changes_nothing(problem, rejection, inplace):
    changes, name = REJECTIONS[rejection]
    batch = problem.batch
    if rejection == "label_outside_vocab" and not bool((batch.response_mask != 0).any()):
        batch = dataclasses.replace(batch, response_mask=torch.ones_like(batch.response_mask))  # a position to check
    x = batch.logits.detach().clone().requires_grad_()
    call = {
        "logits": x,
        "labels": batch.labels,
        "old_log_probs": batch.old_log_probs,
        "advantages": batch.advantages,
        "response_mask": batch.response_mask,
        "backend": problem.backend,
        "inplace_backward": inplace,
        **problem.options,
    }
    call.update({key: bad(dataclasses.replace(problem, batch=batch)) for key, bad in changes.items()})
    inputs = {k: v for k, v in call.items() if isinstance(v, torch.Tensor)}
    before = {k: v.detach().clone() for k, v in inputs.items()}
    args = [call.pop(k) for k in ("logits", "labels", "old_log_probs", "advantages", "response_mask")]
    with pytest.raises(ValueError, match=name):
        sfpo_kernels.grpo_loss(*args, **call)
    for key, t in inputs.items():
        if t.element_size() == 1:  # bool masks
            assert torch.equal(t, before[key]), f"{key} after the rejected call"
        else:
            assert_bit_equal(f"{key} after the rejected call", t.detach(), before[key])
    assert x.grad is None, "a rejected call must leave no gradient"
