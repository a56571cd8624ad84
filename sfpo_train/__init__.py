"""SFPO training: the update rule and its alpha schedule, and the ``sfpo`` command line.

- :class:`SFPOConfig`, :class:`SFPO`: paper Algorithm 1 around any policy-gradient
  pass (``SFPO.step(update_pass, batch, entropy=None)``), with the
  entropy-triggered switch to plain GRPO and exact ``state_dict`` resume.

The trainers (standalone and verl) build on these in the following releases.
"""

from sfpo_train.sfpo import SFPO, SFPOConfig, entropy_zscore, scheduled_alpha

__all__ = ["SFPO", "SFPOConfig", "entropy_zscore", "scheduled_alpha"]
