"""The trainer's command line and its small pure functions: key help, bad input, advantages, schedule, sampler."""

from __future__ import annotations

import os

import pytest
import torch

import sfpo_train.trainer.config as config_lib
from sfpo_train.tasks import default_paths
from sfpo_train.trainer import grpo_advantages, lr_lambda
from sfpo_train.trainer.data import PromptSampler
from sfpo_train.trainer.key_help import KEY_HELP
from sfpo_train.trainer.rollout import response_mask_from
from tests.helpers.cli import run_cli


def test_train_help_lists_every_config_key():
    out = run_cli("train", "--help")
    assert out.returncode == 0
    for key in config_lib.config_keys():
        assert f"    {key.rsplit('.', 1)[1]}=" in out.stdout, key
    assert set(KEY_HELP) == set(config_lib.config_keys())
    for flag in ("--preset", "--algorithm", "--resume", "--print-config"):
        assert flag in out.stdout


def test_train_cli_reports_bad_input_and_prints_config(tmp_path):
    out = run_cli("train", "actor_rollout_ref.rollout.m=4", cwd=tmp_path)
    assert out.returncode == 2 and "unknown config key 'actor_rollout_ref.rollout.m'" in out.stderr
    out = run_cli("train", "--algorithm", "drgrpo", "--print-config", "data.train_batch_size=32", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "train_batch_size: 32" in out.stdout and "loss_agg_mode: seq-mean-token-sum-norm" in out.stdout
    assert "norm_adv_by_std_in_grpo: false" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_train_cli_smoke_run_on_the_shipped_default(tmp_path):
    out = run_cli("train", "--preset", "smoke", "trainer.experiment_name=cli", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "validation accuracy:" in out.stdout
    assert (tmp_path / "runs" / "cli" / "metrics.jsonl").exists()
    assert (
        config_lib.config_from_yaml(str(tmp_path / "runs" / "cli" / "config.yaml")).actor_rollout_ref.model.path is None
    )
    assert os.path.isdir(default_paths()["model"])


# --------------------------------------------------------------------------- parts


def test_grpo_advantages_match_the_formula():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    adv = grpo_advantages(scores, 4, norm_by_std=True)
    for g in range(2):
        group = scores[4 * g : 4 * g + 4].double()
        expected = (group - group.mean()) / (group.std() + 1e-6)
        assert torch.allclose(adv[4 * g : 4 * g + 4].double(), expected, atol=1e-6)
    dr = grpo_advantages(scores, 4, norm_by_std=False)
    assert torch.allclose(dr, scores - scores.view(2, 4).mean(1).repeat_interleave(4))
    # a group of one has mean 0 and std 1 (verl), so the advantage is r / (1 + 1e-6)
    assert torch.allclose(grpo_advantages(scores, 1, norm_by_std=True), scores / (1 + 1e-6), rtol=0, atol=1e-7)


def test_lr_lambda_warmup_then_cosine():
    f = lr_lambda(total_steps=10, warmup_steps=2, kind="cosine", min_lr_ratio=0.1)
    assert [f(0), f(1)] == [0.0, 0.5]  # verl 0.9.1: step / warmup_steps
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1) and f(6) == pytest.approx(0.55)
    assert lr_lambda(10, 0, "constant", 0.0)(7) == 1.0


def test_prompt_sampler_epochs_and_state():
    sampler = PromptSampler(10, 4, shuffle=True, seed=3)
    first = [sampler.next_batch() for _ in range(2)]
    assert sorted(first[0] + first[1])[:8] == sorted(first[0] + first[1]) and len(set(first[0] + first[1])) == 8
    state = sampler.state_dict()
    nxt = sampler.next_batch()  # 2 left: a new epoch starts (the partial batch is dropped)
    assert sampler.epoch == 1
    other = PromptSampler(10, 4, shuffle=True, seed=3)
    other.load_state_dict(state)
    assert other.next_batch() == nxt
    with pytest.raises(ValueError, match="train_batch_size=11 is larger than the training set"):
        PromptSampler(10, 11, shuffle=False, seed=0)


def test_response_mask_counts_through_the_first_eos():
    eos = 1
    responses = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 1, 1, 0], [5, 6, 7, 8, 9], [1, 0, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(response_mask_from(responses, eos), expected)
