"""``trainer.device=cpu`` (``sfpo_train.verl.cpu_runtime.mode``) and what a fresh process of such a run registers.

The defaults of the mode are checked on our hydra config as the entry point
composes it; the run itself is ``examples/verl/cpu-smoke.sh``
(``test_cpu_smoke_outputs.py``).
"""

import os
import subprocess
import sys

import pytest

from tests.helpers.optional import import_or_skip

import_or_skip("verl")

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sfpo_train.verl import CONFIG_DIR, CONFIG_NAME
from sfpo_train.verl.cpu_runtime import MODULES_ENV, PLATFORM_ENV, PLATFORM_MODULE, ROLLOUT_MODULE
from sfpo_train.verl.cpu_runtime.mode import apply_cpu_mode, apply_hf_rollout_defaults

RUNTIME_MODULES = f"{PLATFORM_MODULE},{ROLLOUT_MODULE}"


def _config(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(CONFIG_NAME, overrides=["trainer.device=cpu", *overrides])


@pytest.fixture(autouse=True)
def _restore_platform_env():
    # apply_cpu_mode sets the first two in os.environ: later tests (subprocesses importing verl) must not see them
    names = (PLATFORM_ENV, MODULES_ENV, "RAY_ADDRESS")
    saved = {name: os.environ.pop(name, None) for name in names}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def test_defaults_of_the_mode_replace_verls_defaults():
    config = _config("trainer.n_gpus_per_node=2", "trainer.nnodes=1")
    changed = apply_cpu_mode(config)
    assert config.ray_kwargs.ray_init.num_cpus == 32
    assert config.ray_kwargs.ray_init.num_gpus == 2  # one logical GPU per rank
    assert config.transfer_queue.backend.SimpleStorage.num_data_storage_units == 2
    assert config.reward.num_workers == 1 and config.actor_rollout_ref.rollout.agent.num_workers == 1
    assert config.actor_rollout_ref.rollout.name == "hf"
    assert config.actor_rollout_ref.rollout.tensor_model_parallel_size == 1
    assert config.actor_rollout_ref.model.override_config.attn_implementation == "eager"
    assert config.actor_rollout_ref.actor.strategy == "fsdp2"
    assert config.actor_rollout_ref.ref.strategy == "fsdp2"  # verl's ref follows the actor
    env_vars = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert env_vars[PLATFORM_ENV] == os.environ[PLATFORM_ENV] == "cpu"
    assert env_vars[MODULES_ENV] == os.environ[MODULES_ENV] == RUNTIME_MODULES
    assert len(changed) == 9 and "reward.num_workers: 8 -> 1" in changed


def test_values_set_on_the_command_line_stay():
    config = _config(
        "ray_kwargs.ray_init.num_cpus=6",
        "reward.num_workers=3",
        "actor_rollout_ref.rollout.name=hf",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "+ray_kwargs.ray_init.num_gpus=4",
    )
    changed = apply_cpu_mode(config)
    assert config.ray_kwargs.ray_init.num_cpus == 6 and config.ray_kwargs.ray_init.num_gpus == 4
    assert config.reward.num_workers == 3
    assert config.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    assert not any(
        c.startswith(
            (
                "ray_kwargs.ray_init.num",
                "reward.",
                "actor_rollout_ref.rollout.name",
                "actor_rollout_ref.rollout.tensor",
                "actor_rollout_ref.actor.strategy",
                "actor_rollout_ref.model",
            )
        )
        for c in changed
    ), changed


def test_joining_a_running_cluster_leaves_its_resource_counts_alone():
    os.environ[MODULES_ENV] = "my_lib"
    os.environ["RAY_ADDRESS"] = "127.0.0.1:6379"  # ray.init refuses num_cpus/num_gpus when joining
    config = _config()
    changed = apply_cpu_mode(config)
    assert config.ray_kwargs.ray_init.num_cpus is None and "num_gpus" not in config.ray_kwargs.ray_init
    assert not any(c.startswith("ray_kwargs") for c in changed), changed
    assert config.reward.num_workers == 1  # the other defaults still apply
    assert os.environ[MODULES_ENV] == f"my_lib,{RUNTIME_MODULES}"


def test_an_hf_rollout_with_tensor_parallelism_is_an_error():
    with pytest.raises(ValueError, match="tensor_model_parallel_size=1 \\(got 4\\)"):
        apply_cpu_mode(
            _config("actor_rollout_ref.rollout.name=hf", "actor_rollout_ref.rollout.tensor_model_parallel_size=4")
        )


def test_a_refused_hf_rollout_changes_nothing():
    config = _config(
        "trainer.device=cuda", "actor_rollout_ref.rollout.name=hf", "actor_rollout_ref.rollout.data_parallel_size=2"
    )
    before = OmegaConf.to_yaml(config)
    with pytest.raises(ValueError, match="data_parallel_size=1 \\(got 2\\)"):
        apply_hf_rollout_defaults(config)
    assert OmegaConf.to_yaml(config) == before, "the config changed although it was refused"
    assert MODULES_ENV not in os.environ and PLATFORM_ENV not in os.environ


def test_an_hf_rollout_on_gpu_names_only_the_rollout_module():
    config = _config("trainer.device=cuda", "actor_rollout_ref.rollout.name=hf")
    assert apply_hf_rollout_defaults(config) == ["actor_rollout_ref.rollout.tensor_model_parallel_size: 2 -> 1"]
    env_vars = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert env_vars[MODULES_ENV] == os.environ[MODULES_ENV] == ROLLOUT_MODULE
    assert PLATFORM_ENV not in env_vars and PLATFORM_ENV not in os.environ


def test_a_runtime_env_value_given_on_the_command_line_is_extended():
    config = _config(f"+ray_kwargs.ray_init.runtime_env.env_vars.{MODULES_ENV}=my_lib")
    apply_cpu_mode(config)
    assert config.ray_kwargs.ray_init.runtime_env.env_vars[MODULES_ENV] == f"my_lib,{RUNTIME_MODULES}"


REGISTERED = (
    "from verl.workers.rollout.replica import RolloutReplicaRegistry\n"
    "from verl.workers.rollout.base import get_rollout_class\n"
    "from verl.plugin.platform.platform_manager import PlatformRegistry\n"
    "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
    "print(RolloutReplicaRegistry.get('hf').__name__, get_rollout_class('hf').__name__,"
    " PlatformRegistry.get('cpu').__name__, get_policy_loss_fn('sfpo_vanilla').__name__)\n"
)


@pytest.mark.parametrize("first_import", ["verl", ROLLOUT_MODULE, PLATFORM_MODULE, "sfpo_train.verl.hf_rollout"])
def test_a_fresh_process_of_a_cpu_run_sees_the_cpu_runtime(first_import):
    # A Ray process's first import may be one of our modules (unpickling the rollout server imports
    # hf_rollout, which imports verl, which imports VERL_USE_EXTERNAL_MODULES, hf_rollout among them, half-done).
    code = f"import {first_import}\n" + REGISTERED
    env = {**os.environ, MODULES_ENV: RUNTIME_MODULES, PLATFORM_ENV: "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "failed to load" not in out.stderr, out.stderr[-3000:]
    assert out.stdout.split() == [
        "HFReplica",
        "HFServerAdapter",
        "CPUPlatform",
        "compute_policy_loss_sfpo",
    ], out.stdout


def test_a_fresh_process_of_another_run_sees_the_policy_loss_only():
    code = (
        "from verl.workers.rollout.replica import RolloutReplicaRegistry\n"
        "from verl.plugin.platform.platform_manager import PlatformRegistry\n"
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn\n"
        "print(get_policy_loss_fn('sfpo_vanilla').__name__, PlatformRegistry.get('cpu'),"
        " 'hf' in RolloutReplicaRegistry._registry)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["compute_policy_loss_sfpo", "None", "False"], out.stdout
