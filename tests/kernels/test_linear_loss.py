"""linear_grpo_loss / linear_logprob_entropy: the LM head fused in, against a float64 oracle on exact logits.

The oracle (``helpers.linear_oracle``) forms ``hidden @ weight.T + bias`` in
float64 and runs ``helpers.oracles.verl_oracle`` (written from verl 0.9.1) on
it; the input gradients follow by the chain rule in float64. Its docstring
derives every tolerance. Both paths run: ``backend="torch"`` (the CPU default)
and ``backend="triton"`` (the Triton vocab kernels, under the interpreter on
CPU). Memory: a dispatch mode and saved-tensor hooks show that no tensor of
more than one chunk of logits exists, forward or backward.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import sfpo_kernels
from sfpo_kernels import linear_loss, reference
from sfpo_kernels.linear_loss import CHUNK_BUDGET_BYTES, default_chunk_size
from tests.helpers.alloc_probe import LargestAllocation
from tests.helpers.bits import assert_bit_equal, ulp
from tests.helpers.devices import kernel_devices
from tests.helpers.linear_oracle import (
    check_grads,
    input_grads,
    linear_oracle,
    make_linear_batch,
    unit,
)
from tests.helpers.oracles import (
    EPS32,
    FRACTION_METRICS,
    Tol,
    check_close,
    check_metrics,
    token_oracle,
)

DEVICE = kernel_devices()[0]
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

TOL = {
    # Measured worst cases over this file's inputs: at most 0.24 of each bound (fp32 entropy; bf16 at most 0.14).
    # fp32: test_grpo_loss's bounds (the logits now come from an fp32 matmul, an error of H eps |h||w|,
    # inside the same 8 eps S).
    torch.float32: Tol(value=8.0, agg=8.0, grad=8.0, rounding=0.5),
    # bf16: each logit is rounded once to bf16, |dz| <= u |z| <= u S with u = 2^-8 = 2^15 eps; log p = z_y - lse
    # moves by at most twice that, and so does dlogits per unit of S G; rounding: dz is stored in bf16.
    torch.bfloat16: Tol(
        value=2.0 * unit(torch.bfloat16) + 8.0, agg=8.0, grad=2.0 * unit(torch.bfloat16) + 8.0, rounding=0.5
    ),
}
TOL[torch.float16] = Tol(
    value=2.0 * unit(torch.float16) + 8.0, agg=8.0, grad=2.0 * unit(torch.float16) + 8.0, rounding=0.5
)  # the same argument with u = 2^-11
DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = ["torch", "triton"]

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
FULL = dict(BASE, temperature=0.7, kl_coef=0.1, entropy_coef=0.01)

# (settings, shape, hidden size, vocab, bias, chunk size): chunk sizes that do not divide the response count,
# a chunk of one row, the default rule, and one chunk larger than everything.
CASES = [
    *(pytest.param(dict(FULL, loss_agg_mode=m), (3, 5), 8, 70, True, 4, id=f"agg-{m}") for m in reference.AGG_MODES),
    *(
        pytest.param(dict(BASE, kl_coef=0.1, kl_type=k), (3, 4), 8, 70, False, 3, id=f"kl-{k}")
        for k in ("kl", "abs", "mse", "low_var_kl", "low_var_kl+")
    ),
    pytest.param(dict(BASE, clip_ratio_c=None, clip_ratio_high=0.28), (3, 5), 8, 70, True, 5, id="clip-c-off-high"),
    pytest.param(dict(FULL), (30,), 16, 130, False, 7, id="packed"),
    pytest.param(dict(FULL, loss_agg_mode="token-sum"), (11,), 8, 70, True, None, id="packed-default-chunk"),
    pytest.param(dict(FULL), (1,), 8, 70, True, 1, id="N1"),
    pytest.param(dict(FULL, loss_agg_mode="seq-mean-token-mean"), (2, 3), 8, 70, True, 64, id="one-big-chunk"),
    pytest.param(dict(BASE, temperature=1.3, entropy_coef=-0.05), (2, 4), 8, 70, False, 1, id="chunk-1-temp-1.3"),
]


def run(batch, backend, chunk_size, **settings):
    """linear_grpo_loss with backward: ``(output, {name: grad})``."""
    h = batch.hidden.detach().clone().to(DEVICE).requires_grad_()
    w = batch.weight.detach().clone().to(DEVICE).requires_grad_()
    b = None if batch.bias is None else batch.bias.detach().clone().to(DEVICE).requires_grad_()
    args = [t.to(DEVICE) for t in batch.loss_args()]
    out = sfpo_kernels.linear_grpo_loss(
        h,
        w,
        *args,
        bias=b,
        chunk_size=chunk_size,
        backend=backend,
        ref_log_probs=batch.ref_log_probs.to(DEVICE),
        **settings,
    )
    inputs = {"hidden.grad": h, "weight.grad": w, **({} if b is None else {"bias.grad": b})}
    grads = torch.autograd.grad(out.loss, list(inputs.values()))
    out = out._replace(
        loss=out.loss.cpu(),
        log_probs=out.log_probs.cpu(),
        entropy=out.entropy.cpu(),
        metrics={k: v.cpu() for k, v in out.metrics.items()},
    )
    return out, {k: g.cpu() for k, g in zip(inputs, grads)}


def on_device(batch):
    """The batch's tensors on DEVICE (the oracle stays on the CPU)."""
    return dataclasses.replace(
        batch,
        **{
            f.name: None if getattr(batch, f.name) is None else getattr(batch, f.name).to(DEVICE)
            for f in dataclasses.fields(batch)
        },
    )


def check_against(label, out, grads, want, dtype, batch):
    loss, log_probs, entropy, metrics = out
    assert loss.dim() == 0 and loss.dtype == torch.float32, f"{label} loss: {loss.dtype}"
    for name, got, exact in (("log_probs", log_probs, want.log_probs), ("entropy", entropy, want.entropy)):
        assert got.dtype == torch.float32 and got.shape == exact.shape, f"{label} {name}: {got.dtype} {got.shape}"
        check_close(f"{label} {name}", got, exact, TOL[dtype].value * EPS32 * want.row_scale)
        assert bool((got[~batch.response_mask] == 0).all()), f"{label} {name} must be 0 at masked positions"
    check_close(f"{label} loss", loss, want.loss, want.tol["loss"])
    check_metrics(label, metrics, want)
    for name, g in grads.items():
        assert g.dtype == dtype, f"{label} {name}: dtype {g.dtype}"
    check_grads(label, grads, want.grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings,shape,hidden_size,vocab,bias,chunk", CASES)
def test_matches_float64_oracle(backend, dtype, settings, shape, hidden_size, vocab, bias, chunk):
    """Loss, log-probs, entropy, every metric and the hidden / weight / bias gradients against the oracle."""
    batch = make_linear_batch(
        shape, hidden_size, vocab, dtype, settings["temperature"], bias=bias, seed=len(shape) * 100 + vocab
    )
    want = linear_oracle(batch, TOL[dtype], dtype, **settings)
    out, grads = run(batch, backend, chunk, **settings)
    check_against(f"{backend} {dtype}", out, grads, want, dtype, batch)
    if settings == FULL and len(shape) == 1 and shape[0] > 1:  # the inputs do what they are for
        for name in FRACTION_METRICS:
            assert 0.0 < float(want.metrics[name]) < 1.0, f"{name} = {float(want.metrics[name])}: inputs too tame"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprob_entropy_matches_token_oracle(backend, dtype):
    """linear_logprob_entropy at every position (no mask) with random upstream gradients of both outputs."""
    batch = make_linear_batch((2, 5), 8, 70, dtype, 0.8, seed=7)
    g = torch.Generator().manual_seed(8)
    g_lp, g_h = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    batch.labels[0, 1] = -100  # a padding label: log-prob 0, no gradient through it
    h, w, b = (t.detach().clone().to(DEVICE).requires_grad_() for t in (batch.hidden, batch.weight, batch.bias))
    lp, ent = sfpo_kernels.linear_logprob_entropy(
        h, w, batch.labels.to(DEVICE), 0.8, bias=b, chunk_size=3, backend=backend
    )
    grads = dict(
        zip(
            ("hidden.grad", "weight.grad", "bias.grad"),
            torch.autograd.grad((lp * g_lp).sum() + (ent * g_h).sum(), [h, w, b]),
        )
    )
    exact = token_oracle(batch.logits64(), batch.labels, 0.8, g_lp, g_h)
    t = TOL[dtype]
    lp, ent, grads = lp.cpu(), ent.cpu(), {k: v.cpu() for k, v in grads.items()}
    check_close(f"{backend} log_probs", lp, exact.log_probs, t.value * EPS32 * exact.row_scale)
    check_close(f"{backend} entropy", ent, exact.entropy, t.value * EPS32 * exact.row_scale)
    assert float(lp[0, 1].detach()) == 0.0
    err = t.grad * EPS32 * exact.grad_scale + t.rounding * ulp(exact.grad.to(dtype))
    check_grads(
        f"{backend} {dtype}", grads, input_grads(batch.hidden, batch.weight, batch.bias, exact.grad, err, dtype, 10)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_hidden_states_never_matter(backend):
    """NaN and inf in the hidden states of masked positions: the same loss and gradients bit for bit, and
    exactly zero gradient rows there."""
    batch = make_linear_batch((3, 5), 8, 70, torch.float32, 0.7, seed=11)
    clean, clean_grads = run(batch, backend, 4, **FULL)
    poisoned = batch.hidden.clone()
    poisoned[~batch.response_mask] = float("nan")
    poisoned[0][~batch.response_mask[0]] = float("inf")
    batch.hidden = poisoned
    out, grads = run(batch, backend, 4, **FULL)
    assert_bit_equal("loss", out.loss.detach(), clean.loss.detach())
    for name in clean_grads:
        assert_bit_equal(name, grads[name], clean_grads[name])
    assert bool((grads["hidden.grad"][~batch.response_mask] == 0).all())
    assert int(out.metrics["nonfinite_tokens"]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_fully_masked_batch_gives_zero_loss_and_gradients(backend, mode):
    batch = make_linear_batch((2, 3), 8, 70, torch.bfloat16, 1.0, seed=13, mask=torch.zeros(2, 3, dtype=torch.bool))
    batch.hidden.fill_(float("nan"))
    out, grads = run(batch, backend, None, **dict(FULL, loss_agg_mode=mode))
    assert float(out.loss) == 0.0
    for name, g in grads.items():
        assert bool((g == 0).all()), f"{name} must be all zeros"
    assert bool((out.log_probs == 0).all()) and bool((out.entropy == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_accumulates_both_gradients(backend):
    """A head tied to the input embedding: the shared parameter's gradient is the embedding's plus the head's,
    as with the materialised logits (float64 reference)."""
    batch = make_linear_batch((2, 4), 8, 70, torch.float32, 1.0, bias=False, seed=17)
    ids = torch.randint(0, 70, (2, 4), generator=torch.Generator().manual_seed(18))
    mix = torch.randn(8, 8, generator=torch.Generator().manual_seed(19), dtype=torch.float64) / 3

    def loss_of(table, fused):
        b = on_device(batch) if fused else batch
        hidden = torch.tanh(table[ids.to(table.device)] @ mix.to(table))  # a stand-in body between embedding and head
        args = (b.labels, b.old_log_probs, b.advantages, b.response_mask)
        if fused:
            return sfpo_kernels.linear_grpo_loss(hidden, table, *args, chunk_size=3, backend=backend, **settings).loss
        return reference.linear_grpo_loss(hidden, table, *args, **settings)[0]

    settings = dict(BASE, entropy_coef=0.1)  # the entropy term has a gradient whatever the ratios

    table = batch.weight.detach().clone().to(DEVICE).requires_grad_()
    (got,) = torch.autograd.grad(loss_of(table, True), [table])
    got = got.cpu()
    table64 = batch.weight.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(loss_of(table64, False), [table64])
    assert (want[ids.unique()] != 0).any() and (want.abs().sum(1) > 0).sum() > len(ids.unique()), "both paths flow"
    check_close("tied weight.grad", got, want, 64 * EPS32 * (want.abs() + want.abs().amax()))


def test_autocast_bf16_with_fp32_parameters():
    """Under autocast (the trainer's bf16 mode) the head computes in bf16 and the fp32 weight gets an fp32
    gradient within the bf16 bounds."""
    batch = make_linear_batch((3, 4), 8, 70, torch.float32, 1.0, seed=23)
    want = linear_oracle(batch, TOL[torch.bfloat16], torch.float32, **FULL)
    h, w, b = (t.detach().clone().requires_grad_() for t in (batch.hidden, batch.weight, batch.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sfpo_kernels.linear_grpo_loss(
            h, w, *batch.loss_args(), bias=b, chunk_size=5, backend="torch", ref_log_probs=batch.ref_log_probs, **FULL
        )
    grads = torch.autograd.grad(out.loss, [h, w, b])
    assert all(g.dtype == torch.float32 for g in grads)
    check_close(
        "autocast loss", out.loss, want.loss, 2 * unit(torch.bfloat16) / TOL[torch.float32].value * want.tol["loss"]
    )
    for name, g in zip(("hidden.grad", "weight.grad", "bias.grad"), grads):
        exact, tol = want.grads[name]
        check_close(f"autocast {name}", g, exact, 2 * unit(torch.bfloat16) * tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tensor_holds_more_than_one_chunk_of_logits(backend):
    """Forward and backward: nothing larger than one chunk of logits is allocated (nor the [V, H] weight
    gradient, here the same size), and nothing of [n, V] is saved for backward."""
    rows, hidden_size, vocab, chunk = (8, 8), 6, 96, 6
    batch = make_linear_batch(rows, hidden_size, vocab, torch.float32, 1.0, seed=29)
    n = int(batch.response_mask.sum())
    assert n >= 4 * chunk
    batch = on_device(batch)
    h, w, b = (t.detach().clone().requires_grad_() for t in (batch.hidden, batch.weight, batch.bias))
    saved = []
    mode = LargestAllocation()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t), mode:
        out = sfpo_kernels.linear_grpo_loss(
            h,
            w,
            *batch.loss_args(),
            bias=b,
            chunk_size=chunk,
            backend=backend,
            ref_log_probs=batch.ref_log_probs,
            **FULL,
        )
        forward_largest = mode.largest
        out.loss.backward()
    chunk_bytes = 4 * chunk * vocab  # fp32 logits of one chunk
    limit = max(chunk_bytes, 4 * vocab * hidden_size)
    assert forward_largest <= chunk_bytes, f"forward allocated {forward_largest} bytes, one chunk is {chunk_bytes}"
    assert mode.largest <= limit, (
        f"backward allocated {mode.largest} bytes, limit {limit} (all logits: {4 * n * vocab})"
    )
    assert saved and max(saved) <= vocab * hidden_size < n * vocab, f"saved for backward: {sorted(saved)[-3:]}"
    # The same probe sees the materialised path's [n, V] logits: it can fail.
    with LargestAllocation() as probe:
        reference.linear_grpo_loss(h, w, *batch.loss_args(), bias=b, **BASE)[0].backward()
    assert probe.largest >= 4 * math.prod(rows) * vocab


def test_float64_reference_matches_oracle():
    """reference.linear_grpo_loss on float64 inputs: the oracle's values to 1e-12."""
    batch = make_linear_batch((3, 5), 8, 70, torch.float32, 0.7, seed=31)
    want = linear_oracle(batch, TOL[torch.float32], torch.float32, **FULL)
    h, w, b = (t.detach().double().requires_grad_() for t in (batch.hidden, batch.weight, batch.bias))
    loss, lp, ent, _ = reference.linear_grpo_loss(
        h, w, *batch.loss_args(), bias=b, ref_log_probs=batch.ref_log_probs, **FULL
    )
    check_close("reference loss", loss, want.loss, 1e-12)
    check_close("reference log_probs", lp, want.log_probs, 1e-12)
    check_close("reference entropy", ent, want.entropy, 1e-12)
    for name, g in zip(("hidden.grad", "weight.grad", "bias.grad"), torch.autograd.grad(loss, [h, w, b])):
        check_close(f"reference {name}", g, want.grads[name][0], 1e-12)


def test_default_chunk_size_follows_the_budget():
    vocab = 151936
    triton_rows = default_chunk_size(10**6, vocab, torch.bfloat16, on_torch=False)
    assert triton_rows % 128 == 0 and triton_rows * vocab * 2 <= CHUNK_BUDGET_BYTES < (triton_rows + 128) * vocab * 2
    torch_rows = default_chunk_size(10**6, vocab, torch.float32, on_torch=True)
    assert torch_rows * vocab * 16 <= CHUNK_BUDGET_BYTES and torch_rows < triton_rows
    assert default_chunk_size(5, vocab, torch.bfloat16, on_torch=False) == 5  # never more than the rows
    assert default_chunk_size(10, 2**31, torch.float32, on_torch=True) == 1


BAD_CALLS = [
    pytest.param(lambda a: dict(a, hidden=a["hidden"][0, 0]), "hidden must be", id="hidden-1d"),
    pytest.param(lambda a: dict(a, weight=a["weight"][:, :4]), "weight must be", id="weight-H"),
    pytest.param(lambda a: dict(a, weight=a["weight"].double()), "weight has dtype", id="weight-dtype"),
    pytest.param(lambda a: dict(a, bias=a["bias"][:5]), "bias must be", id="bias-shape"),
    pytest.param(lambda a: dict(a, labels=a["labels"][:, :2]), "labels must have shape", id="labels-shape"),
    pytest.param(lambda a: dict(a, labels=a["labels"].float()), "labels must be an integer", id="labels-dtype"),
    pytest.param(lambda a: dict(a, advantages=a["advantages"][0]), "advantages must have shape", id="adv-shape"),
    pytest.param(lambda a: dict(a, chunk_size=0), "chunk_size must be", id="chunk-0"),
    pytest.param(lambda a: dict(a, chunk_size=2.5), "chunk_size must be", id="chunk-float"),
    pytest.param(lambda a: dict(a, kl_coef=0.1), "needs ref_log_probs", id="kl-no-ref"),
    pytest.param(lambda a: dict(a, loss_agg_mode="mean"), "loss_agg_mode='mean'", id="agg-mode"),
    pytest.param(lambda a: dict(a, temperature=0.0), "temperature must be > 0", id="temperature"),
    pytest.param(lambda a: dict(a, backend="cuda"), "backend 'cuda'", id="backend-cuda"),
]


@pytest.mark.parametrize("change,message", BAD_CALLS)
def test_bad_arguments_raise_value_error_naming_them(change, message):
    batch = make_linear_batch((3, 4), 8, 70, torch.float32, 1.0, seed=37)
    args = dict(
        hidden=batch.hidden,
        weight=batch.weight,
        labels=batch.labels,
        old_log_probs=batch.old_log_probs,
        advantages=batch.advantages,
        response_mask=batch.response_mask,
        bias=batch.bias,
    )
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        sfpo_kernels.linear_grpo_loss(**change(args))


def test_labels_outside_the_vocabulary_are_rejected():
    batch = make_linear_batch((3, 4), 8, 70, torch.float32, 1.0, seed=41)
    batch.labels[0, 0] = 70
    with pytest.raises(ValueError, match=r"labels\[0, 0\] = 70 at a response position is outside \[0, 70\)"):
        sfpo_kernels.linear_grpo_loss(batch.hidden, batch.weight, *batch.loss_args())


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16(backend):
    batch = make_linear_batch((3, 5), 8, 70, torch.float16, 0.7, seed=47)
    want = linear_oracle(batch, TOL[torch.float16], torch.float16, **FULL)
    out, grads = run(batch, backend, 4, **FULL)
    check_against(f"{backend} fp16", out, grads, want, torch.float16, batch)


def test_weight_gradient_accumulates_in_blocks(monkeypatch):
    """bf16: the fp32 dW accumulator fills in row blocks (here 5 rows of [V, H], V not a multiple of 5)."""
    monkeypatch.setattr(linear_loss, "ACC_BLOCK_BYTES", 5 * 8 * 4)
    batch = make_linear_batch((3, 4), 8, 71, torch.bfloat16, 1.0, seed=43)
    want = linear_oracle(batch, TOL[torch.bfloat16], torch.bfloat16, **FULL)
    out, grads = run(batch, "torch", 5, **FULL)
    check_against("blocked dW", out, grads, want, torch.bfloat16, batch)
