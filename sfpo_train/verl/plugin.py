"""What verl loads from the ``verl.plugins`` entry point group when it is imported.

verl 0.9.1's ``verl/__init__.py`` loads every entry point of that group
(``VERL_USE_EXTERNAL_PLUGINS``: ``auto`` by default, ``none`` to skip). Ours only
registers the ``sfpo_vanilla`` policy loss, so that stock verl runs can select
it with ``actor_rollout_ref.actor.policy_loss.loss_mode=sfpo_vanilla``; SFPO
itself needs our worker and trainer (``python -m sfpo_train.verl.main``).

verl catches a plugin's import error and logs it at debug level, so a broken
install would go unnoticed until a run asked for ``sfpo_vanilla``; the error is
logged here at error level (stderr, even with logging unconfigured) first.
"""

import logging

try:
    from sfpo_train.verl import fused  # noqa: F401  (registers the policy loss on import)
except Exception as exc:
    logging.getLogger(__name__).error(
        "sfpo's verl plugin failed to load (%s: %s): the sfpo_vanilla policy loss is not registered. "
        "Check the install with: python -c 'import sfpo_train.verl.fused'", type(exc).__name__, exc)  # fmt: skip
    raise
