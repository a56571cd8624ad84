"""SFPO's settings (:class:`SFPOConfig`) and their schema, importable without torch or the kernels.

The rule itself (:class:`sfpo_train.sfpo.SFPO`) needs torch; its settings do not, so the
command line and the trainer's config check them before torch is loaded. Every name
here is also importable from :mod:`sfpo_train.sfpo`.
"""

from __future__ import annotations

import math
import numbers
import typing
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from sfpo_kernels._backend import BACKENDS, OFFLOAD_MODES

TRIGGERS = ("up", "abs", "down")
DECAYS = ("hard", "linear")
TRIGGER_ENTROPIES = ("old_log_prob", "last_pass")
ZSCORE_EPS = 1e-9
# SFPOConfig fields that do not change the schedule or the math (where theta_0 lives, which kernels copy it):
# a resume may change them, e.g. to offload the snapshot on a smaller GPU.
RESUMABLE_CHANGES = ("snapshot_offload", "backend")


def _setting(default, help: str, choices: tuple | None = None):
    """A config field with its help text (and allowed values): the one place each SFPO setting is described.

    The standalone trainer's ``actor_rollout_ref.actor.sfpo.*`` keys, ``sfpo train
    --help``, the verl plugin's keys and its YAML are all derived from these fields
    (:func:`settings_schema`).
    """
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class SFPOConfig:
    """SFPO's hyperparameters (paper notation in each help text); every value is checked on construction."""

    inner_steps: int = _setting(3, "K, fast-trajectory update passes per iteration (>= 0)")
    alpha: float = _setting(
        0.8,
        "alpha_0, the reposition step theta <- theta_0 + alpha (theta_K - theta_0), in [0, 1] "
        "(1 keeps theta_K, 0 is plain GRPO)",
    )
    zscore_window: int = _setting(30, "omega, entropies in the trigger's rolling window (>= 2)")
    zscore_threshold: float = _setting(1.0, "tau, the entropy z-score that switches SFPO off (> 0)")
    trigger: str = _setting(
        "up",
        "up fires on z >= tau (the authors' code), abs on |z| >= tau (the paper's Algorithm 1), down on z <= -tau",
        TRIGGERS,
    )
    decay: str = _setting(
        "hard", "after the trigger: hard (alpha 0 at once) or linear (to 0 over decay_steps iterations)", DECAYS
    )
    decay_steps: int = _setting(0, "iterations of the linear decay (>= 1 with decay=linear)")
    slow_correction: bool = _setting(
        True, "run Stage III, the slow correction pass (ablation: false skips it while alpha > 0)"
    )
    snapshot_offload: str = _setting(
        "none",
        "where theta_0 lives during the iteration: none (beside the "
        "parameters) or cpu (pinned host memory, no GPU memory)",
        OFFLOAD_MODES,
    )
    reposition: bool = _setting(True, "run Stage II, the reposition (ablation: false keeps theta_K)")
    entropy_control: bool = _setting(True, "the entropy trigger (ablation: false keeps alpha constant)")
    trigger_entropy: str = _setting(
        "old_log_prob",
        "the entropy the trigger watches: old_log_prob (the iteration's "
        "old-log-prob pass at theta_0 before any update, verl's "
        "actor/entropy) or last_pass (the last update pass of the "
        "iteration, the slow one, what the authors' code records)",
        TRIGGER_ENTROPIES,
    )
    # Optional[...] rather than "str | None": the trainer's omegaconf 2.3 structured config reads only the former.
    backend: str | None = _setting(
        None,
        "kernel backend of the snapshot and reposition: triton, cuda or torch "
        "(null: triton for CUDA tensors, torch for CPU tensors)",
        BACKENDS,
    )

    def __post_init__(self):
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"SFPOConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("inner_steps", "zscore_window", "decay_steps"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool), name, "an integer")
        for name in ("alpha", "zscore_threshold"):
            value = getattr(self, name)
            need(
                isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value),
                name,
                "a finite number",
            )
        for name in ("slow_correction", "reposition", "entropy_control"):
            need(isinstance(getattr(self, name), bool), name, "True or False")
        need(self.inner_steps >= 0, "inner_steps", ">= 0")
        need(0.0 <= self.alpha <= 1.0, "alpha", "in [0, 1]")
        need(self.zscore_window >= 2, "zscore_window", ">= 2")
        need(self.zscore_threshold > 0, "zscore_threshold", "> 0")
        need(self.decay != "linear" or self.decay_steps >= 1, "decay_steps", ">= 1 with decay='linear'")
        need(self.decay_steps >= 0, "decay_steps", ">= 0")
        for f in fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices is not None and not (value is None and f.default is None):
                allowed = ", ".join(map(str, choices))
                need(
                    value in choices, f.name, f"None or one of {allowed}" if f.default is None else f"one of {allowed}"
                )


class Setting(NamedTuple):
    """One SFPO setting as the trainers and the verl plugin expose it."""

    name: str
    type: Any  # the resolved annotation, e.g. int, Optional[str]
    default: Any
    help: str
    choices: tuple | None


ENABLE_HELP = "wrap the actor update in SFPO (false: plain GRPO)"


def settings_schema(enable_default: bool) -> tuple[Setting, ...]:
    """``enable`` plus every :class:`SFPOConfig` field with its type, default, help text and allowed values.

    The single source of the ``actor_rollout_ref.actor.sfpo.*`` keys of both
    trainers (the standalone one defaults ``enable`` to true, verl's plugin to false).
    """
    hints = typing.get_type_hints(SFPOConfig)
    own = Setting("enable", bool, enable_default, ENABLE_HELP, None)
    return (
        own,
        *(
            Setting(f.name, hints[f.name], f.default, f.metadata["help"], f.metadata.get("choices"))
            for f in fields(SFPOConfig)
        ),
    )
