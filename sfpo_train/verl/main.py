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


def prepare_config(config):
    """Normalise the SFPO keys (out of verl's ``ActorConfig``), settle ``fused_kernels``, check the run; in place.

    The one place the keys are normalised: the workers read the block written
    here (:func:`~sfpo_train.verl.config.normalized_settings`).

    ``fused_kernels="auto"`` is on for CUDA runs with SFPO on and off otherwise
    (:func:`~sfpo_train.verl.config.resolve_fused_kernels`, the rule the workers
    apply too). Returns the :class:`~sfpo_train.verl.config.VerlSFPOSettings`.
    """
    from sfpo_train.verl.config import normalize_sfpo_config

    settings = normalize_sfpo_config(config.actor_rollout_ref)
    if not needs_sfpo_runner(settings, config.trainer.get("device", "cuda")):
        return settings
    what = "SFPO" if settings.enable else "fused_kernels" if settings.fused_kernels is True else "trainer.device=cpu"
    if not config.trainer.get("use_v1", True):
        raise ValueError(
            f"{what} runs on verl's v1 trainer; trainer.use_v1=False (the legacy trainer) is not supported"
        )
    mode = config.trainer.v1.get("trainer_mode", "sync")
    if mode != "sync":
        raise ValueError(f"{what} wraps verl's synchronous trainer; trainer.v1.trainer_mode={mode!r} is not supported")
    return settings


def needs_sfpo_runner(settings, device: str) -> bool:
    """Whether the run needs our worker: SFPO or the fused kernels on, or a CPU run; otherwise it is exactly verl's.

    A CPU run needs our worker with SFPO off too: it sets verl up for the CPU
    in its Ray process (:func:`sfpo_train.verl.cpu_runtime.engine.use_cpu`).
    """
    from sfpo_train.verl.config import resolve_fused_kernels

    return settings.enable or resolve_fused_kernels(settings, device) or device == "cpu"


def run(config) -> None:
    """SFPO or fused kernels on: validate like verl's ``main``, then ``run_ppo`` with our task runner.

    Both off: verl's own ``main_ppo.main`` on the config (its ``use_v1`` and
    ``trainer_mode`` honoured, its task runner, nothing of ours in the loop).
    """
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    from sfpo_train.verl import verl_internals
    from sfpo_train.verl.cpu_runtime.mode import apply_cpu_mode, apply_hf_rollout_defaults

    if config.trainer.get("device", "cuda") == "cpu":
        from sfpo_train.verl.cpu_runtime.platform import select_platform

        changes = apply_cpu_mode(config)
        select_platform()  # before auto_set_device, which would otherwise turn "cpu" into a detected "cuda"
        print(
            "trainer.device=cpu: verl's Ray job on the CPU; defaults of the mode: "
            + ("; ".join(changes) or "none applied (all set explicitly)"),
            flush=True,
        )
    else:
        apply_hf_rollout_defaults(config)
    auto_set_device(config)
    settings = prepare_config(config)
    if not needs_sfpo_runner(settings, config.trainer.device):
        verl_internals.verl_main_undecorated()(config)  # verl's exact entry point
        return
    from sfpo_train.verl.trainer import SFPOTaskRunner

    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    run_ppo(config, task_runner_class=SFPOTaskRunner)


@hydra.main(config_path=CONFIG_DIR, config_name=CONFIG_NAME, version_base=None)
def main(config) -> None:
    run(config)


if __name__ == "__main__":
    main()
