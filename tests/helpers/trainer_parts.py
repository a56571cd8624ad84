"""Parts of a built trainer rebuilt under other settings (the parts never read the config after construction)."""

from __future__ import annotations

import sfpo_train.trainer.config as config_lib
from sfpo_train.trainer import Trainer
from sfpo_train.trainer.actor import Actor
from sfpo_train.trainer.settings import ActorSettings


def actor_with(trainer: Trainer, *overrides: str) -> Actor:
    """A new :class:`Actor` on ``trainer``'s model, optimizer and profiler, its settings from the run's config
    with ``overrides`` (``key=value``) applied."""
    cfg = config_lib.apply_overrides(trainer.cfg, list(overrides), "test")
    return Actor(
        ActorSettings.from_config(cfg),
        trainer.model,
        trainer.optimizer,
        compute_dtype=trainer.compute_dtype,
        device=trainer.device,
        profiler=trainer.profiler,
    )
