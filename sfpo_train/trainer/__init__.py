"""The standalone GRPO / SFPO trainer (``sfpo train``): verl's config keys, one process, CPU or one GPU.

- :mod:`.loop`: :class:`Trainer` (wiring, ``train_step``, ``validate``, ``fit``)
- :mod:`.actor`: log-probs and the PPO update pass SFPO wraps (verl's actor counterpart)
- :mod:`.collect`: rollouts, rewards, dynamic sampling; :mod:`.rollout` the engines (HF generate, vLLM)
- :mod:`.algos`: advantages, micro-batch weights, LR schedule
- :mod:`.checkpoint`, :mod:`.metrics_log`: what a run writes; :mod:`.run_guard`: one process per run,
  atomic writes, Ctrl-C / SIGTERM
- :mod:`.config`: presets, overrides, validation; :mod:`.schema` the config tree (verl's key names), each key
  declared once (:mod:`.keys`: help, bounds, resumability); :mod:`.settings` what each part reads from it
- :mod:`.data`, :mod:`.reward`, :mod:`.batch`, :mod:`.profiler`
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and IDEs resolve the names to
    from sfpo_train.trainer.actor import Actor
    from sfpo_train.trainer.algos import grpo_advantages, lr_lambda, micro_batch_weights
    from sfpo_train.trainer.batch import TrainBatch
    from sfpo_train.trainer.checkpoint import latest_checkpoint
    from sfpo_train.trainer.loop import Trainer
    from sfpo_train.trainer.metrics_log import MetricsLog

# public name -> its module, loaded on first use: the config modules (.config, .schema, .keys) import
# without torch, so ``sfpo train`` checks its arguments before loading it.
_HOMES = {
    "Actor": "actor",
    "MetricsLog": "metrics_log",
    "TrainBatch": "batch",
    "Trainer": "loop",
    "grpo_advantages": "algos",
    "latest_checkpoint": "checkpoint",
    "lr_lambda": "algos",
    "micro_batch_weights": "algos",
}

__all__ = [
    "Actor",
    "MetricsLog",
    "TrainBatch",
    "Trainer",
    "grpo_advantages",
    "latest_checkpoint",
    "lr_lambda",
    "micro_batch_weights",
]


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        value = getattr(importlib.import_module(f"sfpo_train.trainer.{_HOMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sfpo_train.trainer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
