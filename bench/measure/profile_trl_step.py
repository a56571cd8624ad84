"""Where one iteration of an arm of ``bench/test_bench_trl.py`` spends its CPU time, part by part (cProfile).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/measure/profile_trl_step.py trl_grpo trl_grpo_no_ckpt sfpo_train_grpo

Each arm runs on its own (built as the benchmark builds it, ``--scale`` of ``bench/trl_arms.py``):
``--warmup`` iterations, ``--iterations`` timed with ``time.process_time`` (no profiler), then as many
under cProfile. Prints the unprofiled CPU ms per iteration, then each part's CPU ms per iteration under
the profiler (whose overhead inflates Python-heavy parts more than torch ops) and its share of the
profiled iteration. A part is the cumulative time of the functions named in :data:`PARTS`; indented
parts are inside the one above them.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time

import torch

# (label, [(path suffix, function name), ...]): the first parts are disjoint; "  " marks a part of the one above
PARTS = [
    ("generation + scoring", [("trl/trainer/grpo_trainer.py", "_generate_and_score_completions"),
                              ("sfpo_train/trainer/collect.py", "collect")]),
    ("  HF generate", [("transformers/generation/utils.py", "generate")]),
    ("old log-probs (separate forward)", [("sfpo_train/trainer/actor.py", "log_probs")]),
    ("loss forward", [("trl/trainer/grpo_trainer.py", "compute_loss"),
                      ("sfpo_train/trainer/actor.py", "response_logits"),
                      ("sfpo_train/trainer/actor.py", "response_hidden"),
                      ("sfpo_kernels/fused_loss.py", "grpo_loss"),
                      ("sfpo_kernels/linear_loss.py", "linear_grpo_loss")]),
    ("backward", [("torch/autograd/__init__.py", "backward")]),
    ("  activation recompute", [("torch/utils/checkpoint.py", "recompute_fn")]),
    ("optimizer (AdamW)", [("torch/optim/adam.py", "step")]),
    ("gradient clipping", [("torch/nn/utils/clip_grad.py", "_get_total_norm"),
                           ("torch/nn/utils/clip_grad.py", "_clip_grads_with_norm_")]),
    ("model.train() / eval()", [("transformers/modeling_utils.py", "train")]),
    ("SFPO (snapshot, reposition, trigger)", [("sfpo_train/sfpo.py", "begin"),
                                              ("sfpo_train/iteration.py", "_end_fast_stage"),
                                              ("sfpo_train/iteration.py", "finish")]),
]  # fmt: skip


def profile_arm(name: str, scale: str, warmup: int, iterations: int) -> tuple[float, pstats.Stats]:
    """``(unprofiled CPU seconds per iteration, the profile of as many more)``.

    A TRL arm's ``train()`` runs in this thread (cProfile follows one thread) and a callback at each
    optimizer step switches the phases: warm-up, timed, profiled, stop.
    """
    from transformers import TrainerCallback

    from bench.trl_arms import ARMS, SCALES, SFPO_K, build_arm, trl_trainer

    shape, spec = SCALES[scale], ARMS[name]
    prof = cProfile.Profile()
    marks: list[float] = []  # process_time at the end of the warm-up and of the timed iterations
    with tempfile.TemporaryDirectory() as root:
        if spec.trainer == "trl":
            steps_per_iteration = SFPO_K + 1 if spec.method != "grpo" else 1  # one optimizer step per pass
            total = warmup + 2 * iterations
            trainer = trl_trainer(spec, root, shape, rows=shape.prompts * (total + 2) * (SFPO_K + 1))
            trainer.args.max_steps = total * steps_per_iteration

            class Phases(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    done, rest = divmod(state.global_step, steps_per_iteration)
                    if rest == 0 and done in (warmup, warmup + iterations):
                        marks.append(time.process_time())
                        if done == warmup + iterations:
                            prof.enable()

                def on_train_end(self, args, state, control, **kwargs):
                    prof.disable()

            trainer.add_callback(Phases())
            trainer.train()
        else:
            arm = build_arm(name, root, shape)
            for _ in range(warmup):
                arm.step()
            marks.append(time.process_time())
            for _ in range(iterations):
                arm.step()
            marks.append(time.process_time())
            prof.enable()
            for _ in range(iterations):
                arm.step()
            prof.disable()
    return (marks[1] - marks[0]) / iterations, pstats.Stats(prof)


def parts(stats: pstats.Stats, iterations: int) -> list[tuple[str, float]]:
    """CPU ms per iteration of each of :data:`PARTS` (cumulative times, recursion counted once)."""
    out = []
    for label, names in PARTS:
        total = 0.0
        for (path, _line, func), (_cc, _nc, _tt, cumtime, _callers) in stats.stats.items():
            if any(path.endswith(suffix) and func == fn for suffix, fn in names):
                total += cumtime
        out.append((label, 1e3 * total / iterations))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arms", nargs="+")
    parser.add_argument("--scale", default="full")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args(argv)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), scale {args.scale}, {time.strftime('%F %T')}"
    )
    for name in args.arms:
        unprofiled, stats = profile_arm(name, args.scale, args.warmup, args.iterations)
        profiled = 1e3 * stats.total_tt / args.iterations
        print(f"\n{name}: {1e3 * unprofiled:.1f} CPU ms per iteration unprofiled; {profiled:.1f} ms profiled")
        for label, ms in parts(stats, args.iterations):
            if ms > 0:
                print(f"  {label:40s} {ms:8.1f} ms  {100 * ms / profiled:5.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
