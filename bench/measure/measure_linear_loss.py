"""CPU time and largest tensor of the fused LM head loss vs the materialised head, interleaved in one process.

The benchmark rows of ``bench/test_bench_linear_loss.py`` (same inputs, same calls), each
forward + backward, run in rotating order round after round, timed with
``time.process_time`` (CPU seconds of this process: what a busy shared machine
disturbs least); median, min and max per row, and the largest tensor one call makes.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/measure/measure_linear_loss.py --rounds 15 [--csv OUT.csv]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time

import torch

from bench import linear_baselines
from bench.test_bench_linear_loss import SHAPES, full_step, loss_fn, make_inputs

ROWS = ("materialised", "sfpo_fused", "sfpo_fused_c256", "verl_fused_linear")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=SHAPES.n_tokens[0])
    parser.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    args = parser.parse_args(argv)
    x = make_inputs(args.tokens, torch.device("cpu"))
    calls = {row: full_step(loss_fn(row, x), x) for row in ROWS}
    for call in calls.values():  # warm-up
        call()
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    for r in range(args.rounds):
        order = ROWS[r % len(ROWS) :] + ROWS[: r % len(ROWS)]
        for row in order:
            start = time.process_time()
            calls[row]()
            times[row].append(time.process_time() - start)
    largest = {row: linear_baselines.largest_tensor(calls[row])["largest_tensor_bytes"] for row in ROWS}
    base = statistics.median(times["materialised"])
    print(
        f"N={args.tokens} H={SHAPES.hidden} V={SHAPES.vocab} {SHAPES.dtype}, forward+backward, "
        f"{args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print(f"{'row':18s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'mat./this':>10s} {'largest MiB':>12s}")
    records = []
    for row in ROWS:
        t = times[row]
        med = statistics.median(t)
        print(
            f"{row:18s} {1e3 * med:10.1f} {1e3 * min(t):8.1f} {1e3 * max(t):8.1f} {base / med:10.2f} "
            f"{largest[row] / 2**20:12.2f}"
        )
        records.append(
            {
                "row": row,
                "median_ms": round(1e3 * med, 3),
                "min_ms": round(1e3 * min(t), 3),
                "max_ms": round(1e3 * max(t), 3),
                "n": len(t),
                "materialised_over_this": round(base / med, 4),
                "largest_tensor_mib": round(largest[row] / 2**20, 3),
                "tokens": args.tokens,
                "hidden": SHAPES.hidden,
                "vocab": SHAPES.vocab,
                "dtype": str(SHAPES.dtype).removeprefix("torch."),
                "torch_threads": torch.get_num_threads(),
            }
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
