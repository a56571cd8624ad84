"""One iteration's rollouts as the actor consumes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_FIELDS = ("prompt_ids", "prompt_mask", "responses", "response_mask", "advantages", "old_log_probs", "ref_log_probs")


@dataclass
class TrainBatch:
    """``N = B * n`` responses: ``[N, P]`` prompts (left padded), ``[N, R]`` responses and per-token values."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    scores: torch.Tensor  # [N]
    advantages: torch.Tensor | None = None  # [N, R]
    old_log_probs: torch.Tensor | None = None
    # the old-log-prob entropy aggregated with loss_agg_mode (verl's actor/entropy), when the first update
    # pass supplied the old log-probs (Actor.old_log_probs_from_update)
    old_entropy: float | None = None
    ref_log_probs: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> dict:
        """The per-row fields at ``index`` (None where a field is not set)."""
        return {f: (None if getattr(self, f) is None else getattr(self, f)[index]) for f in ROW_FIELDS}
