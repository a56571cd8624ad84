"""A user's own verl-layout parquet file and Hugging Face model directory, scored by verl's own reward functions.

GSM8K-style rows (verl's ``examples/data_preprocess/gsm8k.py`` layout, ``data_source``
``openai/gsm8k``) written here, a tiny randomly initialised chat model saved to a
directory, and ``sfpo train``'s default reward: verl's ``default_compute_score``
for a data source sfpo does not know; a data source no scorer knows stops the run
at startup naming ``custom_reward_function``.
"""

from __future__ import annotations

import json
import os
import sys

import pandas as pd
import pytest
import torch

from sfpo_train.trainer import Trainer
from sfpo_train.trainer import config as config_lib
from sfpo_train.trainer.reward import default_reward, verl_default_compute_score
from sfpo_train.trainer.rollout import RolloutBatch
from tests.helpers.optional import import_or_skip
from tests.helpers.tiny_text_model import write_tiny_text_model

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'  # verl's gsm8k.py
PROBLEMS = [  # (question, answer)
    ("Tom has 48 apples and buys 24 more. How many apples does he have?", "72"),
    ("A box holds 12 pens. How many pens are in 3 boxes?", "36"),
    ("Ann had 50 dollars and spent 18. How much is left?", "32"),
    ("There are 9 rows of 7 chairs. How many chairs?", "63"),
    ("Sam reads 15 pages a day. How many pages in 4 days?", "60"),
    ("A bus has 40 seats and 27 are taken. How many are free?", "13"),
    ("Mia bakes 6 trays of 8 cookies. How many cookies?", "48"),
    ("Leo walks 3 km a day for 5 days. How many km?", "15"),
]


def gsm8k_rows(problems, split: str, data_source: str = "openai/gsm8k") -> list[dict]:
    return [
        {
            "data_source": data_source,
            "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": split, "index": i, "answer": f"#### {answer}", "question": question},
        }
        for i, (question, answer) in enumerate(problems)
    ]


def write_parquet(path, rows) -> str:
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_text_model(str(tmp_path_factory.mktemp("text_model")))


def own_config(model_dir, train, val, root, *overrides):
    """The smoke preset on the user's model and data, as the docs' command writes it."""
    return config_lib.load_config(
        "smoke",
        [
            f"actor_rollout_ref.model.path={model_dir}",
            f"data.train_files={train}",
            f"data.val_files={val}",
            "data.max_prompt_length=192",
            "data.max_response_length=8",
            f"trainer.default_local_dir={root}",
            "trainer.experiment_name=own",
            "trainer.progress_bar=false",
            "trainer.logger=[]",
            *overrides,
        ],
    )


def test_gsm8k_rows_train_with_verls_scorer(model_dir, tmp_path):
    import_or_skip("verl")
    from verl.utils.reward_score import gsm8k

    train = write_parquet(tmp_path / "train.parquet", gsm8k_rows(PROBLEMS, "train"))
    val = write_parquet(tmp_path / "test.parquet", gsm8k_rows(PROBLEMS[:4], "test"))
    trainer = Trainer.create(own_config(model_dir, train, val, tmp_path / "runs", "trainer.total_training_steps=2"))
    history = trainer.fit()
    assert [h["training/global_step"] for h in history] == [1, 2]
    with open(tmp_path / "runs" / "own" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    validated = [r["training/global_step"] for r in rows if "val-core/openai/gsm8k/reward/mean@1" in r]
    assert validated == [0, 2]  # before training and at the end, under GSM8K's own data source
    assert all(0.0 <= r["critic/score/mean"] <= 1.0 for r in rows[1:])

    # The trainer's own scoring path (decode, then the reward function it was built with) on responses
    # whose text is known: verl's strict GSM8K rule gives 1.0 only for "#### <answer>", so the bare
    # answer (which sfpo's exact-match addition scorer would pass) and a wrong one score 0.
    prompt = trainer.train_prompts[0]
    assert prompt.data_source == "openai/gsm8k" and prompt.ground_truth == "72"
    texts = ["48 + 24 = 72. #### 72", "72", "#### 71"]
    tok = trainer.tokenizer
    width = max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) + 1
    responses = torch.full((len(texts), width), tok.pad_token_id)
    mask = torch.zeros_like(responses)
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        responses[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), 1
    ids = torch.tensor([prompt.input_ids] * len(texts))
    scores, _ = trainer.collector.score([prompt], RolloutBatch(ids, torch.ones_like(ids), responses, mask), len(texts))
    assert scores.tolist() == [1.0, 0.0, 0.0]
    assert scores.tolist() == [float(gsm8k.compute_score(t, "72")) for t in texts]


def test_default_reward_routes_to_sfpos_scorer_then_verls():
    import_or_skip("verl")
    assert default_reward("openai/gsm8k", "so #### 1,234", "1234") == 1.0  # verl's rule drops the comma
    assert default_reward("openai/gsm8k", "1234", "1234") == 0.0  # no "####": verl's strict rule
    assert default_reward("sfpo/addition", "579", "579") == 1.0  # the embedded task keeps its own scorer
    assert default_reward("lighteval/MATH", "so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}") == 1.0


def test_a_data_source_no_scorer_knows_stops_the_run_before_any_work(model_dir, tmp_path):
    train = write_parquet(tmp_path / "train.parquet", gsm8k_rows(PROBLEMS, "train", data_source="my/own-task"))
    val = write_parquet(tmp_path / "test.parquet", gsm8k_rows(PROBLEMS[:2], "test"))
    with pytest.raises(ValueError) as info:
        Trainer.create(own_config(model_dir, train, val, tmp_path / "runs"))
    message = str(info.value)
    assert message.startswith(f"data.train_files={train!r}: data_source 'my/own-task' has no reward function")
    assert "custom_reward_function.path=" in message and "\n" not in message
    assert ("default_compute_score" in message) == (verl_default_compute_score() is not None)
    assert not os.path.exists(tmp_path / "runs" / "own")  # nothing left behind

    # A custom reward function decides itself what it scores: the same data starts.
    reward = tmp_path / "reward.py"
    reward.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n    return 0.5\n")
    trainer = Trainer.create(
        own_config(model_dir, train, val, tmp_path / "runs", f"custom_reward_function.path={reward}")
    )
    assert trainer.reward_fn is not default_reward


@pytest.fixture
def without_verl(monkeypatch):
    """verl's reward package cannot be imported (None in sys.modules halts the import), for this test only."""
    verl_default_compute_score.cache_clear()
    monkeypatch.setitem(sys.modules, "verl.utils.reward_score", None)
    yield
    verl_default_compute_score.cache_clear()


def test_without_verl_the_error_says_to_install_it_or_give_a_reward_function(model_dir, tmp_path, without_verl):
    train = write_parquet(tmp_path / "train.parquet", gsm8k_rows(PROBLEMS, "train"))
    with pytest.raises(ValueError) as info:
        Trainer.create(own_config(model_dir, train, train, tmp_path / "runs"))
    message = str(info.value)
    assert "data_source 'openai/gsm8k' has no reward function" in message
    assert "install the verl extra (pip install 'sfpo[verl]')" in message and "custom_reward_function.path=" in message
    with pytest.raises(ValueError, match="no reward function for data_source 'openai/gsm8k'"):
        default_reward("openai/gsm8k", "#### 72", "72")


def test_own_training_data_needs_its_own_validation_data(model_dir, tmp_path):
    train = write_parquet(tmp_path / "train.parquet", gsm8k_rows(PROBLEMS, "train"))
    cfg = own_config(model_dir, train, train, tmp_path / "runs", "data.val_files=null")
    with pytest.raises(ValueError, match=r"^data.val_files must be a parquet file of the same task .* got None$"):
        config_lib.validate(cfg)
