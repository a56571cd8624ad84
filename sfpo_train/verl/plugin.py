"""What verl loads from the ``verl.plugins`` entry point group when it is imported.

verl 0.9.1's ``verl/__init__.py`` loads every entry point of that group
(``VERL_USE_EXTERNAL_PLUGINS``: ``auto`` by default, ``none`` to skip), in every
process that imports verl, Ray workers included, for every user who installs
sfpo. So ours registers one thing, with verl's policy-loss registry: the
``sfpo_vanilla`` policy loss (:mod:`sfpo_train.verl.fused`; stock verl runs can
select it with ``actor_rollout_ref.actor.policy_loss.loss_mode=sfpo_vanilla``).

It imports neither the CPU runtime (:mod:`sfpo_train.verl.cpu_runtime`: the
``cpu`` platform, the ``hf`` rollout; a run registers them when it asks for
``trainer.device=cpu`` or ``rollout.name=hf``) nor the standalone trainer. SFPO
itself needs our worker and trainer (``python -m sfpo_train.verl.main``).

verl catches a plugin's import error and logs it at debug level, so a broken
install would go unnoticed until a run asked for ``sfpo_vanilla``; the error is
logged here at error level (stderr, even with logging unconfigured) first.
"""

import logging

try:
    # fused registers sfpo_vanilla at the end of its own import; when it is what made this process import
    # verl, it is still half-imported here and registers once it finishes.
    from sfpo_train.verl import fused  # noqa: F401
except Exception as exc:
    logging.getLogger(__name__).error(
        "sfpo's verl plugin failed to load (%s: %s): the sfpo_vanilla policy loss is not registered. "
        "Check the install with: python -c 'import sfpo_train.verl.plugin'",
        type(exc).__name__,
        exc,
    )
    raise
