"""The standalone trainer end to end on CPU: a real (tiny, random) Qwen2 model, real parquet data, real generate.

Every run is seeded, so two runs that must agree are compared bit for bit.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch

import sfpo_train.trainer.config as config_lib
from sfpo_train.trainer import Trainer, latest_checkpoint
from tests.helpers.cli import run_cli
from tests.helpers.tiny_setup import write_data, write_tiny_model
from tests.helpers.trainer_parts import actor_with

VERL_METRICS = (
    "actor/pg_loss",
    "actor/pg_clipfrac",
    "actor/pg_clipfrac_lower",
    "actor/ppo_kl",
    "actor/entropy",
    "actor/grad_norm",
    "actor/lr",
    "critic/score/mean",
    "critic/score/max",
    "critic/score/min",
    "critic/advantages/mean",
    "response_length/mean",
    "response_length/clip_ratio",
    "prompt_length/mean",
    "timing_s/gen",
    "timing_s/reward",
    "timing_s/old_log_prob",
    "timing_s/adv",
    "timing_s/update_actor",
    "timing_s/step",
    "perf/total_num_tokens",
    "perf/throughput",
    "perf/time_per_step",
    "training/global_step",
    "training/epoch",
)
SFPO_METRICS = (
    "sfpo/alpha",
    "sfpo/zscore",
    "sfpo/triggered",
    "timing_s/sfpo_snapshot",
    "timing_s/sfpo_fast",
    "timing_s/sfpo_reposition",
    "timing_s/sfpo_slow",
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised Qwen2 smaller than the shipped one, with the addition tokenizer."""
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    return write_data(str(tmp_path_factory.mktemp("data")))


def make_config(tiny_model_dir, data_files, tmp_path, *overrides, name="run", preset="smoke", algorithm="grpo"):
    base = [
        f"actor_rollout_ref.model.path={tiny_model_dir}",
        f"data.train_files={data_files[0]}",
        f"data.val_files={data_files[1]}",
        f"trainer.default_local_dir={tmp_path}",
        f"trainer.experiment_name={name}",
        "trainer.progress_bar=false",
    ]
    return config_lib.load_config(preset, base + list(overrides), algorithm)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


# --------------------------------------------------------------------------- end to end


def test_smoke_run_writes_verl_metrics_and_run_files(tiny_model_dir, data_files, tmp_path):
    cfg = make_config(tiny_model_dir, data_files, tmp_path, "trainer.save_freq=2", "trainer.test_freq=2")
    trainer = Trainer.create(cfg)
    history = trainer.fit()
    assert len(history) == 3
    for metrics in history:
        missing = [k for k in VERL_METRICS + SFPO_METRICS if k not in metrics]
        assert not missing, missing
        assert 0.0 <= metrics["critic/score/mean"] <= 1.0
        assert all(math.isfinite(metrics[k]) for k in ("actor/pg_loss", "actor/entropy", "actor/grad_norm"))
    assert [m["training/global_step"] for m in history] == [1, 2, 3]
    assert history[0]["sfpo/alpha"] == 0.8 and history[0]["sfpo/inner_steps_run"] == 3
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["training/global_step"] for r in rows] == [0, 1, 2, 3]  # 0: validation before training
    val_key = "val-core/sfpo/addition/reward/mean@1"
    assert val_key in rows[0] and val_key in rows[2] and val_key in rows[3] and val_key not in rows[1]
    table = pd.read_csv(run / "metrics.csv")
    assert len(table) == 4 and "actor/pg_loss" in table.columns
    saved = config_lib.config_from_yaml(str(run / "config.yaml"))
    assert saved.actor_rollout_ref.model.path == tiny_model_dir
    assert latest_checkpoint(str(run)).endswith("global_step_3")  # save_freq 2 and the last step
    assert (run / "checkpoints" / "global_step_2" / "model" / "config.json").exists()


def test_sfpo_disabled_and_alpha_zero_give_the_same_weights(tiny_model_dir, data_files, tmp_path):
    grpo = Trainer.create(
        make_config(
            tiny_model_dir,
            data_files,
            tmp_path,
            "actor_rollout_ref.actor.sfpo.enable=false",
            "trainer.val_before_train=false",
            name="grpo",
        )
    )
    grpo_history = grpo.fit()
    alpha0 = Trainer.create(
        make_config(
            tiny_model_dir,
            data_files,
            tmp_path,
            "actor_rollout_ref.actor.sfpo.alpha=0",
            "trainer.val_before_train=false",
            name="alpha0",
        )
    )
    alpha0_history = alpha0.fit()
    assert_same_weights(weights(grpo), weights(alpha0))
    assert [h["actor/pg_loss"] for h in grpo_history] == [h["actor/pg_loss"] for h in alpha0_history]
    assert all(h["sfpo/inner_steps_run"] == 0 for h in alpha0_history)
    sfpo = Trainer.create(
        make_config(tiny_model_dir, data_files, tmp_path, "trainer.val_before_train=false", name="sfpo")
    )
    sfpo.fit()
    assert any(not torch.equal(a, b) for a, b in zip(weights(grpo).values(), weights(sfpo).values()))


@pytest.mark.parametrize("algorithm", ["grpo", "drgrpo"])
def test_resume_reaches_the_weights_of_an_uninterrupted_run(tiny_model_dir, data_files, tmp_path, algorithm):
    common = (
        "trainer.total_training_steps=4",
        "trainer.save_freq=2",
        "actor_rollout_ref.actor.shuffle=true",
        "actor_rollout_ref.actor.optim.lr_scheduler_type=cosine",
        "actor_rollout_ref.actor.optim.lr_warmup_steps=1",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "data.train_batch_size=8",
    )  # epoch boundary at step 8: not reached
    whole = Trainer.create(
        make_config(tiny_model_dir, data_files, tmp_path, *common, name="whole", algorithm=algorithm)
    )
    whole_history = whole.fit()

    cut = Trainer.create(make_config(tiny_model_dir, data_files, tmp_path, *common, name="cut", algorithm=algorithm))
    cut.fit(stop_after=3)  # "killed" after step 3: the latest checkpoint is step 2, step 3 is redone
    del cut
    resumed = Trainer.resume(str(tmp_path / "cut"))
    assert resumed.global_step == 2
    resumed_history = resumed.fit()
    assert_same_weights(weights(whole), weights(resumed))
    assert resumed_history[-1]["actor/pg_loss"] == whole_history[-1]["actor/pg_loss"]
    assert resumed.sfpo.state_dict() == whole.sfpo.state_dict()
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["training/global_step"] for r in rows] == [0, 1, 2, 3, 4]  # the redone step 3 logged once


def test_lr_scheduler_steps_once_per_iteration(tiny_model_dir, data_files, tmp_path):
    cfg = make_config(
        tiny_model_dir,
        data_files,
        tmp_path,
        "actor_rollout_ref.actor.optim.lr_warmup_steps=3",
        "actor_rollout_ref.actor.optim.lr=0.3",
        "trainer.val_before_train=false",
    )
    history = Trainer.create(cfg).fit()
    # verl's warm-up starts at lr 0; K+1 passes per iteration, one scheduler step
    assert [h["actor/lr"] for h in history] == pytest.approx([0.0, 0.1, 0.2])


def test_dynamic_sampling_refills_the_batch_with_informative_groups(tiny_model_dir, data_files, tmp_path):
    reward = tmp_path / "reward.py"
    # odd prompts: the response's parity (varies within a group); even prompts: always 0 (dropped)
    reward.write_text(
        "import zlib\n"
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return float(extra_info['index'] % 2 == 1 and zlib.crc32(solution_str.encode()) % 2 == 1)\n"
    )
    cfg = make_config(
        tiny_model_dir,
        data_files,
        tmp_path,
        f"custom_reward_function.path={reward}",
        "trainer.val_before_train=false",
        algorithm="dapo",
    )
    assert cfg.actor_rollout_ref.actor.clip_ratio_high == 0.28 and cfg.algorithm.filter_groups.enable
    trainer = Trainer.create(cfg)
    batch, metrics, generated = trainer.collector.collect()
    n, want = cfg.actor_rollout_ref.rollout.n, cfg.data.train_batch_size
    groups = batch.scores.view(-1, n)
    assert groups.shape == (want, n)
    assert bool((groups.amax(1) != groups.amin(1)).all())
    assert metrics["train/num_gen_batches"] >= 2  # half of every generation batch is dropped
    assert trainer.sampler.position == want * int(metrics["train/num_gen_batches"])
    assert generated == want * n * int(metrics["train/num_gen_batches"])  # dropped groups count as generated
    history = trainer.fit()
    assert all(h["train/num_gen_batches"] >= 2 for h in history)


def test_dynamic_sampling_gives_up_with_a_clear_error(tiny_model_dir, data_files, tmp_path):
    reward = tmp_path / "zero.py"
    reward.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n    return 0.0\n")
    cfg = make_config(
        tiny_model_dir,
        data_files,
        tmp_path,
        f"custom_reward_function.path={reward}",
        "algorithm.filter_groups.max_num_gen_batches=2",
        "trainer.val_before_train=false",
        algorithm="dapo",
    )
    with pytest.raises(RuntimeError, match="kept 0 of the 4 groups it needs after 2 generation batches"):
        Trainer.create(cfg).fit()


def test_kl_loss_against_the_reference_model(tiny_model_dir, data_files, tmp_path):
    cfg = make_config(
        tiny_model_dir,
        data_files,
        tmp_path,
        "actor_rollout_ref.actor.use_kl_loss=true",
        "actor_rollout_ref.actor.kl_loss_coef=0.1",
        "trainer.val_before_train=false",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "actor_rollout_ref.actor.sfpo.enable=false",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    )  # one optimizer step per iteration
    history = Trainer.create(cfg).fit()
    assert all("actor/kl_loss" in h and "timing_s/ref" in h for h in history)
    assert history[0]["actor/kl_loss"] == pytest.approx(0.0, abs=1e-6)  # first pass: policy == reference
    assert history[-1]["actor/kl_loss"] > 0.0


# --------------------------------------------------------------------------- bad input, before any work


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.train_batch_sise=4", "unknown config key 'data.train_batch_sise'; did you mean data.train_batch_size"),
        ("actor_rollout_ref.actor.optim.lr=fast", "bad value for actor_rollout_ref.actor.optim.lr"),
        (
            "actor_rollout_ref.actor.ppo_mini_batch_size=3",
            "ppo_mini_batch_size must be a divisor of data.train_batch_size",
        ),
        ("actor_rollout_ref.actor.ppo_mini_batch_size=8", "ppo_mini_batch_size must be <= data.train_batch_size"),
        ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3", "ppo_micro_batch_size_per_gpu must be a divisor"),
        ("data.train_files=/nonexistent/train.parquet", "data.train_files must be an existing path"),
        ("actor_rollout_ref.model.path=/nonexistent/model", "actor_rollout_ref.model.path must be an existing path"),
        ("actor_rollout_ref.actor.sfpo.alpha=1.5", "actor_rollout_ref.actor.sfpo.alpha must be in [0, 1], got 1.5"),
        (
            "actor_rollout_ref.actor.kernel_backend=bogus",
            "actor_rollout_ref.actor.kernel_backend must be null or one of triton, torch",
        ),
        (
            "actor_rollout_ref.actor.kernel_backend=cuda",
            "actor_rollout_ref.actor.kernel_backend must be null or one of",
        ),
        ("actor_rollout_ref.actor.clip_ratio_low=1.5", "actor_rollout_ref.actor.clip_ratio_low must be in [0, 1)"),
        ("actor_rollout_ref.actor.kl_loss_type=k9", "actor_rollout_ref.actor.kl_loss_type='k9' is not supported"),
        ("actor_rollout_ref.actor.loss_agg_mode=mean", "loss_agg_mode='mean' is not supported"),
        ("actor_rollout_ref.rollout.n=0", "actor_rollout_ref.rollout.n must be >= 1"),
        ("trainer.device=tpu", "trainer.device must be one of"),
        ("actor_rollout_ref.actor.sfpo.trigger=sideways", "trigger must be one of up, abs, down"),
        ("not_a_key_value", "must look like key=value"),
        ("actor_rollout_ref.actor.optim.eps=-1", "actor_rollout_ref.actor.optim.eps must be > 0"),
        ("actor_rollout_ref.actor.optim.weight_decay=-1", "actor_rollout_ref.actor.optim.weight_decay must be >= 0"),
        (
            "actor_rollout_ref.rollout.val_kwargs.top_p=7",
            "actor_rollout_ref.rollout.val_kwargs.top_p must be in (0, 1]",
        ),
        ("actor_rollout_ref.rollout.val_kwargs.temperature=-1", "val_kwargs.temperature must be >= 0"),
        ("actor_rollout_ref.model.attn_implementation=bogus", "attn_implementation must be one of sdpa"),
        ("trainer.experiment_name=../escape", "trainer.experiment_name must be a plain directory name"),
        ("trainer.experiment_name=.", "trainer.experiment_name must be a plain directory name"),
    ],
)
def test_bad_config_is_rejected_before_any_work(tiny_model_dir, data_files, tmp_path, override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Trainer.create(make_config(tiny_model_dir, data_files, tmp_path, override))
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_paths_and_data_are_named(tiny_model_dir, data_files, tmp_path):
    with pytest.raises(ValueError, match="is not a transformers model directory"):
        Trainer.create(make_config(tiny_model_dir, data_files, tmp_path, f"actor_rollout_ref.model.path={tmp_path}"))
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"question": ["1+1="]}).to_parquet(bad)
    with pytest.raises(
        ValueError, match=r"data.train_files=.*lacks column\(s\) \['prompt', 'data_source', 'reward_model'\]"
    ):
        Trainer.create(make_config(tiny_model_dir, data_files, tmp_path, f"data.train_files={bad}"))
    with pytest.raises(ValueError, match="the prompt has 8 tokens, more than data.max_prompt_length=4"):
        Trainer.create(make_config(tiny_model_dir, data_files, tmp_path, "data.max_prompt_length=4"))
    assert not (tmp_path / "run").exists()


def test_a_reward_function_that_raises_is_named_with_the_sample(tiny_model_dir, data_files, tmp_path):
    reward = tmp_path / "broken.py"
    reward.write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n    return int(solution_str)\n"
    )  # fails on a non-number response
    cfg = make_config(tiny_model_dir, data_files, tmp_path, f"custom_reward_function.path={reward}")
    with pytest.raises(
        ValueError,
        match=r"the reward function raised on sample \d+ \(data_source='sfpo/addition', "
        r"prompt='\d+\+\d+=', response=.*\): ValueError",
    ):
        Trainer.create(cfg).fit()
    with pytest.raises(ValueError, match="custom_reward_function.name='score' is not a function"):
        Trainer.create(
            make_config(
                tiny_model_dir,
                data_files,
                tmp_path,
                f"custom_reward_function.path={reward}",
                "custom_reward_function.name=score",
                name="other",
            )
        )


def test_existing_runs_are_not_overwritten_and_resume_checks_its_input(tiny_model_dir, data_files, tmp_path):
    cfg = make_config(tiny_model_dir, data_files, tmp_path, "trainer.total_training_steps=1")
    Trainer.create(cfg).fit()
    with pytest.raises(ValueError, match="already holds a run: continue it with --resume"):
        Trainer.create(make_config(tiny_model_dir, data_files, tmp_path))
    with pytest.raises(ValueError, match="not a run directory"):
        Trainer.resume(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="has no checkpoint yet"):
        Trainer.resume(str(tmp_path / "run"))  # smoke preset: save_freq -1
    with pytest.raises(ValueError, match="data.train_batch_size cannot change in a resumed run"):
        Trainer.resume(str(tmp_path / "run"), ["data.train_batch_size=8"])


# --------------------------------------------------------------------------- the command line


def test_random_init_with_override_config_shapes_a_fresh_model(tiny_model_dir, data_files, tmp_path):
    overrides = "{num_hidden_layers:3,hidden_size:16,intermediate_size:32,num_attention_heads:2,num_key_value_heads:1}"
    cfg = make_config(
        tiny_model_dir,
        data_files,
        tmp_path,
        "actor_rollout_ref.model.random_init=true",
        f"actor_rollout_ref.model.override_config={overrides}",
        "trainer.total_training_steps=1",
    )
    trainer = Trainer.create(cfg)
    assert trainer.model.config.num_hidden_layers == 3 and len(trainer.model.model.layers) == 3
    assert trainer.model.config.hidden_size == 16
    again = Trainer.create(
        make_config(
            tiny_model_dir,
            data_files,
            tmp_path,
            "actor_rollout_ref.model.random_init=true",
            f"actor_rollout_ref.model.override_config={overrides}",
            name="again",
        )
    )
    assert_same_weights(weights(trainer), weights(again))  # seeded initialisation
    trainer.fit()
    with pytest.raises(ValueError, match=r"override_config: \['hidden_sise'\] are not entries of Qwen2Config"):
        Trainer.create(
            make_config(
                tiny_model_dir,
                data_files,
                tmp_path,
                "actor_rollout_ref.model.random_init=true",
                "actor_rollout_ref.model.override_config={hidden_sise:16}",
                name="typo",
            )
        )


def test_resume_after_a_real_kill(tiny_model_dir, data_files, tmp_path):
    """SIGKILL a real ``sfpo train`` mid-run, once its first checkpoint exists; ``--resume`` must land on the
    uninterrupted weights.

    The kill is sent as soon as the poll sees the step-2 checkpoint (every 10 ms), with 14 of the 16 steps
    still to run (~30 ms each on this model, plus 7 checkpoints), so it lands mid-run; the test then checks
    that it did: the child died of the SIGKILL and the run's final checkpoint was never written.
    """
    import signal
    import time

    from safetensors.torch import load_file

    steps = 16
    args = [
        "train",
        "--preset",
        "smoke",
        f"actor_rollout_ref.model.path={tiny_model_dir}",
        f"data.train_files={data_files[0]}",
        f"data.val_files={data_files[1]}",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=2",
        "trainer.progress_bar=false",
        f"trainer.default_local_dir={tmp_path}",
    ]
    assert run_cli(*args, "trainer.experiment_name=whole").returncode == 0
    killed = tmp_path / "killed"
    final = f"checkpoints/global_step_{steps}/model/model.safetensors"
    with open(tmp_path / "killed.stderr", "w+") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sfpo_train.cli", *args, "trainer.experiment_name=killed"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 300
        while latest_checkpoint(str(killed)) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stderr.seek(0)
        assert proc.returncode == -signal.SIGKILL, f"it ended before the kill (rc {proc.returncode}):\n{stderr.read()}"
    reached = latest_checkpoint(str(killed))
    assert reached is not None, "killed before the first checkpoint: nothing to resume from"
    assert not (killed / "checkpoints" / f"global_step_{steps}").exists(), f"the run finished (latest: {reached})"
    out = run_cli("train", "--resume", str(killed))
    assert out.returncode == 0, out.stderr
    a, b = load_file(str(tmp_path / "whole" / final)), load_file(str(killed / final))
    assert_same_weights(a, b)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["training/global_step"] for r in rows] == list(range(steps + 1))


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_does_not_depend_on_the_micro_batch_size(tiny_model_dir, data_files, tmp_path, mode):
    """verl normalises by the mini-batch's tokens / rows, so splitting a mini-batch changes nothing but rounding.

    One update pass on one batch whose responses have 1-5 tokens, at lr 0 (the weights stay put, the
    gradient norm is measured before the step), with micro-batches of 1, 4 and 16 responses.
    """
    cfg = make_config(
        tiny_model_dir,
        data_files,
        tmp_path,
        f"actor_rollout_ref.actor.loss_agg_mode={mode}",
        "actor_rollout_ref.actor.optim.lr=0",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.optim.clip_grad=1e9",
    )
    trainer = Trainer.create(cfg)
    batch, _, _ = trainer.collector.collect()
    lengths = torch.arange(len(batch.scores)) % 5 + 1
    batch.response_mask = (torch.arange(batch.responses.shape[1])[None, :] < lengths[:, None]).long()
    batch.old_log_probs, _ = trainer.actor.log_probs(trainer.model, batch, 16)
    batch.old_log_probs = batch.old_log_probs - 0.1 * torch.rand_like(batch.old_log_probs)  # some ratios clip
    batch.advantages = torch.randn(len(batch.scores))[:, None] * batch.response_mask
    results = {}
    for micro in (1, 4, 16):  # an actor per micro-batch size, on the same model and optimizer
        actor = actor_with(trainer, f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}")
        assert actor.settings.micro_batch_rows == micro
        metrics = actor.update_pass(batch).metrics
        results[micro] = (metrics["actor/grad_norm"], metrics["actor/pg_loss"], metrics["actor/pg_clipfrac"])
    assert results[1][0] > 0
    for micro in (4, 16):
        assert results[micro] == pytest.approx(results[1], rel=1e-4, abs=1e-7), (micro, results)


def test_dynamic_sampling_filters_on_a_reward_dicts_acc(tiny_model_dir, data_files, tmp_path):
    reward = tmp_path / "acc_reward.py"
    reward.write_text(
        "import zlib\n"
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return {'score': 0.0, 'acc': zlib.crc32(solution_str.encode()) % 2 == 1}\n"
    )
    common = (
        f"custom_reward_function.path={reward}",
        "trainer.val_before_train=false",
        "algorithm.filter_groups.max_num_gen_batches=2",
    )
    trainer = Trainer.create(
        make_config(
            tiny_model_dir,
            data_files,
            tmp_path,
            *common,
            "algorithm.filter_groups.metric=acc",
            algorithm="dapo",
            name="acc",
        )
    )
    batch, _, _ = trainer.collector.collect()
    assert batch.scores.shape == (16,) and float(batch.scores.abs().sum()) == 0.0  # kept: acc differs, score does not
    with pytest.raises(RuntimeError, match="kept 0 of the 4 groups"):
        Trainer.create(
            make_config(
                tiny_model_dir,
                data_files,
                tmp_path,
                *common,
                "algorithm.filter_groups.metric=score",
                algorithm="dapo",
                name="score",
            )
        ).fit()
