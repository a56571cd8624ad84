"""``trainer.device=cpu``: verl 0.9.1's whole Ray job on a host without an accelerator.

:func:`apply_cpu_mode` runs in the driver before verl reads the config. It
selects our CPU platform in every process of the job (``VERL_PLATFORM=cpu``, in
the driver's environment and in Ray's ``runtime_env``, with the modules that
register it, see below) and gives the
small-cluster settings below as defaults of the mode. Each default replaces
a value equal to verl's own default, so anything else set on the command line
stays as set; what changed is returned (and printed by the entry point).

=====================================================  =========  =====================================
key                                                    verl       cpu mode (why)
=====================================================  =========  =====================================
``ray_kwargs.ray_init.num_cpus``                       null       32 logical CPUs: TransferQueue's
                                                                  storage units and the agent-loop and
                                                                  reward workers each hold one
``ray_kwargs.ray_init.num_gpus``                       (none)     ``n_gpus_per_node * nnodes`` logical
                                                                  GPUs: verl places one rank per GPU
``transfer_queue.backend.SimpleStorage.``              8          2 (each unit is ~480 MB of RSS)
``num_data_storage_units``
``reward.num_workers``                                 8          1
``actor_rollout_ref.rollout.agent.num_workers``        8          1
``actor_rollout_ref.rollout.name``                     ???        ``hf`` (no vLLM/SGLang build for CPU
                                                                  installs beside verl 0.9.1)
``actor_rollout_ref.model.override_config.``           (none)     ``eager`` (flash-attention needs CUDA)
``attn_implementation``
``actor_rollout_ref.actor.strategy``                   fsdp       fsdp2 (the engine tested on CPU)
=====================================================  =========  =====================================

The two ``ray_init`` counts describe a local cluster that ``ray.init`` starts;
Ray refuses them when joining a running cluster (``RAY_ADDRESS`` set or
``ray_init.address`` given), so they are left out then: start that cluster with
``ray start --num-cpus=32 --num-gpus=<ranks per node>``.
``VERL_USE_EXTERNAL_MODULES`` (the driver's environment and ``runtime_env``)
gains :data:`~sfpo_train.verl.cpu_runtime.PLATFORM_MODULE` and
:data:`~sfpo_train.verl.cpu_runtime.ROLLOUT_MODULE`: verl imports them in every
process of the job when it imports itself, and importing them registers the
``cpu`` platform and the ``hf`` rollout there, verl's own processes (agent loop,
reward workers) included. This is the only way they get registered in a Ray
job: the ``verl.plugins`` entry point does not load them.

``rollout.name=hf`` in any mode (:func:`apply_hf_rollout_defaults`) names the
rollout module the same way, and sets ``rollout.tensor_model_parallel_size=1``
where verl's default (2) stands.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf, open_dict

from sfpo_train.verl.cpu_runtime import MODULES_ENV, PLATFORM_ENV, PLATFORM_MODULE, ROLLOUT_MODULE

_MISSING = object()
_LOCAL_CLUSTER_ONLY = ("ray_kwargs.ray_init.num_cpus", "ray_kwargs.ray_init.num_gpus")

# (dotted key, verl's default, the CPU mode's value); a callable value is computed from the config
CPU_DEFAULTS = (
    ("ray_kwargs.ray_init.num_cpus", None, 32),
    ("ray_kwargs.ray_init.num_gpus", _MISSING, lambda c: int(c.trainer.n_gpus_per_node) * int(c.trainer.nnodes)),
    ("transfer_queue.backend.SimpleStorage.num_data_storage_units", 8, 2),
    ("reward.num_workers", 8, 1),
    ("actor_rollout_ref.rollout.agent.num_workers", 8, 1),
    ("actor_rollout_ref.rollout.name", "???", "hf"),
    ("actor_rollout_ref.model.override_config.attn_implementation", _MISSING, "eager"),
    ("actor_rollout_ref.actor.strategy", "fsdp", "fsdp2"),
)


def _get(config: DictConfig, key: str):
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, DictConfig) else None
        if node is None:
            return _MISSING
    if OmegaConf.is_missing(node, leaf):
        return "???"
    return node.get(leaf, _MISSING) if isinstance(node, DictConfig) else _MISSING


def _set(config: DictConfig, key: str, value) -> None:
    node = config
    *parents, leaf = key.split(".")
    with open_dict(config):
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[leaf] = value


def apply_cpu_mode(config: DictConfig) -> list[str]:
    """Select the CPU platform everywhere and apply :data:`CPU_DEFAULTS` where a key holds verl's default; in place.

    A key is compared by value, so ``reward.num_workers=8`` given explicitly reads
    as verl's default too. Returns ``"key: old -> new"`` for each value changed.
    """
    os.environ[PLATFORM_ENV] = "cpu"
    _set_env(config, PLATFORM_ENV, "cpu")
    use_external_modules(config, PLATFORM_MODULE, ROLLOUT_MODULE)
    joins_a_cluster = bool(os.environ.get("RAY_ADDRESS")) or _get(config, "ray_kwargs.ray_init.address") not in (
        _MISSING,
        None,
    )
    changed = []
    for key, verl_default, value in CPU_DEFAULTS:
        if joins_a_cluster and key in _LOCAL_CLUSTER_ONLY:
            continue
        current = _get(config, key)
        if current is verl_default or current == verl_default:
            new = value(config) if callable(value) else value
            _set(config, key, new)
            changed.append(f"{key}: {'(unset)' if current is _MISSING else current} -> {new}")
    return changed + apply_hf_rollout_defaults(config)


def _set_env(config: DictConfig, name: str, value: str) -> None:
    _set(config, f"ray_kwargs.ray_init.runtime_env.env_vars.{name}", value)


def use_external_modules(config: DictConfig, *modules: str) -> None:
    """Append ``modules`` to ``VERL_USE_EXTERNAL_MODULES``, in this process's environment and in Ray's ``runtime_env``.

    verl imports those modules in every process of the job when it imports
    itself. A value already in ``runtime_env`` (given on the command line) is
    kept and extended by the environment's value.
    """
    env = _merged(os.environ.get(MODULES_ENV, ""), modules)
    os.environ[MODULES_ENV] = env
    given = _get(config, f"ray_kwargs.ray_init.runtime_env.env_vars.{MODULES_ENV}")
    _set_env(config, MODULES_ENV, _merged("" if given in (_MISSING, None) else str(given), env.split(",")))


def _merged(value: str, modules) -> str:
    names = [m.strip() for m in value.split(",") if m.strip()]
    return ",".join(names + [m for m in modules if m not in names])


def apply_hf_rollout_defaults(config: DictConfig) -> list[str]:
    """``rollout.name=hf``: its module in every process, tensor parallel size 1 where verl's default (2) stands.

    Other tensor/data/pipeline parallel sizes must be 1 already. The driver imports
    the module too (registering the rollout here).
    """
    rollout = config.actor_rollout_ref.rollout
    if OmegaConf.is_missing(rollout, "name") or rollout.name != "hf":
        return []
    from sfpo_train.verl.cpu_runtime.hf_rollout import check_rollout_config

    # checked as it will be (verl's default size 2 taken as 1) before anything changes: a refused
    # config leaves the environment, Ray's runtime_env and the config as they were
    default_tp = rollout.get("tensor_model_parallel_size") == 2
    check_rollout_config({**rollout, "tensor_model_parallel_size": 1} if default_tp else rollout)
    use_external_modules(config, ROLLOUT_MODULE)
    changed = []
    if default_tp:
        _set(config, "actor_rollout_ref.rollout.tensor_model_parallel_size", 1)
        changed.append("actor_rollout_ref.rollout.tensor_model_parallel_size: 2 -> 1")
    return changed
