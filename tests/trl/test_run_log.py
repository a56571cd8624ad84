"""RunDirectoryCallback: tiny real TRL runs (the shipped model and task, CPU) become run directories for sfpo report."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest

from sfpo_train.sfpo import SFPOConfig
from sfpo_train.tasks import default_paths, evaluate, load_rows
from tests.helpers.cli import run_cli
from tests.helpers.trl_setup import make_trainer, trl_parts

trl, SFPOGRPOTrainer = trl_parts()
from sfpo_train.trl.run_log import RunDirectoryCallback  # needs TRL: after the skip above

VAL = load_rows(default_paths()["val_files"])[:24]
VAL_KEY = "val-core/sfpo/addition/reward/mean@1"


def rows_of(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def logged_run(run_dir, *, cls=None, sfpo=None, max_iterations=None, test_freq=2, resume=None, **overrides):
    trainer = make_trainer(
        os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + "-out"), cls=cls, sfpo=sfpo, **overrides
    )
    callback = RunDirectoryCallback(trainer, run_dir, val_rows=VAL, test_freq=test_freq, max_iterations=max_iterations)
    trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_grpo_and_sfpo_runs_make_a_compare_report(tmp_path):
    k = 2
    grpo = logged_run(tmp_path / "trl-grpo", cls=trl.GRPOTrainer, max_iterations=3, max_steps=50, seed=3)
    sfpo = logged_run(
        tmp_path / "trl-sfpo", sfpo=SFPOConfig(inner_steps=k, alpha=0.8), max_iterations=3, max_steps=50, seed=3
    )
    assert grpo.state.global_step == 3 and sfpo.state.global_step == 3 * (k + 1)  # max_iterations stopped both
    for run, per_row in (("trl-grpo", 1), ("trl-sfpo", k + 1)):
        rows = rows_of(tmp_path / run)
        assert [r["training/global_step"] for r in rows] == [0, 1, 2, 3]
        assert [r.get("trl/global_step") for r in rows[1:]] == [per_row, 2 * per_row, 3 * per_row]
        assert [r["train/rollouts_total"] for r in rows] == [0, 8, 16, 24]  # one generation of 2 x 4 per row
        assert [VAL_KEY in r for r in rows] == [True, False, True, True]  # before, every 2nd row, the last
        assert all(r["timing_s/step"] >= r["timing_s/gen"] > 0 for r in rows[1:])
    assert [r["sfpo/alpha"] for r in rows_of(tmp_path / "trl-sfpo")[1:]] == [0.8] * 3
    assert not any("sfpo/alpha" in r for r in rows_of(tmp_path / "trl-grpo"))

    result = run_cli("report", str(tmp_path), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    runs = pd.read_csv(tmp_path / "report" / "runs.csv").set_index("run")
    assert runs.loc["trl-grpo", "arm"] == "GRPO" and runs.loc["trl-sfpo", "arm"] == "SFPO"
    assert set(runs["seed"]) == {3} and set(runs["rollouts"]) == {24}
    headline = pd.read_csv(tmp_path / "report" / "headline.csv")  # the arms paired by seed: a compare report
    assert list(headline["seed"]) == [3] and list(headline["sfpo_run"]) == ["trl-sfpo"]
    assert "GRPO: 1, SFPO: 1" in (tmp_path / "report" / "report.md").read_text()


def test_the_last_row_holds_the_final_weights_accuracy(tmp_path):
    trainer = logged_run(tmp_path / "run", cls=trl.GRPOTrainer, max_steps=3, test_freq=0, learning_rate=3e-3)
    rows = rows_of(tmp_path / "run")
    assert [VAL_KEY in r for r in rows] == [True, False, False, True]
    tokenizer = trainer.processing_class
    assert tokenizer.padding_side == "left"
    final = evaluate(trainer.model, tokenizer, VAL, max_new_tokens=5, batch_size=256)
    assert rows[-1][VAL_KEY] == final
    assert rows[0][VAL_KEY] != final  # training changed the model


def test_a_row_is_one_generation_when_it_feeds_several_optimizer_steps(tmp_path):
    # 2 optimizer steps per generation: TRL's steps_per_generation=2 with gradient_accumulation_steps=1
    logged_run(
        tmp_path / "run", cls=trl.GRPOTrainer, max_steps=4, per_device_train_batch_size=4, steps_per_generation=2
    )
    rows = rows_of(tmp_path / "run")[1:]
    assert [(r["trl/global_step"], r["trl/optimizer_steps"], r["trl/generations"]) for r in rows] == [
        (2, 2, 1),
        (4, 2, 1),
    ]


def test_stopping_between_passes_writes_a_partial_last_row(tmp_path):
    with pytest.warns(UserWarning, match="after 1 of the 3 passes"):
        logged_run(tmp_path / "run", sfpo=SFPOConfig(inner_steps=2, alpha=0.8), max_steps=4, test_freq=0)
    rows = rows_of(tmp_path / "run")
    assert [r.get("trl/global_step") for r in rows] == [None, 3, 4]
    assert rows[-1]["trl/partial_iteration"] == 1.0 and "sfpo/alpha" not in rows[-1]
    assert VAL_KEY in rows[-1] and VAL_KEY not in rows[1]


def test_resume_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    config = SFPOConfig(inner_steps=1, alpha=0.8)
    save = dict(save_strategy="steps", save_steps=2, max_steps=50)
    whole = logged_run(tmp_path / "whole", sfpo=config, max_iterations=3, **save)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    checkpoint = str(tmp_path / "whole-out" / "checkpoint-4")
    resumed = logged_run(tmp_path / "resumed", sfpo=config, max_iterations=3, resume=checkpoint, **save)
    assert resumed.state.global_step == whole.state.global_step == 6
    a, b = rows_of(tmp_path / "whole"), rows_of(tmp_path / "resumed")
    assert len(b) == len(a) == 4  # row 3 (optimizer steps 5-6) dropped and written again, not twice
    assert b[:3] == a[:3]  # rows 0..2 (optimizer steps up to 4) kept as they were
    for key in ("training/global_step", "trl/global_step", "train/rollouts_total", "sfpo/alpha", VAL_KEY):
        assert b[3][key] == a[3][key]


def test_a_new_run_refuses_a_directory_with_rows(tmp_path):
    logged_run(tmp_path / "run", cls=trl.GRPOTrainer, max_steps=1)
    with pytest.raises(ValueError, match="already holds 2 rows: give a new run_dir"):
        logged_run(tmp_path / "run", cls=trl.GRPOTrainer, max_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_freq": 1.5}, "test_freq must be an integer, got 1.5"),
        ({"max_iterations": 0}, "max_iterations must be an integer >= 1, got 0"),
        ({"val_rows": []}, "val_rows must hold at least one row"),
        ({"val_rows": [{"prompt": "1+1="}]}, "val_rows row 0 must be a verl-layout row"),
        ({"val_rows": "no-such.parquet"}, "val_rows='no-such.parquet' is not a file"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    trainer = make_trainer(tmp_path / "out", cls=trl.GRPOTrainer, max_steps=1)
    with pytest.raises(ValueError, match=message):
        RunDirectoryCallback(trainer, tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_the_trainer_must_be_a_grpo_trainer(tmp_path):
    with pytest.raises(ValueError, match="trainer must be a trl.GRPOTrainer, got str"):
        RunDirectoryCallback("trainer", tmp_path / "run")
