"""A run directory under stress: planted files, a second process, edited or damaged files, kills and signals.

Each test damages a real (tiny, CPU) run the way it happens in practice and checks what ``sfpo train`` /
:class:`Trainer` does: refuse with an error naming the file, or recover with a warning saying what was
skipped, and still land on the weights of an uninterrupted run (every run is seeded: compared bit for bit).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sfpo_train.trainer import Trainer, checkpoint, run_guard
from sfpo_train.trainer.key_help import KEY_HELP
from sfpo_train.trainer.run_guard import RunWarning, StopInterrupt
from tests.helpers.tiny_setup import smoke_config, tiny_overrides, write_data, write_tiny_model

FINAL_WEIGHTS = "model/model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """Overrides pointing the smoke preset at a tiny random Qwen2 and small parquet files."""
    root = tmp_path_factory.mktemp("tiny")
    return tiny_overrides(write_tiny_model(str(root / "model")), write_data(str(root)))


config = smoke_config


def run_rows(run) -> list[int]:
    return [json.loads(line)["training/global_step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def model_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """A copy of the trainer's weights (they keep changing while it trains)."""
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_equal_weights(a: dict, b: dict) -> None:
    """Bit for bit: the same names, and no tensor differs in any element."""
    differ = sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ (or are missing) in {differ}"


def cli(*args, **popen):
    return [sys.executable, "-m", "sfpo_train.cli", "train", *args], dict(stdin=subprocess.DEVNULL, **popen)


def run_cli(*args):
    cmd, kwargs = cli(*args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)


def wait_for(predicate, proc, what, seconds=300):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, f"the child ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.01)


def last_logged_step(run) -> int:
    """The last training step in ``metrics.jsonl`` (-1: none yet); a line being written is not counted."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return -1
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["training/global_step"])
        except ValueError:
            pass
    return max(steps, default=-1)


@pytest.fixture(scope="module")
def three_checkpoints(tiny, tmp_path_factory):
    """A finished 3-step run with a checkpoint at every step, and its final weights."""
    root = tmp_path_factory.mktemp("three")
    trainer = Trainer.create(config(tiny, root, "run", "trainer.save_freq=1", "trainer.val_before_train=false"))
    trainer.fit()
    return root / "run", model_weights(trainer)


def copy_run(source, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(source, run, ignore=shutil.ignore_patterns(run_guard.LOCK_FILE))
    return run


# --------------------------------------------------------------------------- 1. no code runs from a checkpoint


class _Payload:
    """Unpickling this makes the directory ``marker``: what a planted trainer_state.pt could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("planted", ["payload", "numpy-rng"])
def test_resume_refuses_a_state_that_needs_unpickling(three_checkpoints, tmp_path, planted):
    """A trainer_state.pt with a ``__reduce__`` payload (or an old-format one holding numpy's RNG tuple) is refused."""
    run = copy_run(three_checkpoints[0], tmp_path)
    marker = tmp_path / "code_ran"
    content = {"payload": _Payload(marker)} if planted == "payload" else {"rng": {"numpy": np.random.get_state()}}
    for step in (1, 2, 3):
        torch.save({"global_step": step, **content}, run / "checkpoints" / f"global_step_{step}" / "trainer_state.pt")
    state_file = run / "checkpoints" / "global_step_3" / "trainer_state.pt"
    with pytest.raises(ValueError, match=re.escape(f"{state_file} is not a weights-only trainer state")):
        Trainer.resume(str(run))
    assert not marker.exists(), "the planted file's code ran"


def test_the_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.random(), np.random.standard_normal(), torch.rand(1)  # numpy now caches a gaussian: that is saved too
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.standard_normal()), float(torch.rand(1)))
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.standard_normal()), float(torch.rand(1))) == expected


# --------------------------------------------------------------------------- 3. the reward file's help says it runs


def test_the_reward_path_help_says_its_code_runs():
    assert "its code runs as the user running sfpo train" in KEY_HELP["custom_reward_function.path"]


# --------------------------------------------------------------------------- 4. one process per run directory


def test_a_second_sfpo_train_on_a_run_in_use_fails_at_once_naming_the_holder(tiny, tmp_path):
    """A running ``sfpo train`` holds the run; ``--resume`` and a new run under its name fail with its pid.

    The holder is SIGSTOPped once it has a checkpoint (it keeps its lock, and leaves the CPUs to the others),
    then SIGKILLed: its ``.lock`` file (with the dead pid) stays, but locks nothing.
    """
    run = tmp_path / "busy"
    args = [
        *tiny,
        f"trainer.default_local_dir={tmp_path}",
        "trainer.experiment_name=busy",
        "trainer.progress_bar=false",
        "trainer.total_training_steps=5000",
        "trainer.save_freq=2",
        "trainer.val_before_train=false",
    ]
    cmd, kwargs = cli("--preset", "smoke", *args)
    holder = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    try:
        wait_for(lambda: checkpoint.checkpoint_dirs(str(run)), holder, "a checkpoint")
        holder.send_signal(signal.SIGSTOP)
        second = [
            subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **k)
            for c, k in (
                cli("--resume", str(run), "trainer.total_training_steps=5000"),
                cli("--preset", "smoke", *args),
            )
        ]
        outs = [p.communicate(timeout=300) for p in second]
        assert holder.poll() is None, "the holder ended before the second processes ran"
    finally:
        holder.kill()
        holder.wait()
    for p, (_, err) in zip(second, outs):
        assert p.returncode == 2, err
        assert f"run directory '{run}' is in use by another sfpo train (pid {holder.pid}" in err
    assert (run / run_guard.LOCK_FILE).read_text().strip() == str(holder.pid)  # stale: its holder is dead
    resumed = Trainer.resume(str(run), ["trainer.total_training_steps=5000"])  # the kernel dropped the dead one's lock
    assert (run / run_guard.LOCK_FILE).read_text().strip() == str(os.getpid())
    assert resumed.global_step >= 2
    run_guard.unlock_run_dir(str(run))


def test_a_failed_start_leaves_no_run_directory_and_no_lock(tiny, tmp_path):
    with pytest.raises(ValueError, match="is not a transformers model directory"):
        Trainer.create(config(tiny, tmp_path, "run", f"actor_rollout_ref.model.path={tmp_path}"))
    assert not (tmp_path / "run").exists()
    Trainer.create(config(tiny, tmp_path, "run"))  # the name is free again
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "config.yaml"]


# --------------------------------------------------------------------------- 5. config.yaml must match the checkpoint


@pytest.mark.parametrize(
    "edit, message",
    [
        pytest.param(
            lambda text: text.replace("lr: 3.0e-05", "lr: 0.1"),
            "actor_rollout_ref.actor.optim.lr: checkpoint 3e-05, config.yaml 0.1",
            id="edited-lr",
        ),
        pytest.param(lambda text: "", "actor_rollout_ref.model.path: checkpoint '", id="emptied"),
    ],
)
def test_resume_refuses_a_config_that_differs_from_the_checkpoints(three_checkpoints, tmp_path, edit, message):
    run = copy_run(three_checkpoints[0], tmp_path)
    path = run / "config.yaml"
    text = path.read_text()
    assert "lr: 3.0e-05" in text
    path.write_text(edit(text))
    with pytest.raises(ValueError, match=re.escape(f"{path} does not match the run's checkpoint")) as info:
        Trainer.resume(str(run))
    assert message in str(info.value)
    path.write_text(text)
    resumed = Trainer.resume(str(run), ["trainer.total_training_steps=5", "trainer.save_freq=2"])  # these may differ
    assert resumed.cfg.trainer.total_training_steps == 5
    assert not list(run.glob("config.yaml.tmp*")), "config.yaml is rewritten through a temporary file"


# --------------------------------------------------------------------------- 6. resume falls back, names every file


def _tear(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {  # what is done to the run, the step it then resumes from, what the warning says
    "latest-deleted": (
        lambda run: shutil.rmtree(run / "checkpoints" / "global_step_3"),
        2,
        f"{checkpoint.LATEST_FILE} names global_step_3, which does not exist",
    ),
    "bogus-marker": (
        lambda run: (run / "checkpoints" / checkpoint.LATEST_FILE).write_text("three"),
        3,
        "latest_checkpointed_iteration.txt holds 'three', not a step number",
    ),
    "truncated-state": (
        lambda run: _tear(run / "checkpoints" / "global_step_3" / "trainer_state.pt"),
        2,
        "global_step_3/trainer_state.pt cannot be read",
    ),
    "truncated-model": (
        lambda run: _tear(run / "checkpoints" / "global_step_3" / FINAL_WEIGHTS),
        2,
        "global_step_3/model/model.safetensors cannot be read",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_to_the_newest_intact_checkpoint(three_checkpoints, tmp_path, damage):
    source, final = three_checkpoints
    run = copy_run(source, tmp_path)
    apply, step, warning = DAMAGE[damage]
    apply(run)
    with pytest.warns(RunWarning, match=re.escape(warning)):
        resumed = Trainer.resume(str(run))
    assert resumed.global_step == step
    resumed.fit()
    assert_equal_weights(model_weights(resumed), final)
    assert run_rows(run) == [1, 2, 3]


def test_resume_names_every_checkpoint_when_none_loads(three_checkpoints, tmp_path):
    run = copy_run(three_checkpoints[0], tmp_path)
    for step in (1, 2, 3):
        _tear(run / "checkpoints" / f"global_step_{step}" / "trainer_state.pt")
    with pytest.raises(ValueError, match=f"no checkpoint of {run} can be resumed") as info:
        Trainer.resume(str(run))
    for step in (1, 2, 3):
        assert f"global_step_{step}/trainer_state.pt cannot be read" in str(info.value)


def test_a_torn_last_metrics_line_is_dropped_and_one_elsewhere_is_named(three_checkpoints, tmp_path):
    run = copy_run(three_checkpoints[0], tmp_path)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:2]) + lines[2][:40])  # killed while writing step 3's row
    shutil.rmtree(run / "checkpoints" / "global_step_3")  # ... so its checkpoint was never written
    (run / "checkpoints" / checkpoint.LATEST_FILE).write_text("2")
    with pytest.warns(RunWarning, match=re.escape(f"{metrics}, line 3: dropped a torn last row")):
        resumed = Trainer.resume(str(run))
    assert run_rows(run) == [1, 2]
    resumed.fit()
    assert run_rows(run) == [1, 2, 3]
    assert_equal_weights(model_weights(resumed), three_checkpoints[1])

    metrics.write_text(lines[0] + lines[1][:40] + "\n" + lines[2])
    with pytest.raises(ValueError, match=re.escape(f"{metrics}, line 2: not a JSON row")):
        Trainer.resume(str(run))


# --------------------------------------------------------------------------- 7. killed before its first checkpoint


def test_a_run_stopped_before_its_first_checkpoint_restarts_under_its_name(tiny, tmp_path):
    whole = Trainer.create(config(tiny, tmp_path, "whole"))
    whole.fit()
    cut = Trainer.create(config(tiny, tmp_path, "cut"))
    cut.fit(stop_after=1)  # "killed" at step 1 of 3; smoke: save_freq -1, so no checkpoint
    del cut
    with pytest.raises(
        ValueError, match="has no checkpoint yet .* starts again from step 0 when you run its sfpo train"
    ):
        Trainer.resume(str(tmp_path / "cut"))
    with pytest.warns(
        RunWarning,
        match=re.escape(
            "holds a run stopped before its first checkpoint (1 of 3 steps "
            "logged, nothing to resume): starting it again from step 0"
        ),
    ):
        again = Trainer.create(config(tiny, tmp_path, "cut"))
    again.fit()
    assert run_rows(tmp_path / "cut") == [0, 1, 2, 3]
    assert_equal_weights(model_weights(again), model_weights(whole))
    with pytest.raises(ValueError, match="already holds a run"):  # finished (without checkpoints): kept
        Trainer.create(config(tiny, tmp_path, "cut"))


# --------------------------------------------------------------------------- 8. a signal stops after a whole step


def test_sigterm_finishes_the_step_saves_and_resumes_to_the_uninterrupted_weights(tiny, tmp_path):
    """A real ``sfpo train`` gets SIGTERM once it has logged a step; save_freq is past the end, so only the stop
    writes a checkpoint before the last step. ``--resume`` must then land on the uninterrupted weights."""
    steps = 12
    args = [
        "--preset",
        "smoke",
        *tiny,
        f"trainer.default_local_dir={tmp_path}",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=1000",
        "trainer.progress_bar=false",
    ]
    assert run_cli(*args, "trainer.experiment_name=whole").returncode == 0
    run = tmp_path / "stopped"
    cmd, kwargs = cli(*args, "trainer.experiment_name=stopped")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)
    wait_for(lambda: last_logged_step(run) >= 1, proc, "a logged step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, f"rc {proc.returncode}:\n{err}"
    assert "Traceback" not in err, err
    reached = run_rows(run)[-1]
    assert 1 <= reached < steps, f"the signal did not land mid-run (last step {reached})"
    assert checkpoint.checkpoint_dirs(str(run)) == [(reached, str(run / "checkpoints" / f"global_step_{reached}"))]
    assert f"stopped by SIGTERM after step {reached}: saved {run}/checkpoints/global_step_{reached}" in err
    assert f"continue with: sfpo train --resume {run}\n" in err
    out = run_cli("--resume", str(run))
    assert out.returncode == 0, out.stderr
    final = f"checkpoints/global_step_{steps}/{FINAL_WEIGHTS}"
    assert_equal_weights(load_file(str(tmp_path / "whole" / final)), load_file(str(run / final)))
    assert run_rows(run) == list(range(steps + 1))


def test_sigint_in_process_stops_after_the_step_and_restores_the_handlers(tiny, tmp_path):
    """SIGINT sent from inside step 2 (by the reward function): step 2 completes, a checkpoint is written there
    though save_freq is -1, and fit raises StopInterrupt with the previous SIGINT/SIGTERM handlers back."""
    flag = tmp_path / "sent"
    reward = tmp_path / "reward.py"
    reward.write_text(
        "import os, signal\n"
        "CALLS = [0]\n"
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    CALLS[0] += 1\n"
        f"    if CALLS[0] == 17 and not os.path.exists({str(flag)!r}):  # step 2's first sample\n"
        f"        open({str(flag)!r}, 'w').close()\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return float(solution_str.strip() == str(ground_truth))\n"
    )
    common = (f"custom_reward_function.path={reward}", "trainer.val_before_train=false")
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cut = Trainer.create(config(tiny, tmp_path, "cut", *common))
    with pytest.raises(StopInterrupt) as info:
        cut.fit()
    assert {s: signal.getsignal(s) for s in before} == before
    assert (info.value.signum, info.value.global_step, info.value.exit_code) == (signal.SIGINT, 2, 130)
    assert info.value.checkpoint == str(tmp_path / "cut" / "checkpoints" / "global_step_2")
    whole = Trainer.create(config(tiny, tmp_path, "whole", *common))  # the flag exists now: no signal
    whole.fit()
    resumed = Trainer.resume(str(tmp_path / "cut"))
    assert resumed.global_step == 2
    resumed.fit()
    assert_equal_weights(model_weights(resumed), model_weights(whole))


# --------------------------------------------------------------------------- 9. every key checked before any file


@pytest.mark.parametrize(
    "override, message",
    [
        pytest.param(
            "actor_rollout_ref.actor.kernel_backend=bogus",
            "actor_rollout_ref.actor.kernel_backend must be null or one of triton, torch",
            id="loss-backend",
        ),
        pytest.param(
            "actor_rollout_ref.actor.sfpo.backend=cuda",
            "actor_rollout_ref.actor.sfpo.backend='cuda' cannot run with trainer.device=cpu",
            id="sfpo-backend",
        ),
        pytest.param(
            "actor_rollout_ref.actor.sfpo.zscore_window=1",
            "actor_rollout_ref.actor.sfpo.zscore_window must be >= 2, got 1",
            id="sfpo-field",
        ),
    ],
)
def test_bad_keys_are_named_before_the_run_directory_exists(tiny, tmp_path, override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Trainer.create(config(tiny, tmp_path, "run", "trainer.device=cpu", override))
    assert not (tmp_path / "run").exists()


def test_pickle_payload_would_run_code_unguarded(tmp_path):
    """The control for the planted-file test: the payload really runs when unpickled without weights_only."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


_DIE_IN_SAVE = """
import os, signal, sys
import torch
import sfpo_train.trainer.config as config_lib
from sfpo_train.trainer import Trainer

real_save = torch.save

def save_then_die(obj, path, *args, **kwargs):  # the kill lands while step 2's checkpoint is half written
    if isinstance(obj, dict) and obj.get("global_step") == 2:
        path.write(b"half a trainer state")  # the checkpoint writes through a file object
        path.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)

torch.save = save_then_die
Trainer.create(config_lib.load_config("smoke", sys.argv[1:])).fit()
"""


def test_a_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(tiny, three_checkpoints, tmp_path):
    """The half-written checkpoint is never used, its leftovers go at the next save, the weights match."""
    _, final = three_checkpoints
    overrides = [
        *tiny,
        f"trainer.default_local_dir={tmp_path}",
        "trainer.experiment_name=run",
        "trainer.progress_bar=false",
        "trainer.save_freq=1",
        "trainer.val_before_train=false",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _DIE_IN_SAVE, *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "global_step_1").is_dir() and not (checkpoints / "global_step_2").exists()
    assert any(".tmp" in p.name for p in checkpoints.iterdir()), "the kill should leave the half-written checkpoint"
    resumed = Trainer.resume(str(tmp_path / "run"))
    assert resumed.global_step == 1
    resumed.fit()
    assert_equal_weights(model_weights(resumed), final)
    assert not [p.name for p in checkpoints.iterdir() if ".tmp" in p.name]
