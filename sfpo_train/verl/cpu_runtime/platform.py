"""verl platform ``"cpu"``: :class:`CPUPlatform`, selected with ``VERL_PLATFORM=cpu``.

verl picks its device through a platform singleton that knows no "cpu".
Importing this module registers :class:`CPUPlatform` under that name
(:func:`register_platform`); ``trainer.device=cpu`` names this module in
``VERL_USE_EXTERNAL_MODULES`` so that every process of the job imports it when
it imports verl. The platform's current device is the string ``"cpu"`` (so
verl's ``module.to(get_device_id())`` lands on the CPU), its collective backend
gloo, and its Ray resource ``"GPU"``: verl's resource pools place one worker per
accelerator, so a CPU run declares *logical* GPUs (``ray.init(num_gpus=N)``),
one per rank.

The rest of a CPU process's set-up (engine, process group) is
:func:`sfpo_train.verl.cpu_runtime.engine.use_cpu`.
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType

import torch
from verl.plugin.platform.platform_base import PlatformBase

from sfpo_train.verl import verl_internals


def _host_bytes(pages: str) -> int:
    return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")


class _CPUDeviceModule(ModuleType):
    """``torch.cpu`` plus the ``torch.cuda``-style calls verl makes on its device module.

    Memory statistics read 0 (verl only logs them); cache and peak resets do nothing.
    """

    def __init__(self):
        super().__init__("sfpo_cpu_device")

    def __getattr__(self, name: str):
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name == "mem_get_info":  # (free, total) bytes of host memory
            return lambda *args, **kwargs: (_host_bytes("SC_AVPHYS_PAGES"), _host_bytes("SC_PHYS_PAGES"))
        if "memory" in name:
            return lambda *args, **kwargs: 0
        if name in ("get_rng_state", "set_rng_state"):  # checkpoints save the "device" generator too
            return getattr(torch, name)
        if name == "get_device_name":  # verl's MFU looks up peak FLOPs by this name; unknown -> none
            return lambda *args, **kwargs: "CPU"
        if name in (
            "empty_cache",
            "reset_peak_memory_stats",
            "ipc_collect",
            "set_device",
            "manual_seed",
            "manual_seed_all",
        ):
            return lambda *args, **kwargs: None
        raise AttributeError(f"the CPU device module has no {name!r}")


class CPUPlatform(PlatformBase):
    """verl platform for a process without an accelerator."""

    _module = _CPUDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return self._module

    def is_available(self) -> bool:
        return True

    def current_device(self):
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return (None, None)

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"  # logical: verl's pools place one worker per accelerator slot (see the module doc)

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


def register_platform() -> None:
    """Make ``VERL_PLATFORM=cpu`` mean :class:`CPUPlatform` in this process (done when this module is imported)."""
    verl_internals.register_platform("cpu", CPUPlatform)


def select_platform() -> None:
    """This process's verl platform becomes :class:`CPUPlatform` (the driver of a ``trainer.device=cpu`` run)."""
    register_platform()
    current = verl_internals.current_platform()
    if current is None or current.device_name != "cpu":
        verl_internals.set_platform(CPUPlatform())


register_platform()  # importing this module is what makes VERL_PLATFORM=cpu valid
