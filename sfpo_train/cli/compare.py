"""``sfpo compare``: GRPO against SFPO on one preset over several seeds, then ``sfpo report`` on the runs.

For each seed s = 1..N, two runs in this process, one after the other: GRPO
(``actor_rollout_ref.actor.sfpo.enable=false``) and SFPO (the preset's SFPO
settings), both with ``trainer.seed=s`` and ``data.seed=s`` -- the same initial
weights, the same prompt order, the same validation set -- and the same
overrides. Runs go to OUT/grpo-s<s> and OUT/sfpo-s<s>, the report to OUT/report
(report.md / report.html, headline.csv per seed, summary.csv with 95% intervals
over seeds, cost_model.csv, plots); ``sfpo report OUT --out OUT/report`` rebuilds it
at any time.
The same command again with the same --out continues an interrupted compare
(finished runs kept, the interrupted one continued from its newest checkpoint).

Cost: 2 x seeds runs of the preset. On the embedded default (5 seeds x 300 steps)
about 10 min on 2 otherwise idle CPU cores (3 seeds took 5 min 37 s), much longer
on a busy machine. Make it small with --seeds 2 --steps 50 (about 50 s of CPU time
with 1 thread; 1.5-2 min of wall-clock measured on a 2-core machine at load 4-5), or
--preset smoke --seeds 3 --steps 4 for a check of the whole pipeline in seconds.
Unless the overrides or the preset set trainer.test_freq, each run validates about
10 times, spread over its steps; before the first run compare says what a compare
of this size can and cannot show (2 seeds: means, no intervals; 3 or more: 95%
intervals over seeds).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import sfpo_train.trainer.config as config_lib
from sfpo_train.cli import threads
from sfpo_train.reports.compare import ARM_SLUGS, RESERVED, DiskFull, run_compare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="verl-style config overrides applied to both arms (see sfpo train --help for the keys); "
        f"not {', '.join(RESERVED)}",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(config_lib.PRESETS),
        default="default",
        help="starting configuration of both arms (default: the embedded task on CPU)",
    )
    parser.add_argument(
        "--algorithm",
        choices=sorted(config_lib.ALGORITHMS),
        default="grpo",
        help="verl's recipe for both arms: grpo, drgrpo or dapo; the SFPO arm wraps the same one",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=5,
        help="seeds 1..N, each used as trainer.seed and data.seed by both arms (default 5; fewer give wide "
        "intervals; at most 500: 1000 runs)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training iterations per run (default: the preset's trainer.total_training_steps; "
        "300 on the default preset)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="directory for the runs (DIR/grpo-s1, DIR/sfpo-s1, ...) and the report (DIR/report); "
        "default runs/compare-<preset>-<time>",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in logs)")


def main(args: argparse.Namespace) -> int:
    print(f"sfpo compare: {threads.configure_for_run(args.preset, args.overrides, args.algorithm)}", flush=True)
    base = args.algorithm.upper().replace("DRGRPO", "Dr. GRPO")
    print(
        f"sfpo compare: {base} vs SFPO over {base} on preset {args.preset!r}, seeds 1..{args.seeds}, "
        f"{len(ARM_SLUGS) * args.seeds} runs",
        flush=True,
    )
    from sfpo_train.trainer.run_guard import StopInterrupt

    try:
        result = run_compare(
            args.preset,
            seeds=args.seeds,
            steps=args.steps,
            out_dir=args.out,
            algorithm=args.algorithm,
            overrides=args.overrides,
            progress=not args.no_progress,
        )
    except StopInterrupt as e:  # the run in progress saved a checkpoint; the finished ones are complete
        print(
            f"sfpo compare: {e}\nsfpo compare: finish that run with: sfpo train --resume {shlex.quote(e.run_dir)}; "
            f"the runs so far can be reported with: sfpo report {shlex.quote(os.path.dirname(e.run_dir))} "
            f"--out {shlex.quote(os.path.join(os.path.dirname(e.run_dir), 'report'))}",
            file=sys.stderr,
        )
        return e.exit_code
    except DiskFull as e:
        print(f"sfpo compare: {e}; free some space, then run the same command again to continue", file=sys.stderr)
        return 1
    print(
        f"{len(result.run_dirs)} runs in {result.seconds / 60:.1f} min; report: {result.files['report.md']} "
        f"and {result.files['report.html']}"
    )
    headline = os.path.join(result.report_dir, "report.md")
    with open(headline) as f:
        text = f.read()
    start = text.find("## Over seeds")
    end = text.find("## Against the paper")
    if start >= 0:
        section = text[start : end if end > start else None]
        print(section[: section.find("\n| measure")] if "\n| measure" in section else section.rstrip())
    return 0
