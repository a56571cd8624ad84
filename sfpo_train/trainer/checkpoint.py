"""Checkpoints of the standalone trainer: ``<run>/checkpoints/global_step_<N>/``.

Each holds what a resumed run needs to reach the same weights as an
uninterrupted one: ``model/`` (a transformers directory with the tokenizer) and
``trainer_state.pt`` (optimizer, LR scheduler, SFPO state, RNG states, data
position, counters). A checkpoint is written under a temporary name and renamed
into place, then ``latest_checkpointed_iteration.txt`` (verl's marker) is
replaced atomically, so a kill never leaves half a checkpoint behind.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

CHECKPOINT_PREFIX = "global_step_"
LATEST_FILE = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    """Python's, numpy's and torch's (CPU and every CUDA device's) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, global_step: int, model, tokenizer, state: dict) -> str:
    """Write ``checkpoints/global_step_<global_step>/`` (model, tokenizer, ``state``) and mark it the latest."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"{CHECKPOINT_PREFIX}{global_step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(os.path.join(tmp, "model"))
    tokenizer.save_pretrained(os.path.join(tmp, "model"))
    torch.save(state, os.path.join(tmp, STATE_FILE))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(root, LATEST_FILE + ".tmp"), "w") as f:
        f.write(str(global_step))
    os.replace(os.path.join(root, LATEST_FILE + ".tmp"), os.path.join(root, LATEST_FILE))
    return final


def load_state(checkpoint: str) -> dict:
    """The ``trainer_state.pt`` of a checkpoint directory."""
    return torch.load(os.path.join(checkpoint, STATE_FILE), map_location="cpu", weights_only=False)


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint the latest marker names, or None (no marker, or its directory is gone)."""
    root = os.path.join(run_dir, "checkpoints")
    marker = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        path = os.path.join(root, f"{CHECKPOINT_PREFIX}{int(f.read().strip())}")
    return path if os.path.isdir(path) else None
