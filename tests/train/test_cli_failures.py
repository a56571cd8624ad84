"""``sfpo train`` fails fast and says what to type next: argument and key errors before torch is loaded, a run
directory that cannot be written named with its key, a stop before the first checkpoint answered with the command
that reuses its directory, a finished run resumed answered with how to train it longer."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from sfpo_train import cli
from sfpo_train.trainer import Trainer, checkpoint
from sfpo_train.trainer import config as config_lib
from tests.helpers.tiny_setup import smoke_config, tiny_overrides, write_data, write_tiny_model

# Runs sfpo train in a fresh interpreter and reports what it loaded: a failed parse must not have imported torch.
PROBE = """
import json, sys
from sfpo_train import cli
try:
    rc = cli.main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "loaded": sorted(m for m in ("torch", "transformers", "triton") if m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("tiny")
    return tiny_overrides(write_tiny_model(str(root / "model")), write_data(str(root)))


def probe(*argv: str, cwd) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=cwd, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["--preset", "tiny"], "argument --preset: invalid choice: 'tiny'", id="unknown-preset"),
        pytest.param(["--resume"], "argument --resume: expected one argument", id="resume-without-value"),
        pytest.param(["data.train_batch_size"], "override 'data.train_batch_size' must look like key=value", id="no-="),
        pytest.param(["data.train_batchsize=8"], "unknown config key 'data.train_batchsize'", id="unknown-key"),
        pytest.param(["trainer.seed=abc"], "bad value for trainer.seed: 'abc'", id="bad-value"),
        pytest.param(
            ["data.train_batch_size=8"],
            "actor_rollout_ref.actor.ppo_mini_batch_size must be <= data.train_batch_size (8), got 16: "
            "set actor_rollout_ref.actor.ppo_mini_batch_size=8",
            id="mini-batch-above-batch",
        ),
        pytest.param(
            ["data.train_batch_size=12", "actor_rollout_ref.actor.ppo_mini_batch_size=8"],
            "e.g. actor_rollout_ref.actor.ppo_mini_batch_size=6",
            id="mini-batch-not-a-divisor",
        ),
        pytest.param(["--resume", "no-such-run"], "--resume 'no-such-run': not a run directory", id="resume-no-run"),
        pytest.param(
            ["--resume", "run", "actor_rollout_ref.actor.optim.lr=1.0"],
            "actor_rollout_ref.actor.optim.lr cannot change in a resumed run",
            id="resume-fixed-key",
        ),
    ],
)
def test_argument_errors_are_one_line_before_torch_is_imported(tmp_path, argv, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(config_lib.to_yaml(config_lib.load_config("smoke")))
    result, err = probe("train", *argv, cwd=tmp_path)
    assert result["rc"] == 2, err
    assert message in err, err
    assert err.strip().splitlines()[-1].startswith("sfpo train: error: "), err
    assert "Traceback" not in err, err
    assert result["loaded"] == [], f"{result['loaded']} imported before the error was reported"
    assert os.listdir(tmp_path) == ["run"]  # no run directory was made


def test_help_needs_no_torch(tmp_path):
    result, err = probe("train", "--help", cwd=tmp_path)
    assert result["rc"] == 0, err
    assert result["loaded"] == [], f"{result['loaded']} imported for --help"


def test_help_example_run_name_is_the_name_a_run_gets(tiny, tmp_path, capsys):
    """The example of ``--resume`` in ``sfpo train --help`` has the form of the directory a default run creates."""
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    example = re.search(r"--resume runs/(\S+)", capsys.readouterr().out).group(1)
    cfg = config_lib.load_config("default", [*tiny, f"trainer.default_local_dir={tmp_path}"])
    trainer = Trainer.create(cfg)  # named by the trainer, not by the test
    (made,) = os.listdir(tmp_path)
    assert trainer.run_dir == str(tmp_path / made)
    stamp = r"\d{8}-\d{6}"
    assert re.fullmatch(f"default-sfpo-grpo-{stamp}", made), made
    assert re.sub(stamp, "<time>", example) == re.sub(stamp, "<time>", made)


def test_an_unwritable_run_directory_is_one_line_naming_the_key(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--preset", "smoke", f"trainer.default_local_dir={blocker}", "trainer.experiment_name=r"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error" in line]
    assert line.startswith(f"sfpo train: error: run directory {blocker / 'r'}: cannot create {blocker / 'r'}"), line
    assert "(ENOTDIR)" in line and f"trainer.default_local_dir={str(blocker)!r}" in line, line
    assert "Traceback" not in err


def test_a_stop_before_the_first_checkpoint_prints_the_command_that_reuses_its_directory(tiny, tmp_path, capsys):
    """SIGINT during the validation before step 1: no checkpoint. The printed command names the run's generated
    directory, and running it starts that run over there instead of making a second directory."""
    flag = tmp_path / "sent"
    reward = tmp_path / "reward.py"
    reward.write_text(
        "import os, signal\n"
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        f"    if not os.path.exists({str(flag)!r}):\n"
        f"        open({str(flag)!r}, 'w').close()\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return float(solution_str.strip() == str(ground_truth))\n"
    )
    runs = tmp_path / "runs"
    args = [
        "--preset",
        "smoke",
        *tiny,
        f"trainer.default_local_dir={runs}",
        f"custom_reward_function.path={reward}",
        "trainer.progress_bar=false",
    ]
    assert cli.main(["train", *args]) == 130
    err = capsys.readouterr().err
    (made,) = os.listdir(runs)
    assert checkpoint.latest_checkpoint(str(runs / made)) is None
    (line,) = [line for line in err.splitlines() if "start it over in the same directory with: " in line]
    command = shlex.split(line.split("with: ", 1)[1])
    assert command[:2] == ["sfpo", "train"] and command[2:-1] == args
    assert command[-1] == f"trainer.experiment_name={made}"
    assert cli.main(command[1:]) == 0
    assert os.listdir(runs) == [made]
    assert "starting it again from step 0" in capsys.readouterr().err


def test_resume_of_a_finished_run_says_so_and_how_to_train_longer(tiny, tmp_path, capsys):
    cfg = smoke_config(tiny, tmp_path, "done", "trainer.total_training_steps=2", "trainer.save_freq=1")
    Trainer.create(cfg).fit()
    rows = (tmp_path / "done" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "done")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'done'} is finished" in out and "at step 2 of trainer.total_training_steps=2" in out
    command = shlex.split(out.strip().splitlines()[-1].split("raise trainer.total_training_steps: ", 1)[1])
    assert (tmp_path / "done" / "metrics.jsonl").read_text() == rows  # nothing trained
    assert cli.main(command[1:]) == 0  # the printed command trains on to step 4
    assert checkpoint.latest_checkpoint(str(tmp_path / "done")).endswith("global_step_4")
