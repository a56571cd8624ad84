"""``trainer.device=cpu``: verl 0.9.1's whole Ray job on a host without an accelerator.

:func:`apply_cpu_mode` runs in the driver before verl reads the config. It
selects our CPU platform in every process of the job (``VERL_PLATFORM=cpu``, in
the driver's environment and in Ray's ``runtime_env``; the plugin registers the
platform wherever verl is imported, :mod:`sfpo_train.verl.cpu`) and gives the
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
``VERL_USE_EXTERNAL_MODULES`` gains ``sfpo_train.verl.plugin``, so verl's own
processes (agent loop, reward workers) register the CPU platform even where the
entry point is not installed or plugin loading is off.

The ``hf`` rollout also needs ``rollout.tensor_model_parallel_size=1``;
:func:`apply_hf_rollout_defaults` sets it when it is verl's default (2), in
any mode.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf, open_dict

PLATFORM_ENV = "VERL_PLATFORM"
MODULES_ENV = "VERL_USE_EXTERNAL_MODULES"  # verl/__init__ imports these in every process, whatever the plugin policy
PLUGIN_MODULE = "sfpo_train.verl.plugin"
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
    modules = [m for m in os.environ.get(MODULES_ENV, "").split(",") if m.strip()]
    if PLUGIN_MODULE not in modules:
        os.environ[MODULES_ENV] = ",".join([*modules, PLUGIN_MODULE])
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
    for name in (PLATFORM_ENV, MODULES_ENV):
        _set(config, f"ray_kwargs.ray_init.runtime_env.env_vars.{name}", os.environ[name])
    return changed + apply_hf_rollout_defaults(config)


def apply_hf_rollout_defaults(config: DictConfig) -> list[str]:
    """``rollout.name=hf``: tensor parallel size 1 where verl's default (2) stands; other sizes must be 1 already."""
    rollout = config.actor_rollout_ref.rollout
    if OmegaConf.is_missing(rollout, "name") or rollout.name != "hf":
        return []
    changed = []
    if rollout.get("tensor_model_parallel_size") == 2:
        _set(config, "actor_rollout_ref.rollout.tensor_model_parallel_size", 1)
        changed.append("actor_rollout_ref.rollout.tensor_model_parallel_size: 2 -> 1")
    from sfpo_train.verl.hf_rollout import check_rollout_config

    check_rollout_config(rollout)
    return changed
