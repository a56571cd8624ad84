"""Resuming a run whose files were damaged or planted, and checkpointing onto a full or read-only disk.

Each test damages a copy of a real (tiny, CPU) run and checks that ``sfpo train --resume`` / :class:`Trainer`
either falls back to an older checkpoint with a warning naming the skipped one and why, or stops with one
line naming the file or key; never a traceback, a hang, or a half-written file left behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sfpo_train.trainer import Trainer, checkpoint, run_guard
from sfpo_train.trainer.run_guard import RunWarning
from tests.helpers.tiny_setup import smoke_config, tiny_overrides, write_data, write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("tiny")
    return tiny_overrides(write_tiny_model(str(root / "model")), write_data(str(root)))


config = smoke_config


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


def test_a_fifo_as_the_runs_config_yaml_is_named_not_opened(three_checkpoints, tmp_path):
    run = copy_run(three_checkpoints, tmp_path)
    (run / "config.yaml").unlink()
    os.mkfifo(run / "config.yaml")
    proc = run_cli("--resume", str(run), timeout=120)  # a hang: TimeoutExpired
    assert_one_line_error(proc, f"{run / 'config.yaml'} is not a regular file")


# --------------------------------------------------------------------------- intact: everything resume reads loads


def _edit_state(run, step, edit):
    path = run / "checkpoints" / f"global_step_{step}" / checkpoint.STATE_FILE
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _weights_as_bin(model):
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(tensors, model / "pytorch_model.bin")


STEP3 = "checkpoints/global_step_3"
BAD_CONTENT = {  # damage to global_step_3 that leaves every file loadable, and what the warning says about it
    "sfpo-version": (
        lambda run: _edit_state(run, 3, lambda s: s["sfpo"].update(version=99)),
        "'sfpo' is not a state of the SFPO its config describes (state['version'] is 99",
    ),
    "sfpo-not-a-state": (
        lambda run: _edit_state(run, 3, lambda s: s.update(sfpo={"junk": 1})),
        "'sfpo' is not a state of the SFPO its config describes",
    ),
    "no-optimizer": (lambda run: _edit_state(run, 3, lambda s: s.pop("optimizer")), "has no 'optimizer' entry"),
    "no-scheduler": (lambda run: _edit_state(run, 3, lambda s: s.pop("lr_scheduler")), "has no 'lr_scheduler' entry"),
    "optimizer-empty-dict": (
        lambda run: _edit_state(run, 3, lambda s: s.update(optimizer={})),
        "'optimizer' is not an optimizer state_dict",
    ),
    "optimizer-empty-state": (
        lambda run: _edit_state(run, 3, lambda s: s["optimizer"].update(state={})),
        "'optimizer' has an empty state at step 3",
    ),
    "sampler-junk": (
        lambda run: _edit_state(run, 3, lambda s: s.update(sampler={"epoch": "x"})),
        "'sampler' needs non-negative integers",
    ),
    "rng-junk": (lambda run: _edit_state(run, 3, lambda s: s.update(rng={})), "'rng' is not an RNG state"),
    "unknown-model-type": (
        lambda run: _edit_json(run / STEP3 / "model/config.json", lambda c: c.update(model_type="no-such-model")),
        "model/config.json cannot be read",
    ),
    "bad-generation-config": (
        lambda run: (run / STEP3 / "model/generation_config.json").write_text("{not json"),
        "model/generation_config.json cannot be read",
    ),
    "weights-as-pickle": (
        lambda run: _weights_as_bin(run / STEP3 / "model"),
        "holds no model weights (*.safetensors) (pytorch_model.bin is not loaded",
    ),
}


@pytest.mark.parametrize("damage", sorted(BAD_CONTENT))
def test_resume_skips_a_checkpoint_whose_files_load_but_whose_content_is_bad(three_checkpoints, tmp_path, damage):
    run = copy_run(three_checkpoints, tmp_path)
    apply, reason = BAD_CONTENT[damage]
    apply(run)
    with pytest.warns(RunWarning, match=re.escape(f"skipped {run / STEP3}: ")) as record:
        resumed = Trainer.resume(str(run))
    assert resumed.global_step == 2 and resumed.resumed_from == str(run / "checkpoints/global_step_2")
    assert any(reason in str(w.message) for w in record), [str(w.message) for w in record]
    run_guard.unlock_run_dir(str(run))


FIFOS = ["model/config.json", "model/generation_config.json", "model/model.safetensors", checkpoint.STATE_FILE]


@pytest.mark.parametrize("planted", FIFOS)
def test_a_fifo_planted_in_a_checkpoint_is_skipped_without_opening_it(three_checkpoints, tmp_path, planted):
    run = copy_run(three_checkpoints, tmp_path)
    target = run / STEP3 / planted
    target.unlink()
    os.mkfifo(target)
    proc = run_cli("--resume", str(run), "trainer.total_training_steps=3", timeout=120)  # a hang: TimeoutExpired
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped {target.parent.parent if planted.startswith('model') else target.parent}" in proc.stderr
    assert f"{target} is not a regular file" in proc.stderr
    assert "from " + str(run / "checkpoints/global_step_2") in proc.stdout


def test_no_intact_checkpoint_is_one_line_naming_each(three_checkpoints, tmp_path):
    run = copy_run(three_checkpoints, tmp_path)
    _edit_state(run, 1, lambda s: s["sfpo"].update(version=99))
    _edit_state(run, 2, lambda s: s.pop("optimizer"))
    os.remove(run / STEP3 / "model/config.json")
    os.mkfifo(run / STEP3 / "model/config.json")
    proc = run_cli("--resume", str(run), timeout=120)
    assert_one_line_error(
        proc,
        f"no checkpoint of {run} can be resumed",
        "global_step_3/model/config.json is not a regular file",
        "has no 'optimizer' entry",
        "state['version'] is 99",
    )


# --------------------------------------------------------------------------- the resumed run's length


def test_resume_refuses_total_training_steps_below_the_checkpoints_step(three_checkpoints, tmp_path):
    run = copy_run(three_checkpoints, tmp_path)
    before = (run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()
    proc = run_cli("--resume", str(run), "trainer.total_training_steps=2")
    assert_one_line_error(proc, "trainer.total_training_steps=2", "checkpoint it resumes from (3,")
    assert ((run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()) == before


# --------------------------------------------------------------------------- validate first, then act


def test_a_failed_resume_releases_the_run_directorys_lock(three_checkpoints, tmp_path):
    run = copy_run(three_checkpoints, tmp_path)
    with pytest.raises(ValueError, match="trainer.total_training_steps=1"):
        Trainer.resume(str(run), ["trainer.total_training_steps=1"])
    assert not run_guard.holds_lock(str(run))
    with pytest.raises(ValueError, match=r"trainer.total_training_steps must be"):
        Trainer.resume(str(run), ["trainer.total_training_steps=0"])
    assert not run_guard.holds_lock(str(run))
    resumed = Trainer.resume(str(run))  # and this process can still resume it
    assert resumed.global_step == 3
    run_guard.unlock_run_dir(str(run))


def test_create_validates_before_it_names_the_run(tiny, tmp_path):
    cfg = config(tiny, tmp_path, "x", "data.train_batch_size=0")
    cfg.trainer.experiment_name = None
    with pytest.raises(ValueError, match="data.train_batch_size"):
        Trainer.create(cfg)
    assert cfg.trainer.experiment_name is None and not os.listdir(tmp_path)


# --------------------------------------------------------------------------- a full or read-only disk


def _disk_full(monkeypatch, after_saves):
    """From the ``after_saves``-th ``torch.save`` on, every ``torch.save`` and ``os.fsync`` fails as on a full disk."""
    real_save, calls = torch.save, []

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no filename: what a write() on a full disk raises

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= after_saves:
            monkeypatch.setattr(os, "fsync", full)
            full()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temporaries(tiny, tmp_path, monkeypatch, capsys):
    from sfpo_train.cli import main

    args = [*tiny, f"trainer.default_local_dir={tmp_path}", "trainer.experiment_name=run", "trainer.progress_bar=false"]
    _disk_full(monkeypatch, after_saves=2)  # step 1's checkpoint is written, step 2's is not
    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "smoke", *args, "trainer.save_freq=1", "trainer.val_before_train=false"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    run = tmp_path / "run"
    errors = [line for line in err.splitlines() if line.startswith("sfpo train: error:")]
    assert errors == [
        f"sfpo train: error: cannot write {run}/checkpoints/global_step_2.tmp.{os.getpid()}: disk full (ENOSPC)"
    ], err
    assert "Traceback" not in err
    leftovers = [str(p.relative_to(run)) for p in run.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["global_step_1", checkpoint.LATEST_FILE]
    monkeypatch.undo()  # space freed: the run continues from its last checkpoint
    resumed = Trainer.resume(str(run))
    assert resumed.global_step == 1
    run_guard.unlock_run_dir(str(run))


def test_a_full_disk_while_writing_a_file_atomically_removes_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    target.write_text("old")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(run_guard.WriteError, match=re.escape(f"cannot write {target}.tmp.{os.getpid()}: disk full")):
        run_guard.write_atomic(str(target), "new")
    assert os.listdir(tmp_path) == ["metrics.csv"] and target.read_text() == "old"


@pytest.mark.parametrize("code, cause", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_a_read_only_run_directory_is_one_line(tiny, tmp_path, monkeypatch, capsys, code, cause):
    from sfpo_train.cli import main

    real_open = os.open

    def refuse(path, flags, *args, **kwargs):  # what a read-only mount (or no write permission) answers
        if str(path).startswith(str(tmp_path)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(os, "open", refuse)
    args = [*tiny, f"trainer.default_local_dir={tmp_path}", "trainer.experiment_name=run"]
    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "smoke", *args])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert err.strip().endswith(
        f"sfpo train: error: run directory {tmp_path / 'run'}: cannot write {tmp_path / 'run' / '.lock'}: {cause} "
        f"({errno.errorcode[code]}); runs are written under trainer.default_local_dir={str(tmp_path)!r}: run from "
        "a writable directory or set trainer.default_local_dir to one"
    ), err
    assert "Traceback" not in err
