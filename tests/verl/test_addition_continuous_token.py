"""The shipped addition model through verl's agent-loop tokenization (Continuous Token, verl 0.9.1).

verl's agent loop builds every rollout prompt with the builder it picks from
config.json's ``model_type``: ``qwen2`` gives ``QwenContinuousTokenBuilder``,
whose constructor needs a one-token newline and a ``<|im_end|>`` id. These
tests run verl's own factory, dataset and builder on the shipped files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.optional import import_or_skip

import_or_skip("verl")

from sfpo_train import tasks
from sfpo_train.tasks import addition

ROWS = 64  # train prompts checked, of the 20,000


def _expected_ids(text: str) -> list[int]:
    """The task's ids written out by hand: digit d -> d + 2, "+" -> 12, "=" -> 13."""
    return [{"+": 12, "=": 13}[c] if c in "+=" else int(c) + 2 for c in text]


@pytest.fixture(scope="module")
def shipped():
    """verl's tokenizer and builder for the shipped model, made the way its agent loop makes them."""
    from verl.utils.tokenizer import hf_tokenizer
    from verl.utils.tokenizer.continuous_token_wiring import (
        create_continuous_token_builder,
    )

    model_dir = tasks.default_paths()["model"]
    model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    tokenizer = hf_tokenizer(model_dir)
    return tokenizer, create_continuous_token_builder(tokenizer, hf_model_type=model_type), model_type


def test_verl_picks_the_qwen_builder_for_the_shipped_model(shipped):
    from verl.utils.tokenizer.continuous_token import QwenContinuousTokenBuilder

    _, builder, model_type = shipped
    assert model_type == "qwen2"
    assert type(builder) is QwenContinuousTokenBuilder


def test_initial_tokens_of_train_prompts_are_the_bare_prompt(shipped, tmp_path):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tokenizer, builder, _ = shipped
    config = OmegaConf.create({"filter_overlong_prompts": False, "cache_dir": str(tmp_path)})
    dataset = RLHFDataset(data_files=[tasks.default_paths()["train_files"]], tokenizer=tokenizer, config=config)
    assert len(dataset) == 20000
    for i in range(ROWS):
        messages = dataset[i]["raw_prompt"]  # what verl's agent loop hands to build_initial_tokens
        (message,) = messages
        ids = builder.build_initial_tokens(messages)
        assert ids == _expected_ids(message["content"]), message
        templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert ids == list(templated["input_ids"]) == addition.build_tokenizer().encode(message["content"])
        assert len(ids) == addition.PROMPT_TOKENS


def test_a_turn_ending_in_im_end_gets_its_newline_back(shipped):
    # the Qwen builder's boundary rule: after <|im_end|> (15) comes a newline (14), inserted, not generated
    _, builder, _ = shipped
    first = [{"role": "user", "content": "1+2="}]
    runtime = builder.merge_assistant_tokens(builder.build_initial_tokens(first), [5, 15])
    assert runtime.token_ids == [3, 12, 4, 13, 5, 15] and runtime.inserted_token_ids == []
    merged = builder.merge_context_tokens(first, [*first, {"role": "user", "content": "4+5="}], runtime.token_ids)
    assert merged.inserted_token_ids == [14]
    assert merged.token_ids == [3, 12, 4, 13, 5, 15, 14, *_expected_ids("4+5=")]
    assert merged.appended_token_count == 4
