"""SFPO in verl 0.9.1 as a plugin: switch it on with config keys, keep your verl.

- :mod:`sfpo_train.verl.main`: ``python -m sfpo_train.verl.main <verl overrides>``,
  verl's hydra interface plus ``actor_rollout_ref.actor.sfpo.*`` (or the paper
  authors' ``+actor_rollout_ref.actor.use_sfpo=True`` ... keys).
- :mod:`sfpo_train.verl.worker`: :class:`SFPOTrainingWorker` (one SFPO iteration
  per ``train_mini_batch``) and :class:`SFPOActorRolloutRefWorker`.
- :mod:`sfpo_train.verl.trainer`: verl's v1 sync trainer, handing the iteration's
  entropy to the worker and using our worker.
- :mod:`sfpo_train.verl.fused`: ``sfpo_kernels.logprob_entropy`` in the actor's
  log-prob path and the ``sfpo_vanilla`` policy loss.
- :mod:`sfpo_train.verl.config`: the config keys, validated and normalised.
- :mod:`sfpo_train.verl.plugin`: what the ``verl.plugins`` entry point loads in
  every verl process (the ``sfpo_vanilla`` policy loss only).
- :mod:`sfpo_train.verl.verl_internals`: every use of verl below its public
  surface, checked against the verl version it was written for.
- :mod:`sfpo_train.verl.cpu_runtime`: verl on CPU (platform, engine, the ``hf``
  rollout; tests, smoke runs), registered only where a run asks for it.

Importing this package does not import verl; its submodules do. ``import
sfpo_train`` never imports this package.
"""

from pathlib import Path

# hydra config directory: verl's ppo_trainer.yaml plus the sfpo block
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
CONFIG_NAME = "sfpo_trainer"
