"""What verl loads from the ``verl.plugins`` entry point group when it is imported.

verl 0.9.1's ``verl/__init__.py`` loads every entry point of that group
(``VERL_USE_EXTERNAL_PLUGINS``: ``auto`` by default, ``none`` to skip), in every
process that imports verl, Ray workers included. Ours registers, with verl's
own registries:

- the ``sfpo_vanilla`` policy loss (stock verl runs can select it with
  ``actor_rollout_ref.actor.policy_loss.loss_mode=sfpo_vanilla``);
- the ``hf`` rollout (``actor_rollout_ref.rollout.name=hf``,
  :mod:`sfpo_train.verl.hf_rollout`);
- the ``cpu`` platform (``VERL_PLATFORM=cpu``, :mod:`sfpo_train.verl.cpu`), which
  ``trainer.device=cpu`` selects in every process of the job.

SFPO itself needs our worker and trainer (``python -m sfpo_train.verl.main``).
verl catches a plugin's import error and logs it at debug level, so a broken
install would go unnoticed until a run asked for one of these; the error is
logged here at error level (stderr, even with logging unconfigured) first.
"""

import logging

try:
    # Each module registers itself at the end of its own import; when one of them is what made this process
    # import verl, it is still half-imported here and registers once it finishes.
    from sfpo_train.verl import cpu, fused, hf_rollout  # noqa: F401
except Exception as exc:
    logging.getLogger(__name__).error(
        "sfpo's verl plugin failed to load (%s: %s): sfpo_vanilla, the hf rollout and the cpu platform are not "
        "registered. Check the install with: python -c 'import sfpo_train.verl.plugin'",
        type(exc).__name__,
        exc,
    )
    raise
