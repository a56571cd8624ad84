"""Moved to :mod:`sfpo_train.verl.cpu_runtime.mode`; these names stay importable from here."""

from sfpo_train.verl.cpu_runtime import MODULES_ENV, PLATFORM_ENV
from sfpo_train.verl.cpu_runtime.mode import CPU_DEFAULTS, apply_cpu_mode, apply_hf_rollout_defaults

PLUGIN_MODULE = "sfpo_train.verl.plugin"  # the entry point's module (the CPU mode now names cpu_runtime's modules)

__all__ = [
    "CPU_DEFAULTS",
    "MODULES_ENV",
    "PLATFORM_ENV",
    "PLUGIN_MODULE",
    "apply_cpu_mode",
    "apply_hf_rollout_defaults",
]
