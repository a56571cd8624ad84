"""scripts/trl_compare.py: the settings it maps onto GRPOConfig, and a two-iteration run of three arms end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

import sfpo_train.trainer.config as config_lib
from tests.helpers.trl_setup import trl_parts

trl, _ = trl_parts()
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "trl_compare.py"
spec = importlib.util.spec_from_file_location("trl_compare", SCRIPT)
trl_compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trl_compare)


def test_grpo_settings_carry_sfpo_trains_default_into_grpo_config(tmp_path):
    cfg = config_lib.load_config("default", ["actor_rollout_ref.actor.optim.lr=2e-5", "data.train_batch_size=32"])
    args = trl.GRPOConfig(output_dir=str(tmp_path), **trl_compare.grpo_settings(cfg, seed=4))
    assert args.generation_batch_size == 32 * 8  # prompts x responses per generation
    assert args.per_device_train_batch_size == 16 * 8 and args.steps_per_generation == 2  # a step per mini-batch
    assert (args.learning_rate, args.weight_decay, args.max_grad_norm) == (2e-5, 0.01, 1.0)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert (args.epsilon, args.epsilon_high, args.loss_type, args.beta) == (0.2, 0.2, "dapo", 0.0)
    assert (args.max_completion_length, args.temperature, args.top_k, args.seed) == (5, 1.0, 0, 4)
    assert args.lr_scheduler_type == "constant" and not args.gradient_checkpointing and not args.bf16


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean", "loss_agg_mode='seq-mean-token-mean'"),
        ("actor_rollout_ref.actor.ppo_epochs=2", "ppo_epochs=2"),
        ("data.train_batch_size=24", "train_batch_size=24 must be a multiple of ppo_mini_batch_size=16"),
    ],
)
def test_settings_trl_cannot_mirror_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        trl_compare.grpo_settings(config_lib.load_config("default", [override]), seed=1)


def test_bad_arguments_are_refused_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        trl_compare.run(tmp_path, seeds=1, steps=0)
    with pytest.raises(ValueError, match="arms must be some of"):
        trl_compare.run(tmp_path, seeds=1, steps=1, arms=("trl-ppo",))
    assert list(tmp_path.iterdir()) == []


def test_three_arms_two_iterations_end_to_end(tmp_path):
    arms = ("trl-grpo", "trl-sfpo", "train-sfpo")
    paths = trl_compare.run(tmp_path, seeds=1, steps=2, threads=1, arms=arms, test_freq=1, val_samples=16, log=None)
    results = pd.read_csv(paths["csv"]).set_index("run")
    assert list(results.index) == ["trl-grpo-s1", "trl-sfpo-s1", "train-sfpo-s1"]
    assert set(results["iterations"]) == {2} and set(results["rollouts"]) == {2 * 16 * 8}
    # K = 3 while alpha > 0: 4 update passes per iteration for SFPO, 1 for GRPO, in both trainers
    assert list(results["update_passes"]) == [2, 8, 8]
    # one model, one test set, one evaluation function: the same accuracy before training in every arm
    assert results["initial_acc"].nunique() == 1
    assert set(results["grpo_best_from"]) == {"trl-grpo-s1"}  # no sfpo train GRPO arm: TRL's is the target
    assert "| TRL + SFPO | 1 |" in Path(paths["markdown"]).read_text()
    provenance = Path(paths["provenance"]).read_text()
    assert "threads: 1" in provenance and "trl " in provenance and "| train-sfpo-s1 |" in provenance
    runs = pd.read_csv(tmp_path / "report-trl" / "runs.csv")
    assert sorted(runs["arm"]) == ["GRPO", "SFPO"]
    assert Path(paths["report-train"]).exists()
