"""reposition_: t <- snap + alpha * (t - snap), in place, against the reference and the float64 formula.

Tolerance against the float64 formula (the reference and torch._foreach_lerp_
must match bit for bit instead; they evaluate the same fma-based lerp):

    |got - exact| <= ulp_dtype(exact) + 2 * eps_compute * (|theta_0| + |theta_K|)

The first term is the one rounding to the tensor's dtype (at most half an ulp;
a full ulp allowed). The second bounds the lerp's own arithmetic in the compute
dtype (fp32 for fp32/bf16/fp16, fp64 for fp64: eps 2^-23 / 2^-52): ``snap - t``
and ``1 - alpha`` are each rounded once, errors scaled by the operands, not by
the result, which can be much smaller than either when they nearly cancel.
A wrong formula (alpha and 1 - alpha swapped, say) misses this by orders of
magnitude.
"""

from __future__ import annotations

import math

import pytest
import torch

import sfpo_kernels
from sfpo_kernels import reference
from tests.helpers.bits import assert_bit_equal, make_tensors, ulp
from tests.helpers.devices import kernel_devices

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
COMPUTE_EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-23, torch.float16: 2.0**-23}
ALPHAS = [0.0, 0.3, 0.5, 0.8, 1.0]

ODD_SHAPES = [
    pytest.param([(3, 5), (), (0,), (1000,), (7,), (300, 2)], id="mixed-with-0d-and-empty"),
    pytest.param([(1,)] * 40 + [(513,)], id="many-tiny"),
    pytest.param([(257, 3), (4099,)], id="crosses-chunks"),
]


def backends_here() -> list[str]:
    return ["torch", "triton"]


def moved(theta0: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    """theta_K: theta_0 plus a random step, as K optimizer steps would leave it."""
    g = torch.Generator().manual_seed(seed)
    return [(t.double() + 0.5 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype) for t in theta0]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", ODD_SHAPES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_reposition_matches_reference_and_formula(device, backend, dtype, shapes, alpha):
    theta0 = make_tensors(shapes, dtype, device)
    params = [t.clone() for t in theta0]
    snap = sfpo_kernels.snapshot(params, backend=backend)
    theta_k = moved(theta0)
    for p, t in zip(params, theta_k):
        p.copy_(t)

    sfpo_kernels.reposition_(params, snap, alpha, backend=backend)

    expected = [t.clone() for t in theta_k]
    reference.reposition_(expected, theta0, alpha)
    for i, (p, e, t0, tk) in enumerate(zip(params, expected, theta0, theta_k)):
        assert_bit_equal(f"param[{i}] vs reference", p, e)
        exact = t0.double() + alpha * (tk.double() - t0.double())
        tol = ulp(exact.to(dtype)) + 2 * COMPUTE_EPS[dtype] * (t0.double().abs() + tk.double().abs())
        err = (p.double() - exact).abs()
        assert bool((err <= tol).all()), f"param[{i}]: error {(err - tol).max().item():.3g} above tolerance"
        if alpha == 1.0:
            assert_bit_equal(f"param[{i}] at alpha=1", p, tk)
        if alpha == 0.0:
            assert_bit_equal(f"param[{i}] at alpha=0", p, t0)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_fp32_bit_exact_against_foreach_lerp(device, backend, alpha):
    theta0 = make_tensors([(1000,), (33, 7), (5,)], torch.float32, device)
    params = moved(theta0)
    snap = sfpo_kernels.snapshot(theta0, backend=backend)
    expected = [p.clone() for p in params]
    torch._foreach_lerp_(expected, theta0, 1.0 - alpha)
    sfpo_kernels.reposition_(params, snap, alpha, backend=backend)
    for i, (p, e) in enumerate(zip(params, expected)):
        assert_bit_equal(f"param[{i}] vs _foreach_lerp_", p, e)


@pytest.mark.parametrize("device", kernel_devices())
def test_triton_and_torch_backends_agree_bitwise(device):
    for dtype in DTYPES:
        theta0 = make_tensors([(129,), (2, 3, 5)], dtype, device, seed=3)
        theta_k = moved(theta0, seed=4)
        results = {}
        for backend in ("torch", "triton"):
            params = [t.clone() for t in theta_k]
            sfpo_kernels.reposition_(params, sfpo_kernels.snapshot(theta0, backend=backend), 0.8, backend=backend)
            results[backend] = params
        for i, (a, b) in enumerate(zip(results["torch"], results["triton"])):
            assert_bit_equal(f"{dtype} param[{i}] triton vs torch", b, a)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("backend", backends_here())
def test_mixed_dtypes_in_one_call(device, backend):
    theta0 = make_tensors([(10,), (3, 3)], torch.float32, device) + make_tensors([(17,), ()], torch.bfloat16, device)
    params = moved(theta0)
    theta_k = [p.clone() for p in params]
    snap = sfpo_kernels.snapshot(params, backend=backend)
    for p, t in zip(params, theta0):  # snapshot theta_k, then go back to theta0: the snapshot must not move
        p.copy_(t)
    sfpo_kernels.reposition_(params, snap, 0.3, backend=backend)
    expected = [t.clone() for t in theta0]
    reference.reposition_(expected, theta_k, 0.3)
    for i, (p, e) in enumerate(zip(params, expected)):
        assert_bit_equal(f"param[{i}] ({p.dtype})", p, e)


def test_nan_and_inf_propagate_like_torch_lerp():
    theta0 = [torch.tensor([1.0, float("nan"), float("inf"), 2.0])]
    params = [torch.tensor([float("nan"), 1.0, 3.0, float("-inf")])]
    for backend in backends_here():
        p = [params[0].clone()]
        sfpo_kernels.reposition_(p, sfpo_kernels.snapshot(theta0, backend=backend), 0.5, backend=backend)
        e = [params[0].clone()]
        reference.reposition_(e, theta0, 0.5)
        assert torch.equal(p[0].isnan(), e[0].isnan()), backend
        finite = ~e[0].isnan()
        assert torch.equal(p[0][finite], e[0][finite]), backend


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_alpha_zero_and_one_exact_for_signed_zeros_inf_and_nan(device, backend, dtype):
    """A lerp is not exact here: weight 0 gives t + 0 * (snap - t) (NaN where snap is inf, +0.0 for t = -0.0)."""
    special = [-0.0, 0.0, -0.0, math.nan, 1.0, math.inf, -math.inf, 2.0]
    other = [0.0, -0.0, 1.0, 1.0, math.nan, 3.0, 1.0, math.inf]
    for theta0, theta_k in ((special, other), (other, special)):
        t0 = torch.tensor(theta0 * 9, dtype=dtype, device=device)  # 72 elements: crosses a block
        tk = torch.tensor(theta_k * 9, dtype=dtype, device=device)
        for alpha, want in ((0.0, t0), (1.0, tk), (0, t0), (1, tk)):
            params = [tk.clone()]
            sfpo_kernels.reposition_(params, sfpo_kernels.snapshot([t0], backend=backend), alpha, backend=backend)
            assert_bit_equal(f"alpha={alpha!r}", params[0], want)


def test_requires_grad_parameters_updated_in_place_without_autograd():
    lin = torch.nn.Linear(5, 3)
    params = list(lin.parameters())
    theta0 = [p.detach().clone() for p in params]
    snap = sfpo_kernels.snapshot(params)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    versions = [p._version for p in params]
    ptrs = [p.data_ptr() for p in params]
    for backend in backends_here():
        sfpo_kernels.reposition_(params, snap, 0.0, backend=backend)
        for i, (p, t0) in enumerate(zip(params, theta0)):
            assert p.requires_grad and p.grad_fn is None, f"param[{i}] became a non-leaf"
            assert_bit_equal(f"param[{i}] restored", p.detach(), t0)
    assert [p.data_ptr() for p in params] == ptrs, "parameters were replaced, not updated in place"
    assert all(p._version > v for p, v in zip(params, versions)), "autograd version counters not bumped"


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_views_take_the_elementwise_path(device, dtype):
    # Contiguous views at odd offsets of one buffer, as FSDP1 flat parameters hand out.
    flat = make_tensors([(3000,)], dtype, device)[0]
    params = [flat[1:1001], flat[1003:1520], flat[2001:2004]]
    theta0 = [p.clone() for p in params]
    snap = sfpo_kernels.snapshot(params, backend="triton")
    assert not snap._groups[0].table(params).aligned, "odd offsets must not be promised 16-byte alignment"
    for p in params:
        p.add_(1.0)
    theta_k = [p.clone() for p in params]
    sfpo_kernels.reposition_(params, snap, 0.8, backend="triton")
    expected = [t.clone() for t in theta_k]
    reference.reposition_(expected, theta0, 0.8)
    for i, (p, e) in enumerate(zip(params, expected)):
        assert_bit_equal(f"view[{i}]", p, e)
    assert_bit_equal("bytes between the views", flat[1001:1003], make_tensors([(3000,)], dtype, device)[0][1001:1003])
