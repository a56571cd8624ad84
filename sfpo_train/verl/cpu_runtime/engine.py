"""A process set up for verl on CPU: :func:`use_cpu` (our worker in its Ray process; the tests in-process).

verl picks its training engine through a registry keyed by device, which knows
no "cpu", and asks torch for a ``"cpu:gloo,cpu:gloo"`` process group, which
torch rejects. :func:`use_cpu`, once per process before a verl worker is built,
selects the CPU platform (:mod:`sfpo_train.verl.cpu_runtime.platform`), registers
verl's FSDP engine without its offload policy for device ``"cpu"``
(:func:`sfpo_train.verl.verl_internals.fsdp_engine_without_offload`: pinned
memory needs an accelerator), and starts a gloo process group from the usual
``RANK``/``WORLD_SIZE``/``MASTER_*`` variables, on a free port when
``MASTER_PORT`` is unset in a one-process group.

Model settings that must accompany it: ``strategy=fsdp2`` and
``attn_implementation=eager`` (verl's default, flash-attention, needs CUDA);
:mod:`sfpo_train.verl.cpu_runtime.mode` sets them for ``trainer.device=cpu``.
"""

from __future__ import annotations

import os
import socket

import torch.distributed as dist

from sfpo_train.verl import verl_internals
from sfpo_train.verl.cpu_runtime.platform import CPUPlatform, register_platform


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_cpu() -> None:
    """Make verl run on CPU in this process (idempotent); see the module docstring."""
    register_platform()
    current = verl_internals.current_platform()
    if current is not None and current.device_name != "cpu":
        raise RuntimeError(f"verl's platform is already {current.device_name!r}; call use_cpu() before verl starts")
    if current is None:
        verl_internals.set_platform(CPUPlatform())
    # only now: importing verl's engines makes verl detect (and cache) its platform
    verl_internals.register_engine("cpu", verl_internals.fsdp_engine_without_offload())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would pick a port of its own and wait forever
                raise ValueError("use_cpu: WORLD_SIZE > 1 needs MASTER_PORT (one rendezvous port for every rank)")
            os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group(
            "gloo", rank=int(os.environ.get("RANK", "0")), world_size=int(os.environ.get("WORLD_SIZE", "1"))
        )
