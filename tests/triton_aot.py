"""Compile the multi-tensor Triton kernels for a GPU target without a GPU; print what the PTX holds.

Run as a script (``python tests/triton_aot.py 90``) with ``TRITON_INTERPRET`` unset:
the interpreter replaces ``triton.jit`` functions, so this cannot run inside
the test process, which interprets. Prints one JSON object per compiled
variant: kernel, dtype, aligned, and counts of global loads/stores by width.
"""

from __future__ import annotations

import collections
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sfpo_kernels import multi_tensor as mt  # noqa: E402

TABLE = ("*i64",) * 5


def signature(kernel, dtype: str) -> dict[str, str]:
    names = kernel.arg_names
    types = [*TABLE, "*" + dtype] + (["fp64"] if kernel is mt._mt_lerp_kernel else [])
    return {n: (types[i] if i < len(types) else "constexpr") for i, n in enumerate(names)}


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
                ops = collections.Counter()
                for line in compiled.asm["ptx"].splitlines():
                    words = line.split()
                    if words and words[0].startswith("@"):  # predicated (masked) access
                        words = words[1:]
                    if words and words[0].startswith(("ld.global", "st.global")):
                        ops[words[0]] += 1
                print(json.dumps({"kernel": kernel.__name__, "dtype": dtype, "aligned": aligned, "ops": ops,
                                  "fma": "fma.rn" in compiled.asm["ptx"]}))  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
