"""The torch thread choice of sfpo train / compare / sweep: the decision from plain inputs, the model sizes it
reads, OMP_NUM_THREADS winning, and the first line each command prints."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sfpo_train import cli
from sfpo_train.cli import threads
from sfpo_train.cli.threads import SMALL_MODEL_PARAMETERS, choose_threads
from sfpo_train.reports import compare as compare_lib
from sfpo_train.reports import grid as grid_lib
from tests.helpers.tiny_setup import write_tiny_model

BIG = 10 * SMALL_MODEL_PARAMETERS


def choose(**given):
    inputs = {"requested": None, "omp_num_threads": None, "parameters": BIG, "cpus": 8, "load1": 0.0}
    return choose_threads(**{**inputs, **given})


@pytest.mark.parametrize(
    "given,threads,source",
    [
        pytest.param({"cpus": 8, "load1": 0.2}, 8, "auto", id="idle-big-model-one-per-cpu"),
        pytest.param({"cpus": 8, "load1": 3.4}, 5, "auto", id="loaded-big-model-idle-cpus"),
        pytest.param({"cpus": 2, "load1": 1.0}, 1, "auto", id="one-other-busy-process-on-2"),
        pytest.param({"cpus": 2, "load1": 0.4}, 2, "auto", id="2-nearly-idle"),
        pytest.param({"cpus": 4, "load1": 30.0}, 1, "auto", id="overloaded-at-least-one"),
        pytest.param({"cpus": 4, "load1": None}, 4, "auto", id="load-unknown-taken-as-idle"),
        pytest.param({"cpus": 1, "parameters": None}, 1, "auto", id="one-cpu"),
        pytest.param({"parameters": 527_744, "load1": 0.0}, 1, "auto", id="small-model-idle"),
        pytest.param({"parameters": SMALL_MODEL_PARAMETERS - 1}, 1, "auto", id="just-under-the-size"),
        pytest.param({"parameters": SMALL_MODEL_PARAMETERS}, 8, "auto", id="at-the-size"),
        pytest.param({"parameters": None, "cpus": 2, "load1": 0.0}, 2, "auto", id="size-unknown-no-limit"),
        pytest.param({"omp_num_threads": "3", "parameters": 527_744}, 3, "OMP_NUM_THREADS", id="omp-beats-size"),
        pytest.param({"omp_num_threads": "2", "load1": 50.0}, 2, "OMP_NUM_THREADS", id="omp-beats-load"),
        pytest.param({"omp_num_threads": "16", "cpus": 2}, 16, "OMP_NUM_THREADS", id="omp-beats-cpus"),
        pytest.param({"omp_num_threads": "4,2"}, 4, "OMP_NUM_THREADS", id="omp-nested-form"),
        pytest.param({"omp_num_threads": " ", "cpus": 2, "load1": 0.0}, 2, "auto", id="empty-omp-is-unset"),
        pytest.param({"requested": 3, "omp_num_threads": "1"}, 3, "requested", id="request-beats-omp"),
    ],
)
def test_the_decision(given, threads, source):
    choice = choose(**given)
    assert (choice.threads, choice.source) == (threads, source)
    assert choice.reason


def test_the_reason_names_what_decided():
    assert choose(omp_num_threads="2").reason == "OMP_NUM_THREADS=2"
    assert "0.53M-parameter model" in choose(parameters=527_744).reason
    assert "one thread per idle CPU" in choose(load1=3.0).reason


@pytest.mark.parametrize(
    "given,named",
    [
        ({"omp_num_threads": "abc"}, "OMP_NUM_THREADS='abc'"),
        ({"omp_num_threads": "0"}, "OMP_NUM_THREADS='0'"),
        ({"requested": 0}, "threads"),
        ({"requested": True}, "threads"),
        ({"cpus": 0}, "cpus"),
        ({"load1": -1.0}, "load1"),
        ({"load1": float("nan")}, "load1"),
    ],
)
def test_bad_inputs_are_named(given, named):
    with pytest.raises(ValueError, match=named):
        choose(**given)


def test_the_describe_line_says_busy_and_how_to_override():
    line = threads.describe(choose(load1=7.0, cpus=8), 8, 7.0)
    assert line.startswith("1 torch thread(s) (chosen:") and "busy" in line and "OMP_NUM_THREADS=N" in line
    assert "OMP_NUM_THREADS=N" not in threads.describe(choose(omp_num_threads="2"), 8, 0.0)


def test_model_sizes_match_the_real_models(tmp_path):
    """Exact from the safetensors headers, and the config estimate (override_config, random_init) equal to
    the parameter count transformers builds."""
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    path = write_tiny_model(str(tmp_path / "model"))
    built = AutoModelForCausalLM.from_pretrained(path)
    model_cfg = OmegaConf.create({"path": path, "override_config": {}, "random_init": False})
    assert threads.model_parameters(model_cfg) == sum(p.numel() for p in built.parameters())

    reshaped = {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3, "num_key_value_heads": 1}
    model_cfg = OmegaConf.create({"path": path, "override_config": reshaped, "random_init": True})
    base = AutoConfig.from_pretrained(path)
    entries = {k: v for k, v in base.to_dict().items() if k != "layer_types"}  # as the trainer rebuilds it
    fresh = AutoModelForCausalLM.from_config(type(base)(**{**entries, **reshaped}))
    assert threads.model_parameters(model_cfg) == sum(p.numel() for p in fresh.parameters())

    assert threads.safetensors_parameters(tmp_path) is None  # no weights there
    (tmp_path / "broken.safetensors").write_bytes(b"\x01")
    assert threads.safetensors_parameters(tmp_path) is None


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _no_training(*args, **kwargs):
    raise AssertionError("a run started")


@pytest.mark.parametrize("command,seeds", [("compare", "501"), ("sweep", "41")])
def test_compare_and_sweep_say_their_threads_first(command, seeds, tmp_path, monkeypatch, capsys, keep_threads):
    """The thread line comes first, before the command refuses the run count (so no run is trained)."""
    monkeypatch.setattr(compare_lib, "train_or_continue", _no_training)
    monkeypatch.setattr(grid_lib, "train_or_continue", _no_training)
    argv = [command, "--preset", "smoke", "--seeds", seeds, "--steps", "2", "--no-progress", "--out", str(tmp_path)]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    with pytest.raises(SystemExit):
        cli.main(argv)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"sfpo {command}: 1 torch thread(s) (chosen: a 0.53M-parameter model"), first
    assert torch.get_num_threads() == 1

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert capsys.readouterr().out.splitlines()[0].startswith(f"sfpo {command}: 2 torch thread(s) (OMP_NUM_THREADS=2)")
    assert torch.get_num_threads() == 2


def test_train_says_its_threads_first_and_a_bad_omp_value_is_one_line(tmp_path, monkeypatch, capsys, keep_threads):
    model = write_tiny_model(str(tmp_path / "model"))
    (tmp_path / "broken.parquet").write_text("not parquet")
    argv = ["train", "--preset", "smoke", f"actor_rollout_ref.model.path={model}"]
    argv += ["data.train_files=broken.parquet", "data.val_files=broken.parquet"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with pytest.raises(SystemExit):  # the unreadable data stops it after the first line
        cli.main(argv)
    first = capsys.readouterr().out.splitlines()[0]
    tiny = threads.safetensors_parameters(model)
    assert first.startswith(f"sfpo train: 1 torch thread(s) (chosen: a {tiny / 1e6:.2f}M-parameter model"), first

    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert (
        captured.err.strip()
        == "sfpo train: error: OMP_NUM_THREADS='two': must be a whole number >= 1 (the torch thread count)"
    )
    assert not captured.out


def _busy_loops() -> int:
    """Processes running the measurement's busy loop (``python -c "while True: pass"``)."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            count += b"while True: pass" in cmdline.read_bytes()
        except OSError:
            continue
    return count


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="counts processes through /proc")
def test_the_measurement_runs_a_whole_command_beside_a_busy_process_and_stops_it(tmp_path):
    """bench/measure/measure_threads.py at its smallest: one busy-machine run of one step with 1 thread."""
    root = Path(__file__).resolve().parents[2]
    before = _busy_loops()
    out = tmp_path / "out"
    argv = ["--steps", "1", "--rounds", "1", "--threads", "1", "--conditions", "busy", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "measure" / "measure_threads.py"), *argv],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert _busy_loops() == before  # the busy process is gone
    with open(out / "threads.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["condition"], row["threads"], row["reported_threads"], row["exit_code"]) == ("busy", "1", "1", "0")
    assert row["iterations"] == "1" and float(row["wall_s"]) > 0 and float(row["cpu_s"]) > 0
    assert row["command"].startswith("OMP_NUM_THREADS=1 python -m sfpo_train.cli train trainer.total_training_steps=1")
    assert "| one busy process added | 1 | 1 |" in (out / "threads.md").read_text()
    prov = json.loads((out / "threads.provenance.json").read_text())
    assert prov["commands"][0]["torch_threads"] == 1 and prov["settings"]["conditions"] == ["busy"]
    assert str(tmp_path) not in json.dumps(prov) + row["command"]  # shown as OUT
