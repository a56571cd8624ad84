"""logprob_entropy: the fused Triton pass against a float64 oracle written here, independent of the package.

The oracle takes the logits exactly as stored (bf16/fp16 upcast is exact), works
in float64, and differentiates with the analytic formula of docs/conventions.md

    dz = (g_logp * (onehot(y) - p) + g_H * p * (mu - z)) / temperature,

itself checked against float64 autograd below. Without a GPU the kernels run in
Triton's interpreter, so shapes stay tiny; INTERPRETER_BLOCK_V is 64, so V = 7,
64, 65, 200 cover a partial block only, exactly one full block, one full block
plus a 1-wide tail, and several blocks plus a tail.

Tolerances (the table TOL below; eps = 2^-23, the fp32 unit roundoff, since the
kernel computes in fp32 whatever the logits' dtype):

- log-prob and entropy: ``|got - exact| <= value * eps * S`` with the row scale
  ``S = 1 + max|z| + log V``. Dividing by the temperature rounds each z by
  eps |z|; lse = m + log(sum e^(z - m)) and mu add a few roundings of
  magnitude |z| and log V (the sums run over <= 4 blocks of tree-reduced
  terms). The bound is the same for every logits dtype: low-precision logits
  enter the fp32 arithmetic exactly.
- logits.grad, per element: ``|got - exact| <= rounding * ulp_dtype(exact) +
  grad * eps * S * G (+ 2^-126 * G' where p < 2^-126)`` with
  ``G = (|g_logp| (p + onehot) + |g_H| p (|mu - z| + 1)) / temperature``, the size
  of the terms that make up the element (so an element whose p is tiny gets a
  tiny tolerance). The first term is the one rounding of the fp32 result to the
  logits' dtype: round to nearest, so half an ulp (a truncating cast, up to a
  whole ulp, fails); the fp32 term covers a value that lands across a midpoint.
  p = exp(z - lse) carries lse's relative error eps * S, hence the factor S. The
  last term lets a p below fp32's smallest normal flush to zero (GPU exp does);
  ``G'`` is G with p replaced by 1.

A missing ``/ temperature``, a swapped sign of either term or a log-prob off by
one block's contribution misses these by orders of magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import sfpo_kernels
from sfpo_kernels import fused_loss
from tests.helpers.bits import assert_bit_equal, ulp
from tests.helpers.devices import kernel_devices
from tests.helpers.oracles import FP32_TINY, Oracle, token_oracle

DEVICE = kernel_devices()[0]
# The interpreter evaluates masked-off lanes too, and numpy warns about what they compute and the kernel
# discards: 0 * -inf in the forward's tail block, exp(0 - lse) for lse ~ -1e4 in the backward's.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]
EPS32 = 2.0**-23


@dataclass(frozen=True)
class Tol:
    value: float  # log-prob, entropy: multiples of eps * S
    grad: float  # logits.grad, fp32 arithmetic: multiples of eps * S * G
    rounding: float  # logits.grad, final rounding: multiples of ulp_dtype(exact)


TOL = {
    # fp32 logits: every step in fp32. Measured worst cases over this file's inputs (interpreter): values
    # 1.0, fp32 arithmetic in grads < 1 (in the units above); 8 leaves room for the GPU's exp/log
    # approximations (a few ulp) without hiding a wrong term, which costs ~1/eps = 8e6 of these units.
    torch.float32: Tol(value=8.0, grad=8.0, rounding=0.5),
    # bf16 logits: the same fp32 arithmetic on exactly upcast inputs, hence the same value/grad bounds;
    # dlogits is rounded to bf16 (8 significant bits) to nearest even: half an ulp.
    torch.bfloat16: Tol(value=8.0, grad=8.0, rounding=0.5),
    # fp16 logits: as bf16, with fp16's ulp (11 significant bits; below 2^-14 the subnormal spacing
    # 2^-24, which ulp() gives by flooring at the smallest normal, so underflowing gradients are covered).
    torch.float16: Tol(value=8.0, grad=8.0, rounding=0.5),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCABS = [1, 7, 64, 65, 200]


# --------------------------------------------------------------------------- oracle


def assert_values_close(name: str, got: torch.Tensor, exact: torch.Tensor, row_scale: torch.Tensor, dtype) -> None:
    assert got.dtype == torch.float32 and got.shape == exact.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    err = (got.double() - exact).abs()
    tol = TOL[dtype].value * EPS32 * row_scale
    bad = ~(err <= tol)
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} of {got.numel()} off; worst at {bad.nonzero()[0].tolist()}: "
        f"got {got[bad][0].item()!r}, exact {exact[bad][0].item()!r}, tol {tol[bad][0].item():.3g}"
    )


def assert_grad_close(name: str, got: torch.Tensor, want: Oracle, dtype, index=...) -> None:
    exact = want.grad[index]
    assert got.dtype == dtype and got.shape == exact.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    err = (got.double() - exact).abs()
    tol = TOL[dtype].rounding * ulp(exact.to(dtype)) + TOL[dtype].grad * EPS32 * want.grad_scale[index]
    tol = tol + FP32_TINY * want.flush_scale[index]
    bad = ~(err <= tol)
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} of {got.numel()} off; worst at {bad.nonzero()[0].tolist()}: "
        f"got {got[bad][0].item()!r}, exact {exact[bad][0].item()!r}, tol {tol[bad][0].item():.3g}"
    )


# --------------------------------------------------------------------------- inputs


def make_logits(shape, vocab, dtype, seed=0, scale=3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)
    return x.to(device=DEVICE, dtype=dtype)


def make_labels(shape, vocab, seed=0, padding=True) -> torch.Tensor:
    """Random labels in [0, V); with ``padding``, the first is -100 and (if there are 3+) the last is V."""
    g = torch.Generator().manual_seed(seed + 1000)
    labels = torch.randint(0, vocab, shape, generator=g)
    flat = labels.view(-1)
    if padding and flat.numel() >= 2:
        flat[0] = -100
        if flat.numel() >= 3:
            flat[-1] = vocab  # one past the end: also outside [0, V)
    return labels.to(DEVICE)


def upstream(shape, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 2000)
    return (torch.randn(shape, generator=g).to(DEVICE), torch.randn(shape, generator=g).to(DEVICE))


def run(logits, labels, temperature, g_logp, g_h, backend="triton", **kwargs):
    """Forward and backward of ``backend``: ``(log_probs, entropy, logits.grad)``; None upstream = output unused."""
    x = logits.detach().clone().requires_grad_()
    log_probs, entropy = sfpo_kernels.logprob_entropy(x, labels, temperature, backend=backend, **kwargs)
    outputs = [o for o, g in ((log_probs, g_logp), (entropy, g_h)) if g is not None]
    grads = [g for g in (g_logp, g_h) if g is not None]
    (grad,) = torch.autograd.grad(outputs, [x], grads)
    return log_probs.detach(), entropy.detach(), grad


def check_against_oracle(logits, labels, temperature, g_logp, g_h, dtype, **kwargs) -> None:
    log_probs, entropy, grad = run(logits, labels, temperature, g_logp, g_h, **kwargs)
    want = token_oracle(logits, labels, temperature, g_logp, g_h)
    assert_values_close("log_probs", log_probs, want.log_probs, want.row_scale, dtype)
    assert_values_close("entropy", entropy, want.entropy, want.row_scale, dtype)
    assert_grad_close("logits.grad", grad, want, dtype)


# --------------------------------------------------------------------------- tests


def test_oracle_gradient_formula_matches_float64_autograd():
    """The analytic dz of the oracle is the derivative of its own log-prob and entropy."""
    logits = make_logits((4, 5), 65, torch.float64, seed=11)
    logits[0, 1, 3] = float("-inf")  # a masked vocabulary entry
    labels = make_labels((4, 5), 65, seed=11)
    g_logp, g_h = upstream((4, 5), seed=11)
    for temperature in (1.0, 0.7):
        x = logits.clone().requires_grad_()
        z = x / temperature
        log_softmax = torch.log_softmax(z, dim=-1)
        valid = (labels >= 0) & (labels < 65)
        lp = torch.where(valid, log_softmax.gather(-1, labels.clamp(0, 64).unsqueeze(-1)).squeeze(-1), 0.0)
        h = -(log_softmax.exp() * torch.where(log_softmax.isfinite(), log_softmax, 0.0)).sum(-1)
        (want,) = torch.autograd.grad([lp, h], [x], [g_logp.double(), g_h.double()])
        got = token_oracle(logits, labels, temperature, g_logp, g_h)
        torch.testing.assert_close(got.log_probs, lp.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.entropy, h.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.grad, want, rtol=1e-10, atol=1e-13)


LAYOUT_TEMPERATURES = [
    pytest.param("BTV", 1.0, id="BTV-t1.0"),
    pytest.param("NV", 0.7, id="NV-t0.7"),
    pytest.param("BTV", 1.3, id="BTV-t1.3"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS, ids=lambda v: f"V{v}")
@pytest.mark.parametrize("layout,temperature", LAYOUT_TEMPERATURES)
def test_matches_float64_oracle(dtype, vocab, layout, temperature):
    shape = (3, 4) if layout == "BTV" else (11,)
    logits = make_logits(shape, vocab, dtype, seed=vocab)
    labels = make_labels(shape, vocab, seed=vocab)
    g_logp, g_h = upstream(shape, seed=vocab)
    log_probs, entropy, grad = run(logits, labels, temperature, g_logp, g_h)
    assert log_probs.shape == labels.shape and entropy.shape == labels.shape
    want = token_oracle(logits, labels, temperature, g_logp, g_h)
    assert_values_close("log_probs", log_probs, want.log_probs, want.row_scale, dtype)
    assert_values_close("entropy", entropy, want.entropy, want.row_scale, dtype)
    assert_grad_close("logits.grad", grad, want, dtype)
    flat = log_probs.view(-1)
    assert flat[0].item() == 0.0, "label -100: log-prob must be exactly 0"
    assert flat[-1].item() == 0.0, "label V: log-prob must be exactly 0"
    if vocab == 1:  # one token: certain, log-prob 0 and entropy 0 (up to rounding), no gradient at all
        assert bool((grad == 0).all()), "V = 1: logits.grad must be 0"


SMALL_SHAPES = [
    pytest.param((1,), id="N1"),
    pytest.param((3, 1), id="B3-T1"),
    pytest.param((1, 5), id="B1-T5"),
    pytest.param((1, 1), id="B1-T1"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SMALL_SHAPES)
def test_single_row_and_single_step(dtype, shape):
    logits = make_logits(shape, 65, dtype, seed=5)
    labels = make_labels(shape, 65, seed=5, padding=False)
    check_against_oracle(logits, labels, 0.7, *upstream(shape, seed=5), dtype)


def test_empty_batch():
    for shape in ((0,), (2, 0)):
        logits = make_logits(shape, 7, torch.float32)
        labels = torch.zeros(shape, dtype=torch.int64, device=DEVICE)
        log_probs, entropy, grad = run(logits, labels, 1.0, *upstream(shape))
        assert log_probs.shape == shape and entropy.shape == shape and grad.shape == logits.shape


STRIDED_VIEWS = [
    pytest.param("slice", id="slice-of-longer-T"),
    pytest.param("transpose", id="transposed-batch"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [64, 65], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("view", STRIDED_VIEWS)
def test_strided_batch_dims_equal_contiguous_copy(dtype, vocab, view):
    """Only the row addresses differ, so values and grads must match the contiguous copy bit for bit."""
    b, t = 3, 4
    if view == "slice":  # logits[:, 1:-1] of a longer sequence, as a causal LM's logits[:, :-1] is
        big = make_logits((b, t + 2), vocab, dtype, seed=3)
        strided = lambda base: base[:, 1:-1, :]  # noqa: E731
    else:  # [T, B, V] storage seen as [B, T, V]
        big = make_logits((t, b), vocab, dtype, seed=3)
        strided = lambda base: base.transpose(0, 1)  # noqa: E731
    assert not strided(big).is_contiguous()
    labels = make_labels((b, t), vocab, seed=3)
    g_logp, g_h = upstream((b, t), seed=3)

    leaf = big.detach().clone().requires_grad_()
    log_probs, entropy = sfpo_kernels.logprob_entropy(strided(leaf), labels, 0.7, backend="triton")
    torch.autograd.backward([log_probs, entropy], [g_logp, g_h])

    contiguous = strided(big).contiguous()
    want_lp, want_h, want_grad = run(contiguous, labels, 0.7, g_logp, g_h)
    assert_bit_equal("log_probs", log_probs.detach(), want_lp)
    assert_bit_equal("entropy", entropy.detach(), want_h)
    assert_bit_equal("logits.grad", strided(leaf.grad).contiguous(), want_grad)
    outside = leaf.grad.clone()
    strided(outside).zero_()
    assert bool((outside == 0).all()), "logits.grad: rows outside the view must get no gradient"
    want = token_oracle(contiguous, labels, 0.7, g_logp, g_h)
    assert_values_close("log_probs", want_lp, want.log_probs, want.row_scale, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padding_labels_give_zero_log_prob_and_no_gradient_through_it(dtype):
    shape, vocab = (2, 5), 65
    logits = make_logits(shape, vocab, dtype, seed=7)
    labels = make_labels(shape, vocab, seed=7, padding=False)
    padded = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
    padded[0, 1] = padded[1, 4] = padded[1, 0] = True
    labels[0, 1], labels[1, 4], labels[1, 0] = -100, vocab, -1
    g_logp, g_h = upstream(shape, seed=7)
    log_probs, entropy, grad = run(logits, labels, 1.3, g_logp, g_h)
    assert bool((log_probs[padded] == 0).all()), f"log_probs at padding labels: {log_probs[padded].tolist()}"
    # A different upstream gradient at the padded positions' log-probs changes nothing.
    g_other = torch.where(padded, 100.0 * g_logp + 3.0, g_logp)
    _, _, grad_other = run(logits, labels, 1.3, g_other, g_h)
    assert_bit_equal("logits.grad with other g_logp at padding", grad_other, grad)
    want = token_oracle(logits, labels, 1.3, g_logp, g_h)
    assert_values_close("entropy", entropy, want.entropy, want.row_scale, dtype)
    assert_grad_close("logits.grad", grad, want, dtype)


LARGE = [
    pytest.param(100.0, 0.0, id="z~100"),
    pytest.param(3.0, 1e4, id="offset-1e4"),
    pytest.param(3.0, -1e4, id="offset-minus-1e4"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("scale,offset", LARGE)
def test_large_logits_do_not_overflow(dtype, temperature, scale, offset):
    shape, vocab = (2, 3), 200
    logits = make_logits(shape, vocab, torch.float64, seed=9, scale=scale)
    logits[1] += offset  # whole rows shifted: the softmax is the same up to the rounding of the inputs
    logits = logits.to(dtype)
    labels = make_labels(shape, vocab, seed=9, padding=False)
    log_probs, entropy, grad = run(logits, labels, temperature, *upstream(shape, seed=9))
    for name, t in (("log_probs", log_probs), ("entropy", entropy), ("logits.grad", grad)):
        assert bool(t.isfinite().all()), f"{name} not finite"
    check_against_oracle(logits, labels, temperature, *upstream(shape, seed=9), dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_with_minus_inf_logits(backend, dtype):
    """Masked vocabulary entries (-inf): p = 0 there, no NaN, and the rest of the row is unaffected."""
    shape, vocab = (2, 3), 65
    logits = make_logits(shape, vocab, dtype, seed=13)
    labels = make_labels(shape, vocab, seed=13, padding=False)
    logits[0, 0, 10:50] = float("-inf")  # a whole block's worth in the middle
    logits[0, 1, :64] = float("-inf")  # the full first block; only the 1-wide tail is finite
    logits[1, 2, ::2] = float("-inf")
    labels[0, 0], labels[0, 1], labels[1, 2] = 5, 64, 1
    labels[1, 1] = 0
    logits[1, 1, 0] = float("-inf")  # the label itself masked: log-prob -inf
    g_logp, g_h = upstream(shape, seed=13)
    x = logits.clone().requires_grad_()
    log_probs, entropy = sfpo_kernels.logprob_entropy(x, labels, 0.7, backend=backend)
    (grad,) = torch.autograd.grad([log_probs, entropy], [x], [g_logp, g_h])
    want = token_oracle(logits, labels, 0.7, g_logp, g_h)
    assert log_probs[1, 1].item() == float("-inf"), f"log_probs at a -inf label: {log_probs[1, 1].item()}"
    finite = torch.ones(shape, dtype=torch.bool, device=DEVICE)
    finite[1, 1] = False
    assert_values_close("log_probs", log_probs.detach()[finite], want.log_probs[finite], want.row_scale[finite], dtype)
    assert_values_close("entropy", entropy.detach(), want.entropy, want.row_scale, dtype)
    assert_grad_close("logits.grad", grad, want, dtype)
    masked = logits == float("-inf")
    masked[1, 1, 0] = False  # the -inf label's own entry gets g_logp * (1 - 0)
    assert bool((grad[masked] == 0).all()), "logits.grad at -inf entries (p = 0) must be 0"
    assert entropy[0, 1].abs().item() <= TOL[dtype].value * EPS32 * want.row_scale[0, 1].item()  # one token left


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # the all -inf row
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nonfinite_logits_poison_only_their_row(dtype):
    shape, vocab = (2, 4), 65
    logits = make_logits(shape, vocab, dtype, seed=17)
    labels = make_labels(shape, vocab, seed=17, padding=False)
    poisoned = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
    logits[0, 1, 3] = float("nan")
    logits[1, 0, 64] = float("inf")  # in the tail block
    logits[1, 3, :] = float("-inf")  # nothing finite in the row
    poisoned[0, 1] = poisoned[1, 0] = poisoned[1, 3] = True
    g_logp, g_h = upstream(shape, seed=17)
    log_probs, entropy, grad = run(logits, labels, 1.0, g_logp, g_h)
    assert not bool(log_probs[poisoned].isfinite().any()), f"log_probs of poisoned rows: {log_probs[poisoned]}"
    assert not bool(entropy[poisoned].isfinite().any()), f"entropy of poisoned rows: {entropy[poisoned]}"
    clean = ~poisoned
    want = token_oracle(logits, labels, 1.0, g_logp, g_h)
    assert_values_close("log_probs", log_probs[clean], want.log_probs[clean], want.row_scale[clean], dtype)
    assert_values_close("entropy", entropy[clean], want.entropy[clean], want.row_scale[clean], dtype)
    assert_grad_close("logits.grad", grad[clean], want, dtype, clean)


ONE_OUTPUT = [
    pytest.param("log_probs", id="only-log_probs"),
    pytest.param("entropy", id="only-entropy"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("used", ONE_OUTPUT)
def test_gradient_through_one_output(dtype, used):
    shape, vocab = (2, 3), 65
    logits = make_logits(shape, vocab, dtype, seed=19)
    labels = make_labels(shape, vocab, seed=19)
    g_logp, g_h = upstream(shape, seed=19)
    if used == "log_probs":
        g_h = None
    else:
        g_logp = None
    check_against_oracle(logits, labels, 0.7, g_logp, g_h, dtype)


HAS_GRADS = [
    pytest.param(True, True, id="logp-and-H"),
    pytest.param(True, False, id="logp-only"),
    pytest.param(False, True, id="H-only"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("has_logp,has_h", HAS_GRADS)
def test_backward_kernel_variants(dtype, has_logp, has_h):
    """The HAS_GRAD_LOGP / HAS_GRAD_H specialisations, called through the host backward with None grads."""
    shape, vocab = (3, 2), 200
    temperature = 1.3
    logits = make_logits(shape, vocab, dtype, seed=23)
    labels = make_labels(shape, vocab, seed=23)
    g_logp, g_h = upstream(shape, seed=23)
    g_logp, g_h = (g_logp if has_logp else None), (g_h if has_h else None)
    labels_flat = fused_loss.flat_labels(labels)
    flat = fused_loss.logprob_entropy_fwd(logits, labels_flat, temperature)
    log_probs, entropy, lse, mu = (x.view(shape) for x in flat)  # the host functions work on [rows]
    grad = fused_loss.logprob_entropy_bwd(
        logits, labels_flat, g_logp, g_h, flat[2], flat[3], temperature, inplace=False
    )
    want = token_oracle(logits, labels, temperature, g_logp, g_h)
    assert_values_close("log_probs", log_probs, want.log_probs, want.row_scale, dtype)
    assert_values_close("entropy", entropy, want.entropy, want.row_scale, dtype)
    z = logits.double() / temperature
    assert_values_close("lse", lse, torch.logsumexp(z, -1), want.row_scale, dtype)
    assert_values_close("mu", mu, (torch.softmax(z, -1) * z).sum(-1), want.row_scale, dtype)
    assert_grad_close("dlogits", grad, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("view", [pytest.param("contiguous", id="contiguous"), *STRIDED_VIEWS[:1]])
def test_inplace_backward_writes_the_same_gradient_into_the_logits(dtype, view):
    b, t, vocab = 2, 3, 65
    if view == "contiguous":
        big = make_logits((b, t), vocab, dtype, seed=29)
        pick = lambda base: base  # noqa: E731
    else:  # logits[:, 1:-1]: the gradient goes into the view, the storage around it stays as it was
        big = make_logits((b, t + 2), vocab, dtype, seed=29)
        pick = lambda base: base[:, 1:-1, :]  # noqa: E731
    labels = make_labels((b, t), vocab, seed=29)
    g_logp, g_h = upstream((b, t), seed=29)
    _, _, want = run(pick(big), labels, 0.7, g_logp, g_h)

    storage = big.clone()
    x = pick(storage).requires_grad_()
    log_probs, entropy = sfpo_kernels.logprob_entropy(x, labels, 0.7, backend="triton", inplace_backward=True)
    (grad,) = torch.autograd.grad([log_probs, entropy], [x], [g_logp, g_h])
    assert grad.data_ptr() == x.data_ptr(), "inplace_backward: the gradient must live in the logits' memory"
    assert_bit_equal("logits.grad (inplace)", grad.contiguous(), want)
    assert_bit_equal("logits after backward", pick(storage).detach().contiguous(), want)
    rest = storage.detach().clone()
    pick(rest).copy_(pick(big))
    assert_bit_equal("storage outside the logits", rest, big)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [7, 200], ids=lambda v: f"V{v}")
def test_each_backend_matches_float64_oracle(backend, dtype, vocab):
    """Both backends against the independent oracle, values and logits.grad, with this file's tolerances.

    (``backend="torch"`` runs :func:`sfpo_kernels.reference.logprob_entropy`: comparing it with the
    reference would compare a function with itself.)
    """
    shape = (2, 3)
    logits = make_logits(shape, vocab, dtype, seed=31)
    labels = make_labels(shape, vocab, seed=31)
    check_against_oracle(logits, labels, 0.7, *upstream(shape, seed=31), dtype, backend=backend)


LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES, ids=str)
def test_every_integer_label_dtype_gives_the_int64_result(backend, label_dtype):
    """One behaviour for every integer dtype and both backends (torch's gather once rejected uint8/int16)."""
    shape, vocab = (2, 3), 65
    logits = make_logits(shape, vocab, torch.float32, seed=37)
    labels = make_labels(shape, vocab, seed=37, padding=False)
    g_logp, g_h = upstream(shape, seed=37)
    want = run(logits, labels, 0.7, g_logp, g_h, backend=backend)
    got = run(logits, labels.to(label_dtype), 0.7, g_logp, g_h, backend=backend)
    for name, a, b in zip(("log_probs", "entropy", "logits.grad"), got, want, strict=True):
        assert_bit_equal(f"{name} ({label_dtype} labels)", a, b)


ROW_POISON = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the forward still reads the rows
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("poison", ROW_POISON, ids=str)
def test_response_mask_rows_get_exact_zero_gradient_whatever_they_hold(backend, poison):
    """Rows with response_mask 0 holding NaN/inf logits and NaN upstream gradients: their dlogits exact zeros,
    every other row's outputs and gradient bit for bit those of the same call without a mask."""
    shape, vocab = (2, 4), 65
    logits = make_logits(shape, vocab, torch.float32, seed=39)
    labels = make_labels(shape, vocab, seed=39, padding=False)
    keep = torch.tensor([[True, False, True, True], [False, True, True, False]], device=DEVICE)
    g_logp, g_h = upstream(shape, seed=39)
    want_lp, want_h, want_grad = run(logits, labels, 0.7, g_logp, g_h, backend=backend)
    poisoned = torch.where(keep.unsqueeze(-1), logits, poison)
    nan = torch.full_like(g_logp, float("nan"))
    lp, h, grad = run(
        poisoned,
        labels,
        0.7,
        torch.where(keep, g_logp, nan),
        torch.where(keep, g_h, nan),
        backend=backend,
        response_mask=keep,
    )
    assert bool((grad[~keep] == 0).all()), f"logits.grad of masked rows: {grad[~keep]}"
    assert_bit_equal("logits.grad of response rows", grad[keep], want_grad[keep])
    assert_bit_equal("log_probs of response rows", lp[keep], want_lp[keep])
    assert_bit_equal("entropy of response rows", h[keep], want_h[keep])


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("used", [pytest.param("both", id="both"), *ONE_OUTPUT])
def test_rows_without_upstream_gradient_get_zeros_from_the_triton_backward(used):
    """g_logp = g_H = 0 for a row: dlogits = 0 without the row being read (a NaN row gave 0 * NaN = NaN)."""
    shape, vocab = (2, 3), 65
    logits = make_logits(shape, vocab, torch.float32, seed=43)
    labels = make_labels(shape, vocab, seed=43, padding=False)
    g_logp, g_h = upstream(shape, seed=43)
    g_logp, g_h = (None if used == "entropy" else g_logp), (None if used == "log_probs" else g_h)
    _, _, want = run(logits, labels, 1.0, g_logp, g_h)
    logits[0, 1] = float("nan")
    for g in (g_logp, g_h):
        if g is not None:
            g[0, 1] = 0.0
    _, _, grad = run(logits, labels, 1.0, g_logp, g_h)
    assert bool((grad[0, 1] == 0).all()), f"logits.grad of the row without gradient: {grad[0, 1]}"
    others = torch.ones(shape, dtype=torch.bool, device=DEVICE)
    others[0, 1] = False
    assert_bit_equal("logits.grad of the other rows", grad[others], want[others])


def _logits(shape=(2, 3), vocab=7, dtype=torch.float32):
    return torch.zeros(*shape, vocab, dtype=dtype, device=DEVICE)


def _labels(shape=(2, 3), dtype=torch.int64):
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


INVALID = [
    pytest.param(lambda: (torch.zeros(7, device=DEVICE), _labels(())), {}, "logits", id="logits-1d"),
    pytest.param(lambda: (torch.zeros(2, 2, 3, 7, device=DEVICE), _labels((2, 2, 3))), {}, "logits", id="logits-4d"),
    pytest.param(lambda: ([[0.0, 1.0]], _labels((1,))), {}, "logits", id="logits-not-a-tensor"),
    pytest.param(lambda: (_logits(dtype=torch.float64), _labels()), {}, "logits", id="logits-fp64"),
    pytest.param(lambda: (_logits(dtype=torch.int32), _labels()), {}, "logits", id="logits-int"),
    pytest.param(lambda: (_logits(vocab=0), _labels()), {}, "logits", id="empty-vocab"),
    pytest.param(lambda: (_logits(vocab=14)[..., ::2], _labels()), {}, "logits", id="vocab-stride-2"),
    pytest.param(
        lambda: (_logits((3, 2)).transpose(1, 2).transpose(0, 1), _labels((7, 3))),
        {},
        "logits",
        id="vocab-not-last-contiguous",
    ),
    pytest.param(lambda: (_logits(), _labels((2, 4))), {}, "labels", id="labels-shape"),
    pytest.param(lambda: (_logits(), _labels((6,))), {}, "labels", id="labels-flattened"),
    pytest.param(lambda: (_logits(), _labels(dtype=torch.float32)), {}, "labels", id="labels-float"),
    pytest.param(lambda: (_logits(), _labels(dtype=torch.bool)), {}, "labels", id="labels-bool"),
    pytest.param(lambda: (_logits(), [[0, 1, 2], [0, 1, 2]]), {}, "labels", id="labels-not-a-tensor"),
    pytest.param(
        lambda: (_logits(), _labels()),
        {"response_mask": _labels((2, 4)).bool()},
        "response_mask",
        id="response_mask-shape",
    ),
    pytest.param(
        lambda: (_logits(), _labels()),
        {"response_mask": [[1, 1, 1]] * 2},
        "response_mask",
        id="response_mask-not-a-tensor",
    ),
    pytest.param(lambda: (_logits(), _labels()), {"temperature": 0.0}, "temperature", id="temperature-0"),
    pytest.param(lambda: (_logits(), _labels()), {"temperature": -1.0}, "temperature", id="temperature-negative"),
    pytest.param(lambda: (_logits(), _labels()), {"temperature": float("nan")}, "temperature", id="temperature-nan"),
    pytest.param(lambda: (_logits(), _labels()), {"temperature": float("inf")}, "temperature", id="temperature-inf"),
    pytest.param(lambda: (_logits(), _labels()), {"temperature": True}, "temperature", id="temperature-bool"),
    pytest.param(lambda: (_logits(), _labels()), {"temperature": "1.0"}, "temperature", id="temperature-str"),
    pytest.param(lambda: (_logits(), _labels()), {"backend": "cuda-graphs"}, "backend", id="backend-unknown"),
    pytest.param(lambda: (_logits(), _labels()), {"backend": 3}, "backend", id="backend-not-a-string"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("make,kwargs,names", INVALID)
def test_invalid_arguments_raise_value_error_naming_them(backend, make, kwargs, names):
    logits, labels = make()
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(ValueError, match=names):
        sfpo_kernels.logprob_entropy(logits, labels, **kwargs)


def test_largest_vocabulary():
    """V = 262144 (the issue's upper bound), labels at both ends, large logits: streamed correctly."""
    vocab = 262144
    g = torch.Generator().manual_seed(77)
    logits = (torch.randn(2, vocab, generator=g, dtype=torch.float64) * 5 + 50).float().requires_grad_(True)
    labels = torch.tensor([0, vocab - 1])
    log_probs, entropy = sfpo_kernels.logprob_entropy(logits, labels, backend="triton")
    (log_probs.sum() + entropy.sum()).backward()
    exact = logits.detach().double().requires_grad_(True)
    want_lp, want_h = sfpo_kernels.reference.logprob_entropy(exact, labels)
    (want_lp.sum() + want_h.sum()).backward()
    # fp32 over 262144 terms of |z| ~ 75: z - lse carries ~|z| * 2^-24 ~ 5e-6 absolute error, so
    # log-prob / entropy within 1e-4 absolute, p = exp(z - lse) within 2e-5 relative; gradient entries
    # where p (1 + mu - z) nearly cancels keep that error in absolute terms (1e-8 of a max of ~1).
    torch.testing.assert_close(log_probs.double(), want_lp, atol=1e-4, rtol=0)
    torch.testing.assert_close(entropy.double(), want_h, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits.grad.double(), exact.grad, atol=1e-8, rtol=2e-5)
