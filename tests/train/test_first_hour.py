"""What a newcomer sees from ``sfpo``: threads and load first, the algorithm in names and headers, where a resume
continues from, the checkpoint at the end, real paths in ``--print-config``, hints for options that are keys."""

from __future__ import annotations

import os

import pytest

from sfpo_train import cli
from sfpo_train.tasks import default_paths
from tests.helpers.tiny_setup import tiny_overrides, write_data, write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny_overrides(write_tiny_model(str(root / "model")), write_data(str(root)))


@pytest.mark.parametrize(
    "argv,key",
    [
        (["--device", "cuda"], "trainer.device=cuda"),
        (["train", "--device=cuda"], "trainer.device=cuda"),
        (["compare", "--lr", "1e-4"], "sfpo compare actor_rollout_ref.actor.optim.lr=1e-4"),
    ],
)
def test_options_that_are_config_keys_get_a_hint(argv, key, capsys):
    assert cli.main(argv) == 2
    assert key in capsys.readouterr().err


def test_print_config_shows_the_embedded_paths(capsys):
    assert cli.main(["train", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert f"path: {default_paths()['model']}" in out and f"val_files: {default_paths()['val_files']}" in out


def test_train_reports_threads_algorithm_resume_and_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    assert (
        cli.main(
            [
                "train",
                "--preset",
                "smoke",
                "--algorithm",
                "drgrpo",
                *tiny,
                "trainer.total_training_steps=1",
                "trainer.save_freq=1",
                "trainer.progress_bar=false",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert "1 torch thread(s) (OMP_NUM_THREADS=1)" in lines[0] and "load average" in lines[0]
    assert "SFPO (K=3, alpha=0.8) over Dr. GRPO" in lines[1]
    (run,) = os.listdir(tmp_path / "runs")
    assert run.startswith("smoke-sfpo-drgrpo-")
    checkpoint = os.path.join("runs", run, "checkpoints", "global_step_1")
    assert lines[-1].startswith(f"checkpoint: {checkpoint} ")
    assert cli.main(["train", "--resume", os.path.join("runs", run), "trainer.total_training_steps=2"]) == 0
    out = capsys.readouterr().out
    assert f"from {checkpoint} (step 1)" in out and "global_step_2" in out.splitlines()[-1]
