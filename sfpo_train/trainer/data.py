"""Prompts in verl's parquet layout, tokenised once, and a resumable sampler over them.

A row (verl's RL dataset layout): ``prompt`` (a list of chat messages, or a
plain string), ``data_source`` (routes the reward function),
``reward_model.ground_truth`` and optionally ``extra_info``. Prompts go through
the tokenizer's chat template with ``add_generation_prompt=True``, as verl does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sfpo_train.padding import left_pad  # noqa: F401 (re-exported: older code imports it from here)


@dataclass
class Prompt:
    """One tokenised prompt and what its reward needs."""

    input_ids: list[int]
    data_source: str
    ground_truth: str
    extra_info: dict
    text: str


def _to_python(value):
    """pyarrow gives numpy arrays and dicts of numpy scalars; the reward function gets plain Python."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_python(v) for v in value]
    return value


def load_prompts(
    path: str,
    tokenizer,
    *,
    prompt_key: str,
    reward_fn_key: str,
    max_prompt_length: int,
    max_samples: int = -1,
    key: str = "data.train_files",
) -> list[Prompt]:
    """Read and tokenise a verl-layout parquet file; ``ValueError`` for anything a training run would trip on."""
    import pandas as pd

    if path is None or not os.path.isfile(path):
        raise ValueError(f"{key} must be an existing parquet file, got {path!r}")
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"{key}={path!r} is not a readable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in (prompt_key, reward_fn_key, "reward_model") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{key}={path!r} lacks column(s) {missing} (verl layout: {prompt_key}, {reward_fn_key}, "
            f"reward_model.ground_truth); it has {list(frame.columns)}"
        )
    if len(frame) == 0:
        raise ValueError(f"{key}={path!r} has no rows")
    if max_samples > 0:
        frame = frame.iloc[:max_samples]
    prompts = []
    for i, row in enumerate(frame.to_dict("records")):
        messages = _to_python(row[prompt_key])
        if isinstance(messages, str):
            text = messages
        else:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            raise ValueError(
                f"{key}={path!r} row {i}: the prompt has {len(ids)} tokens, more than "
                f"data.max_prompt_length={max_prompt_length}"
            )
        if len(ids) == 0:
            raise ValueError(f"{key}={path!r} row {i}: the prompt is empty")
        reward_model = _to_python(row["reward_model"])
        if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
            raise ValueError(f"{key}={path!r} row {i}: reward_model has no ground_truth")
        extra = _to_python(row.get("extra_info")) if "extra_info" in frame.columns else None
        prompts.append(
            Prompt(
                ids,
                str(row[reward_fn_key]),
                _to_python(reward_model["ground_truth"]),
                extra if isinstance(extra, dict) else {},
                text,
            )
        )
    return prompts


class PromptSampler:
    """Batches of prompt indices: a fresh permutation per epoch, the last partial batch dropped (verl's loader).

    The permutation of epoch e depends only on ``(seed, e)``, so the state is two
    integers and resume needs nothing else.
    """

    def __init__(self, num_prompts: int, batch_size: int, *, shuffle: bool, seed: int):
        if batch_size > num_prompts:
            raise ValueError(
                f"data.train_batch_size={batch_size} is larger than the training set ({num_prompts} prompts)"
            )
        self.num_prompts, self.batch_size, self.shuffle, self.seed = num_prompts, batch_size, shuffle, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_prompts))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_prompts, generator=generator).tolist()

    def next_batch(self) -> list[int]:
        if self.position + self.batch_size > self.num_prompts:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        batch = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
