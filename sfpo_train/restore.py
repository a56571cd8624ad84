"""Putting theta_0 back after a failed SFPO step, as far as it can be done, without hiding the step's error.

:meth:`sfpo_train.SFPO.step` calls :func:`restore_theta0` when a pass raises and
attaches what it returns to that pass's error with :func:`add_note`.
"""

from __future__ import annotations

import torch

import sfpo_kernels


def restore_theta0(snap: sfpo_kernels.Snapshot, params: list[torch.Tensor], backend: str | None) -> list[str]:
    """Put theta_0 back into ``params`` after a failed step, as far as it can be; never raises.

    The fused :meth:`~sfpo_kernels.Snapshot.restore_` first. It refuses (writing
    nothing) a list a pass changed under it: a parameter of another dtype, shape or
    device (``model.half()``, ``p.data = ...``), or with its storage freed. Then
    each parameter on its own: copied in place where it still matches its copy (its
    storage allocated again first if it was freed), else given a new tensor holding
    theta_0 (``p.data = ...``: theta_0's values, dtype, shape and device). Returns
    what the caller should know (empty when the fused restore ran), for the notes
    of the error that propagates.
    """
    try:
        snap.restore_(params, backend=backend)
        return []
    except Exception as refused:  # reported below, after the per-parameter restore
        notes = [f"SFPO: the fused restore of theta_0 was refused ({refused}); restored parameter by parameter"]
    try:
        values = snap.values()
    except Exception as e:  # the parameters cannot be restored; say so on the pass's error
        return [*notes, f"SFPO: theta_0 could not be read back, the parameters were NOT restored: {e}"]
    replaced = []
    with torch.no_grad():
        for i, (p, theta0) in enumerate(zip(params, values)):
            try:
                if not _copy_back(p, theta0, snap.devices[i]):
                    replaced.append(i)
            except Exception as e:  # one parameter's failure does not stop the others'
                notes.append(f"SFPO: parameter {i} (shape {tuple(p.shape)}, {p.dtype}) was NOT restored: {e}")
    if replaced:
        notes.append(
            f"SFPO: parameters {replaced} had changed dtype, shape or device during the failed step; each was "
            "given a new tensor holding theta_0 (p.data = ...), so views of its old memory no longer alias it"
        )
    return notes


def _copy_back(p: torch.Tensor, theta0: torch.Tensor, device: torch.device) -> bool:
    """``p`` <- ``theta0``: in place (True) where dtype, shape and device still match, else ``p.data = ...`` (False)."""
    from torch.distributed.tensor import DTensor

    target = p.to_local() if isinstance(p, DTensor) else p
    if (target.shape, target.dtype, target.device) == (theta0.shape, theta0.dtype, device):
        reach = (target.storage_offset() + _extent(target)) * target.element_size()
        storage = target.untyped_storage()
        if storage.nbytes() < reach:  # freed (FSDP-style) during the step: a copy into it would fault
            storage.resize_(reach)
        target.copy_(theta0)
        return True
    if target is not p:
        raise ValueError(
            f"its local shard now has shape {tuple(target.shape)} and dtype {target.dtype}, "
            f"theta_0's {tuple(theta0.shape)} and {theta0.dtype}; a DTensor's shard cannot be replaced"
        )
    p.data = torch.empty(theta0.shape, dtype=theta0.dtype, device=device).copy_(theta0)
    return False


def _extent(t: torch.Tensor) -> int:
    """Elements from ``t``'s first to one past its last, over its strides (numel when contiguous)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (Python 3.11+), or the same ``__notes__`` list by hand on 3.10."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python 3.10
        error.__notes__ = [*getattr(error, "__notes__", ()), note]
