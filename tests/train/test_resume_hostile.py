"""Resuming a run whose files were damaged or planted, and checkpointing onto a full or read-only disk.

Each test damages a copy of a real (tiny, CPU) run and checks that ``sfpo train --resume`` / :class:`Trainer`
either falls back to an older checkpoint with a warning naming the skipped one and why, or stops with one
line naming the file or key; never a traceback, a hang, or a half-written file left behind.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import sfpo_train.trainer.config as config_lib
from sfpo_train.trainer import Trainer, run_guard
from tests.helpers.tiny_setup import tiny_overrides, write_data, write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("tiny")
    return tiny_overrides(write_tiny_model(str(root / "model")), write_data(str(root)))


def config(tiny, root, name, *overrides):
    return config_lib.load_config(
        "smoke",
        [
            *tiny,
            f"trainer.default_local_dir={root}",
            f"trainer.experiment_name={name}",
            "trainer.progress_bar=false",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def three_checkpoints(tiny, tmp_path_factory):
    """A finished 3-step run with a checkpoint at every step."""
    root = tmp_path_factory.mktemp("three")
    Trainer.create(config(tiny, root, "run", "trainer.save_freq=1", "trainer.val_before_train=false")).fit()
    return root / "run"


def copy_run(source, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(source, run, ignore=shutil.ignore_patterns(run_guard.LOCK_FILE))
    return run


def run_cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "sfpo_train.cli", "train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(proc, *parts):
    assert proc.returncode != 0, proc.stdout[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sfpo train: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for part in parts:
        assert part in errors[0], errors[0]


# --------------------------------------------------------------------------- config.yaml that is not YAML


@pytest.mark.parametrize("text", ["trainer: !!python/object:os.system {}\n", "trainer: [1\n", "a: !custom 3\n"])
def test_a_yaml_tag_or_syntax_error_in_config_yaml_is_one_line_naming_the_file(three_checkpoints, tmp_path, text):
    run = copy_run(three_checkpoints, tmp_path)
    (run / "config.yaml").write_text(text)
    proc = run_cli("--resume", str(run))
    assert_one_line_error(proc, f"{run / 'config.yaml'} is not a config this trainer can read")
