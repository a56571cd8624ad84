"""``sfpo report RUN [RUN ...]``: per-stage time and memory, training curves, and SFPO against GRPO.

Reads each run directory's ``config.yaml`` and ``metrics.jsonl`` (what ``sfpo
train`` and ``sfpo compare`` write) and writes report.md and report.html (tables
and plots), CSV tables (runs.csv, stage_time.csv, stage_share.csv,
stage_memory.csv and, with both arms, headline.csv) and PNG plots into --out.
What each file holds and how each measure is defined: ``sfpo_train.reports``.

Without --out the report goes to RUN/report (one run) or report/ in the runs'
common parent directory, and never over a report already there (the one sfpo
compare writes into its directory, or an earlier sfpo report): name a directory
with --out, that one to replace it. A report directory given with --out is
replaced as a whole, so no file of the earlier report is left beside the new one.
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
        "directory, refused when it already holds a report: --out that directory replaces it)",
    )
    parser.add_argument("--title", help="the report's title")


def main(args: argparse.Namespace) -> int:
    from sfpo_train.trainer.run_guard import RunWarning

    out = args.out or default_out(args.runs)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")
    earlier = report_title(out)
    if args.out is None and (earlier is not None or (os.path.isdir(out) and os.listdir(out))):
        what = f"a report ({earlier!r})" if earlier else "files"
        raise ValueError(
            f"{out} already holds {what}, and sfpo report does not write over it unasked: give --out DIR for "
            f"a new report elsewhere, or --out {out} to replace it"
        )
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
            if earlier is not None:  # a report there: replaced whole, none of its files left beside the new ones
                from sfpo_train.reports.compare import write_report

                written = write_report(out, lambda directory: build_report(args.runs, directory, title=args.title))
            else:
                written = build_report(args.runs, out, title=args.title)
        except OSError as e:  # --out not writable: a file in the way, no permission, a full disk
            raise ValueError(f"--out {out}: cannot write {e.filename or out} ({e.strerror or e})") from None
    print(f"sfpo report: {len(written)} files in {out}; open {written['report.html']} or read {written['report.md']}")
    return 0


def report_title(directory: str) -> str | None:
    """The title of the report in ``directory`` (its report.md's first line), None where it holds no report."""
    path = os.path.join(directory, "report.md")
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        first = f.readline().strip()
    return first.removeprefix("# ") or "untitled"
