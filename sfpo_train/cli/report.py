"""``sfpo report RUN [RUN ...]``: per-stage time and memory, training curves, and SFPO against GRPO.

Reads each run directory's ``config.yaml`` and ``metrics.jsonl`` (what ``sfpo
train`` and ``sfpo compare`` write) and writes report.md and report.html (tables
and plots), CSV tables (runs.csv, stage_time.csv, stage_share.csv,
stage_memory.csv and, with both arms, headline.csv) and PNG plots into --out.
What each file holds and how each measure is defined: ``sfpo_train.reports``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from sfpo_train.reports.build import build_report, default_out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run directories (holding metrics.jsonl, as sfpo train writes them); a directory whose "
        "subdirectories are runs (e.g. an sfpo compare output) stands for all of them",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="where the report goes (default: RUN/report for one run, else report/ in the runs' common parent "
        "directory)",
    )
    parser.add_argument("--title", help="the report's title")


def main(args: argparse.Namespace) -> int:
    from sfpo_train.trainer.run_guard import RunWarning

    out = args.out or default_out(args.runs)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")
    with warnings.catch_warnings():
        warnings.simplefilter("always", RunWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, RunWarning):  # a dropped torn last line of metrics.jsonl
                print(f"sfpo report: warning: {message}", file=sys.stderr, flush=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            written = build_report(args.runs, out, title=args.title)
        except OSError as e:  # --out not writable: a file in the way, no permission, a full disk
            raise ValueError(f"--out {out}: cannot write {e.filename or out} ({e.strerror or e})") from None
    print(f"sfpo report: {len(written)} files in {out}; open {written['report.html']} or read {written['report.md']}")
    return 0
