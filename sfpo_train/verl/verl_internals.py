"""Every place sfpo reaches below verl's public surface, in one module, checked against the verl it was written for.

sfpo's plugin was written against verl 0.9.1. Each function here touches
something verl may change without notice (a registry's private table, a
private attribute, a private method, an internal function); the rest of
``sfpo_train.verl`` calls these instead of touching verl itself, so a new verl
version means reading this module. The first call checks the installed version
(:func:`check_verl_version`) and warns once, naming both versions, when it is
not :data:`VERL_VERSION`.

=====================================  ==============================================================
function                               what of verl it touches
=====================================  ==============================================================
:func:`register_policy_loss`           ``core_algos.register_policy_loss`` (``POLICY_LOSS_REGISTRY``)
:func:`register_platform`              ``platform_manager.PlatformRegistry.register``
:func:`current_platform`               ``platform_manager._current_platform`` (private)
:func:`set_platform`                   ``platform_manager.set_platform``
:func:`register_engine`                ``EngineRegistry._engines`` (private table)
:func:`fsdp_engine_without_offload`    ``FSDPEngineWithLMHead._build_fsdp_module`` (private method)
:func:`register_rollout`               ``RolloutReplicaRegistry.register`` and ``rollout.base.``
                                       ``_ROLLOUT_REGISTRY`` (private table)
:func:`set_replica_server`             ``RolloutReplica._server_handle`` / ``_server_address``
:func:`dense_forward_parts`            ``models.transformers.dense_common`` (internal module)
:func:`replace_dense_fused_forward`    the ``forward`` verl patched onto an HF model class
:func:`sync_trainer_base`              ``PPOTrainerSync._init_resource_pool_mgr`` / ``_update_actor``
:func:`verl_main_undecorated`          ``main_ppo.main.__wrapped__`` (hydra's undecorated function)
:func:`task_runner_base`               ``TaskRunnerV1.__ray_actor_class__`` (the class Ray wraps)
=====================================  ==============================================================

Importing this module imports nothing of verl; each function imports what it needs.
"""

from __future__ import annotations

import functools
import warnings

VERL_VERSION = "0.9.1"  # the version every function below was written for and tested with
installed_version: str | None = None  # verl.__version__, read on the first check
_warned = False


def check_verl_version() -> None:
    """Warn once (``RuntimeWarning``) when the installed verl is not :data:`VERL_VERSION`."""
    global installed_version, _warned
    if installed_version is None:
        import verl

        installed_version = verl.__version__
    if installed_version != VERL_VERSION and not _warned:
        _warned = True
        warnings.warn(
            f"sfpo's verl plugin was written for verl {VERL_VERSION}, but verl {installed_version} is installed: "
            "it uses verl internals (sfpo_train/verl/verl_internals.py lists them) that may have changed",
            RuntimeWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- policy loss


def register_policy_loss(name: str):
    """verl's ``@register_policy_loss(name)`` decorator (``actor.policy_loss.loss_mode=<name>``)."""
    check_verl_version()
    from verl.trainer.ppo.core_algos import register_policy_loss as verl_register

    return verl_register(name)


# --------------------------------------------------------------------------- platform


def register_platform(name: str, platform_cls: type) -> None:
    """``VERL_PLATFORM=<name>`` selects ``platform_cls`` in this process."""
    check_verl_version()
    from verl.plugin.platform import platform_manager

    platform_manager.PlatformRegistry.register(name)(platform_cls)


def current_platform():
    """This process's verl platform, or ``None`` when verl has not resolved one yet (no detection is triggered)."""
    check_verl_version()
    from verl.plugin.platform import platform_manager

    return platform_manager._current_platform


def set_platform(platform) -> None:
    """Make ``platform`` (an instance) this process's verl platform."""
    check_verl_version()
    from verl.plugin.platform import platform_manager

    platform_manager.set_platform(platform)


# --------------------------------------------------------------------------- training engine


def register_engine(device: str, engine_cls: type, backends=("fsdp", "fsdp2")) -> None:
    """verl's language-model engine for ``device`` under each of ``backends`` (an existing entry is kept).

    Importing verl's engines makes verl resolve (and cache) its platform: set the
    platform first.
    """
    check_verl_version()
    from verl.workers.engine.base import EngineRegistry

    engines = EngineRegistry._engines["language_model"]
    for backend in backends:
        engines[backend].setdefault(device, engine_cls)


@functools.cache
def fsdp_engine_without_offload():
    """verl's FSDP engine, without FSDP2's CPU offload policy for forward-only models (one class per process).

    verl gives every forward-only model (the reference policy) a
    ``CPUOffloadPolicy(pin_memory=True)``; pinned memory needs an accelerator, so on
    a CPU host building the reference model would fail. Where the parameters live
    in host memory already, the module is wrapped without an offload policy.
    """
    check_verl_version()
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    class CPUFSDPEngine(FSDPEngineWithLMHead):
        __doc__ = fsdp_engine_without_offload.__doc__

        def _build_fsdp_module(self, module):
            config = self.engine_config
            saved = config.forward_only, config.offload_policy
            object.__setattr__(config, "forward_only", False)
            object.__setattr__(config, "offload_policy", False)
            try:
                return super()._build_fsdp_module(module)
            finally:
                object.__setattr__(config, "forward_only", saved[0])
                object.__setattr__(config, "offload_policy", saved[1])

    return CPUFSDPEngine


# --------------------------------------------------------------------------- rollout


def register_rollout(name: str, replica_factory, adapter_path: str) -> None:
    """``rollout.name=<name>``: the replica (``replica_factory()`` returns its class) and the ``async`` adapter.

    ``adapter_path`` is the adapter class's dotted path; verl imports it in the
    actor worker.
    """
    check_verl_version()
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register(name, replica_factory)
    base._ROLLOUT_REGISTRY[(name, "async")] = adapter_path


def set_replica_server(replica, handle, address: str) -> None:
    """What verl's replica reports as its server: the Ray handle and its address."""
    check_verl_version()
    replica._server_handle = handle
    replica._server_address = address


# --------------------------------------------------------------------------- the fused log-prob forward


def dense_forward_parts():
    """``(forward_base_model, CausalLMOutputForPPO)`` of verl's dense fused forward (``dense_common``)."""
    check_verl_version()
    from verl.models.transformers import dense_common

    return dense_common.forward_base_model, dense_common.CausalLMOutputForPPO


def replace_dense_fused_forward(module, forward) -> type:
    """Set ``forward`` as the ``forward`` of the class on which verl patched its dense fused forward; that class.

    With ``model.use_fused_kernels=True`` verl assigns ``model.__class__.forward``
    (``dense_common.forward_with_torch_backend`` or ``..._triton_backend``) before
    FSDP wraps the model in a generated subclass, so the class to patch is the one
    in ``type(module).__mro__`` holding verl's forward. Patching it changes that
    class in this process (every instance of it: the actor and the reference
    model share it). ``ValueError`` when verl installed no dense fused forward.
    """
    check_verl_version()
    from verl.models.transformers import dense_common

    verl_forwards = (dense_common.forward_with_torch_backend, dense_common.forward_with_triton_backend)
    for cls in type(module).__mro__:
        current = cls.__dict__.get("forward")
        if current is forward:
            return cls
        if current in verl_forwards:
            cls.forward = forward
            return cls
    raise ValueError(
        f"fused_kernels needs verl's dense fused forward on {type(module).__name__} "
        "(model.use_fused_kernels=True on a text-only model); none was found"
    )


# --------------------------------------------------------------------------- trainer and entry point


@functools.cache
def sync_trainer_base() -> type:
    """verl's ``PPOTrainerSync`` with two public hooks in place of its private methods.

    - ``after_resource_pools()`` runs at the end of ``_init_resource_pool_mgr``
      (``role_worker_mapping`` is filled, no worker started yet);
    - ``before_actor_update(batch, metrics)`` runs at the start of
      ``_update_actor`` (``metrics`` holds the old-log-prob pass's ``actor/entropy``).
    """
    check_verl_version()
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    class SyncTrainerWithHooks(PPOTrainerSync):
        __doc__ = sync_trainer_base.__doc__

        def _init_resource_pool_mgr(self):
            super()._init_resource_pool_mgr()
            self.after_resource_pools()

        def _update_actor(self, batch, metrics: dict):
            self.before_actor_update(batch, metrics)
            return super()._update_actor(batch, metrics)

        def after_resource_pools(self) -> None:
            pass

        def before_actor_update(self, batch, metrics: dict) -> None:
            pass

    return SyncTrainerWithHooks


def verl_main_undecorated():
    """verl's ``main_ppo.main`` without its ``hydra.main`` wrapper: call it on a composed config."""
    check_verl_version()
    from verl.trainer.main_ppo import main

    return main.__wrapped__


def task_runner_base() -> type:
    """The class of verl's ``TaskRunnerV1`` Ray actor, to subclass."""
    check_verl_version()
    from verl.trainer.main_ppo import TaskRunnerV1

    return TaskRunnerV1.__ray_actor_class__
