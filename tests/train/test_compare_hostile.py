"""``sfpo compare`` / ``sfpo sweep`` under hostile use: absurd counts, a SIGKILL mid-compare, a full disk.

Each test says what it protects: a refusal that comes before any run starts, a
killed compare continued without redoing its finished runs, and a full disk
reported in one line with the path and nothing half-written left behind.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from sfpo_train import cli
from sfpo_train.reports import compare as compare_lib
from sfpo_train.reports import grid as grid_lib
from sfpo_train.reports.compare import DiskFull, disk_full
from sfpo_train.trainer import run_guard


def _no_training(*args, **kwargs):
    raise AssertionError("a run started")


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["compare", "--seeds", "100000000"], id="compare-1e8-seeds"),
        pytest.param(["compare", "--seeds", "501"], id="compare-just-over"),
        pytest.param(["sweep", "--seeds", "41"], id="sweep-just-over"),
    ],
)
def test_absurd_run_counts_are_refused_before_any_run(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_lib, "train_or_continue", _no_training)
    monkeypatch.setattr(grid_lib, "train_or_continue", _no_training)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--preset", "smoke", "--steps", "2", "--no-progress", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"limit of {compare_lib.MAX_RUNS} runs" in err and f"--seeds {argv[2]}" in err, err
    assert not out.exists()  # nothing written


def test_the_limit_itself_is_accepted(tmp_path, monkeypatch):
    """500 seeds (1000 runs) pass the count check; the runs' configs are built one at a time."""
    built = []
    real = compare_lib.arm_config

    def counting(*args, **kwargs):
        built.append(kwargs["name"])
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_lib, "arm_config", counting)
    monkeypatch.setattr(compare_lib, "train_or_continue", _no_training)
    with pytest.raises(AssertionError, match="a run started"):
        compare_lib.run_compare("smoke", seeds=500, steps=2, out_dir=str(tmp_path / "out"), progress=False)
    # seed 1 of each arm checked up front, then the first run's own: not 1000 configs before it starts
    assert built == ["grpo-s1", "sfpo-s1", "grpo-s1"]


def test_sweep_builds_one_run_config_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(grid_lib, "train_or_continue", _no_training)
    calls = []
    real = grid_lib.config_lib.load_config

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(grid_lib.config_lib, "load_config", counting)
    with pytest.raises(AssertionError, match="a run started"):
        grid_lib.run_sweep("smoke", groups=("baseline", "stages"), seeds=40, steps=2, out_dir=str(tmp_path), log=None)
    # the base config, seed 1 of each of the 3 runs, then the first run's: not 3 x 40 before it starts
    assert len(calls) == 1 + 3 + 1


# ----------------------------------------------------------------- SIGKILL in the middle, then the same command


def _steps_logged(run_dir: str) -> list[int]:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return [int(json.loads(line).get("training/global_step", 0)) for line in f if line.strip()]
    except (OSError, ValueError):
        return []  # not there yet, or a line being written


def _files_with_mtimes(run_dir: str) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(root, name), run_dir): os.stat(os.path.join(root, name)).st_mtime_ns
        for root, _, names in os.walk(run_dir)
        for name in names
    }


@pytest.mark.parametrize(
    ("command", "runs"),
    [
        pytest.param(["compare", "--seeds", "2"], ["grpo-s1", "sfpo-s1", "grpo-s2", "sfpo-s2"], id="compare"),
        pytest.param(
            ["sweep", "--groups", "baseline", "stages"],
            ["grpo-s1", "no-reposition-s1", "no-slow-correction-s1"],
            id="sweep",
        ),
    ],
)
def test_a_killed_command_continues_without_redoing_finished_runs(command, runs, tmp_path):
    steps = 12
    out = str(tmp_path / "out")
    argv = [sys.executable, "-m", "sfpo_train.cli", *command, "--preset", "smoke", "--steps", str(steps)]
    argv += ["--no-progress", "--out", out, "trainer.save_freq=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first, second = (os.path.join(out, r) for r in runs[:2])
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        # SIGKILL once the first run finished and the second saved a checkpoint and went on
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            logged = _steps_logged(second)
            if _steps_logged(first)[-1:] == [steps] and logged and 3 < max(logged) < steps:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the command ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    finished = _files_with_mtimes(first)
    interrupted_at = max(_steps_logged(second))

    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{first}: finished ({steps} steps), kept" in again.stdout
    assert f"{second}: continuing from" in again.stdout, again.stdout
    assert _files_with_mtimes(first) == finished  # the finished run was not touched
    for run in runs:  # every run complete, each step logged once (the interrupted one's after its checkpoint too)
        logged = [s for s in _steps_logged(os.path.join(out, run)) if s > 0]
        assert logged == list(range(1, steps + 1)), (run, interrupted_at, logged)
    if command[0] == "compare":
        reported = pd.read_csv(os.path.join(out, "report", "runs.csv"))["run"]
        assert sorted(reported) == sorted(runs)
    else:
        table = pd.read_csv(os.path.join(out, "report", "sweep.csv"))
        assert len(table) == 1 + 2 and (table.iloc[:, 0].is_unique)


# ----------------------------------------------------------------- a disk that fills while the report is written


def _fill_the_disk_on_csv(monkeypatch):
    """Every ``DataFrame.to_csv`` to a path writes part of the file, then fails as a full disk does."""
    real = pd.DataFrame.to_csv

    def to_csv(self, path=None, *args, **kwargs):
        if path is None:
            return real(self, path, *args, **kwargs)
        with open(path, "w") as f:
            f.write(real(self, None, *args, **kwargs)[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as file.write() raises it: no file name

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)


@pytest.mark.parametrize(
    ("command", "report_file"),
    [
        pytest.param(["compare", "--seeds", "1"], "runs.csv", id="compare"),
        pytest.param(["sweep", "--groups", "baseline", "stages"], "sweep.csv", id="sweep"),
    ],
)
def test_a_full_disk_stops_the_report_in_one_line_and_leaves_nothing_half_written(
    command, report_file, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    argv = [*command, "--preset", "smoke", "--steps", "2", "--no-progress", "--out", str(out)]
    with monkeypatch.context() as m:
        _fill_the_disk_on_csv(m)
        assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"sfpo {command[0]}: disk full: no space left to write {out / 'report'}; "
        "free some space, then run the same command again to continue"
    ]
    runs = sorted(p.name for p in out.iterdir())
    assert "report" not in runs and not [name for name in runs if name.startswith(".")], runs  # no temporaries

    assert cli.main(argv) == 0  # space freed: the same command finishes, its runs kept
    assert "finished (2 steps), kept" in capsys.readouterr().out
    report = out / "report"
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    assert report_file in before

    with monkeypatch.context() as m:  # full again: the report there stays as it was
        _fill_the_disk_on_csv(m)
        assert cli.main(argv) == 1
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == sorted([*runs, "report"])


def test_a_run_whose_disk_filled_is_the_same_disk_full_line_as_the_report():
    """The trainer turns a full disk into its WriteError; compare and sweep name it like their own writes."""
    full = run_guard.WriteError("/out/grpo-s1/checkpoints/global_step_2", errno.ENOSPC)
    assert str(full) == "cannot write /out/grpo-s1/checkpoints/global_step_2: disk full (ENOSPC)"
    as_compare = disk_full(full, "/out/grpo-s1")
    assert isinstance(as_compare, DiskFull)
    assert str(as_compare) == "disk full: no space left to write /out/grpo-s1/checkpoints/global_step_2"
    read_only = run_guard.WriteError("/out/grpo-s1/metrics.jsonl", errno.EROFS)
    assert disk_full(read_only, "/out/grpo-s1") is read_only  # not a full disk: kept as the trainer said it
