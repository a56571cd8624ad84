"""SFPO's schedule kept identical on every data-parallel rank of a verl job.

Every rank repositions its own FSDP shard with its own copy of the rule
(:class:`sfpo_train.SFPO`), so the copies must agree on alpha and on the
trigger, or the shards of one parameter move by different amounts and the
model is silently corrupted. Two ways they could drift, both closed here:

- on resume, ``sfpo_state.json`` exists only where rank 0 wrote it (nodes
  without a shared filesystem): :func:`broadcast_from_rank0` hands rank 0's
  state to every rank;
- anything else that makes one rank's schedule differ (a state loaded by hand,
  a different entropy): :func:`check_ranks_agree` compares a few numbers across
  ranks every iteration with one all-reduce and raises on every rank at once.

Without an initialised process group (one process) both are no-ops.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device() -> torch.device:
    """Where the default group's collectives take tensors: the current GPU for NCCL, else the CPU."""
    backend = str(dist.get_backend())
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` (any picklable value, ``None`` included) on every rank; every rank must call it."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def check_ranks_agree(what: str, **values: float | None) -> None:
    """Raise ``RuntimeError`` on every rank unless all ranks hold the same ``values``.

    ``values`` are numbers (``None`` and NaN compare equal to themselves); one
    all-reduce of ``[v, -v]`` with MAX gives each value's maximum and minimum
    over the ranks, and they differ exactly when some rank disagrees.
    """
    if _world() == 1 or not values:
        return
    names = list(values)
    # None -> -inf and NaN -> +inf: both stay distinguishable from every real number and from each other
    numbers = [
        -math.inf if values[n] is None else math.inf if math.isnan(values[n]) else float(values[n]) for n in names
    ]
    local = torch.tensor(numbers, dtype=torch.float64, device=_collective_device())
    both = torch.cat([local, -local])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[: len(names)].tolist(), (-both[len(names) :]).tolist()
    differ = [f"{n} in [{lo}, {hi}]" for n, lo, hi in zip(names, low, high) if lo != hi]
    if differ:
        raise RuntimeError(
            f"SFPO's schedule differs across ranks {what} (rank {dist.get_rank()} holds "
            f"{dict(zip(names, numbers))}): {', '.join(differ)}. Every rank must reposition its shard with the "
            "same alpha; was sfpo_state.json loaded on some ranks only, or the schedule changed by hand?"
        )
