"""Moved to :mod:`sfpo_train.verl.cpu_runtime.hf_rollout`; these names stay importable from here.

Importing this module registers ``rollout.name=hf``, as importing the new one does.
"""

from sfpo_train.verl.cpu_runtime.hf_rollout import (
    NAME,
    SERVER_PREFIX,
    HFReplica,
    HFRolloutServer,
    HFServerAdapter,
    ProcessedLogProbs,
    Sampling,
    check_rollout_config,
    generate_batch,
    register,
    server_name,
)

__all__ = [
    "NAME",
    "SERVER_PREFIX",
    "HFReplica",
    "HFRolloutServer",
    "HFServerAdapter",
    "ProcessedLogProbs",
    "Sampling",
    "check_rollout_config",
    "generate_batch",
    "register",
    "server_name",
]
