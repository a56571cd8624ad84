"""The standalone GRPO / SFPO trainer (``sfpo train``): verl's config keys, one process, CPU or one GPU.

- :mod:`~sfpo_train.trainer.loop`: :class:`Trainer` (wiring, ``train_step``, ``validate``, ``fit``)
"""

from sfpo_train.trainer.loop import Trainer, grpo_advantages, latest_checkpoint, lr_lambda

__all__ = ["Trainer", "grpo_advantages", "latest_checkpoint", "lr_lambda"]
