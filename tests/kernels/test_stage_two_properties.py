"""Properties of snapshot / Snapshot.restore_ / reposition_ over random tensor lists (hypothesis).

Inputs: 1-5 tensors per call; shapes with 0-d, empty and sizes that cross the
interpreter's block (64) and chunk (256); fp32/bf16/fp16/fp64 mixed in one
call; contiguous views at odd offsets of a larger buffer, whose bytes around
the view are watched; values over 2^-8..2^8 with signed zeros (and inf/NaN
where the property is an exact copy). Both the torch and the triton backends.

Every invariant is exact, so there is no tolerance table:

- snapshot and restore_ are bit copies (equal to ``reference.snapshot``);
- reposition_ equals ``reference.reposition_`` bit for bit for alpha in
  [2^-24, 1): both evaluate the same fma-based two-branch lerp with one
  rounding. Not below: there 1 - alpha rounds to 1.0 in fp32, where ATen's
  CPU lerp (the reference) gives a zero result one sign in its vectorised body
  and the other in its scalar tail, so it has no single answer to match;
- alpha 0 and 1 are exact for every bit pattern (theta_0 / theta_K);
- a rejected call raises ValueError and changes no byte of any tensor, any
  buffer a tensor is a view of, or the snapshot.

Budget: derandomized (the same examples every run), no deadline, example counts
sized so the file runs in well under a minute on 2 CPU cores with the Triton
interpreter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from tests.helpers.bits import assert_bit_equal
from tests.helpers.devices import kernel_devices
from tests.helpers.optional import import_or_skip

import_or_skip("hypothesis")  # the test extra installs it; the GPU machine's image may not
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sfpo_kernels
from sfpo_kernels import reference

DEVICE = kernel_devices()[0]
BACKENDS = ["torch", "triton"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
EDGE_SHAPES = ((), (0,), (3, 0), (1,), (65,), (257,), (2, 129))


def _settings(max_examples: int):
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


@dataclass(frozen=True)
class Spec:
    """One tensor of a call: a view of ``shape`` at element ``offset`` of a buffer with ``pad`` elements after it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    pad: int


SHAPES = st.one_of(st.sampled_from(EDGE_SHAPES), st.lists(st.integers(0, 5), max_size=3).map(tuple))
SPECS = st.lists(
    st.builds(Spec, SHAPES, st.sampled_from(DTYPES), st.sampled_from((0, 0, 1, 3)), st.sampled_from((0, 2))),
    min_size=1,
    max_size=5,
)
SEEDS = st.integers(0, 2**31 - 1)
OFFLOADS = st.sampled_from(("none", "cpu"))
# alpha in [2^-24, 1) for the comparison with the reference (see the module docstring); 0 and 1 are exact copies.
LERP_ALPHAS = st.one_of(
    st.sampled_from((0.5, 2.0**-24, 1 - 2.0**-53, 0.49999997, 0.50000006)),
    st.floats(2.0**-24, 1.0, exclude_max=True),
)
EXACT_ALPHAS = st.sampled_from((0.0, 1.0, 0, 1, torch.tensor(0.0), torch.tensor(1.0, dtype=torch.float64)))


def _values(n: int, dtype: torch.dtype, seed: int, special: bool) -> torch.Tensor:
    """``n`` values: normal times 2^[-8, 8], 1 in 8 a signed zero, with ``special`` 1 in 16 each inf, -inf, NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-8, 9, (n,), generator=g).double())
    pick = torch.randint(0, 16, (n,), generator=g)
    x = torch.where(pick == 0, 0.0, torch.where(pick == 1, -0.0, x))
    if special:
        x = torch.where(pick == 2, math.inf, torch.where(pick == 3, -math.inf, torch.where(pick == 4, math.nan, x)))
    return x.to(device=DEVICE, dtype=dtype)


def _build(specs: list[Spec], seed: int, special: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(buffers, tensors): each tensor a contiguous view into its own buffer."""
    buffers = [_values(s.offset + math.prod(s.shape) + s.pad, s.dtype, seed + k, special) for k, s in enumerate(specs)]
    return buffers, _views(specs, buffers)


def _views(specs: list[Spec], buffers: list[torch.Tensor]) -> list[torch.Tensor]:
    return [b[s.offset : s.offset + math.prod(s.shape)].view(s.shape) for s, b in zip(specs, buffers)]


def _theta_k(specs: list[Spec], seed: int, special: bool = False) -> list[torch.Tensor]:
    return [_values(math.prod(s.shape), s.dtype, seed + 7919 + k, special).view(s.shape) for k, s in enumerate(specs)]


def _assign(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, v in zip(tensors, values):
            t.copy_(v)


def _assert_bytes(what: str, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want), what
    for k, (a, b) in enumerate(zip(got, want)):
        assert_bit_equal(f"{what}: buffer {k}", a, b)


def _clones(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


# ----------------------------------------------------------------------------- results


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(100)
@given(specs=SPECS, seed=SEEDS, offload=OFFLOADS)
def test_snapshot_and_restore_are_bit_copies(backend, specs, seed, offload):
    buffers, tensors = _build(specs, seed, special=True)
    before = _clones(buffers)
    snap = sfpo_kernels.snapshot(tensors, offload=offload, backend=backend)
    _assert_bytes("after snapshot", buffers, before)
    _assert_bytes("snapshot values vs reference.snapshot", snap.values(), reference.snapshot(tensors))
    _assign(tensors, _theta_k(specs, seed, special=True))
    snap.restore_(tensors, backend=backend)
    _assert_bytes("after restore_ (views and the bytes around them)", buffers, before)


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(150)
@given(specs=SPECS, seed=SEEDS, alpha=LERP_ALPHAS, offload=OFFLOADS)
def test_reposition_matches_the_reference_bit_for_bit(backend, specs, seed, alpha, offload):
    buffers, tensors = _build(specs, seed)
    theta0 = _clones(tensors)
    snap = sfpo_kernels.snapshot(tensors, offload=offload, backend=backend)
    theta_k = _theta_k(specs, seed)
    _assign(tensors, theta_k)
    expected = _clones(buffers)
    reference.reposition_(_views(specs, expected), theta0, alpha)

    sfpo_kernels.reposition_(tensors, snap, alpha, backend=backend)

    _assert_bytes(f"reposition_ at alpha={alpha!r} vs reference", buffers, expected)
    _assert_bytes("snapshot after reposition_", snap.values(), theta0)


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(60)
@given(specs=SPECS, seed=SEEDS, alpha=EXACT_ALPHAS, offload=OFFLOADS)
def test_alpha_zero_and_one_are_exact_for_every_value(backend, specs, seed, alpha, offload):
    buffers, tensors = _build(specs, seed, special=True)
    theta0 = _clones(tensors)
    snap = sfpo_kernels.snapshot(tensors, offload=offload, backend=backend)
    theta_k = _theta_k(specs, seed, special=True)
    _assign(tensors, theta_k)
    expected = _clones(buffers)
    _assign(_views(specs, expected), theta0 if float(alpha) == 0.0 else theta_k)

    sfpo_kernels.reposition_(tensors, snap, alpha, backend=backend)

    _assert_bytes(f"reposition_ at alpha={alpha!r}", buffers, expected)


# ----------------------------------------------------------------------------- rejected calls


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Every other element of ``t`` (a strided view of the same buffer), or a transposed matrix if ``t`` is too small."""
    if t.numel() >= 3:
        return t.view(-1)[::2]
    return torch.zeros(3, 4, dtype=t.dtype, device=t.device).t()


def _inference(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return t.clone()


def _other_shape(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)


def _other_dtype(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype != torch.float64 else torch.float32)


# name: (what replaces tensors[i], the message). snapshot() refuses the first four too; shape and dtype it
# cannot get wrong (it takes them from the tensors).
REPLACEMENTS = {
    "non-contiguous": (_non_contiguous, r"tensors\[{i}\].*not contiguous"),
    "inference": (_inference, r"tensors\[{i}\] is an inference tensor"),
    "neg-bit": (torch._neg_view, r"tensors\[{i}\] has its neg bit set"),
    "integer": (
        lambda t: torch.zeros(t.shape, dtype=torch.int32, device=t.device),
        r"tensors\[{i}\] has dtype torch.int32",
    ),
    "other-shape": (_other_shape, r"tensors\[{i}\] has shape"),
    "other-dtype": (_other_dtype, r"tensors\[{i}\] has dtype"),
}
SNAPSHOT_REPLACEMENTS = ("non-contiguous", "inference", "neg-bit", "integer")
BAD_ALPHAS = (math.nan, math.inf, -0.5, 1.5, 10**400, True, "0.5", None, torch.tensor([0.1, 0.2]))


KINDS = {
    "snapshot": (*SNAPSHOT_REPLACEMENTS, "alias", "backend"),
    "restore_": (*REPLACEMENTS, "alias", "backend", "count", "released"),
    "reposition_": (*REPLACEMENTS, "alias", "backend", "count", "released", "alpha"),
}
REJECTED_CALLS = [pytest.param(op, kind, id=f"{op}-{kind}") for op, kinds in KINDS.items() for kind in kinds]


@st.composite
def _corruption(draw, kind: str):
    """(specs, argument): a valid list and where (or what) the one thing wrong with the call is."""
    specs = draw(SPECS)
    if kind == "alias":  # needs a tensor with memory to share
        nonempty = [k for k, s in enumerate(specs) if math.prod(s.shape) > 0]
        if not nonempty:
            specs, nonempty = specs + [Spec((2,), torch.float32, 0, 0)], [len(specs)]
        return specs, draw(st.sampled_from(nonempty))
    if kind == "alpha":
        return specs, draw(st.sampled_from(BAD_ALPHAS))
    if kind == "count":
        return specs, draw(st.sampled_from((-1, 1)))
    if kind == "backend":
        if draw(st.booleans()):  # every tensor empty: no group would ever resolve the name
            specs = [Spec(s.shape[:-1] + (0,), s.dtype, s.offset, s.pad) for s in specs]
        return specs, None
    return specs, draw(st.integers(0, len(specs) - 1))


def _corrupt(kind: str, arg, tensors: list[torch.Tensor], watched: list[torch.Tensor]) -> tuple[list, str]:
    """The call's tensor list with the corruption applied, and the message it must raise."""
    tensors = list(tensors)
    if kind in REPLACEMENTS:
        make, pattern = REPLACEMENTS[kind]
        tensors[arg] = make(tensors[arg])
        watched.append(tensors[arg])
        return tensors, pattern.format(i=arg)
    if kind == "alias":
        return tensors + [tensors[arg]], rf"tensors\[{arg}\] and tensors\[{len(tensors)}\] share memory"
    if kind == "count":
        n = len(tensors)
        bad = tensors[:-1] if arg < 0 else tensors + [torch.zeros(1, device=DEVICE)]
        return bad, rf"tensors has {len(bad)} tensors but the snapshot holds {n}"
    return tensors, {"backend": r"backend='numba'", "released": r"released", "alpha": r"alpha"}[kind]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,kind", REJECTED_CALLS)
@_settings(12)
@given(data=st.data(), seed=SEEDS, offload=OFFLOADS)
def test_a_rejected_call_changes_no_byte(backend, op, kind, data, seed, offload):
    specs, arg = data.draw(_corruption(kind), label="specs, argument")
    buffers, tensors = _build(specs, seed, special=True)
    snap = None if op == "snapshot" else sfpo_kernels.snapshot(tensors, offload=offload, backend=backend)
    _assign(tensors, _theta_k(specs, seed, special=True))  # so a half-applied restore or reposition would show
    watched: list[torch.Tensor] = []
    bad, pattern = _corrupt(kind, arg, tensors, watched)
    # raw memory of every buffer (a neg view is compared through the buffer it views)
    before, watched_before = _clones(buffers), [w.clone() for w in watched]
    snap_before = _clones(snap.values()) if snap is not None else []
    chosen = "numba" if kind == "backend" else backend
    if kind == "released":
        snap.release()

    with pytest.raises(ValueError, match=pattern):
        if op == "snapshot":
            sfpo_kernels.snapshot(bad, offload=offload, backend=chosen)
        elif op == "restore_":
            snap.restore_(bad, backend=chosen)
        else:
            sfpo_kernels.reposition_(bad, snap, arg if kind == "alpha" else 0.5, backend=chosen)

    _assert_bytes(f"{op} rejected for {kind}: the tensors' buffers", buffers, before)
    _assert_bytes(f"{op} rejected for {kind}: the bad tensor", [w.clone() for w in watched], watched_before)
    if snap is not None and kind != "released":
        _assert_bytes(f"{op} rejected for {kind}: the snapshot", snap.values(), snap_before)
