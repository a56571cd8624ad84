"""A tiny real training setup for the profiler and report tests: a random Qwen2 and small parquet files.

The same model and data as ``test_trainer.py``'s fixtures (a 1-layer, hidden-32
Qwen2 with the addition tokenizer; 64 training and 16 test problems), as plain
functions so several test files can build them.
"""

from __future__ import annotations

import os

import pandas as pd
import torch

from sfpo_train.tasks import addition


def write_tiny_model(path: str) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shipped = {k: v for k, v in addition.build_model_config().to_dict().items() if k != "layer_types"}
    config = Qwen2Config(
        **{
            **shipped,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
        }
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(path)
    addition.build_tokenizer().save_pretrained(path)
    return path


def write_data(path: str) -> tuple[str, str]:
    train, test = os.path.join(path, "train.parquet"), os.path.join(path, "test.parquet")
    pd.DataFrame(addition.make_rows(64, seed=5, split="train")).to_parquet(train)
    pd.DataFrame(addition.make_rows(16, seed=6, split="test")).to_parquet(test)
    return train, test


def tiny_overrides(model_dir: str, data: tuple[str, str]) -> list[str]:
    """Overrides pointing the ``smoke`` preset at the tiny model and data."""
    return [f"actor_rollout_ref.model.path={model_dir}", f"data.train_files={data[0]}", f"data.val_files={data[1]}"]


def smoke_config(tiny: list[str], root, name: str, *overrides: str):
    """The smoke preset on the tiny model and data (``tiny``: :func:`tiny_overrides`), its run ``root/name``,
    no progress bar, then ``overrides``."""
    from sfpo_train.trainer import config as config_lib

    return config_lib.load_config(
        "smoke",
        [
            *tiny,
            f"trainer.default_local_dir={root}",
            f"trainer.experiment_name={name}",
            "trainer.progress_bar=false",
            *overrides,
        ],
    )
