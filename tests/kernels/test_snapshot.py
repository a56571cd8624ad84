"""snapshot / Snapshot.restore_ and the argument checks shared with reposition_.

Copies are bit copies: every comparison here is exact.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import sfpo_kernels
from sfpo_kernels import Snapshot
from tests.helpers.bits import assert_bit_equal, make_tensors
from tests.helpers.devices import kernel_devices

SHAPES = [(3, 5), (), (0,), (0, 4), (1000,), (7,), (300, 2), (1,)]
BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_snapshot_copies_and_restores_bit_exact(device, backend, dtype, offload):
    params = make_tensors(SHAPES, dtype, device)
    theta0 = [p.clone() for p in params]
    snap = sfpo_kernels.snapshot(params, offload=offload, backend=backend)

    assert len(snap) == len(params)
    assert snap.offload == offload
    for i, (v, t0) in enumerate(zip(snap.values(), theta0)):
        assert_bit_equal(f"snapshot value[{i}]", v, t0)
    elem = torch.empty((), dtype=dtype).element_size()
    assert snap.nbytes >= sum(p.numel() for p in params) * elem

    for p in params:  # the snapshot must not alias the tensors
        p.mul_(3.0).add_(1.0)
    for i, (v, t0) in enumerate(zip(snap.values(), theta0)):
        assert_bit_equal(f"snapshot value[{i}] after the tensors moved", v, t0)

    snap.restore_(params, backend=backend)
    for i, (p, t0) in enumerate(zip(params, theta0)):
        assert_bit_equal(f"restored[{i}]", p, t0)


@pytest.mark.parametrize("device", kernel_devices())
def test_thousands_of_tensors_one_group(device):
    shapes = [((i * 7) % 13,) for i in range(2000)]  # includes empty tensors
    params = make_tensors(shapes, torch.float32, device)
    theta0 = [p.clone() for p in params]
    snap = sfpo_kernels.snapshot(params, backend="triton")
    assert len(snap._groups) == 1, "one (device, dtype) group means one launch"
    for p in params:
        p.add_(1.0)
    sfpo_kernels.reposition_(params, snap, 0.0, backend="triton")
    for i, (p, t0) in enumerate(zip(params, theta0)):
        assert_bit_equal(f"param[{i}]", p, t0)


def test_accepts_a_generator_of_module_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    snap = sfpo_kernels.snapshot(p for p in model.parameters() if p.requires_grad)
    assert len(snap) == 4
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    snap.restore_(model.parameters())
    for i, (p, b) in enumerate(zip(model.parameters(), before)):
        assert_bit_equal(f"param[{i}]", p.detach(), b)


def test_release_frees_and_blocks_reuse():
    params = [torch.randn(10)]
    snap = sfpo_kernels.snapshot(params)
    snap.release()
    assert snap.nbytes == 0
    with pytest.raises(ValueError, match="released"):
        sfpo_kernels.reposition_(params, snap, 0.5)
    with pytest.raises(ValueError, match="released"):
        snap.restore_(params)


# ----------------------------------------------------------------------------- rejected calls


def _params():
    return [torch.randn(4, 3), torch.randn(5), torch.randn(2, dtype=torch.bfloat16)]


def _bad_reposition_calls():
    """(id, call(params, snap), message pattern) for calls that must be rejected."""
    return [
        ("alpha-above-1", lambda p, s: sfpo_kernels.reposition_(p, s, 1.5), r"alpha.*\[0, 1\].*1\.5"),
        ("alpha-negative", lambda p, s: sfpo_kernels.reposition_(p, s, -0.1), r"alpha.*-0\.1"),
        ("alpha-nan", lambda p, s: sfpo_kernels.reposition_(p, s, math.nan), r"alpha.*nan"),
        ("alpha-inf", lambda p, s: sfpo_kernels.reposition_(p, s, math.inf), r"alpha.*inf"),
        ("alpha-bool", lambda p, s: sfpo_kernels.reposition_(p, s, True), r"alpha.*True"),
        ("alpha-string", lambda p, s: sfpo_kernels.reposition_(p, s, "0.5"), r"alpha"),
        ("too-few", lambda p, s: sfpo_kernels.reposition_(p[:2], s, 0.5), r"2 tensors.*holds 3"),
        ("too-many", lambda p, s: sfpo_kernels.reposition_(p + [torch.zeros(1)], s, 0.5), r"4 tensors.*holds 3"),
        (
            "wrong-shape",
            lambda p, s: sfpo_kernels.reposition_([p[0].view(3, 4), p[1], p[2]], s, 0.5),
            r"tensors\[0\] has shape \(3, 4\).*\(4, 3\)",
        ),
        (
            "wrong-dtype",
            lambda p, s: sfpo_kernels.reposition_([p[0], p[1].double(), p[2]], s, 0.5),
            r"tensors\[1\] has dtype torch.float64.*torch.float32",
        ),
        (
            "non-contiguous",
            lambda p, s: sfpo_kernels.reposition_([p[0].t().contiguous().t(), p[1], p[2]], s, 0.5),
            r"tensors\[0\].*not contiguous",
        ),
        (
            "aliased",
            lambda p, s: sfpo_kernels.reposition_([p[0], p[0].view(-1)[:5], p[2]], s, 0.5),
            r"tensors\[0\] and tensors\[1\] share memory",
        ),
        (
            "not-a-snapshot",
            lambda p, s: sfpo_kernels.reposition_(p, [x.clone() for x in p], 0.5),
            r"snap must be a Snapshot",
        ),
        (
            "unknown-backend",
            lambda p, s: sfpo_kernels.reposition_(p, s, 0.5, backend="numba"),
            r"backend='numba'.*triton, cuda, torch",
        ),
        (
            "cuda-backend-on-cpu",
            lambda p, s: sfpo_kernels.reposition_(p, s, 0.5, backend="cuda"),
            r"backend 'cuda' needs CUDA",
        ),
        ("restore-wrong-count", lambda p, s: s.restore_(p[1:]), r"2 tensors.*holds 3"),
        (
            "restore-integer-tensor",
            lambda p, s: s.restore_([p[0], torch.arange(5), p[2]]),
            r"tensors\[1\] has dtype torch.int64",
        ),
    ]


@pytest.mark.parametrize("call,pattern", [pytest.param(c, m, id=i) for i, c, m in _bad_reposition_calls()])
def test_rejected_calls_raise_and_leave_every_tensor_unchanged(call, pattern):
    params = _params()
    snap = sfpo_kernels.snapshot(params)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)  # so a half-applied reposition or restore would show
    before = [p.clone() for p in params]
    snap_before = [v.clone() for v in snap.values()]
    with pytest.raises(ValueError, match=pattern):
        call(params, snap)
    for i, (p, b) in enumerate(zip(params, before)):
        assert_bit_equal(f"tensor[{i}] after the rejected call", p, b)
    for i, (v, b) in enumerate(zip(snap.values(), snap_before)):
        assert_bit_equal(f"snapshot value[{i}] after the rejected call", v, b)


def _inference_tensor(t):
    with torch.inference_mode():
        return t.clone()


# Tensors that pass every shape / dtype / device check but that a kernel must not write (an
# inference tensor: torch refuses the in-place write part way through a call, Triton writes it
# behind autograd's back) or read as raw memory (the neg bit: Triton would copy the un-negated values).
_UNWRITABLE = [
    pytest.param(_inference_tensor, r"tensors\[1\] is an inference tensor", id="inference"),
    pytest.param(torch._neg_view, r"tensors\[1\] has its neg bit set", id="neg-bit"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_bad,pattern", _UNWRITABLE)
@pytest.mark.parametrize("op", ["reposition_", "restore_"])
def test_unwritable_tensors_rejected_before_any_write(backend, make_bad, pattern, op):
    params = _params()
    snap = sfpo_kernels.snapshot(params, backend=backend)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    params[1] = make_bad(params[1])
    before = [p.clone() for p in params]  # clone() resolves the neg bit: the values the caller sees
    with pytest.raises(ValueError, match=pattern):
        if op == "reposition_":
            sfpo_kernels.reposition_(params, snap, 0.5, backend=backend)
        else:
            snap.restore_(params, backend=backend)
    for i, (p, b) in enumerate(zip(params, before)):
        assert_bit_equal(f"tensor[{i}] after the rejected {op}", p.clone(), b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_bad,pattern", _UNWRITABLE)
def test_snapshot_rejects_unwritable_tensors(backend, make_bad, pattern):
    params = _params()
    params[1] = make_bad(params[1])
    with pytest.raises(ValueError, match=pattern):
        sfpo_kernels.snapshot(params, backend=backend)


def test_conj_bit_rejected():
    z = torch.randn(3, dtype=torch.complex64).conj()
    assert z.is_conj()
    with pytest.raises(ValueError, match=r"tensors\[0\]"):
        sfpo_kernels.snapshot([z])


@pytest.mark.parametrize("alpha", [10**400, -(10**400)], ids=["huge-int", "huge-negative-int"])
def test_alpha_too_large_for_a_float_is_a_value_error(alpha):
    params = _params()
    snap = sfpo_kernels.snapshot(params)
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \[0, 1\]"):
        sfpo_kernels.reposition_(params, snap, alpha)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda t, s, b: sfpo_kernels.snapshot(t, backend=b), id="snapshot"),
        pytest.param(lambda t, s, b: s.restore_(t, backend=b), id="restore_"),
        pytest.param(lambda t, s, b: sfpo_kernels.reposition_(t, s, 0.5, backend=b), id="reposition_"),
    ],
)
def test_bad_backend_rejected_even_when_every_tensor_is_empty(call, monkeypatch):
    empty = [torch.zeros(0), torch.zeros(0, 3, dtype=torch.bfloat16)]
    snap = sfpo_kernels.snapshot(empty)
    with pytest.raises(ValueError, match=r"backend='numba'.*triton, cuda, torch"):
        call(empty, snap, "numba")
    monkeypatch.setenv("SFPO_BACKEND", "pytorch")
    with pytest.raises(ValueError, match=r"SFPO_BACKEND='pytorch'"):
        call(empty, snap, None)


def test_snapshot_reused_after_its_tensors_changed_shape():
    w = torch.nn.Parameter(torch.randn(6, 2))
    snap = sfpo_kernels.snapshot([w])
    w.data = torch.randn(3, 4)  # e.g. a resized embedding
    before = w.detach().clone()
    with pytest.raises(ValueError, match=r"tensors\[0\] has shape \(3, 4\) but the snapshot has \(6, 2\)"):
        sfpo_kernels.reposition_([w], snap, 0.5)
    assert_bit_equal("w", w.detach(), before)


@pytest.mark.parametrize(
    "args,kwargs,pattern",
    [
        pytest.param(([torch.randn(3)],), {"offload": "gpu"}, r"offload='gpu'.*'none', 'cpu'", id="bad-offload"),
        pytest.param((torch.randn(3),), {}, r"list of tensors, got a single tensor", id="single-tensor"),
        pytest.param(([torch.randn(3), 2.0],), {}, r"tensors\[1\] must be a tensor, got float", id="not-a-tensor"),
        pytest.param((5,), {}, r"list of tensors, got int", id="not-iterable"),
        pytest.param(([torch.randn(4, 4).t()],), {}, r"tensors\[0\].*not contiguous", id="non-contiguous"),
        pytest.param(([torch.zeros(3, dtype=torch.int32)],), {}, r"tensors\[0\] has dtype torch.int32", id="int"),
        pytest.param(([torch.zeros(3, device="meta")],), {}, r"tensors\[0\].*meta", id="meta"),
        pytest.param(([torch.randn(3)],), {"backend": "jax"}, r"backend='jax'", id="bad-backend"),
    ],
)
def test_snapshot_rejects_bad_arguments(args, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        sfpo_kernels.snapshot(*args, **kwargs)


def test_backend_from_environment(monkeypatch):
    params = [torch.randn(5)]
    monkeypatch.setenv("SFPO_BACKEND", "pytorch")
    with pytest.raises(ValueError, match=r"SFPO_BACKEND='pytorch'"):
        sfpo_kernels.snapshot(params)
    monkeypatch.setenv("SFPO_BACKEND", "torch")
    assert isinstance(sfpo_kernels.snapshot(params), Snapshot)


def test_triton_on_cpu_needs_the_interpreter():
    # The interpreter is chosen when sfpo_kernels is imported, so check in a fresh process without it.
    code = (
        "import torch, sfpo_kernels\n"
        "assert not sfpo_kernels.triton_interpreting()\n"
        "try:\n"
        "    sfpo_kernels.snapshot([torch.randn(3)], backend='triton')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert re.search(r"backend 'triton' needs CUDA tensors.*TRITON_INTERPRET=1", out), out
