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
    proc = subprocess.run([sys.executable, str(HERE / "triton_aot.py"), "90"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_variant_compiles(variants):
    compiled = {(v["kernel"], v["dtype"], v["aligned"]) for v in variants}
    expected = {(k, d, a) for k in ("_mt_copy_kernel", "_mt_lerp_kernel") for d in ("fp32", "bf16", "fp16", "fp64")
                for a in (False, True)}  # fmt: skip
    assert compiled == expected


def test_aligned_tables_get_128_bit_accesses(variants):
    for v in variants:
        vector = {op: n for op, n in v["ops"].items() if ".v4." in op or ".v2.b64" in op or ".v2.f64" in op}
        if v["aligned"]:
            assert any(op.startswith("ld.global") for op in vector), f"{v['kernel']} {v['dtype']}: no vector loads: {v['ops']}"
            assert any(op.startswith("st.global") for op in vector), f"{v['kernel']} {v['dtype']}: no vector stores: {v['ops']}"
        else:  # no alignment promise: element-wise accesses are the only safe ones
            assert not vector, f"{v['kernel']} {v['dtype']} unaligned uses vector accesses: {v['ops']}"


def test_lerp_uses_fused_multiply_add(variants):
    for v in variants:
        if v["kernel"] == "_mt_lerp_kernel":
            assert v["fma"], f"lerp {v['dtype']} aligned={v['aligned']}: no fma.rn in the PTX"
