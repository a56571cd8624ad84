"""The vLLM rollout engine (``actor_rollout_ref.rollout.name=vllm``): runs wherever vLLM and a GPU are present.

vLLM is an optional extra (``pip install -e '.[vllm]'``); CI has neither it nor a
GPU, so these tests skip there and run on a GPU machine with the extra installed.
"""

from __future__ import annotations

import pytest
import torch

from helpers.devices import requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


def test_vllm_greedy_rollouts_follow_the_synced_weights(tmp_path):
    pytest.importorskip("vllm")
    from sfpo_train.trainer.config import load_config
    from sfpo_train.trainer.rollout import HFRollout
    from sfpo_train.trainer import Trainer

    cfg = load_config("smoke", ["trainer.device=cuda", "actor_rollout_ref.rollout.name=vllm",
                                "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
                                f"trainer.default_local_dir={tmp_path}", "trainer.experiment_name=vllm",
                                "trainer.progress_bar=false", "actor_rollout_ref.actor.optim.lr=1e-3"])  # fmt: skip
    trainer = Trainer.create(cfg)
    hf = HFRollout(trainer.model, trainer.tokenizer, trainer.autocast)
    prompts = [p.input_ids for p in trainer.val_prompts[:16]]
    greedy = trainer._sampling(validation=True)

    def agree() -> float:
        a, b = trainer.rollout.generate(prompts, greedy), hf.generate(prompts, greedy)
        return float((a.responses == b.responses).all(dim=1).float().mean())

    assert agree() >= 0.9  # fp32 both sides; a near-tie may flip a token
    history = trainer.fit()  # updates the weights and syncs them into vLLM after every iteration
    assert len(history) == cfg.trainer.total_training_steps
    assert agree() >= 0.9
    batch = trainer.rollout.generate(prompts, trainer._sampling(validation=False))
    assert batch.responses.shape == (16 * cfg.actor_rollout_ref.rollout.n, cfg.data.max_response_length)
    assert torch.equal(batch.response_mask.sum(1) > 0, torch.ones(len(batch.responses), dtype=torch.bool, device="cuda"))
