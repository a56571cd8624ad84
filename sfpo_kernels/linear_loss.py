"""The LM head fused into the GRPO loss: no ``[tokens, V]`` logits beyond one chunk of tokens.

``logits = hidden @ weight.T (+ bias)`` at N = 16k tokens and V = 151936 are
~5 GB in bf16, and their gradient as much again. Here the head runs chunk by
chunk over the response tokens only:

- gather: the response positions (``response_mask != 0``) are gathered first,
  ``h = hidden[keep]`` ``[n, H]``; prompts and padding cost no matmul, and a
  masked position gets log-prob 0, entropy 0 and an exactly zero gradient
  whatever its hidden state holds (NaN included: it is never read by a matmul);
- forward, per chunk of ``c`` rows: ``z = h_c @ W^T (+ b)`` ``[c, V]`` in the
  compute dtype, then the vocabulary pass of :mod:`sfpo_kernels.fused_loss`
  (``logprob_entropy_fwd``) keeps four fp32 numbers per token (log-prob,
  entropy, lse, ``mu = sum p z``); ``z`` is dropped before the next chunk;
- backward, per chunk: ``z`` is recomputed, ``logprob_entropy_bwd`` writes
  ``dz = (g_logp (onehot(y) - p) + g_H p (mu - z)) / temperature`` into ``z``'s
  own memory, then ``dh_c = dz @ W`` and ``dW += dz^T @ h_c``, ``db += sum dz``
  (fp32 accumulators for bf16/fp16; returned in the weight's dtype);
- the O(N) policy-gradient math is :func:`sfpo_kernels.grpo_math.grpo_loss_from_log_probs`,
  exactly what :func:`sfpo_kernels.grpo_loss` runs on the materialised logits.

Memory beyond the inputs: one chunk of logits (plus the torch path's fp32
temporaries of that chunk), the ``[n, H]`` gathered hidden states and their
gradient, and the ``[V, H]`` weight-gradient accumulator. Cost: the head's
matmul three times (forward, recompute, and the two backward products), i.e.
one extra ``2 n H V`` FLOPs over the materialised path, which pays for not
writing and re-reading ``2 n V`` logits and dlogits.

Chunk size (``chunk_size=None``, :func:`default_chunk_size`): as many rows as
fit in :data:`CHUNK_BUDGET_BYTES` (256 MiB) counting, per row, the chunk's
logits in the compute dtype and, on the torch path, its fp32 temporaries
(``z / T``, ``p`` and a product: 12 bytes per entry); a multiple of 128 rows
(whole matmul tiles) when that is at least 128, never more than ``n``. At
V = 151936 bf16 with the Triton pass that is 768 rows (223 MiB).

Dispatch: as :func:`sfpo_kernels.logprob_entropy`: the Triton launchers for
CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1`` with
``backend="triton"``), the same math in torch per chunk on CPU tensors.
"""

from __future__ import annotations

import torch

from sfpo_kernels._backend import empty_for_kernel, resolve_backend
from sfpo_kernels._loss_inputs import check_label_tensor, check_like, check_loss_inputs, response_labels, shape_of
from sfpo_kernels.fused_loss import (
    SUPPORTED_DTYPES,
    GRPOLossOutput,
    flat_labels,
    logprob_entropy_bwd,
    logprob_entropy_fwd,
)
from sfpo_kernels.grpo_math import grpo_loss_from_log_probs, response_positions
from sfpo_kernels.loss_options import GRPOLossOptions, check_option, resolve_options

CHUNK_BUDGET_BYTES = 256 * 2**20
CHUNK_ROW_MULTIPLE = 128
ACC_BLOCK_BYTES = 64 * 2**20  # fp32 output of one block of the dW product for low-precision inputs
TORCH_TEMP_BYTES = 12  # fp32 bytes per logit the torch path's chunk math adds (z / T, p, one product)

# --------------------------------------------------------------------------- the vocabulary pass on one chunk


def _vocab_fwd_torch(z: torch.Tensor, labels: torch.Tensor, temperature: float):
    """The torch twin of ``logprob_entropy_fwd`` on one ``[c, V]`` chunk: fp32 ``(log_probs, entropy, lse, mu)``."""
    zf = z.float() / temperature
    lse = torch.logsumexp(zf, dim=-1)
    p = torch.exp(zf - lse.unsqueeze(-1))
    mu = torch.where(p > 0, p * zf, torch.zeros_like(zf)).sum(-1)  # p = 0 at z = -inf: no 0 * -inf
    vocab = z.shape[-1]
    valid = (labels >= 0) & (labels < vocab)
    z_label = zf.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, z_label - lse, torch.zeros_like(lse)), lse - mu, lse, mu


def _vocab_bwd_torch(z, labels, g_logp, g_h, lse, mu, temperature) -> torch.Tensor:
    """The torch twin of ``logprob_entropy_bwd(..., inplace=True)``: ``dz`` written into ``z``."""
    zf = z.float() / temperature
    p = torch.exp(zf - lse.unsqueeze(-1))
    vocab = z.shape[-1]
    valid = (labels >= 0) & (labels < vocab)
    dz = torch.zeros_like(zf)
    if g_h is not None:
        dz += g_h.float().unsqueeze(-1) * torch.where(p > 0, p * (mu.unsqueeze(-1) - zf), torch.zeros_like(zf))
    if g_logp is not None:
        g = torch.where(valid, g_logp.float(), torch.zeros_like(lse))  # a padding label's log-prob is the constant 0
        dz -= g.unsqueeze(-1) * p
        dz.scatter_add_(-1, torch.where(valid, labels, 0).unsqueeze(-1), g.unsqueeze(-1))
    return z.copy_(dz / temperature)


def _head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[c, V]`` logits of one chunk: ``h @ W^T (+ b)`` in the compute dtype."""
    return h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` possibly bf16/fp16: fp32 accumulation across chunks.

    Low-precision inputs go through the product in blocks of ``acc``'s rows
    (:data:`ACC_BLOCK_BYTES` of fp32 output each): cuBLAS' fp32-output matmul
    where this torch has it (``out_dtype``), else an fp32 upcast of the block.
    """
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    rows = max(1, ACC_BLOCK_BYTES // (acc.shape[1] * acc.element_size()))
    b_acc = None
    for r0 in range(0, acc.shape[0], rows):
        block, part = acc[r0 : r0 + rows], a[r0 : r0 + rows]
        if acc.is_cuda and _mm_out_dtype_works(acc.device):
            block += torch.mm(part, b, out_dtype=acc.dtype)
        else:
            b_acc = b.to(acc.dtype) if b_acc is None else b_acc
            block.addmm_(part.to(acc.dtype), b_acc)


_MM_OUT_DTYPE: dict[str, bool] = {}


def _mm_out_dtype_works(device: torch.device) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` runs on ``device`` (torch >= 2.8 on CUDA)."""
    if device.type not in _MM_OUT_DTYPE:
        x = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        try:
            _MM_OUT_DTYPE[device.type] = torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[device.type] = False
    return _MM_OUT_DTYPE[device.type]


def default_chunk_size(rows: int, vocab: int, dtype: torch.dtype, on_torch: bool) -> int:
    """Rows per chunk: as many as :data:`CHUNK_BUDGET_BYTES` holds (see the module docstring)."""
    per_row = vocab * (torch.empty((), dtype=dtype).element_size() + (TORCH_TEMP_BYTES if on_torch else 0))
    chunk = max(1, CHUNK_BUDGET_BYTES // per_row)
    if chunk >= CHUNK_ROW_MULTIPLE:
        chunk = chunk // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
    return max(1, min(chunk, rows))


class LinearLogProbEntropyFunction(torch.autograd.Function):
    """``(log_probs, entropy) [n] = f(h [n, H], W [V, H], b [V])``, chunked over the rows."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, temperature, chunk, compute_dtype, use_triton):
        ctx.hidden_dtype = h.dtype
        with torch.autocast(h.device.type, enabled=False):
            w, b = weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype)
            h = h.to(compute_dtype)
            n = h.shape[0]
            out = empty_for_kernel((4, n), dtype=torch.float32, device=h.device)  # every chunk fills its columns
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                z = _head(h[rows], w, b)  # [c, V]: the only logits alive
                if use_triton:
                    values = logprob_entropy_fwd(z, labels[rows], temperature)
                else:
                    values = _vocab_fwd_torch(z, labels[rows], temperature)
                for i, v in enumerate(values):
                    out[i, rows] = v
                del z
        ctx.save_for_backward(h, weight, bias, labels, out[2], out[3])
        ctx.set_materialize_grads(False)  # an unused output (entropy at entropy_coef 0) skips its term
        ctx.settings = (temperature, chunk, compute_dtype, use_triton)
        return out[0], out[1]

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        h, weight, bias, labels, lse, mu = ctx.saved_tensors
        temperature, chunk, compute_dtype, use_triton = ctx.settings
        if grad_log_probs is None and grad_entropy is None:
            return (None,) * 8
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            w, b = weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype)
            want_dh = ctx.needs_input_grad[0]  # every chunk fills its rows of dh
            dh = empty_for_kernel(h.shape, dtype=h.dtype, device=h.device) if want_dh else None
            dw = torch.zeros(weight.shape, dtype=acc_dtype, device=h.device) if ctx.needs_input_grad[1] else None
            want_db = bias is not None and ctx.needs_input_grad[2]
            db = torch.zeros(w.shape[0], dtype=acc_dtype, device=h.device) if want_db else None
            for start in range(0, h.shape[0], chunk):
                rows = slice(start, start + chunk)
                g_logp = None if grad_log_probs is None else grad_log_probs[rows]
                g_h = None if grad_entropy is None else grad_entropy[rows]
                z = _head(h[rows], w, b)  # recomputed, then overwritten with dz
                if use_triton:
                    dz = logprob_entropy_bwd(z, labels[rows], g_logp, g_h, lse[rows], mu[rows], temperature, True)
                else:
                    dz = _vocab_bwd_torch(z, labels[rows], g_logp, g_h, lse[rows], mu[rows], temperature)
                if dh is not None:
                    torch.mm(dz, w, out=dh[rows])
                if dw is not None:
                    _accumulate(dw, dz.T, h[rows])
                if db is not None:
                    db += dz.sum(0, dtype=acc_dtype)
                del z, dz
        dh = None if dh is None else dh.to(ctx.hidden_dtype)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None, None, None


# --------------------------------------------------------------------------- argument checks


def _check_head(hidden, weight, bias, labels) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got {shape_of(hidden)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = {hidden.shape[-1]} (hidden's last dim), got {shape_of(weight)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden on {hidden.device}")
    if not torch.is_autocast_enabled(hidden.device.type) and weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight has dtype {weight.dtype} but hidden {hidden.dtype} (outside autocast they must agree)"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}] or None, got {shape_of(bias)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(
                f"bias must have weight's dtype and device ({weight.dtype}, {weight.device}), "
                f"got {bias.dtype}, {bias.device}"
            )
    check_label_tensor(labels, hidden, "hidden", "H")


def _check_chunk(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None (from the memory budget), got {chunk_size!r}")


# --------------------------------------------------------------------------- public API


def _rows_logprob_entropy(hidden, weight, bias, labels, keep, temperature, chunk_size, backend):
    """Log-probs and entropy shaped like ``labels`` (0 where ``keep`` is False), through the chunked head."""
    name = resolve_backend(backend, hidden.device)
    if name == "cuda":
        raise ValueError("backend 'cuda' has no fused loss (csrc/ holds the multi-tensor kernels); use triton or torch")
    compute_dtype = (
        torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
    )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat = flat_labels(labels)
    if keep is None:
        rows, row_labels = flat_hidden, flat
    else:
        keep_flat = keep.reshape(-1)
        rows, row_labels = flat_hidden[keep_flat], flat[keep_flat].contiguous()  # a gather: masked rows never read
    on_torch = name == "torch"
    chunk = chunk_size or default_chunk_size(rows.shape[0], weight.shape[0], compute_dtype, on_torch)
    log_probs, entropy = LinearLogProbEntropyFunction.apply(
        rows, weight, bias, row_labels, float(temperature), chunk, compute_dtype, not on_torch
    )
    if keep is None:
        return log_probs.view(labels.shape), entropy.view(labels.shape)
    zeros = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    return zeros.masked_scatter(keep, log_probs), zeros.masked_scatter(keep, entropy)


def linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    response_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax((hidden @ weight.T + bias) / temperature)[label]`` and the entropy, chunk by chunk.

    Example::

        h = model.model(input_ids).last_hidden_state          # [B, T, H]
        lp, ent = linear_logprob_entropy(h, model.lm_head.weight, labels)  # [B, T] each, fp32

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``, fp32/bf16/fp16 (batch dims may be strided).
        weight: ``[V, H]``, the LM head (a tied embedding works: its gradient
            accumulates into the shared parameter); hidden's dtype, or any under autocast.
        labels: integer, ``hidden.shape[:-1]``; entries outside ``[0, V)`` get log-prob 0.
        temperature: > 0.
        bias: optional ``[V]``.
        chunk_size: rows per chunk of logits; None: :func:`default_chunk_size`.
        response_mask: optional, ``hidden.shape[:-1]``: only positions where it is
            nonzero go through the head; the others get 0 and a zero gradient.
        backend: ``"triton"`` or ``"torch"``, as in :func:`sfpo_kernels.logprob_entropy`.

    Returns:
        ``(log_probs, entropy)``, fp32, shaped like ``labels``, differentiable
        w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    _check_head(hidden, weight, bias, labels)
    check_option("temperature", temperature)
    _check_chunk(chunk_size)
    keep = None
    if response_mask is not None:
        check_like("response_mask", response_mask, hidden, "hidden", "H")
        keep = response_positions(response_mask)
    return _rows_logprob_entropy(hidden, weight, bias, labels.to(torch.int64), keep, temperature, chunk_size, backend)


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ref_log_probs: torch.Tensor | None = None,
    options: GRPOLossOptions | None = None,
    backend: str | None = None,
    check_labels: bool = True,
    **option_overrides,
) -> GRPOLossOutput:
    """:func:`sfpo_kernels.grpo_loss` on ``logits = hidden @ weight.T + bias``, without those logits.

    Loss, metrics and semantics are ``grpo_loss``'s on the materialised logits
    (every option of :class:`GRPOLossOptions`; see its docstring), except that
    ``log_probs`` and ``entropy`` are 0 at masked positions, which never go
    through the head. Masked positions never affect the loss, the metrics or
    any gradient, whatever their hidden states hold: their gradient rows are
    exact zeros.

    Args:
        hidden, weight, labels, bias, chunk_size, backend: as in :func:`linear_logprob_entropy`.
        old_log_probs, advantages, response_mask, ref_log_probs: ``hidden.shape[:-1]``.
        options, **option_overrides, check_labels: as in :func:`sfpo_kernels.grpo_loss`
            (``options=GRPOLossOptions(...)`` and/or its fields by name, e.g. ``clip_ratio_high=0.28``).

    Returns:
        :class:`GRPOLossOutput` ``(loss, log_probs, entropy, metrics)``; the loss is
        differentiable w.r.t. ``hidden``, ``weight`` and ``bias``.
    """
    options = resolve_options(options, option_overrides, "linear_grpo_loss")
    _check_head(hidden, weight, bias, labels)
    _check_chunk(chunk_size)
    check_loss_inputs(hidden, "hidden", "H", old_log_probs, advantages, response_mask, ref_log_probs, options)
    labels, keep = response_labels(labels, response_mask, weight.shape[0], check_labels)
    log_probs, entropy = _rows_logprob_entropy(
        hidden, weight, bias, labels, keep, options.temperature, chunk_size, backend
    )
    loss, metrics = grpo_loss_from_log_probs(
        log_probs, entropy, old_log_probs, advantages, response_mask, ref_log_probs=ref_log_probs, options=options
    )
    return GRPOLossOutput(loss, log_probs, entropy, metrics)
