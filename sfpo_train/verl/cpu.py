"""Moved to :mod:`sfpo_train.verl.cpu_runtime` (``platform`` and ``engine``); these names stay importable from here.

Importing this module registers the ``cpu`` platform, as importing
:mod:`sfpo_train.verl.cpu_runtime.platform` does.
"""

from sfpo_train.verl.cpu_runtime.engine import free_port, use_cpu
from sfpo_train.verl.cpu_runtime.platform import CPUPlatform, register_platform, select_platform

__all__ = ["CPUPlatform", "free_port", "register_platform", "select_platform", "use_cpu"]
