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

from sfpo_train.trainer.actor import Actor
from sfpo_train.trainer.algos import grpo_advantages, lr_lambda, micro_batch_weights
from sfpo_train.trainer.batch import TrainBatch
from sfpo_train.trainer.checkpoint import latest_checkpoint
from sfpo_train.trainer.loop import Trainer
from sfpo_train.trainer.metrics_log import MetricsLog

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
