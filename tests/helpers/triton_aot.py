"""Compile the multi-tensor Triton kernels for a GPU target without a GPU; print what the PTX holds.

Run as a script (``python tests/helpers/triton_aot.py 90``) with ``TRITON_INTERPRET`` unset:
the interpreter replaces ``triton.jit`` functions, so this cannot run inside
the test process, which interprets. Prints one JSON object per compiled
variant: kernel, dtype, aligned, and counts of global loads/stores by width.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sfpo_kernels import fused_loss as fl
from sfpo_kernels import multi_tensor as mt

TABLE = ("*i64",) * 5


def signature(kernel, dtype: str) -> dict[str, str]:
    names = kernel.arg_names
    types = [*TABLE, "*" + dtype] + (["fp64"] if kernel is mt._mt_lerp_kernel else [])
    return {n: (types[i] if i < len(types) else "constexpr") for i, n in enumerate(names)}


# The fused-loss kernels' runtime arguments as the host launches them: strides and the rows per batch
# are int64 (token counts times V pass 2^31), the vocabulary size int32, every per-token vector fp32.
LOSS_ARG_TYPES = {
    "logits": "*{dtype}",
    "dlogits": "*{dtype}",
    "labels": "*i64",
    "stride_b": "i64",
    "stride_t": "i64",
    "rows_per_batch": "i64",
    "d_stride_b": "i64",
    "d_stride_t": "i64",
    "log_probs": "*fp32",
    "entropy": "*fp32",
    "lse_out": "*fp32",
    "mu_out": "*fp32",
    "lse": "*fp32",
    "mu": "*fp32",
    "grad_log_probs": "*fp32",
    "grad_entropy": "*fp32",
    "inv_temperature": "fp32",
    "V": "i32",
    "keep": "*u8",
}
# (HAS_GRAD_LOGP, HAS_GRAD_H) of the backward: both outputs used, only the log-prob, only the entropy.
LOSS_BWD_GRADS = ((True, True), (True, False), (False, True))


def ptx_ops(compiled) -> collections.Counter:
    """Global loads/stores in the PTX, by instruction (predicated ones counted as the instruction)."""
    ops = collections.Counter()
    for line in compiled.asm["ptx"].splitlines():
        words = line.split()
        if words and words[0].startswith("@"):  # predicated (masked) access
            words = words[1:]
        if words and words[0].startswith(("ld.global", "st.global")):
            ops[words[0]] += 1
    return ops


def ptx_counts(compiled) -> dict:
    """What the arithmetic compiled to: fp32 divisions of any rounding (``div.rn.f32``, and ``div.full.f32``,
    which is what Triton emits for an fp32 ``/``) and hardware bf16 conversions (``cvt.rn.bf16*.f32``)."""
    ptx = compiled.asm["ptx"]
    return {
        "fma": "fma.rn" in ptx,
        "div_f32": len(re.findall(r"\bdiv\.(?:rn|full|approx)[a-z.]*\.f32\b", ptx)),
        "cvt_rn_bf16": len(re.findall(r"\bcvt\.rn\.bf16(?:x2)?\.f32\b", ptx)),
        "bf16_bit_rounding": bool(re.search(r"\b(?:32767|0[xX]0*7[fF]{3})\b", ptx)),
    }


def unspecialized(kernel) -> list[str]:
    """The arguments the JIT does not specialise on (stored as names or indices, by Triton version)."""
    return sorted(kernel.arg_names[a] if isinstance(a, int) else a for a in kernel.do_not_specialize)


def loss_variants(target) -> None:
    """The fused-loss forward (with and without the row mask) and backward (every gradient set), for every
    logits dtype and alignment."""
    for kernel in (fl._logprob_entropy_fwd_kernel, fl._logprob_entropy_bwd_kernel):
        grads = LOSS_BWD_GRADS if kernel is fl._logprob_entropy_bwd_kernel else ("keep", "no-keep")
        for dtype in ("fp32", "bf16", "fp16"):
            sig = {
                n: (LOSS_ARG_TYPES[n].format(dtype=dtype) if n in LOSS_ARG_TYPES else "constexpr")
                for n in kernel.arg_names
            }
            for aligned in (False, True):
                for has_grad in grads:
                    constexprs = {"BLOCK_V": fl.GPU_BLOCK_V, "ALIGNED": aligned}
                    record = {"kernel": kernel.__name__, "dtype": dtype, "aligned": aligned}
                    if isinstance(has_grad, str):
                        constexprs["HAS_KEEP"] = record["has_keep"] = has_grad == "keep"
                    else:
                        constexprs["HAS_GRAD_LOGP"], constexprs["HAS_GRAD_H"] = has_grad
                        record["has_grad_logp"], record["has_grad_h"] = has_grad
                    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
                    compiled = triton.compile(src, target=target, options={"num_warps": fl.GPU_NUM_WARPS})
                    print(
                        json.dumps(
                            {
                                **record,
                                "ops": ptx_ops(compiled),
                                **ptx_counts(compiled),
                                "do_not_specialize": unspecialized(kernel),
                            }
                        )
                    )


def main(capability: int) -> None:
    target = GPUTarget("cuda", capability, 32)
    for kernel in (mt._mt_copy_kernel, mt._mt_lerp_kernel):
        for dtype in ("fp32", "bf16", "fp16", "fp64"):
            for aligned in (False, True):
                constexprs = {"CHUNK": mt.GPU_CHUNK, "BLOCK": mt.GPU_BLOCK, "ALIGNED": aligned}
                if kernel is mt._mt_lerp_kernel:
                    constexprs["COMPUTE_FP64"] = dtype == "fp64"
                src = ASTSource(fn=kernel, signature=signature(kernel, dtype), constexprs=constexprs)
                compiled = triton.compile(src, target=target, options={"num_warps": mt.GPU_NUM_WARPS})
                print(
                    json.dumps(
                        {
                            "kernel": kernel.__name__,
                            "dtype": dtype,
                            "aligned": aligned,
                            "ops": ptx_ops(compiled),
                            **ptx_counts(compiled),
                        }
                    )
                )
    loss_variants(target)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
