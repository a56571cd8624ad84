"""Left padding of token-id lists, shared by the standalone trainer's rollouts and verl's hf rollout server."""

from __future__ import annotations

import torch


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` ids left-padded with ``pad_id`` to the longest sequence, and the attention mask (1 on real tokens)."""
    rows = [torch.tensor(s, dtype=torch.long) for s in sequences]
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    ones = [torch.ones(len(s), dtype=torch.long) for s in sequences]
    mask = torch.nn.utils.rnn.pad_sequence(ones, batch_first=True, padding_value=0, padding_side="left")
    return ids.to(device), mask.to(device)
