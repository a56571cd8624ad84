"""Fused GRPO loss: log-prob of the sampled token and token entropy in one pass over the vocabulary.

verl's eager path upcasts the ``[N, V]`` logits to fp32, takes a log-softmax,
gathers the label, and computes the entropy in a second pass: at N = 16k tokens
and V = 151936 that is ~10 GB of fp32 temporaries per micro-batch. Here:

- forward, one streaming pass per token over V (online max, sum of exp, and the
  softmax-weighted sum of z, plus one load of the label's logit) gives
  ``log p(y) = z_y - lse`` and ``H = lse - sum p z``; only four fp32 numbers per
  token are kept (log-prob, entropy, lse, ``mu = sum p z``);
- a masked row (``response_mask`` 0) is skipped in both passes: the forward
  writes zeros for its four numbers without loading its logits, the backward
  writes zero ``dlogits`` (Liger returns early for such rows the same way);
- ``z = logits * (1 / temperature)``: one multiply per element, the division
  happens once on the host (a per-element ``div.rn.f32`` is a multi-instruction
  sequence on the GPU; the AOT test checks none is left in the vocabulary loops);
- backward, one pass over V writes ``dlogits`` in the logits' dtype:
  ``dz = g_logp (onehot(y) - p) + g_H p (mu - z)``, ``dlogits = dz / temperature``
  (times the inverse);
  a row whose upstream gradients are both exactly 0 (every masked position:
  the loss masks with ``where``) gets ``dlogits = 0`` without its logits being
  read -- no ``0 * NaN`` from whatever a masked row holds, and no traffic;
- the policy-gradient math on those per-token values (ratio, clipping, KL,
  aggregation, metrics) is O(N) elementwise work done by
  :func:`sfpo_kernels.grpo_math.grpo_loss_from_log_probs` under autograd,
  which hands the kernel the exact ``g_logp`` and ``g_H``.

Byte limit per call (what the benchmark compares against): forward reads the
logits once; backward reads them once more (response rows only) and writes
``dlogits`` once.
Tokens sit on grid axis 0 (no 65535 limit); V is streamed in blocks, so any V
up to 2^31 works, multiple of the block or not.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sfpo_kernels import reference
from sfpo_kernels._backend import empty_for_kernel, resolve_backend
from sfpo_kernels._loss_inputs import check_label_tensor, check_like, check_loss_inputs, response_labels, shape_of
from sfpo_kernels._triton_utils import store_rounded, triton_interpreting
from sfpo_kernels.grpo_math import grpo_loss_from_log_probs, response_positions
from sfpo_kernels.loss_options import (  # noqa: F401 (LossOptionError, DEFAULT_LOSS_OPTIONS: re-exported)
    DEFAULT_LOSS_OPTIONS,
    GRPOLossOptions,
    LossOptionError,
    check_option,
    resolve_options,
)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Launch settings on the GPU: one program per token row streaming V in blocks of GPU_BLOCK_V with
# GPU_NUM_WARPS warps (16 elements per thread per block: four 128-bit loads of bf16). They are fixed,
# not autotuned, on purpose: the backward writes dlogits into the logits when inplace_backward is set,
# and triton.autotune benchmarks a kernel by launching every config on the same arguments, so an
# in-place kernel would read its own output from the second config on (autotune's restore_value can
# copy the buffer back, at the cost of one [N, V] copy per config and per new shape). The forward
# shares the settings so both passes stream V the same way. `bench/measure/sweep_loss_launch.py` is the sweep
# that must justify them on an H100/H200 (BLOCK_V x num_warps, fwd and bwd, bf16, N=16384, V=151936);
# it has NOT been run on a GPU yet: these values are Liger's and the Triton softmax tutorial's choice
# for rows this long, unmeasured here.
GPU_BLOCK_V, GPU_NUM_WARPS = 4096, 8
# T (rows per batch) and the strides change with every micro-batch's padded length: specialising on
# them (Triton's value-1 and divisible-by-16 classes) would compile a new kernel for each new class.
# Alignment is ALIGNED's job (checked on the host), so nothing is lost. V stays specialised: it is
# fixed per model.
DYNAMIC_ARGS = ["stride_b", "stride_t", "rows_per_batch", "d_stride_b", "d_stride_t"]
INTERPRETER_BLOCK_V = 64  # small, so CI's small vocabularies still span several blocks
INTERPRETER_LARGE_V = 8192  # above this the interpreter takes GPU-sized blocks (numpy time is per block)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _row_pointer(base, i_row, rows_per_batch, stride_b, stride_t, ALIGNED: tl.constexpr):
    """Row ``i_row`` of a ``[B, T, V]`` view flattened to ``[B*T, V]``: works for any batch strides.

    ``ALIGNED``: the host checked the base and both strides put every row on a
    16-byte boundary, so full blocks load with 128-bit accesses.
    """
    p_row = base + (i_row // rows_per_batch) * stride_b + (i_row % rows_per_batch) * stride_t
    if ALIGNED:
        p_row = tl.multiple_of(p_row, 16)
    return p_row


@triton.jit
def _online_softmax_block(b_z, m, s, w):
    """Fold one block of z into the running (max m, s = sum e^(z-m), w = sum e^(z-m) (z-m)).

    Relative to m, so the entropy log(s) - w/s never cancels two large numbers.
    """
    m_new = tl.maximum(m, tl.max(b_z, 0))
    # A block (or a row so far) of -inf only: keep everything at zero, no inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m - m_safe)
    b_e = tl.exp(b_z - m_safe)
    b_ez = b_e * tl.where(b_e == 0.0, 0.0, b_z - m_safe)  # e = 0 at z = -inf: no 0 * -inf
    # Re-base w from the old max to the new: (z - m_new) = (z - m_old) + (m_old - m_new).
    delta = tl.where(s == 0.0, 0.0, m - m_safe)  # nothing accumulated yet: no 0 * -inf
    w = scale * (w + s * delta) + tl.sum(b_ez, 0)
    s = scale * s + tl.sum(b_e, 0)
    return m_new, s, w


@triton.jit(do_not_specialize=[a for a in DYNAMIC_ARGS if not a.startswith("d_")])
def _logprob_entropy_fwd_kernel(
    logits,  # *T [B, T, V] with strides (stride_b, stride_t, 1)
    stride_b,
    stride_t,
    rows_per_batch,  # T
    labels,  # *int64 [B*T] contiguous
    keep,  # *uint8 [B*T]: 0 = masked row, skipped (unused unless HAS_KEEP)
    log_probs,  # *fp32 [B*T] out
    entropy,  # *fp32 [B*T] out
    lse_out,  # *fp32 [B*T] out: logsumexp(z), saved for backward
    mu_out,  # *fp32 [B*T] out: sum softmax(z) * z, saved for backward
    inv_temperature,  # runtime float: z = logits * inv_temperature
    V,
    HAS_KEEP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Per row: lse, mu, entropy = lse - mu, log_prob = z[label] - lse (0 for labels outside [0, V)).

    A masked row (``keep == 0``) gets 0 for all four and its logits are never loaded.
    """
    i_row = tl.program_id(0).to(tl.int64)
    if HAS_KEEP:  # noqa: SIM102 -- compile time, then run time: no load of keep without it
        if tl.load(keep + i_row) == 0:
            tl.store(log_probs + i_row, 0.0)
            tl.store(entropy + i_row, 0.0)
            tl.store(lse_out + i_row, 0.0)
            tl.store(mu_out + i_row, 0.0)
            return
    p_row = _row_pointer(logits, i_row, rows_per_batch, stride_b, stride_t, ALIGNED)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    w = tl.zeros([], tl.float32)
    v_full = V // BLOCK_V * BLOCK_V
    for v0 in range(0, v_full, BLOCK_V):  # full blocks: no mask, vector loads
        b_z = tl.load(p_row + v0 + tl.arange(0, BLOCK_V)).to(tl.float32) * inv_temperature
        m, s, w = _online_softmax_block(b_z, m, s, w)
    if v_full < V:
        o_v = v_full + tl.arange(0, BLOCK_V)
        b_z = tl.load(p_row + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32) * inv_temperature
        m, s, w = _online_softmax_block(b_z, m, s, w)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lse = m_safe + tl.log(s)
    w_over_s = w / s
    label = tl.load(labels + i_row)
    valid = (label >= 0) & (label < V)
    z_label = tl.load(p_row + tl.where(valid, label, 0)).to(tl.float32) * inv_temperature
    tl.store(log_probs + i_row, tl.where(valid, z_label - lse, 0.0))
    tl.store(entropy + i_row, tl.log(s) - w_over_s)
    tl.store(lse_out + i_row, lse)
    tl.store(mu_out + i_row, m_safe + w_over_s)


@triton.jit
def _dlogits_block(
    p_row,
    p_drow,
    o_v,
    m_v,
    label,
    g_logp,
    g_h,
    b_lse,
    b_mu,
    inv_temperature,
    HAS_GRAD_H: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One block of dlogits = (g_logp (onehot(y) - p) + g_H p (mu - z)) * inv_temperature."""
    if MASKED:
        b_z = tl.load(p_row + o_v, mask=m_v, other=float("-inf")).to(tl.float32) * inv_temperature
    else:
        b_z = tl.load(p_row + o_v).to(tl.float32) * inv_temperature
    b_p = tl.exp(b_z - b_lse)
    b_dz = -g_logp * b_p
    if HAS_GRAD_H:
        b_dz += g_h * b_p * tl.where(b_p == 0.0, 0.0, b_mu - b_z)  # p = 0 at z = -inf: no 0 * inf
    b_dz = tl.where(o_v == label, b_dz + g_logp, b_dz) * inv_temperature
    store_rounded(p_drow + o_v, b_dz, m_v, MASKED)


@triton.jit(do_not_specialize=DYNAMIC_ARGS)
def _logprob_entropy_bwd_kernel(
    logits,  # *T [B, T, V], strides (stride_b, stride_t, 1)
    stride_b,
    stride_t,
    rows_per_batch,
    labels,  # *int64 [B*T]
    grad_log_probs,  # *fp32 [B*T] (unused unless HAS_GRAD_LOGP)
    grad_entropy,  # *fp32 [B*T] (unused unless HAS_GRAD_H)
    lse,  # *fp32 [B*T]
    mu,  # *fp32 [B*T]
    dlogits,  # *T out, strides (d_stride_b, d_stride_t, 1); may alias logits
    d_stride_b,
    d_stride_t,
    inv_temperature,
    V,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_H: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """dlogits = (g_logp (onehot(y) - p) + g_H p (mu - z)) * inv_temperature, p = exp(z - lse).

    A row with ``g_logp == g_H == 0`` (a masked position; a padding label without
    entropy gradient) is written as zeros and its logits are never loaded:
    exact for any finite row, and NaN/inf there cannot leak in.
    """
    i_row = tl.program_id(0).to(tl.int64)
    p_row = _row_pointer(logits, i_row, rows_per_batch, stride_b, stride_t, ALIGNED)
    p_drow = _row_pointer(dlogits, i_row, rows_per_batch, d_stride_b, d_stride_t, ALIGNED)
    b_lse = tl.load(lse + i_row)
    b_mu = tl.load(mu + i_row)
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_log_probs + i_row)
    else:
        g_logp = tl.zeros([], tl.float32)
    if HAS_GRAD_H:
        g_h = tl.load(grad_entropy + i_row)
    else:
        g_h = tl.zeros([], tl.float32)
    label = tl.load(labels + i_row)
    valid = (label >= 0) & (label < V)
    g_logp = tl.where(valid, g_logp, 0.0)  # a padding label's log-prob is the constant 0
    label = tl.where(valid, label, -1)
    v_full = V // BLOCK_V * BLOCK_V
    if (g_logp != 0.0) | (g_h != 0.0):
        for v0 in range(0, v_full, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            _dlogits_block(
                p_row, p_drow, o_v, o_v < V, label, g_logp, g_h, b_lse, b_mu, inv_temperature, HAS_GRAD_H, False
            )
        if v_full < V:
            o_v = v_full + tl.arange(0, BLOCK_V)
            _dlogits_block(
                p_row, p_drow, o_v, o_v < V, label, g_logp, g_h, b_lse, b_mu, inv_temperature, HAS_GRAD_H, True
            )
    else:  # no gradient flows into this row
        b_zero = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, v_full, BLOCK_V):
            o_v = v0 + tl.arange(0, BLOCK_V)
            store_rounded(p_drow + o_v, b_zero, o_v < V, False)
        if v_full < V:
            o_v = v_full + tl.arange(0, BLOCK_V)
            store_rounded(p_drow + o_v, b_zero, o_v < V, True)


# --------------------------------------------------------------------------- host functions


def _as_rows(logits: torch.Tensor) -> tuple[int, int, int, int]:
    """``(rows, rows_per_batch, stride_b, stride_t)`` for a ``[N, V]`` or ``[B, T, V]`` tensor."""
    if logits.dim() == 2:
        return logits.shape[0], max(logits.shape[0], 1), 0, logits.stride(0)
    b, t, _ = logits.shape
    return b * t, max(t, 1), logits.stride(0), logits.stride(1)


def _rows_aligned(*tensors: torch.Tensor) -> bool:
    """Every row of every ``[.., V]`` tensor starts on a 16-byte boundary (base and batch strides)."""
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or any((stride * es) % 16 for stride in t.stride()[:-1]):
            return False
    return True


def _block_v(logits: torch.Tensor) -> int:
    vocab = logits.shape[-1]
    if (logits.device.type == "cuda" and not triton_interpreting()) or vocab > INTERPRETER_LARGE_V:
        return min(GPU_BLOCK_V, triton.next_power_of_2(vocab))
    return INTERPRETER_BLOCK_V


def flat_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` as the contiguous int64 ``[rows]`` vector both kernels read."""
    return labels.reshape(-1).contiguous().to(torch.int64)


def logprob_entropy_fwd(
    logits: torch.Tensor, labels_flat: torch.Tensor, temperature: float, keep_flat: torch.Tensor | None = None
):
    """Triton forward: ``(log_probs, entropy, lse, mu)``, fp32 ``[rows]`` (``labels_flat`` from :func:`flat_labels`).

    Rows where ``keep_flat`` (bool ``[rows]``) is False get 0 for all four and are not read.
    """
    rows, rows_per_batch, stride_b, stride_t = _as_rows(logits)
    out = empty_for_kernel((4, rows), dtype=torch.float32, device=logits.device)
    keep = None if keep_flat is None else keep_flat.reshape(-1).contiguous().view(torch.uint8)
    if rows:
        _logprob_entropy_fwd_kernel[(rows,)](
            logits,
            stride_b,
            stride_t,
            rows_per_batch,
            labels_flat,
            labels_flat if keep is None else keep,
            out[0],
            out[1],
            out[2],
            out[3],
            1.0 / float(temperature),
            logits.shape[-1],
            HAS_KEEP=keep is not None,
            BLOCK_V=_block_v(logits),
            ALIGNED=_rows_aligned(logits),
            num_warps=GPU_NUM_WARPS,
        )
    log_probs, entropy, lse, mu = out
    return log_probs, entropy, lse, mu


def _row_gradient(grad: torch.Tensor | None, keep_flat: torch.Tensor | None) -> torch.Tensor | None:
    """An upstream gradient as the fp32 ``[rows]`` vector the kernel reads, 0 where ``keep_flat`` is False."""
    if grad is None:
        return None
    grad = grad.reshape(-1).float()
    if keep_flat is not None:  # where, not a product: a NaN gradient at a masked row becomes 0 too
        grad = torch.where(keep_flat, grad, torch.zeros_like(grad))
    return grad.contiguous()


def logprob_entropy_bwd(
    logits,
    labels_flat,
    grad_log_probs,
    grad_entropy,
    lse,
    mu,
    temperature,
    inplace: bool,
    keep_flat: torch.Tensor | None = None,
):
    """Triton backward: ``dlogits`` in ``logits.dtype`` (written into ``logits`` itself when ``inplace``).

    Rows where ``keep_flat`` (bool ``[rows]``) is False, and rows whose upstream
    gradients are both 0, get zeros and are not read. ``inplace``: ``dlogits`` is
    ``logits``, and the logits' version counter is bumped, so anything autograd
    saved of them (this op's own saved logits included: a second backward through
    the graph) raises instead of reading gradients as logits.
    """
    rows, rows_per_batch, stride_b, stride_t = _as_rows(logits)
    dlogits = logits if inplace else empty_for_kernel(logits.shape, dtype=logits.dtype, device=logits.device)
    _, _, d_stride_b, d_stride_t = _as_rows(dlogits)
    grad_log_probs, grad_entropy = _row_gradient(grad_log_probs, keep_flat), _row_gradient(grad_entropy, keep_flat)
    dummy = lse
    if rows:
        _logprob_entropy_bwd_kernel[(rows,)](
            logits,
            stride_b,
            stride_t,
            rows_per_batch,
            labels_flat,
            dummy if grad_log_probs is None else grad_log_probs,
            dummy if grad_entropy is None else grad_entropy,
            lse,
            mu,
            dlogits,
            d_stride_b,
            d_stride_t,
            1.0 / float(temperature),
            logits.shape[-1],
            HAS_GRAD_LOGP=grad_log_probs is not None,
            HAS_GRAD_H=grad_entropy is not None,
            BLOCK_V=_block_v(logits),
            ALIGNED=_rows_aligned(logits, dlogits),
            num_warps=GPU_NUM_WARPS,
        )
    if inplace:
        torch.autograd.graph.increment_version(logits)
    return dlogits


class LogProbEntropyFunction(torch.autograd.Function):
    """``(log_probs, entropy) = f(logits)`` with the fused Triton forward and backward."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, inplace_backward, keep):
        labels_flat = flat_labels(labels)  # once: the backward reads the same vector
        keep_flat = None if keep is None else keep.reshape(-1)
        log_probs, entropy, lse, mu = logprob_entropy_fwd(logits, labels_flat, temperature, keep_flat)
        ctx.save_for_backward(logits, labels_flat, lse, mu, keep_flat)
        # An unused output (e.g. entropy with entropy_coef 0) then arrives as None and the
        # backward kernel skips its term instead of streaming a vector of zeros.
        ctx.set_materialize_grads(False)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        return log_probs.view(labels.shape), entropy.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        logits, labels_flat, lse, mu, keep_flat = ctx.saved_tensors
        dlogits = logprob_entropy_bwd(
            logits, labels_flat, grad_log_probs, grad_entropy, lse, mu, ctx.temperature, ctx.inplace_backward, keep_flat
        )
        return dlogits, None, None, None, None


# --------------------------------------------------------------------------- public API


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable w.r.t. logits
    log_probs: torch.Tensor  # [B, T] (or [N]) fp32
    entropy: torch.Tensor  # same shape, fp32
    metrics: dict[str, torch.Tensor]  # 0-d tensors: call float() when logging


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, V] or [B, T, V], got {shape_of(logits)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"logits has dtype {logits.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    if logits.stride(-1) != 1:
        raise ValueError(f"logits must be contiguous in the vocabulary dimension, got strides {logits.stride()}")
    check_label_tensor(labels, logits, "logits", "V")


def logprob_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    response_mask: torch.Tensor | None = None,
    backend: str | None = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log softmax(logits / temperature)[label]`` and entropy, in one pass over V.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, fp32/bf16/fp16, contiguous in V
            (batch dims may be strided, e.g. ``logits[:, :-1]``).
        labels: integer (any integer dtype) ``[N]`` / ``[B, T]``; entries outside
            ``[0, V)`` get log-prob 0.
        temperature: > 0.
        response_mask: optional, shaped like ``labels``: rows where it is 0 get an
            exactly zero gradient whatever their logits hold (NaN, inf) and outputs 0;
            the Triton kernels do not read them, forward or backward.
        backend: ``"triton"`` (default for CUDA) or ``"torch"`` (eager, the CPU default).
        inplace_backward: write ``dlogits`` into ``logits``' memory (saves one
            ``[N, V]`` buffer; only when nothing else reads the logits afterwards).

    Returns:
        ``(log_probs, entropy)``, fp32, shaped like ``labels``, differentiable
        w.r.t. ``logits``. A row whose upstream gradients are both 0 gets zero
        ``dlogits`` from the Triton backward without being read.
    """
    _check_logits(logits, labels)
    check_option("temperature", temperature)
    if response_mask is not None:
        check_like("response_mask", response_mask, logits, "logits", "V")
    name = resolve_backend(backend, logits.device)
    if name == "cuda":
        raise ValueError("backend 'cuda' has no fused loss (csrc/ holds the multi-tensor kernels); use triton or torch")
    labels = labels.to(torch.int64)  # one conversion, one behaviour for every integer dtype and backend
    keep = None if response_mask is None else response_positions(response_mask)
    if name == "torch":
        return reference.logprob_entropy(logits, labels, temperature, response_mask=keep)
    return LogProbEntropyFunction.apply(logits, labels, float(temperature), bool(inplace_backward), keep)


def grpo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    ref_log_probs: torch.Tensor | None = None,
    options: GRPOLossOptions | None = None,
    backend: str | None = None,
    inplace_backward: bool = False,
    check_labels: bool = True,
    **option_overrides,
) -> GRPOLossOutput:
    """GRPO's clipped-ratio policy loss with entropy bonus and KL penalty, fused over the vocabulary.

    ``loss = agg(pg) - entropy_coef * agg(H) + kl_coef * agg(kl)``, every term as
    verl computes it (``compute_policy_loss_vanilla``, ``agg_loss``,
    ``kl_penalty``; :mod:`sfpo_kernels.grpo_math` states the math, and
    ``docs/conventions.md`` "Math conventions"). With token weights
    ``w = response_mask``: ``token-mean`` is ``sum w x / sum w``, the ``seq-*``
    modes average ``sum_t w x`` (or ``sum_t w x / sum_t w``) over the rows that
    hold a response position (``w != 0``), as verl's ``masked_sum`` weights.

    Masked positions (``w == 0``) never affect the loss, the metrics or any
    gradient, whatever they hold (NaN and inf included): their ``dlogits`` are
    exact zeros, their ``log_probs`` and ``entropy`` 0, and the Triton kernels
    never read their logits.

    Example::

        out = grpo_loss(logits, labels, old, adv, mask, clip_ratio_high=0.28)
        out = grpo_loss(logits, labels, old, adv, mask, options=GRPOLossOptions(clip_ratio_high=0.28))

    Args:
        logits: ``[B, T, V]`` (or packed ``[N, V]``), fp32/bf16/fp16, requires grad.
        labels: the sampled tokens, any integer dtype, ``logits.shape[:-1]``;
            values at masked positions (padding, -100) are ignored.
        old_log_probs, advantages: ``logits.shape[:-1]``.
        response_mask: ``logits.shape[:-1]``; bool, 0/1, or float token weights
            (0.5 counts half a token everywhere, as in verl).
        ref_log_probs: reference-policy log-probs, needed when ``kl_coef != 0``;
            when given, the ``kl`` metric is reported.
        options: a :class:`GRPOLossOptions` (default: its defaults).
        **option_overrides: any field of :class:`GRPOLossOptions` by name
            (``temperature=``, ``clip_ratio_high=``, ...; ``GRPOLossOptions.help()``
            gives each one's meaning and domain), replacing that field of
            ``options``. Another keyword raises ``TypeError``; a bad value
            :class:`LossOptionError` (a ``ValueError`` naming the option).
        backend: as in :func:`logprob_entropy`.
        inplace_backward: as in :func:`logprob_entropy`.
        check_labels: raise ``ValueError`` for labels outside ``[0, V)`` at response
            positions (costs one device-to-host sync).

    Returns:
        :class:`GRPOLossOutput` ``(loss, log_probs, entropy, metrics)``; metrics are 0-d
        tensors: ``pg_loss``, ``pg_clipfrac``, ``pg_clipfrac_lower``, ``ppo_kl``,
        ``entropy``, ``kl`` (with ``ref_log_probs``; NaN if a response position's
        log-prob or ref log-prob is not finite), ``nonfinite_tokens``: response
        tokens with a non-finite log-prob, entropy, old log-prob, advantage or
        weight (or ref log-prob when ``kl_coef != 0``). Each of them makes the
        loss NaN: the ratio's clamp no longer hides ``log p = -inf``.
    """
    options = resolve_options(options, option_overrides, "grpo_loss")
    _check_logits(logits, labels)
    check_loss_inputs(logits, "logits", "V", old_log_probs, advantages, response_mask, ref_log_probs, options)
    labels, keep = response_labels(labels, response_mask, logits.shape[-1], check_labels)
    log_probs, entropy = logprob_entropy(
        logits, labels, options.temperature, response_mask=keep, backend=backend, inplace_backward=inplace_backward
    )
    loss, metrics = grpo_loss_from_log_probs(
        log_probs, entropy, old_log_probs, advantages, response_mask, ref_log_probs=ref_log_probs, options=options
    )
    return GRPOLossOutput(loss, log_probs, entropy, metrics)
