"""Run directories as ``sfpo report`` reads them: :class:`Run`, :func:`load_run` and the lookups on them."""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

ARMS = ("GRPO", "SFPO")  # the order arms appear in, in every table and plot


@dataclass
class Run:
    """One run directory: its config and its metrics (row 0 may be the validation before training)."""

    path: str
    name: str
    arm: str  # "SFPO" or "GRPO"
    seed: int
    config: dict
    rows: pd.DataFrame  # every row of metrics.jsonl, sorted by training/global_step
    algorithm: str = "grpo"  # the recipe both arms run (grpo, drgrpo, dapo; "custom" when none matches)

    @property
    def train(self) -> pd.DataFrame:
        """The training steps (global_step >= 1)."""
        return self.rows[self.rows["training/global_step"] >= 1]

    @property
    def timed(self) -> pd.DataFrame:
        """The steps stage means are taken over: all but the first when there are 3 or more."""
        train = self.train
        return train.iloc[1:] if len(train) >= 3 else train

    @property
    def val(self) -> pd.DataFrame:
        """Validation rows: step, accuracy (mean over data sources), rollouts and wall-clock so far."""
        cols = [c for c in self.rows.columns if c.startswith("val-core/") and c.endswith("/reward/mean@1")]
        if not cols:
            return pd.DataFrame(columns=["step", "accuracy", "rollouts", "elapsed_s"])
        rows = self.rows.dropna(subset=cols, how="all")
        out = pd.DataFrame(
            {
                "step": rows["training/global_step"].astype(int),
                "accuracy": rows[cols].mean(axis=1),
                "rollouts": rows.get("train/rollouts_total", pd.Series(0, index=rows.index)).fillna(0),
                "elapsed_s": rows.get("train/elapsed_s", pd.Series(0.0, index=rows.index)).fillna(0.0),
            }
        )
        return out.reset_index(drop=True)


def nested(config: dict, dotted: str, default=None):
    """``config`` looked up along ``dotted`` (``"trainer.seed"``); ``default`` where a key on the way is missing."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def column(frame: pd.DataFrame, name: str) -> pd.Series:
    """``frame[name]``, or all NaN where the runs did not log that metric."""
    return frame[name] if name in frame else pd.Series(np.nan, index=frame.index)


def algorithm_of(config: dict) -> str:
    """The recipe (grpo, drgrpo, dapo) of a run's config (``custom`` without a config to read it from)."""
    from sfpo_train.trainer.config import algorithm_of as recipe_of

    return recipe_of(lambda key: nested(config, key)) if config else "custom"


def arms(runs: list[Run]) -> list[str]:
    """The arms present among ``runs``, GRPO first."""
    return [a for a in ARMS if any(r.arm == a for r in runs)]


def read_metrics(metrics: str) -> list[dict]:
    """The rows of a ``metrics.jsonl``, checked; ``ValueError`` naming the file, the line and what is wrong.

    As the trainer reads it: a torn (unparseable) last line, what a kill mid-write
    leaves, is dropped with a :class:`~sfpo_train.trainer.run_guard.RunWarning`; a
    bad line anywhere else is an error. Each row must be a JSON object whose
    ``training/global_step`` is a whole number >= 0 and whose other values are
    numbers, booleans or null; ``memory/`` keys must read ``memory/<stage>/<reading>``.
    """
    if not os.path.isfile(metrics):
        raise ValueError(f"{metrics}: not a regular file")
    try:
        with open(metrics, "rb") as f:
            lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    except OSError as e:
        raise ValueError(f"{metrics}: cannot read ({e.strerror})") from None
    rows = []
    for i, (number, raw) in enumerate(lines):
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # not UTF-8, not JSON, or an integer of over 4300 digits
            what = (
                f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                if isinstance(e, UnicodeDecodeError)
                else f"not a JSON row ({e})"
            )
            if i < len(lines) - 1:
                raise ValueError(
                    f"{metrics}, line {number}: {what}; only a torn last line (a kill mid-write) is dropped on its own"
                ) from None
            from sfpo_train.trainer.run_guard import RunWarning

            warnings.warn(
                f"{metrics}, line {number}: dropped a torn last row ({len(raw)} bytes, {what})",
                RunWarning,
                stacklevel=2,
            )
            continue
        rows.append(_checked_row(row, f"{metrics}, line {number}"))
    return rows


def _checked_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: {_json_type(row)}, not a row (a JSON object)")
    step = row.get("training/global_step")
    if step is None:
        raise ValueError(f"{where}: no training/global_step")
    whole = (isinstance(step, int) and abs(step) <= 2**53) or (isinstance(step, float) and step.is_integer())
    if isinstance(step, bool) or not whole:
        raise ValueError(f"{where}: training/global_step must be a whole number, got {_shown(step)}")
    if step < 0:
        raise ValueError(f"{where}: training/global_step must be >= 0, got {step}")
    for key, value in row.items():
        if isinstance(value, int) and abs(value) > 2**53:
            raise ValueError(f"{where}: {key} is an integer too large for a float ({value.bit_length()} bits)")
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):  # bool is an int
            raise ValueError(f"{where}: {key} must be a finite number or null, got {_shown(value)}")
        if key.startswith("memory/") and (key.count("/") != 2 or "" in key.split("/")):
            raise ValueError(f"{where}: metric {key!r} is not memory/<stage>/<reading>")
    return row


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _shown(value, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_config(config_path: str) -> dict:
    """A run's ``config.yaml`` as a dict; ``{}`` when there is none; ``ValueError`` naming the file otherwise."""
    if not os.path.exists(config_path):
        return {}
    if not os.path.isfile(config_path):
        raise ValueError(f"{config_path}: not a regular file")
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    except Exception as e:  # yaml's and omegaconf's errors, a decode error: none is worth a traceback here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{config_path}: not a config sfpo report can read ({first})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: a mapping of config sections, got {_json_type(config)}")
    _check_config(config, config_path)
    return config


# The config keys the reports read, and what each must be where present (null: as if absent).
CONFIG_KINDS = {
    "trainer.seed": "an integer",
    "trainer.total_training_steps": "an integer",
    "actor_rollout_ref.actor.sfpo.enable": "true or false",
    "actor_rollout_ref.actor.sfpo.alpha": "a number",
    "actor_rollout_ref.actor.sfpo.inner_steps": "an integer",
    "actor_rollout_ref.actor.sfpo.zscore_threshold": "a number",
}


def _is_kind(value, kind: str) -> bool:
    if kind == "true or false":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == "an integer" else isinstance(value, (int, float))


def _check_config(config: dict, config_path: str) -> None:
    sfpo = nested(config, "actor_rollout_ref.actor.sfpo")
    if sfpo is not None and not isinstance(sfpo, dict):
        raise ValueError(f"{config_path}: actor_rollout_ref.actor.sfpo must be a mapping, got {_shown(sfpo)}")
    for key, kind in CONFIG_KINDS.items():
        value = nested(config, key)
        if value is not None and not _is_kind(value, kind):
            raise ValueError(f"{config_path}: {key} must be {kind}, got {_shown(value)}")


def load_run(path: str) -> Run:
    """A run directory written by ``sfpo train`` / ``sfpo compare``; ``ValueError`` naming what is missing."""
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isdir(path):
        raise ValueError(f"RUN {path!r} is not a directory")
    if not os.path.lexists(metrics):
        raise ValueError(f"RUN {path!r} holds no metrics.jsonl (not a run directory of sfpo train)")
    records = read_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics}: empty (the run logged no step yet)")
    rows = pd.DataFrame(records)
    rows = rows.sort_values("training/global_step", kind="stable").reset_index(drop=True)
    config = read_config(os.path.join(path, "config.yaml"))
    sfpo = nested(config, "actor_rollout_ref.actor.sfpo", {}) or {}
    if sfpo:
        is_sfpo = bool(sfpo.get("enable", True)) and (sfpo.get("alpha") or 0.0) > 0
    else:  # no config: the logged alpha says which rule ran
        is_sfpo = bool((rows.get("sfpo/alpha", pd.Series([0.0])).fillna(0) > 0).any())
    seed = nested(config, "trainer.seed", 0) or 0
    return Run(
        os.path.abspath(path),
        os.path.basename(os.path.normpath(path)),
        "SFPO" if is_sfpo else "GRPO",
        seed,
        config,
        rows,
        algorithm_of(config),
    )


def expand_run_paths(paths: list[str]) -> list[str]:
    """Each RUN as given; a directory without metrics.jsonl whose subdirectories are runs stands for those."""
    out = []
    for path in paths:
        if not os.path.isdir(path):
            raise ValueError(f"RUN {path!r} is not a directory")
        if os.path.lexists(os.path.join(path, "metrics.jsonl")):  # load_run says what is wrong with it
            out.append(path)
            continue
        children = sorted(
            os.path.join(path, d) for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "metrics.jsonl"))
        )
        if not children:
            raise ValueError(f"RUN {path!r} holds no metrics.jsonl, nor do its subdirectories")
        out.extend(children)
    return out
