"""Run verl 0.9.1 on CPU: its FSDP training worker in-process (tests) and its whole Ray job (``trainer.device=cpu``).

verl picks its device through a platform singleton and its training engine
through a registry keyed by device; neither knows "cpu". This module fills
both in:

- :class:`CPUPlatform`, registered as verl platform ``"cpu"`` when the plugin
  loads (:func:`register_platform`; every process that imports verl loads it),
  selected with ``VERL_PLATFORM=cpu``. Its current device is the string
  ``"cpu"`` (so verl's ``module.to(get_device_id())`` lands on the CPU), its
  collective backend gloo, and its Ray resource ``"GPU"``: verl's resource pools
  place one worker per accelerator, so a CPU run declares *logical* GPUs
  (``ray.init(num_gpus=N)``), one per rank;
- :func:`use_cpu`, once per process before a verl worker is built: the platform,
  :class:`CPUFSDPEngine` for device "cpu", and a gloo process group (verl would
  ask torch for ``"cpu:gloo,cpu:gloo"``, which it rejects) from the usual
  ``RANK``/``WORLD_SIZE``/``MASTER_*`` variables, on a free port when
  ``MASTER_PORT`` is unset in a one-process group. Our worker calls it in its Ray process.

Model settings that must accompany it: ``strategy=fsdp2`` and
``attn_implementation=eager`` (verl's default, flash-attention, needs CUDA);
``sfpo_train.verl.cpu_mode`` sets them for ``trainer.device=cpu``.
"""

from __future__ import annotations

import contextlib
import os
import socket
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
    """Make ``VERL_PLATFORM=cpu`` mean :class:`CPUPlatform` in this process (the plugin calls it)."""
    platform_manager.PlatformRegistry.register("cpu")(CPUPlatform)


def select_platform() -> None:
    """This process's verl platform becomes :class:`CPUPlatform` (the driver of a ``trainer.device=cpu`` run)."""
    register_platform()
    current = platform_manager._current_platform
    if current is None or current.device_name != "cpu":
        platform_manager.set_platform(CPUPlatform())


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_engine_class():
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    class CPUFSDPEngine(FSDPEngineWithLMHead):
        """verl's FSDP engine, without FSDP2's CPU offload policy, which is meaningless on a CPU.

        verl gives every forward-only model (the reference policy) a
        ``CPUOffloadPolicy(pin_memory=True)``; pinned memory needs an accelerator, so
        on a CPU host building the reference model would fail. The parameters live in
        host memory already, so the engine wraps the module without an offload policy.
        """

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


def use_cpu() -> None:
    """Make verl run on CPU in this process (idempotent); see the module docstring."""
    register_platform()
    current = platform_manager._current_platform
    if current is not None and current.device_name != "cpu":
        raise RuntimeError(f"verl's platform is already {current.device_name!r}; call use_cpu() before verl starts")
    if current is None:
        platform_manager.set_platform(CPUPlatform())
    # Imported only now: importing the engines makes verl detect (and cache) its platform.
    from verl.workers.engine.base import EngineRegistry

    engines = EngineRegistry._engines["language_model"]
    engine = _cpu_engine_class()
    for backend in ("fsdp", "fsdp2"):
        if "cpu" not in engines[backend]:
            engines[backend]["cpu"] = engine
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would pick a port of its own and wait forever
                raise ValueError("use_cpu: WORLD_SIZE > 1 needs MASTER_PORT (one rendezvous port for every rank)")
            os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group(
            "gloo", rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1"))
        )


register_platform()  # importing this module is what makes VERL_PLATFORM=cpu valid (the plugin imports it)
