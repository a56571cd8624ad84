"""Run verl 0.9.1's FSDP training worker on CPU (tests, smoke runs; no GPU needed).

verl picks its device through a platform singleton and its training engine
through a registry keyed by device; neither knows "cpu". :func:`use_cpu`
fills both in, once per process, and must run before any verl worker is
built:

- a :class:`CPUPlatform` whose current device is the string ``"cpu"`` (so
  verl's ``module.to(get_device_id())`` lands on the CPU) and whose
  collective backend is gloo;
- verl's own FSDP/FSDP2 language-model engine registered for device "cpu";
- a gloo process group (verl would otherwise ask for ``"cpu:gloo,cpu:gloo"``,
  which torch rejects), from the usual ``RANK``/``WORLD_SIZE``/``MASTER_*``
  environment variables.

Model settings that must accompany it: ``strategy=fsdp2`` and
``attn_implementation=eager`` (verl's default, flash-attention, needs CUDA).
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType

import torch
import torch.distributed as dist
from verl.plugin.platform import platform_manager
from verl.plugin.platform.platform_base import PlatformBase


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
        if name in ("empty_cache", "reset_peak_memory_stats", "ipc_collect", "set_device", "manual_seed",
                    "manual_seed_all"):  # fmt: skip
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
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


def use_cpu() -> None:
    """Make verl run on CPU in this process (idempotent); see the module docstring."""
    platform_manager.PlatformRegistry.register("cpu")(CPUPlatform)
    current = platform_manager._current_platform
    if current is not None and current.device_name != "cpu":
        raise RuntimeError(f"verl's platform is already {current.device_name!r}; call use_cpu() before verl starts")
    if current is None:
        platform_manager.set_platform(CPUPlatform())
    # Imported only now: importing the engines makes verl detect (and cache) its platform.
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engines = EngineRegistry._engines["language_model"]
    for backend in ("fsdp", "fsdp2"):
        engines[backend].setdefault("cpu", FSDPEngineWithLMHead)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("gloo", rank=int(os.environ.get("RANK", "0")),
                                world_size=int(os.environ.get("WORLD_SIZE", "1")))  # fmt: skip
