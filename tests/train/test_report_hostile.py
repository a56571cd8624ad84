"""``sfpo report`` on hostile run directories: names that are formulas or HTML, files that are not what they seem.

A run directory's name goes into every CSV and page as text, never as a formula
or markup. A metrics.jsonl or config.yaml the report cannot read ends it with
one line, ``sfpo report: error: <file>...: <what>``, exit 2, and no traceback;
a torn last line (a kill mid-write) is dropped with a warning, as the trainer does.
"""

from __future__ import annotations

import csv
import glob
import os
import re

import pytest

from sfpo_train import cli
from sfpo_train.reports.render import csv_safe
from tests.helpers.run_files import write_stage_run

FORMULA = "=cmd|' -C calc'!A0"  # a directory name holds no "/"
MARKUP = "<img src=x onerror=alert(1)>&|b"
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def report(capsys, *argv) -> tuple[int, str]:
    """``sfpo report ARGV``: (exit code, standard error)."""
    try:
        code = cli.main(["report", *map(str, argv)])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- names as formulas and markup


def test_run_names_are_text_in_every_csv_and_page(tmp_path, capsys):
    grpo = write_stage_run(tmp_path, FORMULA, 1, sfpo=False, accuracies=[0.1, 0.3, 0.5])
    sfpo = write_stage_run(tmp_path, MARKUP, 1, sfpo=True, accuracies=[0.1, 0.5, 0.6])
    out = tmp_path / "out"
    code, err = report(capsys, grpo, sfpo, "--out", out)
    assert code == 0, err
    csvs = sorted(glob.glob(str(out / "*.csv")))
    assert {"runs.csv", "headline.csv", "stage_time.csv"} <= {os.path.basename(p) for p in csvs}
    for path in csvs:
        with open(path, newline="") as f:
            for row in csv.reader(f):
                for cell in row:
                    assert not cell.startswith(FORMULA_STARTS) or is_number(cell), (path, cell)
    with open(out / "runs.csv", newline="") as f:
        names = [row["run"] for row in csv.DictReader(f)]
    assert names == ["'" + FORMULA, MARKUP]

    md = (out / "report.md").read_text()
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;&amp;\\|b" in md
    for table in re.findall(r"(?:^\|.*\|\n)+", md, flags=re.M):  # each row as many cells as its header
        counts = {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}
        assert len(counts) == 1, table
    page = (out / "report.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;&amp;|b" in page


@pytest.mark.parametrize(
    "value, written",
    [
        ("=1+1", "'=1+1"),
        ("+cmd", "'+cmd"),
        ("-cmd", "'-cmd"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("-0.5", "-0.5"),
        ("+3", "+3"),
        ("-inf", "-inf"),
        ("grpo-s1", "grpo-s1"),
        (-2.5, -2.5),
        (7, 7),
    ],
)
def test_csv_safe_quotes_formulas_and_leaves_numbers(value, written):
    assert csv_safe(value) == written


def test_every_report_csv_goes_through_write_csvs():
    """The one place a report writes CSV is render.write_csvs (sfpo report, compare and sweep alike)."""
    root = os.path.join(os.path.dirname(__file__), "..", "..", "sfpo_train")
    writers = []
    for folder in ("reports", "cli"):
        for path in glob.glob(os.path.join(root, folder, "*.py")):
            with open(path) as f:
                if ".to_csv(" in f.read() or "csv.writer" in f.read():
                    writers.append(os.path.basename(path))
    assert writers == ["render.py"]
