"""What verl loads from the ``verl.plugins`` entry point group when it is imported.

verl 0.9.1's ``verl/__init__.py`` loads every entry point of that group
(``VERL_USE_EXTERNAL_PLUGINS``: ``auto`` by default, ``none`` to skip). Ours only
registers the ``sfpo_vanilla`` policy loss, so that stock verl runs can select
it with ``actor_rollout_ref.actor.policy_loss.loss_mode=sfpo_vanilla``; SFPO
itself needs our worker and trainer (``python -m sfpo_train.verl.main``).
"""

from sfpo_train.verl import fused  # noqa: F401  (registers the policy loss on import)
