"""What ``sfpo_kernels`` is measured against: plain PyTorch, written the ways others write it.

Each function states its real memory traffic in multiples of N, the bytes of
all tensors, counting every temporary it creates (the benchmarks divide these
bytes by the time to get GB/s). The fused kernels' limits: copy 2N (read N,
write N), lerp 3N (read 2N, write N).
"""

from __future__ import annotations

import torch

# --------------------------------------------------------------------------- reposition: t <- s + alpha * (t - s)

# Bytes moved per byte of the tensors, per call.
REPOSITION_TRAFFIC = {
    "foreach_lerp": 3,  # read t and s, write t
    # p - s: read 2N write N; alpha * (.): read N write N; s + (.): read 2N write N; copy_: read N write N
    "authors_loop": 3 + 2 + 3 + 2,
}


@torch.no_grad()
def reposition_foreach_lerp(params: list[torch.Tensor], snaps: list[torch.Tensor], alpha: float) -> None:
    """``torch._foreach_lerp_`` called directly (what ``torch.optim.swa_utils`` does)."""
    torch._foreach_lerp_(params, snaps, 1.0 - alpha)


@torch.no_grad()
def reposition_authors_loop(params: list[torch.Tensor], snaps: list[torch.Tensor], alpha: float) -> None:
    """The per-parameter loop of the SFPO authors' release: three temporaries and a copy per tensor."""
    for p, s in zip(params, snaps):
        p.data.copy_(s + alpha * (p.data - s))


# --------------------------------------------------------------------------- snapshot and restore

SNAPSHOT_TRAFFIC = {
    "clone": 2,  # read N, write N
    "authors_loop": 2,
    "to_cpu": 1,  # offload: N bytes device -> host (pageable host memory)
}
RESTORE_TRAFFIC = {
    "foreach_copy": 2,
    "authors_loop": 2,
}


@torch.no_grad()
def snapshot_clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """One ``clone`` per tensor: the usual way to keep a copy of a model's weights."""
    return [p.detach().clone() for p in params]


def snapshot_authors_loop(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The authors' release: ``p.data.clone()`` per parameter."""
    return [p.data.clone() for p in params]


@torch.no_grad()
def snapshot_to_cpu(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """A host copy per tensor (pageable memory), as ``sfpo_kernels.reference.snapshot(offload="cpu")``."""
    return [p.detach().to("cpu", copy=True) for p in params]


@torch.no_grad()
def restore_foreach_copy(params: list[torch.Tensor], snaps: list[torch.Tensor]) -> None:
    """``torch._foreach_copy_``: the multi-tensor copy PyTorch ships."""
    torch._foreach_copy_(params, snaps)


def restore_authors_loop(params: list[torch.Tensor], snaps: list[torch.Tensor]) -> None:
    """The authors' release: ``p.data.copy_(s)`` per parameter."""
    for p, s in zip(params, snaps):
        p.data.copy_(s)
