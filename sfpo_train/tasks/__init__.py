"""Tasks for the standalone trainer: verl-style data rows, a reward dispatcher, evaluation.

- :func:`compute_score` has verl's ``default_compute_score`` signature and routes
  by ``data_source`` to the task's scorer; it can be passed to verl as a custom
  reward function.
- :data:`DEFAULT_TASK` and :func:`default_paths`: the embedded default that
  ``sfpo train`` runs with no arguments (model and data shipped inside the package).
- :func:`load_rows` reads a verl parquet file into plain Python rows;
  :func:`evaluate` is the mean reward of a model's completions on such rows.

Rows follow verl's layout: ``data_source``, ``prompt`` (chat messages),
``ability``, ``reward_model`` (``{"style", "ground_truth"}``), ``extra_info``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sfpo_train.tasks import addition

DEFAULT_TASK = "addition"

# data_source -> scorer with verl's signature (data_source, solution_str, ground_truth, extra_info)
SCORERS: dict[str, Callable[..., float]] = {addition.DATA_SOURCE: addition.compute_score}

# task name -> directory of its shipped assets: model/, train.parquet, test.parquet
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
TASK_ASSETS: dict[str, Path] = {"addition": _ASSETS / "addition"}


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """The reward of one response: the scorer registered for ``data_source`` (see :data:`SCORERS`).

    Same signature as verl's ``default_compute_score``; raises ``ValueError``
    naming the data source and the known ones when none is registered.
    """
    scorer = SCORERS.get(data_source)
    if scorer is None:
        raise ValueError(f"no reward function for data_source {data_source!r}; known: {sorted(SCORERS)}")
    return scorer(data_source, solution_str, ground_truth, extra_info)


def default_paths(task: str = DEFAULT_TASK) -> dict[str, str]:
    """Absolute paths of a task's shipped assets: ``{"model", "train_files", "val_files"}``.

    ``model`` is a Hugging Face model directory (weights, generation config and
    tokenizer), the other two are verl-layout parquet files. Raises
    ``ValueError`` for an unknown task and ``FileNotFoundError`` if the assets
    are missing from the installation.
    """
    if task not in TASK_ASSETS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_ASSETS)}")
    root = TASK_ASSETS[task]
    paths = {"model": root / "model", "train_files": root / "train.parquet", "val_files": root / "test.parquet"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"task {task!r} assets missing: {missing}; regenerate them with scripts/make_{task}_data.py and "
            f"scripts/train_{task}_model.py"
        )
    return {key: str(p) for key, p in paths.items()}


def load_rows(path: str | Path) -> list[dict]:
    """The rows of a verl-layout parquet file as plain dicts and lists (no numpy arrays)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[dict],
    *,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> list[str]:
    """Each row's response text, decoded with ``skip_special_tokens=True`` (as verl's reward sees it).

    The prompt is ``tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True)``;
    prompts are left-padded in batches of ``batch_size`` and run through
    ``model.generate``: greedy, or (``do_sample=True``) ancestral sampling at
    ``temperature`` with no top-k/top-p cut, drawn from torch's global RNG. The
    model is put in eval mode for the call and its previous mode restored.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.padding_side != "left":
        # Right padding would put pad tokens between a prompt and its continuation.
        raise ValueError(
            f"tokenizer.padding_side must be 'left' for batched generation, got {tokenizer.padding_side!r}"
        )
    if do_sample:
        # top_k=0 and top_p=1.0 switch the warpers off, whatever the model's generation_config says.
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    else:
        sampling = {"do_sample": False}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    responses: list[str] = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            prompts = [
                tokenizer.apply_chat_template(list(row["prompt"]), add_generation_prompt=True, tokenize=False)
                for row in batch
            ]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            output = model.generate(
                # only these two: some tokenizers add token_type_ids, which generate() rejects
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **sampling,
            )
            # With left padding every prompt ends at the same column, so the
            # responses are everything after it.
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return responses


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    rows: Sequence[dict],
    *,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> float:
    """Mean reward over ``rows`` (verl layout) of the model's responses, scored with :func:`compute_score`.

    For a 0/1 reward such as addition's this is the accuracy. Responses come
    from :func:`generate_responses` with the same arguments.
    """
    if len(rows) == 0:
        raise ValueError("rows must not be empty")
    responses = generate_responses(
        model,
        tokenizer,
        rows,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        do_sample=do_sample,
        temperature=temperature,
    )
    total = 0.0
    for row, response in zip(rows, responses):
        total += compute_score(row["data_source"], response, row["reward_model"]["ground_truth"], row.get("extra_info"))
    return total / len(rows)


__all__ = [
    "DEFAULT_TASK",
    "SCORERS",
    "TASK_ASSETS",
    "addition",
    "compute_score",
    "default_paths",
    "evaluate",
    "generate_responses",
    "load_rows",
]
