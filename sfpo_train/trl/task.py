"""The embedded addition task in TRL's format: a prompt dataset and a reward function for ``GRPOTrainer``.

The same problems, model and reward as ``sfpo train``'s default: the verl-layout
parquet rows become ``{"prompt": "123+456=", "ground_truth": "579"}`` (standard,
not conversational: TRL tokenizes the bare prompt, as the standalone trainer does)
and :func:`addition_reward` scores a completion 1.0 iff it is the exact sum.
"""

from __future__ import annotations

from sfpo_train.tasks import default_paths, load_rows
from sfpo_train.tasks.addition import DATA_SOURCE, compute_score


def addition_rows(split: str = "train", limit: int | None = None) -> list[dict]:
    """The shipped ``train`` or ``test`` problems as ``{"prompt", "ground_truth"}`` rows (the first ``limit``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    rows = load_rows(default_paths()["train_files" if split == "train" else "val_files"])
    rows = rows[:limit] if limit is not None else rows
    return [{"prompt": r["prompt"][0]["content"], "ground_truth": r["reward_model"]["ground_truth"]} for r in rows]


def addition_dataset(split: str = "train", limit: int | None = None):
    """:func:`addition_rows` as a ``datasets.Dataset`` (TRL's ``train_dataset``)."""
    from datasets import Dataset

    return Dataset.from_list(addition_rows(split, limit))


def addition_reward(completions: list[str], ground_truth: list[str], **kwargs) -> list[float]:
    """TRL's reward-function signature: 1.0 for each completion that is exactly its row's sum, else 0.0."""
    return [compute_score(DATA_SOURCE, c, g) for c, g in zip(completions, ground_truth, strict=True)]


def model_path() -> str:
    """The shipped model directory (weights and tokenizer), for ``GRPOTrainer(model=...)``."""
    return default_paths()["model"]
