"""A small ``sfpo compare`` that can show something: validation scaled to the run's length, and a word first on
what a compare of its size can and cannot show.

One real compare (the default preset on the tiny model: 1 seed x 20 steps, then continued to 24); the rest
reads configs only.
"""

from __future__ import annotations

import json
import os

import pytest

from sfpo_train import cli
from sfpo_train.reports.compare import (
    VALIDATION_POINTS,
    run_compare,
    scope_lines,
    sets_test_freq,
    validation_every,
)
from sfpo_train.trainer import config as config_lib
from tests.helpers.tiny_setup import tiny_overrides, write_data, write_tiny_model


def validated_steps(run_dir: str) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["training/global_step"] for r in rows if any(k.startswith("val-core/") for k in r)]


@pytest.mark.parametrize(
    ("total", "test_freq", "every"),
    [
        (50, 50, 5),  # the README's small compare: every 5 steps, not only at 0 and 50
        (300, 50, 30),
        (1000, 50, 50),  # the trainer's default is already as often
        (4, 50, 1),
        (50, -1, 5),  # validation off in the config: compare still validates
        (50, 3, 3),  # more often than compare would: kept
    ],
)
def test_validation_every_gives_about_ten_validations(total, test_freq, every):
    assert validation_every(total, test_freq) == every
    assert total / every <= VALIDATION_POINTS or every == test_freq


def test_the_users_or_the_presets_test_freq_is_left_alone():
    assert not sets_test_freq("default", ["data.train_batch_size=8"])
    assert sets_test_freq("default", ["trainer.test_freq=7"]) and sets_test_freq("default", ["+trainer.test_freq=7"])
    assert sets_test_freq("smoke", [])  # the smoke preset validates only at the end, on purpose


def scope(seeds: int, *overrides: str) -> list[str]:
    return scope_lines(config_lib.load_config("default", list(overrides)), seeds, chosen=False)


def test_scope_says_what_the_size_allows():
    lines = scope(5, "trainer.test_freq=30")
    assert len(lines) == 1 and "95% intervals over 5 seeds" in lines[0] and "11 validations" in lines[0]
    few = scope(2, "trainer.total_training_steps=50", "trainer.test_freq=5")
    assert len(few) == 2 and "intervals over seeds" in few[1] and "to within 5 steps" in few[0]
    assert "entropy trigger" not in few[1]  # 50 steps: the window of 30 fills
    ends_only = scope(3, "trainer.total_training_steps=50", "trainer.test_freq=-1")
    assert "rollouts and wall-clock to GRPO's best (validation only at steps 0 and 50" in ends_only[1]
    no_start = scope(3, "trainer.val_before_train=false")
    assert "whether GRPO improved" in no_start[1]
    short = scope(3, "trainer.total_training_steps=20")
    assert "the entropy trigger (it needs 30 steps" in short[1]


def test_a_small_compare_validates_along_the_run_and_says_so_first(tmp_path, capsys):
    tiny = tiny_overrides(write_tiny_model(str(tmp_path / "model")), write_data(str(tmp_path)))
    out = tmp_path / "cmp"
    argv = ["compare", "--seeds", "1", "--steps", "20", "--out", str(out), "--no-progress", *tiny]
    assert cli.main([*argv, "trainer.save_freq=10"]) == 0
    printed = capsys.readouterr().out.splitlines()
    can = next(i for i, line in enumerate(printed) if line.startswith("sfpo compare: can show:"))
    cannot = next(i for i, line in enumerate(printed) if line.startswith("sfpo compare: cannot show:"))
    trained = next(i for i, line in enumerate(printed) if " runs in " in line)
    assert can < cannot < trained  # said before the runs
    assert "11 validations, every 2 steps: chosen for 20 steps" in printed[can]
    assert "intervals over seeds" in printed[cannot] and "entropy trigger" in printed[cannot]
    for run in ("grpo-s1", "sfpo-s1"):
        assert validated_steps(out / run) == list(range(0, 21, 2))
    # continued to 24 steps: the runs keep the frequency they were made with (2, not 24 / 10 -> 3)
    said = []
    run_compare(
        "default",
        seeds=1,
        steps=24,
        out_dir=str(out),
        progress=False,
        overrides=tiny + ["trainer.save_freq=10"],
        log=said.append,
    )
    assert "every 2 steps" in said[0]
    for run in ("grpo-s1", "sfpo-s1"):
        assert validated_steps(out / run) == list(range(0, 25, 2))
    with pytest.raises(ValueError, match="trainer.test_freq"):  # a frequency of the user's own: other settings
        run_compare(
            "default", seeds=1, steps=24, out_dir=str(out), progress=False, overrides=[*tiny, "trainer.test_freq=3"]
        )
