"""The float64 oracle of the fused LM head + GRPO loss: :func:`helpers.oracles.verl_oracle` on exact logits.

``logits = hidden @ weight.T + bias`` is formed in float64 from the (fp32 or
bf16) inputs, exactly; :func:`verl_oracle` gives the loss, metrics and
``dL/dlogits``; the chain rule gives ``dL/dhidden = dlogits @ W``,
``dL/dW = dlogits^T @ hidden``, ``dL/db = sum dlogits`` in float64.

Tolerances (eps = 2^-23, u = the unit of the compute dtype: eps for fp32, 2^-8
for bf16, whose logits are rounded once after an fp32-accumulated matmul):

- per-token log-prob, entropy, the loss and each float metric: :class:`Tol` as in
  test_grpo_loss, with ``value`` in units of eps: for bf16 the rounding of each
  logit to bf16 moves z by ``u |z| <= u S``, which is ``2^15 eps S``.
- dlogits per element ``E = grad * eps * S G + rounding * ulp_c(dz) + flush``
  (``S G`` the oracle's ``grad_scale``), then propagated through each product:
  ``dh = E @ |W| + ulp_c(dh) + H eps (|dz| @ |W|)``,
  ``dW = E^T @ |h| + ulp_w(dW) + n eps (|dz|^T @ |h|)``, ``db = sum E + n eps sum |dz|``
  (the final rounding to the output dtype, and the matmul's fp32 accumulation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.helpers.bits import ulp
from tests.helpers.oracles import (
    EPS32,
    FP32_TINY,
    RATIO_OFFSETS,
    REF_OFFSETS,
    Batch,
    Tol,
    check_close,
    token_oracle,
    verl_oracle,
)


@dataclass
class LinearBatch:
    hidden: torch.Tensor  # [B, T, H] or [N, H], compute dtype
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    labels: torch.Tensor
    old_log_probs: torch.Tensor  # fp32, hidden.shape[:-1]
    advantages: torch.Tensor
    response_mask: torch.Tensor  # bool
    ref_log_probs: torch.Tensor

    def logits64(self) -> torch.Tensor:
        z = self.hidden.double() @ self.weight.double().T
        return z if self.bias is None else z + self.bias.double()

    def as_batch(self) -> Batch:
        return Batch(
            self.logits64(), self.labels, self.old_log_probs, self.advantages, self.response_mask, self.ref_log_probs
        )

    def loss_args(self):
        return self.labels, self.old_log_probs, self.advantages, self.response_mask


def make_linear_batch(shape, hidden_size, vocab, dtype, temperature, *, bias=True, seed=0, mask=None) -> LinearBatch:
    """Hidden states, an LM head with |z| ~ 1.5, labels, a holed mask (row 1 fully masked with 3+ rows).

    Old / reference log-probs are the exact log-probs moved by the fixed offsets
    of :mod:`helpers.oracles`, so every path clips the same tokens.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=g, dtype=torch.float64).to(dtype)
    weight = (1.5 / hidden_size**0.5 * torch.randn(vocab, hidden_size, generator=g, dtype=torch.float64)).to(dtype)
    b = (0.5 * torch.randn(vocab, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    labels = torch.randint(0, vocab, shape, generator=g)
    if mask is None:
        mask = torch.rand(shape, generator=g) > 0.25
        mask.view(-1)[0] = True
        if len(shape) == 2 and shape[0] >= 3:
            mask[1] = False
    labels[~mask & (torch.rand(shape, generator=g) > 0.3)] = -100
    batch = LinearBatch(hidden, weight, b, labels, labels, labels, mask, labels)
    exact = token_oracle(batch.logits64(), labels, temperature, None, None).log_probs
    n = labels.numel()

    def pick(values):
        return torch.tensor(values, dtype=torch.float64)[torch.randint(len(values), (n,), generator=g)].view(shape)

    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    batch.old_log_probs = (exact - pick(RATIO_OFFSETS)).float()
    batch.ref_log_probs = (exact - pick(REF_OFFSETS)).float()
    batch.advantages = (sign * (0.5 + 1.5 * torch.rand(n, generator=g))).view(shape).float()
    return batch


def unit(dtype) -> float:
    """Unit roundoff of the compute dtype in multiples of eps (2^-23)."""
    return {torch.float32: 1.0, torch.bfloat16: 2.0**15, torch.float16: 2.0**12}[dtype]


@dataclass
class LinearExpected:
    loss: torch.Tensor
    log_probs: torch.Tensor  # 0 at masked positions
    entropy: torch.Tensor
    metrics: dict
    tol: dict
    row_scale: torch.Tensor
    grads: dict  # name -> (exact float64, per-element tolerance)


def input_grads(hidden, weight, bias, dz, err, dtype, n_rows):
    """Exact float64 input gradients from ``dz`` ``[.., V]`` and their tolerances from the dlogits error ``err``."""
    h = hidden.double().reshape(-1, hidden.shape[-1])
    w = weight.double()
    dz, err = dz.reshape(-1, dz.shape[-1]), err.reshape(-1, err.shape[-1])
    adz = dz.abs()
    dh = dz @ w
    dw = dz.T @ h
    out = {
        "hidden.grad": (
            dh.view(hidden.shape),
            (err @ w.abs() + ulp(dh.to(dtype)) + hidden.shape[-1] * EPS32 * (adz @ w.abs())).view(hidden.shape),
        ),
        "weight.grad": (dw, err.T @ h.abs() + ulp(dw.to(weight.dtype)) + n_rows * EPS32 * (adz.T @ h.abs())),
    }
    if bias is not None:
        db = dz.sum(0)
        out["bias.grad"] = (db, err.sum(0) + ulp(db.to(bias.dtype)) + n_rows * EPS32 * adz.sum(0))
    return out


def linear_oracle(batch: LinearBatch, tol: Tol, dtype, **settings) -> LinearExpected:
    """The loss, metrics and every input gradient in float64, with their tolerances."""
    want = verl_oracle(batch.as_batch(), tol, **settings)
    dz = want.grad
    err = tol.grad * EPS32 * want.grad_scale + tol.rounding * ulp(dz.to(dtype)) + FP32_TINY * want.flush_scale
    err = torch.where(batch.response_mask.unsqueeze(-1), err, torch.zeros_like(err))
    keep = batch.response_mask
    zero = torch.zeros_like(want.log_probs)
    return LinearExpected(
        loss=want.loss,
        log_probs=torch.where(keep, want.log_probs, zero),
        entropy=torch.where(keep, want.entropy, zero),
        metrics=want.metrics,
        tol=want.tol,
        row_scale=want.row_scale,
        grads=input_grads(batch.hidden, batch.weight, batch.bias, dz, err, dtype, int(keep.sum())),
    )


def check_grads(label: str, got: dict, want: dict) -> None:
    """Each gradient by name against its float64 value and per-element tolerance."""
    assert set(got) == set(want), f"{label}: gradients {sorted(got)} != {sorted(want)}"
    for name, value in got.items():
        exact, tol = want[name]
        check_close(f"{label} {name}", value, exact, tol)
