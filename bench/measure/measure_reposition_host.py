"""Host time of one ``reposition_`` over a 338-tensor list: before and after the Snapshot's validation cache.

The list has the structure of Qwen2.5-1.5B's trainable parameters (338 tensors: embeddings, per layer
q/k/v/o with q/k/v biases, gate/up/down, two RMSNorms, a final norm) at tiny sizes, so the arithmetic
is negligible and what is timed is the Python around the launches. Arms, in one process, interleaved
with the order rotated every round, ``time.process_time`` per call:

- ``baseline``: ``sfpo_kernels/reposition.py`` as it was before the cache (git revision
  ``--baseline-rev``, default ``42a2087^``, read with ``git show``; or ``--baseline FILE``), loaded as a
  separate module that imports this tree's kernels: validation every call;
- ``cached``: this tree's ``reposition_`` after a ``snapshot`` (the cache filled) and an in-place step;
- ``validate``: this tree's validation forced (the cache emptied before each call);
- ``foreach_lerp``: ``torch._foreach_lerp_`` on the same lists, the launch-bound floor (torch backend).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/measure/measure_reposition_host.py [--rounds 30] [--backend torch] \
        [--csv OUT.csv]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import sfpo_kernels
from sfpo_kernels import reposition


def qwen_like_params(layers: int = 28) -> list[torch.nn.Parameter]:
    """338 tensors shaped like Qwen2.5-1.5B's trainable parameters, 64x smaller in every width (tied head)."""
    h, inter, kv = 24, 140, 4
    shapes = [(2373, h)]  # embed_tokens (= lm_head)
    for _ in range(layers):
        shapes += [(h, h), (h,), (kv, h), (kv,), (kv, h), (kv,), (h, h), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    shapes.append((h,))  # final norm
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("reposition_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


REPO_ROOT = Path(__file__).resolve().parents[2]
BASELINE_REV = "42a2087^"  # the parent of the commit that added the Snapshot's validation cache


def load_baseline_rev(rev: str):
    """``sfpo_kernels/reposition.py`` at git revision ``rev`` of this checkout, loaded; None without git or the rev."""
    try:
        done = subprocess.run(
            ["git", "show", f"{rev}:sfpo_kernels/reposition.py"], cwd=REPO_ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    if done.returncode != 0:
        return None
    with tempfile.TemporaryDirectory(prefix="sfpo-baseline-") as tmp:  # executed on load: not needed after
        path = os.path.join(tmp, "reposition.py")
        Path(path).write_text(done.stdout)
        return load_baseline(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=20, help="calls per timed sample")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline's reposition.py")
    parser.add_argument("--baseline", metavar="FILE", help="the baseline's reposition.py as a file (instead of a rev)")
    parser.add_argument("--csv", metavar="PATH", help="also write one row per arm as CSV")
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = qwen_like_params()
    assert len(params) == 338, len(params)
    backend = args.backend
    arms = {}
    if args.baseline is not None:
        old = load_baseline(args.baseline) if os.path.exists(args.baseline) else None
    else:
        old = load_baseline_rev(args.baseline_rev)
    if old is None:
        print(
            f"no baseline: {args.baseline or args.baseline_rev} cannot be read; timing the other arms", file=sys.stderr
        )
    else:
        old_snap = old.snapshot(params, backend=backend)
        arms["baseline"] = lambda: old.reposition_(params, old_snap, 0.5, backend=backend)
    snap = sfpo_kernels.snapshot(params, backend=backend)
    with torch.no_grad():
        torch._foreach_add_(params, 1.0)  # a Stage I step between snapshot and reposition

    def validate():
        snap._validated = None
        sfpo_kernels.reposition_(params, snap, 0.5, backend=backend)

    arms["cached"] = lambda: sfpo_kernels.reposition_(params, snap, 0.5, backend=backend)
    arms["validate"] = validate
    views = snap._groups[0].views

    def floor():
        with torch.no_grad():
            torch._foreach_lerp_(params, views, 0.5)

    arms["foreach_lerp"] = floor
    names = list(arms)
    times = {n: [] for n in names}
    for r in range(args.rounds + 2):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            start = time.process_time()
            for _ in range(args.calls):
                arms[n]()
            if r >= 2:
                times[n].append((time.process_time() - start) / args.calls)
    print(
        f"reposition_ of {len(params)} tensors ({sum(p.numel() for p in params):,} parameters, fp32, CPU, "
        f"backend {backend}), process_time per call, {args.rounds} samples of {args.calls} calls, interleaved; "
        f"torch {torch.__version__}; cache in this tree: {hasattr(reposition, '_layout_key')}"
    )
    records = []
    for n in names:
        t = times[n]
        print(
            f"  {n:13s} median {1e6 * statistics.median(t):7.1f} us (min {1e6 * min(t):.1f}, max {1e6 * max(t):.1f}, "
            f"n={len(t)})"
        )
        records.append(
            {
                "arm": n,
                "median_us": round(1e6 * statistics.median(t), 2),
                "min_us": round(1e6 * min(t), 2),
                "max_us": round(1e6 * max(t), 2),
                "n": len(t),
                "calls_per_sample": args.calls,
                "tensors": len(params),
                "backend": backend,
                "baseline": "file" if args.baseline else args.baseline_rev,
                "torch_threads": torch.get_num_threads(),
            }
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)


if __name__ == "__main__":
    main()
