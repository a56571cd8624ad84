"""Checkpoints of the standalone trainer: ``<run>/checkpoints/global_step_<N>/``.

Each holds what a resumed run needs to reach the same weights as an
uninterrupted one: ``model/`` (a transformers directory with the tokenizer) and
``trainer_state.pt`` (optimizer, LR scheduler, SFPO state, RNG states, data
position, counters, and the run's resolved config as YAML text). A checkpoint
is written under a per-process temporary name and renamed into place, then
``latest_checkpointed_iteration.txt`` (verl's marker) is replaced atomically,
so a kill never leaves half a checkpoint behind.

``trainer_state.pt`` holds only tensors and plain data (the RNG states as
tensors and numbers, not numpy or Python objects) and is read with
``torch.load(weights_only=True)``: a planted or older file that needs
unpickling of arbitrary objects is refused, never executed.

Resuming (:func:`find_resumable`) does not trust the marker: it tries the
``global_step_*`` directories newest first and takes the first intact one,
warning about each one it skips and why. Intact means everything resume reads
is a regular file (a planted FIFO would hang the read) that loads and
validates: the model's ``config.json`` and ``generation_config.json`` as
transformers reads them, safetensors weights (a ``pytorch_model.bin`` is not
read: unpickling), and a state with every entry resume restores (optimizer,
scheduler, SFPO, sampler, RNG, counters, config) in the shape it expects.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import pickle
import random
import re
import shutil
import stat
import warnings

import numpy as np
import torch

import sfpo_train.trainer.config as config_lib
from sfpo_train.trainer.metrics_log import MetricsLog
from sfpo_train.trainer.run_guard import RunWarning, tmp_name, write_atomic, writing

CONFIG_FILE = config_lib.RUN_CONFIG_FILE
CHECKPOINT_PREFIX = "global_step_"
LATEST_FILE = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.pt"
STATE_FORMAT = 2  # 2: weights-only (tensors and plain data) with the config; 1 (unversioned): pickled RNG objects
_STEP_DIR = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")


def rng_state() -> dict:
    """Python's, numpy's and torch's (CPU and every CUDA device's) RNG states, as tensors and plain numbers."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str, global_step: int, model, tokenizer, state: dict) -> str:
    """Write ``checkpoints/global_step_<global_step>/`` (model, tokenizer, ``state``) and mark it the latest.

    The caller holds the run's lock (:func:`~sfpo_train.trainer.run_guard.lock_run_dir`), so temporary
    directories left by an earlier, killed process are removed here.
    """
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"{CHECKPOINT_PREFIX}{global_step}")
    tmp = tmp_name(final)
    with writing(tmp):
        for stale in glob.glob(os.path.join(root, f"{CHECKPOINT_PREFIX}*.tmp*")):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in glob.glob(os.path.join(root, f"{LATEST_FILE}.tmp*")):
            os.remove(stale)
        try:  # a failed write (a full disk) leaves no temporary behind
            os.makedirs(tmp)
            model.save_pretrained(os.path.join(tmp, "model"))
            tokenizer.save_pretrained(os.path.join(tmp, "model"))
            with open(os.path.join(tmp, STATE_FILE), "wb") as f:  # a file object: a write error is an OSError
                torch.save({**state, "format": STATE_FORMAT}, f)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(e, OSError) and "os error 28" in str(e):  # safetensors' (Rust) error for ENOSPC
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp) from None
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    write_atomic(os.path.join(root, LATEST_FILE), str(global_step))
    return final


def load_state(checkpoint: str) -> dict:
    """The ``trainer_state.pt`` of a checkpoint directory, read weights-only; ``ValueError`` naming the file."""
    path = os.path.join(checkpoint, STATE_FILE)
    _check_regular(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        needs = re.search(r"GLOBAL (\S+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and needs:
            raise ValueError(
                f"{path} is not a weights-only trainer state (it needs {needs[1]}), so it is not loaded: "
                f"unpickling it could run code. Checkpoints of sfpo before state format {STATE_FORMAT} "
                "cannot be resumed; one you did not write should be deleted"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path} cannot be read ({type(e).__name__}: {first}); truncated or not a torch file?"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} has state format {found!r}, this sfpo reads format {STATE_FORMAT}")
    return state


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint the latest marker names, or None (no marker, or its directory is gone)."""
    root = os.path.join(run_dir, "checkpoints")
    step = _marker_step(os.path.join(root, LATEST_FILE))
    if step is None:
        return None
    path = os.path.join(root, f"{CHECKPOINT_PREFIX}{step}")
    return path if os.path.isdir(path) else None


def _marker_step(marker: str) -> int | None:
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{marker} holds {text[:40]!r}, not a step number")
    return int(text)


def checkpoint_dirs(run_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoints/global_step_<N>`` directory, newest first (temporaries excluded)."""
    root = os.path.join(run_dir, "checkpoints")
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        match = _STEP_DIR.fullmatch(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match[1]), os.path.join(root, name)))
    return sorted(found, reverse=True)


def find_resumable(run_dir: str) -> tuple[str, dict] | None:
    """The newest intact checkpoint (see the module's docstring) with its state; None if there is none.

    Each newer one skipped (and a marker naming something else) is reported with a :class:`RunWarning`;
    ``ValueError`` listing every checkpoint and its problem when none of them is intact.
    """
    skipped = []
    marker = os.path.join(run_dir, "checkpoints", LATEST_FILE)
    try:
        marked = _marker_step(marker)
    except ValueError as e:
        marked = None
        skipped.append(f"ignored {e}")
    candidates = checkpoint_dirs(run_dir)
    if marked is not None and marked not in [step for step, _ in candidates]:
        skipped.append(f"{marker} names {CHECKPOINT_PREFIX}{marked}, which does not exist")
    for step, path in candidates:
        try:
            _check_model_dir(os.path.join(path, "model"))
            state = load_state(path)
            check_state(state, os.path.join(path, STATE_FILE), step)
        except ValueError as e:
            skipped.append(f"skipped {path}: {e}")
            continue
        if skipped:
            warnings.warn(f"resuming {run_dir} from {path}; " + "; ".join(skipped), RunWarning, stacklevel=2)
        return path, state
    if candidates:
        raise ValueError(f"no checkpoint of {run_dir} can be resumed: " + "; ".join(skipped))
    if skipped:
        warnings.warn(f"{run_dir}: " + "; ".join(skipped), RunWarning, stacklevel=2)
    return None


_STATE_ENTRIES = {  # what resume restores from trainer_state.pt, and the type each entry must have
    "optimizer": dict,
    "lr_scheduler": dict,
    "sfpo": dict,
    "sampler": dict,
    "rng": dict,
    "rollouts_total": int,
    "elapsed_s": (int, float),
    "last_val": dict,
    "config": str,
}


def check_state(state: dict, path: str, step: int) -> None:
    """``ValueError`` naming ``path`` and the entry unless ``state`` holds everything resume restores, as it must be."""

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}")

    if state.get("global_step") != step:
        raise bad(f"is for step {state.get('global_step')!r}, not {step}")
    for key, kind in _STATE_ENTRIES.items():
        if key not in state:
            raise bad(f"has no {key!r} entry")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise bad(f"{key!r} is a {type(state[key]).__name__}, not a {getattr(kind, '__name__', 'number')}")
    optimizer = state["optimizer"]
    groups = optimizer.get("param_groups")
    if not isinstance(optimizer.get("state"), dict) or not isinstance(groups, list) or not groups:
        raise bad("'optimizer' is not an optimizer state_dict (needs 'state' and a non-empty 'param_groups')")
    ids = set()
    for group in groups:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) or not group["params"]:
            raise bad("'optimizer' has a parameter group without parameters")
        ids.update(group["params"])
    if step > 0 and not optimizer["state"]:
        raise bad(f"'optimizer' has an empty state at step {step} (its moments were lost)")
    if not set(optimizer["state"]) <= ids:
        raise bad("'optimizer' has state for parameters that are in none of its groups")
    scheduler = state["lr_scheduler"]
    if not isinstance(scheduler.get("last_epoch"), int) or not isinstance(scheduler.get("base_lrs"), list):
        raise bad("'lr_scheduler' is not an LR scheduler state_dict (needs 'last_epoch' and 'base_lrs')")
    if len(scheduler["base_lrs"]) != len(groups):
        raise bad(f"'lr_scheduler' has {len(scheduler['base_lrs'])} base_lrs for {len(groups)} parameter groups")
    sampler = state["sampler"]
    if not all(isinstance(sampler.get(k), int) and sampler[k] >= 0 for k in ("epoch", "position")):
        raise bad(f"'sampler' needs non-negative integers 'epoch' and 'position', got {sampler!r}"[:300])
    try:
        _check_rng(state["rng"])
    except Exception as e:  # any malformed piece: a KeyError, TypeError, ValueError or RuntimeError
        raise bad(f"'rng' is not an RNG state ({type(e).__name__}: {_first_line(e)})") from None
    saved = config_lib.parse_config(state["config"], f"{path}'s 'config'")
    from sfpo_train.sfpo import SFPO

    try:  # against the checkpoint's own config: a config.yaml that differs is refused as such, after the choice
        SFPO([torch.nn.Parameter(torch.zeros(1))], config_lib.sfpo_config(saved)).load_state_dict(state["sfpo"])
    except ValueError as e:
        raise bad(f"'sfpo' is not a state of the SFPO its config describes ({e})") from None


def _check_rng(rng: dict) -> None:
    """Raises unless :func:`set_rng_state` can restore ``rng`` (tried on fresh generators, not the global ones)."""
    py, npy = rng["python"], rng["numpy"]
    random.Random().setstate((int(py["version"]), tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]))
    np.random.RandomState().set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.Generator().set_state(rng["torch"])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_regular(path: str) -> None:
    """``ValueError`` unless ``path`` is a regular file (checked without opening it: a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file")


def _check_model_dir(model_dir: str) -> None:
    """``ValueError`` naming the file unless ``model_dir`` loads: its configs as transformers reads them, its weights.

    Weights must be safetensors (what :func:`save_checkpoint` writes); a ``pytorch_model.bin`` is a pickle.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    config = os.path.join(model_dir, "config.json")
    _check_regular(config)
    try:
        with open(config) as f:
            if not isinstance(json.load(f), dict):
                raise ValueError("not a JSON object")
        AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # JSON, an unknown model_type (ValueError / KeyError), a bad entry
        raise ValueError(f"{config} cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    generation = os.path.join(model_dir, "generation_config.json")
    if os.path.lexists(generation):
        _check_regular(generation)
        try:
            GenerationConfig.from_pretrained(model_dir)
        except Exception as e:
            raise ValueError(f"{generation} cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.lexists(index):
        _check_regular(index)
    weights = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not weights:
        pickled = sorted(os.path.basename(p) for p in glob.glob(os.path.join(model_dir, "*.bin")))
        also = f" ({', '.join(pickled)} is not loaded: a pickle, not written by sfpo)" if pickled else ""
        raise ValueError(f"{model_dir} holds no model weights (*.safetensors){also}")
    for path in weights:
        _check_regular(path)
        try:
            with safe_open(path, "pt"):  # reads the header; a truncated file does not cover its tensors
                pass
        except Exception as e:
            raise ValueError(f"{path} cannot be read ({e})") from None


# ----------------------------------------------------------------- a run directory without a checkpoint


def restart_reason(run_dir: str) -> str | None:
    """Why a new run may reuse ``run_dir`` (None: it holds no run); ``ValueError`` if it holds one to keep.

    A run with ``config.yaml`` but no checkpoint that did not finish was stopped before its first
    checkpoint (killed, or it crashed): there is nothing to resume, so it is started again.
    """
    config_path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(config_path):
        return None
    keep = ValueError(
        f"run directory {run_dir!r} already holds a run: continue it with --resume {run_dir}, "
        "or choose another trainer.experiment_name"
    )
    if checkpoint_dirs(run_dir):
        raise keep
    logged, total = logged_steps(run_dir), None
    try:
        total = config_lib.config_from_yaml(config_path).trainer.total_training_steps
    except ValueError:
        pass  # an unreadable config.yaml and no checkpoint: nothing there can be resumed
    if logged is not None and total is not None and logged >= total:
        raise keep  # it finished without checkpoints (trainer.save_freq <= 0): its metrics are its result
    return (
        f"{run_dir} holds a run stopped before its first checkpoint ({logged if logged is not None else '?'} of "
        f"{total if total is not None else '?'} steps logged, nothing to resume): starting it again from step 0, "
        "replacing its config.yaml and metrics"
    )


def logged_steps(run_dir: str) -> int | None:
    """The last training step in ``metrics.jsonl`` (0 if none), or None if the file cannot be read."""
    try:
        rows = MetricsLog(run_dir).read()
    except ValueError:
        return None
    return max((int(r.get("training/global_step", 0)) for r in rows), default=0)


def clear_run(run_dir: str) -> None:
    """Remove what a stopped run wrote before its first checkpoint (metrics, checkpoint temporaries).

    Called once the new run's trainer is built, so ``rollout_model/`` (the vLLM engine's copy of the
    weights, just rewritten by that trainer and read by its live engine) is kept.
    """
    for name in ("metrics.jsonl", "metrics.csv"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
