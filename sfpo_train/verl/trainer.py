"""verl 0.9.1's v1 synchronous PPO trainer, with SFPO's worker and the iteration's entropy handed to it.

Two small hooks into ``PPOTrainerSync`` (no change to verl's loop), which
:func:`sfpo_train.verl.verl_internals.sync_trainer_base` puts on verl's private
``_init_resource_pool_mgr`` and ``_update_actor``:

- :meth:`SFPOTrainer.after_resource_pools`: the actor (and reference) workers are
  ``SFPOTrainer.worker_cls`` (:class:`~sfpo_train.verl.worker.SFPOActorRolloutRefWorker`
  unless a subclass names another) instead of verl's ``ActorRolloutRefWorker``;
- :meth:`SFPOTrainer.before_actor_update`: with SFPO on, the entropy verl just computed in the
  old-log-prob pass (``metrics["actor/entropy"]``, the response-token aggregate
  with the actor's ``loss_agg_mode``) goes to the workers as the non-tensor key
  ``sfpo_entropy``: this is the entropy SFPO's trigger watches.

:class:`SFPOTaskRunner` is verl's ``TaskRunnerV1`` running this trainer; hand
it to ``verl.trainer.main_ppo.run_ppo(config, task_runner_class=...)``.
"""

from __future__ import annotations

import ray
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import Role

from sfpo_train.verl import verl_internals
from sfpo_train.verl.worker import ENTROPY_KEY, SFPOActorRolloutRefWorker

_ACTOR_ROLES = (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef, Role.RefPolicy)


class SFPOTrainer(verl_internals.sync_trainer_base()):
    """verl's sync trainer with :attr:`worker_cls` as its actor worker and the entropy handed to it."""

    #: the actor/rollout/ref worker class; a subclass of SFPOActorRolloutRefWorker (a CPU variant, a
    #: worker with extra methods) is injected by subclassing the trainer and naming it here
    worker_cls: type = SFPOActorRolloutRefWorker

    def after_resource_pools(self) -> None:
        for role in self.role_worker_mapping:
            if role in _ACTOR_ROLES:
                self.role_worker_mapping[role] = ray.remote(self.worker_cls)

    def before_actor_update(self, batch, metrics: dict) -> None:
        sfpo = self.config.actor_rollout_ref.get("sfpo", {})
        if not sfpo.get("enable", False):
            return  # fused kernels only: verl's update, no trigger
        entropy = metrics.get("actor/entropy")
        if entropy is None and sfpo.get("trigger_entropy") == "last_pass":
            return  # the worker reads the last update pass's entropy
        if entropy is None:
            raise ValueError(
                "SFPO's trigger needs actor/entropy from the old-log-prob pass, which this run skipped "
                "(algorithm.rollout_correction.bypass_mode=True?)"
            )
        batch.extra_info[ENTROPY_KEY] = float(entropy)


class _SFPOTaskRunner(verl_internals.task_runner_base()):
    """verl's ``TaskRunnerV1`` whose ``run`` builds :attr:`trainer_cls` instead of the registered sync trainer.

    Another worker class goes in by subclassing both::

        class MyTrainer(SFPOTrainer):
            worker_cls = MyWorker  # a subclass of SFPOActorRolloutRefWorker

        runner = sfpo_train.verl.trainer.task_runner(MyTrainer)
        verl.trainer.main_ppo.run_ppo(config, task_runner_class=runner)
    """

    trainer_cls: type = SFPOTrainer

    def run(self, config):
        import transfer_queue as tq
        from verl.utils.logging_utils import configure_verl_logging

        configure_verl_logging()
        config.transfer_queue.enable = True  # the v1 trainers move batches through TransferQueue
        OmegaConf.resolve(config)
        self.config = config
        tq.init(config.transfer_queue)
        succeeded = False
        try:
            self.trainer = self.trainer_cls(config=config)
            self.trainer.init()
            self.init_agent_loop_manager()
            self.trainer.fit(self.agent_loop_manager)
            succeeded = True
        finally:
            try:
                tracking = getattr(self.trainer, "logger", None)
                if tracking is not None:
                    tracking.finish(exit_code=0 if succeeded else 1)
            finally:
                tq.close()


def task_runner(trainer_cls: type[SFPOTrainer] = SFPOTrainer):
    """A Ray task runner class building ``trainer_cls`` (give it to ``run_ppo(config, task_runner_class=...)``)."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, SFPOTrainer)):
        raise ValueError(f"trainer_cls must be a subclass of SFPOTrainer, got {trainer_cls!r}")
    if trainer_cls is SFPOTrainer:
        return ray.remote(_SFPOTaskRunner)
    return ray.remote(type(f"_{trainer_cls.__name__}TaskRunner", (_SFPOTaskRunner,), {"trainer_cls": trainer_cls}))


SFPOTaskRunner = task_runner()
