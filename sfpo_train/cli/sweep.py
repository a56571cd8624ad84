"""``sfpo sweep``: the paper's ablations as one resumable grid of runs, then a table (sweep.csv) and a heat map.

The grid, one run per point and seed, each against the same seed's GRPO run:
K in {1, 3, 5, 7} x alpha in {0.3, 0.5, 0.8, 1.0} (paper Fig. 5), hard vs linear decay
(Fig. 7), with and without entropy control (Fig. 6), without the reposition and
without the slow correction (Fig. 5d), and GRPO and SFPO at lr 1e-5, 3e-5, 1e-4.
Points with the same settings share a run: 25 distinct runs per seed, 22 of them SFPO.
Runs go to OUT/<point>-s<seed>, the report to OUT/report (sweep.csv, sweep.md,
sweep.html, sweep_k_alpha.png). Run the same command again to continue an
interrupted sweep: finished runs are kept, an interrupted one continues from its
newest checkpoint.

Cost: a run costs what an sfpo train of the same settings costs: an SFPO step with
K fast passes is about 1 + 0.55 K GRPO steps on the embedded default. Measured:
the whole grid at 1 seed x 60 steps (--steps 60 trainer.test_freq=20) took 13.7 min
of CPU time (41.8 min on 2 cores shared with other jobs); at the default 300 steps
expect about 5x that, about an hour of CPU per seed. Make it small with --steps
(e.g. 60), --seeds 1 and --groups (e.g. --groups baseline k_alpha), or --preset smoke
--steps 2 for a check of the whole pipeline in a few minutes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import sfpo_train.trainer.config as config_lib
from sfpo_train.cli import threads
from sfpo_train.reports.compare import DiskFull
from sfpo_train.reports.grid import GROUPS, run_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="verl-style config overrides applied to every run (not the keys the grid sets)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(config_lib.PRESETS),
        default="default",
        help="starting configuration of every run (default: the embedded task on CPU)",
    )
    parser.add_argument(
        "--algorithm",
        choices=sorted(config_lib.ALGORITHMS),
        default="grpo",
        help="verl's recipe of every run: grpo, drgrpo or dapo",
    )
    parser.add_argument(
        "--groups",
        nargs="+",
        choices=GROUPS,
        default=list(GROUPS),
        metavar="GROUP",
        help=f"the parts of the grid to run (default all: {' '.join(GROUPS)}); the baseline is needed for the targets",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="seeds 1..N for every point (default 1; at most 1000 runs in all: 40 seeds of the whole grid)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training iterations per run (default: the preset's; 300 on the default preset)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="directory of the runs and the report (default runs/sweep-<preset>-<time>); the same DIR "
        "again continues the sweep",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (e.g. in logs)")


def main(args: argparse.Namespace) -> int:
    from sfpo_train.trainer.run_guard import StopInterrupt

    print(f"sfpo sweep: {threads.configure_for_run(args.preset, args.overrides, args.algorithm)}", flush=True)
    print(
        f"sfpo sweep: preset {args.preset!r} ({args.algorithm}), groups {' '.join(args.groups)}, seeds 1..{args.seeds}",
        flush=True,
    )
    try:
        result = run_sweep(
            args.preset,
            groups=tuple(args.groups),
            seeds=args.seeds,
            steps=args.steps,
            out_dir=args.out,
            algorithm=args.algorithm,
            overrides=args.overrides,
            progress=not args.no_progress,
            log=lambda text: print(text, flush=True),
        )
    except StopInterrupt as e:
        out = os.path.dirname(e.run_dir)
        print(
            f"sfpo sweep: {e}\nsfpo sweep: continue with the same command and --out {shlex.quote(out)}", file=sys.stderr
        )
        return e.exit_code
    except DiskFull as e:
        print(f"sfpo sweep: {e}; free some space, then run the same command again to continue", file=sys.stderr)
        return 1
    print(
        f"sfpo sweep: {len(set(result.run_dirs.values()))} runs per seed in {result.seconds / 60:.1f} min; "
        f"table {result.files['sweep.csv']}, report {result.files['report.md']}"
    )
    return 0
