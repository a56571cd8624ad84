"""verl's ``trainer.logger`` in ``sfpo train``: console, TensorBoard, W&B (offline) and verl's file logger.

Each backend is the real library; what it wrote is read back with that library's
own reader (TensorBoard's ``EventAccumulator``) or as the plain file it is, and
compared with ``metrics.jsonl``, which every run writes whatever the key says.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from sfpo_train.trainer import Trainer
from sfpo_train.trainer import config as config_lib
from tests.helpers.cli import run_cli
from tests.helpers.optional import import_or_skip
from tests.helpers.tiny_setup import smoke_config, tiny_overrides, write_data, write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny_overrides(write_tiny_model(str(root / "model")), write_data(str(root)))


def jsonl_rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def numbers_of(row: dict) -> dict[str, float | str]:
    """A ``metrics.jsonl`` row's numbers, NaN (which JSON writes as null) as the string "nan" so that it compares."""
    return {k: same(math.nan if v is None else v) for k, v in row.items() if v is None or isinstance(v, (int, float))}


def same(value: float) -> float | str:
    value = float(value)
    return "nan" if math.isnan(value) else value


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` as TensorBoard reads the directory (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    found = {tag: [(e.step, same(e.value)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return {tag: points for tag, points in found.items() if points}  # a tag whose every event was purged: none


def assert_same_as_jsonl(tb: dict, rows: list[dict]) -> None:
    """Every number of every row is the scalar at that row's step (TensorBoard keeps float32), and nothing else."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for k, v in numbers_of(row).items():
            expected.setdefault(k, []).append((row["training/global_step"], same(np.float32(v)) if v != "nan" else v))
    assert sorted(tb) == sorted(expected)
    for tag, points in expected.items():
        assert sorted(tb[tag], key=str) == sorted(points, key=str), tag


def test_console_tensorboard_and_file_loggers_write_the_jsonl_rows(tiny, tmp_path, monkeypatch):
    import_or_skip("tensorboard")
    for name in ("TENSORBOARD_DIR", "VERL_FILE_LOGGER_PATH", "VERL_FILE_LOGGER_ROOT"):
        monkeypatch.delenv(name, raising=False)  # verl's default places, under the working directory
    out = run_cli(
        "train",
        "--preset",
        "smoke",
        *tiny,
        "trainer.total_training_steps=2",
        "trainer.experiment_name=logged",
        "trainer.progress_bar=false",
        "trainer.logger=[console,tensorboard,file]",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = jsonl_rows(tmp_path / "runs" / "logged" / "metrics.jsonl")
    assert [r["training/global_step"] for r in rows] == [0, 1, 2]

    assert_same_as_jsonl(scalars(tmp_path / "tensorboard_log" / "sfpo" / "logged"), rows)

    # verl's console format, step:N - key:value - ..., every number of the row as Python prints it
    console = [line for line in out.stdout.splitlines() if line.startswith("step:")]
    assert len(console) == len(rows)
    for line, row in zip(console, rows):
        fields = dict(item.split(":", 1) for item in line.split(" - "))
        assert int(fields.pop("step")) == row["training/global_step"]
        assert {k: same(v) for k, v in fields.items()} == numbers_of(row)

    # verl's file logger: {"step": N, "data": row} per line, in ./<project_name>/<experiment_name>.jsonl
    assert jsonl_rows(tmp_path / "sfpo" / "logged.jsonl") == [
        {"step": r["training/global_step"], "data": r} for r in rows
    ]
    assert "tensorboard: metrics in tensorboard_log/sfpo/logged" in out.stdout


def test_a_resumed_run_hides_the_tensorboard_steps_it_redoes(tiny, tmp_path, monkeypatch):
    """Killed after step 3 with its checkpoint at step 2: step 3's events are purged and logged once again
    (verl's file logger keeps its rows up to step 2 and logs step 3 once)."""
    import_or_skip("tensorboard")
    board, file_log = tmp_path / "board", tmp_path / "verl_file.jsonl"
    monkeypatch.setenv("TENSORBOARD_DIR", str(board))
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(file_log))
    cfg = smoke_config(
        tiny,
        tmp_path,
        "cut",
        "trainer.total_training_steps=4",
        "trainer.save_freq=2",
        "trainer.logger=[tensorboard,file]",
    )
    Trainer.create(cfg).fit(stop_after=3)
    assert max(step for step, _ in scalars(board)["training/global_step"]) == 3
    resumed = Trainer.resume(str(tmp_path / "cut"))
    assert resumed.global_step == 2
    resumed.fit()
    tb = scalars(board)
    assert [step for step, _ in tb["training/global_step"]] == [0, 1, 2, 3, 4]  # step 3 once, not twice
    rows = jsonl_rows(tmp_path / "cut" / "metrics.jsonl")
    assert_same_as_jsonl(tb, rows)
    assert jsonl_rows(file_log) == [{"step": r["training/global_step"], "data": r} for r in rows]


def test_wandb_offline_writes_a_run_directory(tiny, tmp_path, monkeypatch):
    import_or_skip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)  # the command's environment (run_cli inherits it)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # offline needs no account
    out = run_cli(
        "train",
        "--preset",
        "smoke",
        *tiny,
        "trainer.total_training_steps=1",
        "trainer.experiment_name=offline-wandb-run",
        "trainer.project_name=sfpo-logger-test",
        "trainer.progress_bar=false",
        f"trainer.default_local_dir={tmp_path / 'runs'}",
        "trainer.logger=[wandb]",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    # W&B's record file: protobuf records, whose strings (the run's name, each metric's key) are stored as is
    content = Path(run_file).read_bytes()
    assert b"offline-wandb-run" in content and b"sfpo-logger-test" in content  # the run's name and project
    for key in numbers_of(jsonl_rows(tmp_path / "runs" / "offline-wandb-run" / "metrics.jsonl")[-1]):
        assert key.encode() in content, key
    assert "wandb: metrics in " + os.path.dirname(run_file) in out.stdout


@pytest.mark.parametrize(
    "value, message",
    [
        ("[console,tensorbord]", "trainer.logger must be a list of console, file, tensorboard, wandb"),
        ("[mlflow]", "verl's other loggers are not written here"),
        ("[console,console]", "(each once"),
    ],
)
def test_an_unknown_logger_is_an_error_naming_the_key(value, message):
    with pytest.raises(ValueError, match=r"^trainer\.logger must be ") as info:
        config_lib.validate(config_lib.load_config("smoke", [f"trainer.logger={value}"]))
    assert message in str(info.value)


@pytest.mark.parametrize("logger, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_logger_whose_package_is_missing_names_the_key_value_and_extra(logger, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules halts the import: not installed
    with pytest.raises(ValueError) as info:
        config_lib.validate(config_lib.load_config("smoke", [f"trainer.logger=[console,{logger}]"]))
    message = str(info.value)
    assert message.startswith(f"trainer.logger=[console,{logger}]: '{logger}' needs the {logger} package")
    assert message.endswith(f"pip install 'sfpo[{logger}]'") and "\n" not in message


def test_a_single_name_and_an_empty_list_are_accepted_as_verl_accepts_them(tiny, tmp_path, capsys):
    assert config_lib.validate(config_lib.load_config("smoke", ["trainer.logger=console"])) is None
    trainer = Trainer.create(
        smoke_config(tiny, tmp_path, "quiet", "trainer.logger=[]", "trainer.total_training_steps=1")
    )
    trainer.fit()
    assert "step:" not in capsys.readouterr().out
    rows = jsonl_rows(tmp_path / "quiet" / "metrics.jsonl")
    assert [r["training/global_step"] for r in rows] == [0, 1] and not math.isnan(rows[1]["critic/score/mean"])
