"""Run directories as ``sfpo report`` reads them: :class:`Run`, :func:`load_run` and the lookups on them."""

from __future__ import annotations

import json
import os
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


def load_run(path: str) -> Run:
    """A run directory written by ``sfpo train`` / ``sfpo compare``; ``ValueError`` naming what is missing."""
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isdir(path):
        raise ValueError(f"RUN {path!r} is not a directory")
    if not os.path.isfile(metrics):
        raise ValueError(f"RUN {path!r} holds no metrics.jsonl (not a run directory of sfpo train)")
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f"RUN {path!r}: metrics.jsonl is empty (the run logged no step yet)")
    rows = pd.DataFrame(records)
    if "training/global_step" not in rows:
        raise ValueError(f"RUN {path!r}: metrics.jsonl has no training/global_step column")
    rows = rows.sort_values("training/global_step", kind="stable").reset_index(drop=True)
    config: dict = {}
    config_path = os.path.join(path, "config.yaml")
    if os.path.isfile(config_path):
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    sfpo = nested(config, "actor_rollout_ref.actor.sfpo", {}) or {}
    if sfpo:
        is_sfpo = bool(sfpo.get("enable", True)) and float(sfpo.get("alpha", 0.0)) > 0
    else:  # no config: the logged alpha says which rule ran
        is_sfpo = bool((rows.get("sfpo/alpha", pd.Series([0.0])).fillna(0) > 0).any())
    seed = int(nested(config, "trainer.seed", 0) or 0)
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
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            out.append(path)
            continue
        children = sorted(
            os.path.join(path, d) for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "metrics.jsonl"))
        )
        if not children:
            raise ValueError(f"RUN {path!r} holds no metrics.jsonl, nor do its subdirectories")
        out.extend(children)
    return out
