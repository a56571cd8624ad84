"""SFPO Stage II on a list of tensors: ``snapshot``, ``Snapshot.restore_`` and ``reposition_``.

The public face of the multi-tensor kernels: validation, grouping by
(device, dtype), snapshot storage, and all backend dispatch -- ``torch``
(``torch._foreach_*``), ``triton`` (:mod:`sfpo_kernels.multi_tensor`), ``cuda``
(:mod:`sfpo_kernels._cuda_lib`), the last two driven by the pointer table of
:mod:`sfpo_kernels._pointer_table`.

    snap = snapshot(params)            # theta_0, one fused copy per (device, dtype) group
    ...K fast optimizer steps...       # theta_K
    reposition_(params, snap, alpha)   # theta <- theta_0 + alpha * (theta_K - theta_0), in place
    del snap                           # SFPO holds no memory between iterations

Every call validates all of its arguments before it writes anything: a bad
call raises ``ValueError`` saying what was expected and what came, and leaves
every tensor as it was. That includes the backend name (even when every tensor
is empty and no kernel would run), inference tensors (made under
``torch.inference_mode()``: torch refuses their in-place update, the kernels
would write them behind autograd's back) and tensors with the neg or conj bit
set (lazy views whose memory does not hold their values) and tensors whose
storage was freed or shrunk below their extent (``t.untyped_storage().resize_(0)``,
as FSDP does with a parameter between uses: the kernels would write memory
that is no longer theirs). Parameters
(``requires_grad=True``) are written in place without autograd, FSDP2
``DTensor`` parameters through their local shard, FSDP1 flat parameters as the
plain 1-D tensors they are.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from sfpo_kernels import _cuda_lib
from sfpo_kernels import multi_tensor as mt
from sfpo_kernels._backend import OFFLOAD_MODES, empty_for_kernel, requested_backend, resolve_backend
from sfpo_kernels._pointer_table import STORAGE_ALIGN_BYTES, PointerTable, pointer_table

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Largest host->device staging batch of the torch backend's offloaded reposition.
TORCH_OFFLOAD_STAGING_BYTES = 256 * 2**20


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_SUPPORTED = frozenset(SUPPORTED_DTYPES)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory holds ``t``'s values on this rank (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        with torch.no_grad():  # to_local() then returns the shard itself, not an autograd view
            return t.to_local()
    return t


def _as_tensor_list(tensors: Iterable[torch.Tensor], name: str) -> list[torch.Tensor]:
    """Validated local tensors: dense, contiguous, a supported dtype, no two sharing memory,
    no inference tensor, no neg or conj bit, each within its storage (none freed or shrunk).

    Runs on every call with thousands of tensors, so each check is one cheap
    attribute read; the messages are built only on failure.
    """
    if isinstance(tensors, torch.Tensor):
        raise ValueError(f"{name} must be a list of tensors, got a single tensor of shape {tuple(tensors.shape)}")
    try:
        items = list(tensors)
    except TypeError:
        raise ValueError(f"{name} must be a list of tensors, got {type(tensors).__name__}") from None
    out = []
    spans = []
    for i, t in enumerate(items):
        if type(t) not in _PLAIN_TYPES:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
            t = _local(t)
        if t.dtype not in _SUPPORTED:
            raise ValueError(f"{name}[{i}] has dtype {t.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")
        if t.is_meta or t.layout != torch.strided:
            raise ValueError(f"{name}[{i}] is a {t.layout} tensor on {t.device}; need dense memory")
        if t.is_inference() or t.is_neg() or t.is_conj():
            raise ValueError(_unwritable_message(t, f"{name}[{i}]"))
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] (shape {tuple(t.shape)}) is not contiguous; pass contiguous tensors")
        nbytes = t.nbytes
        if nbytes:
            reach = (t.storage_offset() * t.element_size()) + nbytes  # contiguous: the span is numel elements
            held = t.untyped_storage().nbytes()
            if held < reach:
                raise ValueError(_freed_message(t, f"{name}[{i}]", held, reach))
            ptr = t.data_ptr()
            spans.append((ptr, ptr + nbytes, i))
        out.append(t)
    _check_no_overlap(spans, name)
    return out


def _unwritable_message(t: torch.Tensor, where: str) -> str:
    if t.is_inference():
        return (
            f"{where} is an inference tensor (made under torch.inference_mode()), which cannot be updated in "
            "place outside it; pass a normal tensor (clone it outside inference mode)"
        )
    bit = "neg" if t.is_neg() else "conj"
    return (
        f"{where} has its {bit} bit set (a lazy view, its memory does not hold its values); "
        f"pass torch.resolve_{bit}(t) or a plain tensor"
    )


def _freed_message(t: torch.Tensor, where: str, held: int, reach: int) -> str:
    return (
        f"{where} (shape {tuple(t.shape)}, {t.dtype}) reaches byte {reach} of its storage "
        f"(offset {t.storage_offset()} + {t.numel()} elements), but the storage holds {held} bytes: "
        "was it freed or shrunk (untyped_storage().resize_(0), as FSDP does between uses)? "
        "Allocate it again before the call"
    )


def _check_no_overlap(spans: list[tuple[int, int, int]], name: str) -> None:
    """Two entries sharing memory would be updated twice; reject them. ``spans``: (start, end, index)."""
    spans.sort()
    for (_, end_a, i), (start_b, _, j) in itertools.pairwise(spans):
        if start_b < end_a:
            raise ValueError(f"{name}[{min(i, j)}] and {name}[{max(i, j)}] share memory; each tensor may appear once")


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        if isinstance(alpha, torch.Tensor) and alpha.numel() == 1 and alpha.dtype.is_floating_point:
            alpha = alpha.item()
        else:
            raise ValueError(f"alpha must be a real number in [0, 1], got {alpha!r}")
    try:
        value = float(alpha)
    except OverflowError:  # an int (or Fraction) beyond the float range
        value = math.inf
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        shown = repr(alpha)
        shown = shown if len(shown) <= 40 else f"{shown[:20]}...({len(shown)} characters)"
        raise ValueError(f"alpha must be a finite number in [0, 1], got {shown}")
    return value


@dataclass
class _Group:
    """The tensors of one (device, dtype) and their slice of the snapshot storage."""

    device: torch.device
    dtype: torch.dtype
    indices: list[int]  # positions in the caller's list; empty tensors excluded
    shapes: list[torch.Size]
    offsets: list[int]  # element offset of each tensor in ``storage``
    storage: torch.Tensor  # flat buffer holding the copies
    _views: list[torch.Tensor] | None = None
    _table: PointerTable | None = None  # for the members the snapshot last validated (dropped when they change)

    @property
    def views(self) -> list[torch.Tensor]:
        """Tensor views of the copies, shaped like the tensors; made on first use (the kernels need none)."""
        if self._views is None:
            self._views = [
                self.storage.as_strided(shape, _contiguous_strides(shape), off)
                for shape, off in zip(self.shapes, self.offsets)
            ]
        return self._views

    def table(self, tensors: list[torch.Tensor]) -> PointerTable:
        """Pointer table pairing ``tensors`` with their copies (cached by content, and on the group for the
        members its snapshot validated: :meth:`Snapshot._check_tensors` drops it when they change)."""
        if self._table is None:
            base, elem = self.storage.data_ptr(), self.storage.element_size()
            block, chunk = mt.launch_shape(self.device)
            self._table = pointer_table(
                tensors, [base + off * elem for off in self.offsets], self.device, block=block, chunk=chunk
            )
        return self._table


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class Snapshot:
    """A copy of a list of tensors, grouped by (device, dtype) into flat storage.

    Holds the shapes, dtypes and devices it was taken from, and checks every
    later ``restore_`` / ``reposition_`` against them. ``offload="cpu"`` keeps the
    copy of CUDA tensors in pinned host memory, read and written by the kernels
    directly over PCIe (zero-copy): no GPU memory, transfers overlapped with
    the arithmetic. ``nbytes`` is the size of the copy.
    """

    def __init__(self, shapes, dtypes, devices, groups: list[_Group], offload: str):
        self.shapes: tuple[torch.Size, ...] = tuple(shapes)
        self.dtypes: tuple[torch.dtype, ...] = tuple(dtypes)
        self.devices: tuple[torch.device, ...] = tuple(devices)
        self.offload = offload
        self._groups: list[_Group] | None = groups
        self._signature = list(zip(self.shapes, self.dtypes, self.devices))
        # The last tensor list that passed validation: its key and what was checked (see _layout_key).
        self._validated: tuple[tuple, _Checked] | None = None

    def __len__(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        state = "released" if self._groups is None else f"{self.nbytes / 2**20:.1f} MiB"
        return f"Snapshot({len(self)} tensors, {state}, offload={self.offload!r})"

    @property
    def nbytes(self) -> int:
        if self._groups is None:
            return 0
        return sum(g.storage.numel() * g.storage.element_size() for g in self._groups)

    def values(self) -> list[torch.Tensor]:
        """The snapshot's copies in the caller's order (views of its storage; empty for empty tensors)."""
        groups = self._live_groups()
        out: list[torch.Tensor | None] = [None] * len(self)
        for g in groups:
            if g.storage.device != g.device:  # offloaded: let the device->host copies land first
                torch.cuda.current_stream(g.device).synchronize()
            for i, v in zip(g.indices, g.views):
                out[i] = v
        return [
            v if v is not None else torch.empty(shape, dtype=dtype, device=device)  # empty tensors have no storage
            for v, shape, dtype, device in zip(out, self.shapes, self.dtypes, self.devices)
        ]

    def release(self) -> None:
        """Free the storage now; the snapshot cannot be used afterwards."""
        self._groups = None
        self._validated = None  # and the references to the tensors it validated

    def restore_(self, tensors: Iterable[torch.Tensor], *, backend: str | None = None) -> None:
        """Copy the snapshot back into ``tensors`` (same count, shapes, dtypes, devices), in place.

        Validates as :func:`reposition_` does: a bad call raises ``ValueError`` before any tensor is written.
        """
        tensors = list(tensors) if not isinstance(tensors, torch.Tensor) else tensors
        checked = self._checked(tensors)
        backends = self._backends(backend)
        with torch.no_grad():
            for g, members, name in zip(self._groups, checked.members, backends):
                _copy_group(g, members, name, to_snapshot=False)
        _mark_modified(checked.changed)

    def _live_groups(self) -> list[_Group]:
        if self._groups is None:
            raise ValueError("snap was released; take a new snapshot")
        return self._groups

    def _backends(self, backend: str | None) -> list[str]:
        requested_backend(backend)  # a bad name fails even with no group to run (every tensor empty)
        return [resolve_backend(backend, g.device) for g in self._live_groups()]

    def _check_tensors(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors`` validated against the snapshot, as the local tensors the kernels write."""
        return self._checked(tensors).local

    def _checked(self, tensors: Iterable[torch.Tensor]) -> _Checked:
        """``tensors`` validated, with each group's members and the tensors whose versions a write bumps.

        A list whose :func:`_layout_key` equals that of the last list that passed is
        not validated again (one tuple compare): the key holds everything the checks
        read that can change while the tensor objects stay the same.
        """
        self._live_groups()
        key = _layout_key(tensors)
        if key is not None and self._validated is not None and self._validated[0] == key:
            return self._validated[1]
        return self._remember(key, tensors, self._validate(tensors))

    def _remember(self, key: tuple | None, tensors: list[torch.Tensor], local: list[torch.Tensor]) -> _Checked:
        """The :class:`_Checked` of a validated list, cached under ``key`` (None: not cacheable)."""
        groups = self._live_groups()
        # Both the caller's tensors and their local shards: a graph may have saved a DTensor parameter itself,
        # whose version counter is not its shard's.
        changed = local + [t for t, t_local in zip(tensors, local) if t is not t_local]
        checked = _Checked(local, [[local[i] for i in g.indices] for g in groups], changed)
        if key is not None:
            self._validated = (key, checked)
            for g in groups:  # the pointer tables were built for the previous list
                g._table = None
        return checked

    def _validate(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        local = _as_tensor_list(tensors, "tensors")
        if len(local) != len(self):
            raise ValueError(f"tensors has {len(local)} tensors but the snapshot holds {len(self)}")
        if [(t.shape, t.dtype, t.device) for t in local] != self._signature:
            for i, t in enumerate(local):
                for what, got, want in (
                    ("shape", t.shape, self.shapes[i]),
                    ("dtype", t.dtype, self.dtypes[i]),
                    ("device", t.device, self.devices[i]),
                ):
                    if got != want:
                        raise ValueError(f"tensors[{i}] has {what} {_fmt(got)} but the snapshot has {_fmt(want)}")
        return local


def _layout_key(tensors) -> tuple | None:
    """What validation depends on that can change under a tensor object that stays the same, or None (no cache).

    Per tensor ``(id, data_ptr, shape, stride, dtype, is_neg)``; the ids are of objects
    the snapshot keeps referenced (``_validated``), so none is reused while cached.
    Not the version counter: Stage I's optimizer steps bump it on every pass
    (value writes, which change nothing validation checks), so it would miss every
    time between ``snapshot`` and ``reposition_``; and ``p.data = x`` (the one
    way to swap a parameter's memory, dtype or shape in place) does not bump it.
    What the key catches: a tensor replaced (id), resized, re-dtyped or moved
    (``.data = ...``, ``resize_``, ``set_``, ``.to``: shape, dtype, data_ptr), its
    storage changed or freed (data_ptr: a freed storage's is 0, and a resized
    one is a new allocation, made while the old one is still held), made non-contiguous in place (stride), or
    a lazy neg view swapped in (``is_neg``). The device is implied: ``.data =`` a
    tensor on another device changes the data pointer (a CPU and a CUDA
    allocation never share an address under CUDA's unified addressing). Dtype
    and layout checks need no more: strided is implied by a data pointer, and an
    inference tensor cannot alias a normal one. Only plain tensors and
    parameters (no DTensor, whose local shard is a new object per call); an
    empty list, or a list that is not one, is validated every time.
    """
    if not isinstance(tensors, list) or not tensors:
        return None
    for t in tensors:
        if type(t) not in _PLAIN_TYPES:
            return None
    return tuple([(id(t), t.data_ptr(), t.shape, t.stride(), t.dtype, t.is_neg()) for t in tensors])


def _fmt(x) -> str:
    return str(tuple(x)) if isinstance(x, torch.Size) else str(x)


class _Checked(NamedTuple):
    """A validated tensor list: the local tensors, each group's members, what a write marks modified."""

    local: list[torch.Tensor]
    members: list[list[torch.Tensor]]  # per snapshot group, in group order
    changed: list[torch.Tensor]  # the local tensors, and the caller's where they differ (DTensors)


def _mark_modified(changed: list[torch.Tensor]) -> None:
    """Kernels write through raw pointers; tell autograd the tensors changed in place."""
    if changed:
        torch.autograd.graph.increment_version(changed)


def _copy_group(g: _Group, members: list[torch.Tensor], backend: str, *, to_snapshot: bool) -> None:
    if not members:
        return
    if backend == "torch":
        src, dst = (members, g.views) if to_snapshot else (g.views, members)
        if g.storage.device == g.device:
            torch._foreach_copy_(dst, src)
        else:  # offloaded: asynchronous DMA transfers to / from pinned memory, one per tensor
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)
        return
    table, witness = g.table(members), members[0]
    if backend == "triton":
        mt.triton_copy_(table, to_snapshot, witness)
    else:  # the CUDA C++ kernels of csrc/ (built lazily with nvcc)
        _cuda_lib.copy_(table, to_snapshot, witness.element_size(), witness.device)
    _keep_host_storage_until_done(g)


def _lerp_group(g: _Group, members: list[torch.Tensor], weight: float, backend: str) -> None:
    if not members:
        return
    if backend == "torch":
        if g.storage.device == g.device:
            torch._foreach_lerp_(members, g.views, weight)
            return
        # Offloaded snapshot: stage it back in bounded batches, so the extra
        # device memory stays below TORCH_OFFLOAD_STAGING_BYTES.
        for lo, hi in _byte_batches(members, TORCH_OFFLOAD_STAGING_BYTES):
            staged = [v.to(g.device, non_blocking=True) for v in g.views[lo:hi]]
            torch._foreach_lerp_(members[lo:hi], staged, weight)
        return
    table, witness = g.table(members), members[0]
    if backend == "triton":
        mt.triton_lerp_(table, weight, witness)
    else:  # the CUDA C++ kernels of csrc/
        _cuda_lib.lerp_(table, weight, witness.dtype, witness.device)
    _keep_host_storage_until_done(g)


# Pinned host buffers a kernel still reads or writes through raw pointers. torch
# tracks its own copies to pinned memory, not ours: without this, dropping an
# offloaded snapshot right after reposition_ (as SFPO does) could let the
# pinned-memory cache hand the buffer out while the kernel still streams it.
_HOST_STORAGE_IN_FLIGHT: list[tuple[torch.cuda.Event, torch.Tensor]] = []


def _keep_host_storage_until_done(g: _Group) -> None:
    if g.storage.device == g.device:
        return
    _HOST_STORAGE_IN_FLIGHT[:] = [(e, s) for e, s in _HOST_STORAGE_IN_FLIGHT if not e.query()]
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(g.device))
    _HOST_STORAGE_IN_FLIGHT.append((event, g.storage))


def _byte_batches(tensors: list[torch.Tensor], limit: int) -> list[tuple[int, int]]:
    """Split ``tensors`` into consecutive ``[lo, hi)`` runs of at most ``limit`` bytes (or one tensor)."""
    runs, lo, size = [], 0, 0
    for k, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if k > lo and size + nbytes > limit:
            runs.append((lo, k))
            lo, size = k, 0
        size += nbytes
    if lo < len(tensors):
        runs.append((lo, len(tensors)))
    return runs


def _allocate_groups(tensors: list[torch.Tensor], offload: str) -> list[_Group]:
    """Group non-empty tensors by (device, dtype) and lay each group out in one flat buffer."""
    by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() > 0:
            by_key.setdefault((t.device, t.dtype), []).append(i)
    groups = []
    for (device, dtype), indices in by_key.items():
        align = max(1, STORAGE_ALIGN_BYTES // tensors[indices[0]].element_size())
        offsets, total = [], 0
        for i in indices:
            offsets.append(total)
            total += -(-tensors[i].numel() // align) * align
        if offload == "cpu" and device.type == "cuda":
            storage = empty_for_kernel(total, dtype=dtype, device="cpu", pin_memory=True)
        else:
            storage = empty_for_kernel(total, dtype=dtype, device=device)
        groups.append(_Group(device, dtype, indices, [tensors[i].shape for i in indices], offsets, storage))
    return groups


def snapshot(tensors: Iterable[torch.Tensor], *, offload: str = "none", backend: str | None = None) -> Snapshot:
    """Copy the current values of ``tensors`` into a new :class:`Snapshot`.

    Args:
        tensors: list (or iterable) of contiguous fp32/bf16/fp16/fp64 tensors of
            any shapes, devices and sizes, 0-d and empty included, e.g.
            ``[p for p in model.parameters() if p.requires_grad]``; no
            inference tensors, none with the neg or conj bit set.
        offload: ``"none"`` keeps the copy beside each tensor; ``"cpu"`` keeps the
            copy of CUDA tensors in pinned host memory (no GPU memory).
        backend: ``"triton"``, ``"cuda"`` or ``"torch"``; default ``$SFPO_BACKEND``,
            else triton for CUDA tensors and torch for CPU tensors.

    Example::

        >>> import torch, sfpo_kernels
        >>> w = [torch.ones(3), torch.zeros(2, 2)]
        >>> snap = sfpo_kernels.snapshot(w)
        >>> w[0].add_(1.0); sfpo_kernels.reposition_(w, snap, 0.5); w[0]
        tensor([1.5000, 1.5000, 1.5000])
    """
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload={offload!r} is not supported; expected one of {', '.join(map(repr, OFFLOAD_MODES))}")
    requested_backend(backend)  # a bad name fails even when every tensor is empty (no group to resolve it for)
    local = _as_tensor_list(tensors, "tensors")
    backends = {d: resolve_backend(backend, d) for d in {t.device for t in local if t.numel()}}  # before allocating
    groups = _allocate_groups(local, offload)
    snap = Snapshot([t.shape for t in local], [t.dtype for t in local], [t.device for t in local], groups, offload)
    # Validated just now: reposition_ / restore_ on the same, unchanged list skip it. The key is of the local
    # tensors (the caller's themselves for a list of plain tensors, the only lists the cache can match).
    snap._remember(_layout_key(local), local, local)
    with torch.no_grad():
        for g in groups:
            _copy_group(g, [local[i] for i in g.indices], backends[g.device], to_snapshot=True)
    return snap


def reposition_(tensors: Iterable[torch.Tensor], snap: Snapshot, alpha: float, *, backend: str | None = None) -> None:
    """In place, for every tensor: ``t <- snap + alpha * (t - snap)`` (SFPO Stage II).

    ``alpha == 1`` leaves every tensor as it is (nothing is read or written) and
    ``alpha == 0`` copies the snapshot back (:meth:`Snapshot.restore_`): both
    bit-exact for every value, signed zeros, inf and NaN included, where a lerp
    is not (``0 * inf`` is NaN, ``-0.0 + 0.0`` is ``+0.0``). Any other alpha is
    evaluated as ``torch.lerp(t, snap, 1 - alpha)`` in ``promote(dtype, fp32)``
    with one rounding (the two-branch, fma-based lerp of ATen's vectorised
    kernels); fp32 results equal ``torch._foreach_lerp_(tensors, snap.values(),
    1 - alpha)``.

    Args:
        tensors: the same list the snapshot was taken of (or one with the same
            shapes, dtypes and devices), contiguous.
        snap: a :class:`Snapshot` from :func:`snapshot`.
        alpha: a finite real number (or a one-element floating tensor) in ``[0, 1]``.
        backend: as in :func:`snapshot`.

    Raises:
        ValueError: on any mismatch or any argument :func:`snapshot` would refuse
            (backend name included), before any tensor is written.
    """
    if not isinstance(snap, Snapshot):
        raise ValueError(f"snap must be a Snapshot from sfpo_kernels.snapshot(), got {type(snap).__name__}")
    alpha = _check_alpha(alpha)
    tensors = list(tensors) if not isinstance(tensors, torch.Tensor) else tensors
    checked = snap._checked(tensors)
    backends = snap._backends(backend)
    if alpha == 1.0:  # theta_K as it is; a lerp with weight 0 would still turn -0.0 into +0.0
        return
    with torch.no_grad():
        for g, members, name in zip(snap._live_groups(), checked.members, backends):
            if alpha == 0.0:  # theta_0 exactly, whatever the tensors hold now (a lerp keeps their NaNs)
                _copy_group(g, members, name, to_snapshot=False)
            else:
                _lerp_group(g, members, 1.0 - alpha, name)
    _mark_modified(checked.changed)
