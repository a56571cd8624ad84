"""Iteration time with and without the on-policy old-log-prob reuse, GRPO and SFPO, on the embedded default.

Four trainers in one process (GRPO / SFPO x ``old_log_prob_from_update`` auto / false), the
``default`` preset (the shipped addition model, 16 prompts x 8 responses, one mini-batch: on-policy),
on the CPU. Rounds are interleaved with the order rotated every round; each ``train_step`` is timed
with ``time.process_time`` (CPU time of this process: robust on a shared machine). The two arms of
an algorithm follow the same trajectory (the reuse is exact), so they do the same work but the
forward. Prints medians with min / max and the count, and the stage medians that moved.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/measure/measure_old_log_prob_reuse.py [--rounds 12] [--csv OUT.csv]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time

import torch

STAGES = ("old_log_prob", "update_actor")


def build(root: str, algo: str, mode: str):
    import sfpo_train.trainer.config as config_lib
    from sfpo_train.trainer import Trainer

    cfg = config_lib.load_config(
        "default",
        [
            f"trainer.default_local_dir={root}",
            f"trainer.experiment_name={algo}-{mode}",
            "trainer.device=cpu",
            "trainer.progress_bar=false",
            "trainer.val_before_train=false",
            "trainer.save_freq=-1",
            f"actor_rollout_ref.actor.sfpo.enable={algo == 'sfpo'}",
            f"actor_rollout_ref.actor.old_log_prob_from_update={mode}",
        ],
    )
    return Trainer.create(cfg, preset="default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--csv", metavar="PATH", help="also write one row per arm as CSV")
    args = parser.parse_args()
    torch.set_num_threads(1)
    arms = [(algo, mode) for algo in ("grpo", "sfpo") for mode in ("false", "auto")]
    times: dict = {arm: [] for arm in arms}
    stages: dict = {arm: {s: [] for s in STAGES} for arm in arms}
    with tempfile.TemporaryDirectory() as root:
        trainers = {arm: build(root, *arm) for arm in arms}
        for r in range(args.warmup + args.rounds):
            order = arms[r % len(arms) :] + arms[: r % len(arms)]
            for arm in order:
                start = time.process_time()
                metrics = trainers[arm].train_step()
                elapsed = time.process_time() - start
                if r >= args.warmup:
                    times[arm].append(elapsed)
                    for s in STAGES:
                        stages[arm][s].append(metrics.get(f"timing_s/{s}", 0.0))
                assert metrics["actor/old_log_prob_from_update"] == float(arm[1] == "auto"), arm
    print(
        f"train_step, process_time, {args.rounds} rounds after {args.warmup} warm-up, interleaved, rotated; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread"
    )
    records = []
    for algo in ("grpo", "sfpo"):
        base = statistics.median(times[(algo, "false")])
        for mode in ("false", "auto"):
            t = times[(algo, mode)]
            med = statistics.median(t)
            parts = ", ".join(f"{s} {1e3 * statistics.median(stages[(algo, mode)][s]):.1f}" for s in STAGES)
            print(
                f"  {algo} old_log_prob_from_update={mode:5s}: median {1e3 * med:7.1f} ms (min {1e3 * min(t):.1f}, "
                f"max {1e3 * max(t):.1f}, n={len(t)})  {med / base:.3f}x  [wall medians ms: {parts}]"
            )
            records.append(
                {
                    "algorithm": algo,
                    "old_log_prob_from_update": mode,
                    "median_ms": round(1e3 * med, 3),
                    "min_ms": round(1e3 * min(t), 3),
                    "max_ms": round(1e3 * max(t), 3),
                    "n": len(t),
                    "ratio_to_separate_pass": round(med / base, 4),
                    **{
                        f"{s}_wall_median_ms": round(1e3 * statistics.median(stages[(algo, mode)][s]), 3)
                        for s in STAGES
                    },
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
