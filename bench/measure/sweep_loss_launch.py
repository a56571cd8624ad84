"""The sweep that must justify the fused loss's GPU launch settings (``GPU_BLOCK_V``, ``GPU_NUM_WARPS``).

For each ``BLOCK_V x num_warps`` it times the vocabulary kernels of :mod:`sfpo_kernels.fused_loss` on
the shape they exist for (N=16384 token rows, V=151936, bf16; ``--tokens`` / ``--vocab`` change it):
the forward (reads the logits once) and the backward into a separate buffer (reads them once more,
writes dlogits once), each as the median of ``--reps`` CUDA-event-timed launches after a warm-up,
with GB/s against the bytes it must move. The settings are fixed module constants, not
``triton.autotune`` configs: autotuning launches every config on the same arguments, which the
in-place backward (dlogits written into the logits) cannot survive. So this script sets the
constants, runs, and restores them; the winner is what ``fused_loss.py`` should hold.

It needs a CUDA GPU and exits with a message without one (no number is ever made up on a CPU).

    python bench/measure/sweep_loss_launch.py [--tokens 16384 --vocab 151936 --reps 20] [--csv OUT.csv]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys

import torch

BLOCKS = (1024, 2048, 4096, 8192, 16384)
WARPS = (4, 8, 16, 32)


def _time_ms(fn, reps: int) -> float:
    fn()  # compile and warm up
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sweep(tokens: int, vocab: int, reps: int) -> list[dict]:
    from sfpo_kernels import fused_loss as fl

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16, generator=g)
    labels = fl.flat_labels(torch.randint(0, vocab, (tokens,), device="cuda", generator=g))
    g_logp, g_h = torch.randn(tokens, device="cuda"), torch.randn(tokens, device="cuda")
    row_bytes = vocab * logits.element_size()
    saved = fl.GPU_BLOCK_V, fl.GPU_NUM_WARPS
    rows = []
    try:
        for block in BLOCKS:
            for warps in WARPS:
                if block // (32 * warps) < 1:
                    continue
                fl.GPU_BLOCK_V, fl.GPU_NUM_WARPS = block, warps
                _, _, lse, mu = fl.logprob_entropy_fwd(logits, labels, 1.0)
                fwd = _time_ms(lambda: fl.logprob_entropy_fwd(logits, labels, 1.0), reps)
                bwd = _time_ms(
                    lambda lse=lse, mu=mu: fl.logprob_entropy_bwd(logits, labels, g_logp, g_h, lse, mu, 1.0, False),
                    reps,
                )
                rows.append(
                    {
                        "block_v": block,
                        "num_warps": warps,
                        "fwd_ms": fwd,
                        "bwd_ms": bwd,
                        "fwd_gbps": tokens * row_bytes / fwd / 1e6,
                        "bwd_gbps": 2 * tokens * row_bytes / bwd / 1e6,
                    }
                )
                print(
                    f"BLOCK_V {block:6d} warps {warps:2d}: fwd {fwd:7.3f} ms ({rows[-1]['fwd_gbps']:6.0f} GB/s)  "
                    f"bwd {bwd:7.3f} ms ({rows[-1]['bwd_gbps']:6.0f} GB/s)",
                    flush=True,
                )
    finally:
        fl.GPU_BLOCK_V, fl.GPU_NUM_WARPS = saved
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--csv", default=None, help="also write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "sweep_loss_launch: no CUDA GPU here; the launch-settings sweep only means something on one",
            file=sys.stderr,
        )
        return 2
    rows = sweep(args.tokens, args.vocab, args.reps)
    best = min(rows, key=lambda r: r["fwd_ms"] + r["bwd_ms"])
    print(f"fastest fwd+bwd on {torch.cuda.get_device_name()}: BLOCK_V={best['block_v']} num_warps={best['num_warps']}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
