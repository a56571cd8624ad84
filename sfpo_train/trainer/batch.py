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
    old_log_probs: torch.Tensor | None = None  # None until the old-log-prob pass (or the first update pass) gives them
    ref_log_probs: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> dict:
        """The per-row fields at ``index`` (None where a field is not set)."""
        return {f: (None if getattr(self, f) is None else getattr(self, f)[index]) for f in ROW_FIELDS}
