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


# --------------------------------------------------------------------------- files that are not what they seem


def append(run: str, data: bytes) -> None:
    with open(os.path.join(run, "metrics.jsonl"), "ab") as f:
        f.write(data)


def into_directory(run: str) -> None:
    os.remove(os.path.join(run, "metrics.jsonl"))
    os.mkdir(os.path.join(run, "metrics.jsonl"))


def insert_line(run: str, data: bytes) -> None:
    path = os.path.join(run, "metrics.jsonl")
    with open(path, "rb") as f:
        lines = f.readlines()
    with open(path, "wb") as f:
        f.writelines(lines[:2] + [data] + lines[2:])


def config(run: str, text: str) -> None:
    with open(os.path.join(run, "config.yaml"), "w") as f:
        f.write(text)


@pytest.mark.parametrize(
    "spoil, file, message",
    [
        pytest.param(lambda r: append(r, b"[1, 2]\n"), "metrics.jsonl, line 6", "an array, not a row", id="array"),
        pytest.param(lambda r: append(r, b"null\n"), "metrics.jsonl, line 6", "null, not a row", id="null"),
        pytest.param(
            lambda r: append(r, b'{"training/global_step": "3"}\n'),
            "metrics.jsonl, line 6",
            'training/global_step must be a whole number, got "3"',
            id="string-step",
        ),
        pytest.param(
            lambda r: append(r, b'{"training/global_step": 2.5}\n'),
            "metrics.jsonl, line 6",
            "training/global_step must be a whole number, got 2.5",
            id="fractional-step",
        ),
        pytest.param(
            lambda r: append(r, b'{"timing_s/step": 1.0}\n'),
            "metrics.jsonl, line 6",
            "no training/global_step",
            id="no-step",
        ),
        pytest.param(
            lambda r: insert_line(r, b'{"training/global_step": 9, "a\xff": 1}\n'),
            "metrics.jsonl, line 3",
            "not UTF-8 text (byte 0xff at column 31); only a torn last line",
            id="non-utf8-inside",
        ),
        pytest.param(
            lambda r: insert_line(r, b'{"training/global_step": 9\n'),
            "metrics.jsonl, line 3",
            "not a JSON row (",
            id="bad-json-inside",
        ),
        pytest.param(into_directory, "metrics.jsonl", "not a regular file", id="metrics-is-a-directory"),
        pytest.param(
            lambda r: append(r, b'{"training/global_step": 5, "timing_s/step": "fast"}\n'),
            "metrics.jsonl, line 6",
            'timing_s/step must be a finite number or null, got "fast"',
            id="string-metric",
        ),
        pytest.param(
            lambda r: append(r, b'{"training/global_step": 5, "timing_s/step": Infinity}\n'),
            "metrics.jsonl, line 6",
            "timing_s/step must be a finite number or null, got Infinity",
            id="infinite-metric",
        ),
        pytest.param(
            lambda r: append(r, b'{"training/global_step": 5, "memory/gen": 1.0}\n'),
            "metrics.jsonl, line 6",
            "metric 'memory/gen' is not memory/<stage>/<reading>",
            id="odd-memory-column",
        ),
        pytest.param(
            lambda r: append(r, b'{"training/global_step": 5, "x": 1' + b"0" * 400 + b"}\n"),
            "metrics.jsonl, line 6",
            "x is an integer too large for a float",
            id="huge-integer",
        ),
        pytest.param(lambda r: config(r, "a: [\n"), "config.yaml", "not a config sfpo report can read", id="bad-yaml"),
        pytest.param(lambda r: config(r, "- 1\n"), "config.yaml", "a mapping of config sections", id="yaml-list"),
        pytest.param(
            lambda r: config(r, "trainer:\n  seed: abc\n"),
            "config.yaml",
            'trainer.seed must be an integer, got "abc"',
            id="string-seed",
        ),
        pytest.param(
            lambda r: config(r, "trainer:\n  total_training_steps: many\n"),
            "config.yaml",
            'trainer.total_training_steps must be an integer, got "many"',
            id="string-steps",
        ),
        pytest.param(
            lambda r: config(r, "actor_rollout_ref:\n  actor:\n    sfpo:\n      alpha: high\n"),
            "config.yaml",
            'actor_rollout_ref.actor.sfpo.alpha must be a number, got "high"',
            id="string-alpha",
        ),
    ],
)
def test_an_unreadable_run_is_one_line_naming_the_file(tmp_path, capsys, spoil, file, message):
    run = write_stage_run(tmp_path, "run", 1, sfpo=False, accuracies=[0.1, 0.3, 0.5])
    spoil(run)
    code, err = report(capsys, run, "--out", tmp_path / "out")
    assert code == 2
    assert err.startswith(f"sfpo report: error: {os.path.join(run, file)}: {message}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize(
    "torn",
    [b'{"training/global_step": 5, "timing_s/st', b'{"training/global_step": 5, "a\xe2\x82'],
    ids=["mid-json", "mid-utf8-character"],
)
def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys, torn):
    run = write_stage_run(tmp_path, "run", 1, sfpo=False, accuracies=[0.1, 0.3, 0.5])
    append(run, torn)
    code, err = report(capsys, run, "--out", tmp_path / "out")
    assert code == 0, err
    assert err.startswith(
        f"sfpo report: warning: {os.path.join(run, 'metrics.jsonl')}, line 6: dropped a torn last row ({len(torn)} bytes"
    ), err
    with open(tmp_path / "out" / "runs.csv", newline="") as f:
        assert [row["steps"] for row in csv.DictReader(f)] == ["4"]  # the torn step 5 is not counted


def test_only_a_torn_line_is_an_empty_run(tmp_path, capsys):
    run = write_stage_run(tmp_path, "run", 1, sfpo=False, accuracies=[0.1])
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write('{"training/glo')
    code, err = report(capsys, run, "--out", tmp_path / "out")
    assert code == 2
    assert (
        err.splitlines()[-1]
        == f"sfpo report: error: {os.path.join(run, 'metrics.jsonl')}: empty (the run logged no step yet)"
    )


def test_a_run_with_only_steps_logged_is_reported(tmp_path, capsys):
    """No config, no timings, no rollouts: the report says n/a where it cannot know, and does not fail."""
    run = tmp_path / "bare"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"training/global_step": 0}\n{"training/global_step": 1}\n')
    code, err = report(capsys, run, "--out", tmp_path / "out")
    assert code == 0, err
    with open(tmp_path / "out" / "runs.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["steps"], row["rollouts"]) == ("1", "0")


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_an_unwritable_out_is_named(tmp_path, capsys, where):
    run = write_stage_run(tmp_path, "run", 1, sfpo=False, accuracies=[0.1, 0.3, 0.5])
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = blocker if where == "is-a-file" else blocker / "report"
    code, err = report(capsys, run, "--out", out)
    assert code == 2
    expected = "exists and is not a directory" if where == "is-a-file" else f"cannot write {out} (Not a directory)"
    assert err == f"sfpo report: error: --out {out}: {expected}\n"
