"""The Triton kernels compile for Hopper (sm_90) and vectorise as intended, checked without a GPU.

CI has no GPU, and the interpreter that runs the kernels there never compiles
them; a kernel that only breaks in the GPU compiler would go unnoticed. Triton
compiles ahead of time for any target with its bundled ptxas, so this test does
that and reads the PTX.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def variants() -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(HERE.parent / "helpers" / "triton_aot.py"), "90"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


MULTI_TENSOR_KERNELS = ("_mt_copy_kernel", "_mt_lerp_kernel")
LOSS_FWD, LOSS_BWD = "_logprob_entropy_fwd_kernel", "_logprob_entropy_bwd_kernel"
LOSS_DTYPES = ("fp32", "bf16", "fp16")
LOSS_BWD_GRADS = ((True, True), (True, False), (False, True))  # (HAS_GRAD_LOGP, HAS_GRAD_H)


def test_every_variant_compiles(variants):
    compiled = {(v["kernel"], v["dtype"], v["aligned"]) for v in variants}
    expected = {
        (k, d, a) for k in MULTI_TENSOR_KERNELS for d in ("fp32", "bf16", "fp16", "fp64") for a in (False, True)
    }
    expected |= {(k, d, a) for k in (LOSS_FWD, LOSS_BWD) for d in LOSS_DTYPES for a in (False, True)}
    assert compiled == expected
    assert {v.get("has_keep") for v in variants if v["kernel"] == LOSS_FWD} == {False, True}


def test_vocabulary_loops_have_no_fp32_division(variants):
    """z = logits * (1 / temperature): the division is done once on the host. A per-element fp32 division in
    a vocabulary loop (an fp32 ``/`` compiles to div.full.f32; div.rn.f32 for a correctly rounded one) would
    appear at least once per element a thread handles per block (BLOCK_V / (32 * num_warps) = 16) per loop
    copy; what is left is the forward's one per-row ``w / s`` after its loop, none in the backward."""
    from sfpo_kernels import fused_loss as fl

    per_thread = fl.GPU_BLOCK_V // (32 * fl.GPU_NUM_WARPS)
    assert per_thread > 1
    for v in _loss(variants, LOSS_FWD) + _loss(variants, LOSS_BWD):
        allowed = 1 if v["kernel"] == LOSS_FWD else 0
        assert v["div_f32"] <= allowed, (
            f"{v['kernel']} {v['dtype']} aligned={v['aligned']}: {v['div_f32']} fp32 divisions"
        )


def test_loss_kernels_do_not_specialise_on_the_micro_batch_shape(variants):
    """T and the batch strides change with every micro-batch's padded length: no recompilation per new value."""
    for v in _loss(variants, LOSS_FWD) + _loss(variants, LOSS_BWD):
        dynamic = {"stride_b", "stride_t", "rows_per_batch"} | (
            {"d_stride_b", "d_stride_t"} if v["kernel"] == LOSS_BWD else set()
        )
        assert dynamic <= set(v["do_not_specialize"]), (
            f"{v['kernel']}: specialises on {dynamic - set(v['do_not_specialize'])}"
        )
        assert "V" not in v["do_not_specialize"]


def test_bf16_stores_use_the_hardware_rounding(variants):
    """On the GPU the fp32 -> bf16 cast (cvt.rn) already rounds to nearest even: the integer rounding on the bits
    (an add of 0x7FFF) is only for the interpreter, whose cast truncates (ROUND_BF16_ON_BITS)."""
    stores = [v for v in variants if v["dtype"] == "bf16" and v["kernel"] in ("_mt_lerp_kernel", LOSS_BWD)]
    assert stores
    for v in stores:
        assert v["cvt_rn_bf16"] > 0 and not v["bf16_bit_rounding"], f"{v['kernel']} aligned={v['aligned']}: {v}"


def test_aligned_tables_get_128_bit_accesses(variants):
    for v in variants:
        if v["kernel"] not in MULTI_TENSOR_KERNELS:
            continue  # the loss kernels store per-token scalars: their own test below
        vector = {op: n for op, n in v["ops"].items() if ".v4." in op or ".v2.b64" in op or ".v2.f64" in op}
        if v["aligned"]:
            assert any(op.startswith("ld.global") for op in vector), (
                f"{v['kernel']} {v['dtype']}: no vector loads: {v['ops']}"
            )
            assert any(op.startswith("st.global") for op in vector), (
                f"{v['kernel']} {v['dtype']}: no vector stores: {v['ops']}"
            )
        else:  # no alignment promise: element-wise accesses are the only safe ones
            assert not vector, f"{v['kernel']} {v['dtype']} unaligned uses vector accesses: {v['ops']}"


def test_lerp_uses_fused_multiply_add(variants):
    for v in variants:
        if v["kernel"] == "_mt_lerp_kernel":
            assert v["fma"], f"lerp {v['dtype']} aligned={v['aligned']}: no fma.rn in the PTX"


def _loss(variants, kernel):
    return [v for v in variants if v["kernel"] == kernel]


def test_every_loss_backward_gradient_set_compiles(variants):
    compiled = {(v["dtype"], v["aligned"], v["has_grad_logp"], v["has_grad_h"]) for v in _loss(variants, LOSS_BWD)}
    assert compiled == {(d, a, *g) for d in LOSS_DTYPES for a in (False, True) for g in LOSS_BWD_GRADS}


def test_aligned_loss_kernels_stream_the_logits_with_128_bit_accesses(variants):
    """ALIGNED: the full V blocks of logits load (and dlogits store) as ld/st.global.v4; without it, no vector
    access at all (the other loads are per-token scalars: labels, lse, mu, upstream gradients)."""
    for v in _loss(variants, LOSS_FWD) + _loss(variants, LOSS_BWD):
        name = f"{v['kernel']} {v['dtype']} aligned={v['aligned']} grads={v.get('has_grad_logp')},{v.get('has_grad_h')}"
        vector_loads = {op: n for op, n in v["ops"].items() if op.startswith("ld.global.v4.")}
        vector_stores = {op: n for op, n in v["ops"].items() if op.startswith("st.global.v4.")}
        if v["aligned"]:
            assert vector_loads, f"{name}: no 128-bit loads of the logits: {v['ops']}"
            if v["kernel"] == LOSS_BWD:
                assert vector_stores, f"{name}: no 128-bit stores of dlogits: {v['ops']}"
        else:
            vector = {op: n for op, n in v["ops"].items() if ".v2." in op or ".v4." in op}
            assert not vector, f"{name} unaligned uses vector accesses: {v['ops']}"


def test_loss_backward_reads_only_the_gradients_it_has(variants):
    """HAS_GRAD_LOGP / HAS_GRAD_H = False drop the loads of that gradient (and of mu, used only by the
    entropy term): fewer per-token fp32 loads than the variant with both (16-bit logits, whose own loads
    are b16, so every ld.global.b32 is a per-token scalar)."""
    scalar_loads = {
        (v["dtype"], v["aligned"], v["has_grad_logp"], v["has_grad_h"]): v["ops"].get("ld.global.b32", 0)
        for v in _loss(variants, LOSS_BWD)
        if v["dtype"] in ("bf16", "fp16")
    }
    for (dtype, aligned, has_logp, has_h), n in scalar_loads.items():
        both = scalar_loads[(dtype, aligned, True, True)]
        if not (has_logp and has_h):
            assert n < both, f"{dtype} aligned={aligned} grads=({has_logp}, {has_h}): {n} fp32 loads, both: {both}"
