"""SFPO training: the update rule and its alpha schedule, and the ``sfpo`` command line.

- :class:`SFPOConfig`, :class:`SFPO`: paper Algorithm 1 around any policy-gradient
  pass (``SFPO.step(update_pass, batch, entropy=None)``), with the
  entropy-triggered switch to plain GRPO and exact ``state_dict`` resume.

- :mod:`sfpo_train.trainer` (``sfpo train``): a standalone GRPO / Dr. GRPO / DAPO
  trainer with SFPO, verl's config keys and metric names, and an embedded
  default task and model (:mod:`sfpo_train.tasks`).
- :mod:`sfpo_train.verl`: SFPO inside verl 0.9.1 as a plugin (needs the ``verl`` extra).
"""

from sfpo_train.sfpo import SFPO, SFPOConfig, entropy_zscore, scheduled_alpha

__all__ = ["SFPO", "SFPOConfig", "entropy_zscore", "scheduled_alpha"]
