"""Independent float64 oracles of the kernel tests, written from DESIGN.md's formulas, not from the package.

:func:`token_oracle`: per-token log-prob, entropy and the analytic dlogits

    dz = (g_logp * (onehot(y) - p) + g_H * p * (mu - z)) / temperature

with the scales the tests' tolerances are built from (see test_logprob_entropy.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
