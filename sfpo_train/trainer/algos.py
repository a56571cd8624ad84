"""The GRPO family's arithmetic outside the loss: advantages, micro-batch weights, the iteration's entropy, the LR
schedule (verl 0.9.1's)."""

from __future__ import annotations

import math

import torch

from sfpo_kernels import grpo_math

GRPO_EPS = 1e-6


def iteration_entropy(entropy: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str) -> float:
    """The iteration's entropy (verl's ``actor/entropy``, SFPO's trigger input): the old-log-prob pass's per-token
    entropy ``[N, R]`` aggregated like the loss (``loss_agg_mode``) over the response tokens."""
    return float(grpo_math.agg_loss(entropy, response_mask.float(), loss_agg_mode))


def grpo_advantages(scores: torch.Tensor, group_size: int, norm_by_std: bool) -> torch.Tensor:
    """GRPO's outcome advantage per response; ``scores`` ``[G * group_size]``, groups contiguous.

    ``(r - mean_g) / (std_g + 1e-6)`` with the unbiased std (``torch.std``), or
    ``r - mean_g`` (Dr. GRPO). A group of one has mean 0 and std 1, as in verl.
    """
    groups = scores.view(-1, group_size).double()
    if group_size == 1:
        mean, std = torch.zeros_like(groups), torch.ones_like(groups)
    else:
        mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    adv = groups - mean
    if norm_by_std:
        adv = adv / (std + GRPO_EPS)
    return adv.reshape(-1).float()


def micro_batch_weights(
    response_mask: torch.Tensor, micro_batches: list[torch.Tensor], mode: str
) -> list[torch.Tensor]:
    """Each micro-batch's share of its mini-batch's aggregate under ``mode``.

    ``sum_i w_i * agg(micro_i) == agg(mini-batch)``: token-mean weights by
    response tokens, the seq-* modes by non-empty rows, token-sum by 1. Returned
    as device tensors (no host sync).
    """
    if mode == "token-sum":
        return [torch.ones((), device=response_mask.device) for _ in micro_batches]
    if mode == "token-mean":
        counts = [response_mask[index].sum().float() for index in micro_batches]
    else:
        counts = [(response_mask[index].sum(dim=1) > 0).sum().float() for index in micro_batches]
    total = torch.stack(counts).sum().clamp(min=1.0)
    return [c / total for c in counts]


def lr_lambda(total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float):
    """verl 0.9.1's schedules: linear warm-up ``step / warmup_steps`` (so iteration 0 runs at lr 0, as
    ``get_constant_schedule_with_warmup`` / ``get_cosine_schedule_with_warmup`` do), then constant or
    cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return step / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
