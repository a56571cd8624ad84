"""``python -m sfpo_train.verl.main <verl overrides>``: verl 0.9.1's PPO entry point with SFPO switchable.

Same hydra interface as ``python -m verl.trainer.main_ppo`` (every verl key and
override works unchanged), on ``conf/sfpo_trainer.yaml`` = verl's
``ppo_trainer.yaml`` plus ``actor_rollout_ref.actor.sfpo.*``. The paper
authors' keys (``+actor_rollout_ref.actor.use_sfpo=True``,
``+...sfpo_inner_steps``, ``+...sfpo_step_size``, ``+...zscore_w``,
``+...zscore_threshold``) work too. Example::

    python -m sfpo_train.verl.main algorithm.adv_estimator=grpo \\
        actor_rollout_ref.model.path=Qwen/Qwen2.5-Math-1.5B ... \\
        actor_rollout_ref.actor.sfpo.enable=true actor_rollout_ref.actor.sfpo.inner_steps=3 \\
        actor_rollout_ref.actor.sfpo.alpha=0.8
"""

from __future__ import annotations

import hydra

from sfpo_train.verl import CONFIG_DIR, CONFIG_NAME


def prepare_config(config) -> None:
    """Normalise the SFPO keys (out of verl's ``ActorConfig``) and check the run can host SFPO, in place."""
    from sfpo_train.verl.config import normalize_sfpo_config

    settings = normalize_sfpo_config(config.actor_rollout_ref)
    if not settings.enable:
        return
    if not config.trainer.get("use_v1", True):
        raise ValueError("SFPO runs on verl's v1 trainer; trainer.use_v1=False (the legacy trainer) is not supported")
    mode = config.trainer.v1.get("trainer_mode", "sync")
    if mode != "sync":
        raise ValueError(f"SFPO wraps verl's synchronous trainer; trainer.v1.trainer_mode={mode!r} is not supported")


def run(config) -> None:
    """Validate like verl's ``main`` does, then ``run_ppo`` with :class:`~sfpo_train.verl.trainer.SFPOTaskRunner`."""
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    from sfpo_train.verl.trainer import SFPOTaskRunner

    auto_set_device(config)
    prepare_config(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    run_ppo(config, task_runner_class=SFPOTaskRunner)


@hydra.main(config_path=CONFIG_DIR, config_name=CONFIG_NAME, version_base=None)
def main(config) -> None:
    run(config)


if __name__ == "__main__":
    main()
