"""One whole training iteration of the standalone trainer, GRPO against SFPO (K=3, alpha 0.8), stage by stage.

Each round is one ``Trainer.train_step()``: generation, reward, old log-probs,
advantages, the update (GRPO: one pass; SFPO: snapshot, K fast passes,
reposition, slow pass), weight sync -- timed per stage by the trainer's own
:class:`sfpo_train.trainer.profiler.StageProfiler` (the GPU synchronised at every stage
boundary). ``extra_info`` holds the mean seconds of every stage over the
measured rounds (``timing_s/<stage>``), each stage's largest memory reading
(``memory/<stage>/<reading>``: torch's peak allocated on CUDA, process RSS on the
CPU), the run's peak and the profiler's own overhead.

Model: on the CPU the tiny test Qwen2 (hidden 32, 1 layer) on the ``smoke``
preset (4 prompts x 4 responses); with a GPU the ``qwen2.5-0.5b`` preset
(Qwen2.5-0.5B's shapes, random weights, bf16 autocast, 64 prompts x 8).
``SFPO_BENCH_SIZE=tiny`` forces the CPU setup on a GPU machine too. The
entropy trigger is off so every SFPO round runs its K fast passes.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("SFPO_BENCH_SIZE") != "tiny"
ROUNDS, WARMUP = 3, 1  # a whole iteration per round: few rounds, the first (allocation, compilation) not timed
STAGES = (
    "gen",
    "reward",
    "old_log_prob",
    "adv",
    "update_actor",
    "sfpo_snapshot",
    "sfpo_fast",
    "sfpo_reposition",
    "sfpo_slow",
    "optimizer",
    "sync_weights",
    "other",
    "step",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``(preset, overrides, model description)`` shared by both arms."""
    root = tmp_path_factory.mktemp("bench_training")
    common = [
        f"trainer.default_local_dir={root}",
        "trainer.progress_bar=false",
        "trainer.val_before_train=false",
        "trainer.total_training_steps=100",
        "actor_rollout_ref.actor.sfpo.entropy_control=false",
    ]
    if ON_GPU:
        return "qwen2.5-0.5b", common, "qwen2.5-0.5b-shaped bf16"
    from tests.helpers.tiny_setup import tiny_overrides, write_data, write_tiny_model  # the tests' tiny model and data

    paths = tiny_overrides(write_tiny_model(str(root / "model")), write_data(str(root))) + ["trainer.device=cpu"]
    return "smoke", common + paths, "tiny qwen2 fp32 (hidden 32, 1 layer)"


@pytest.mark.parametrize("algo", ["grpo", "sfpo"])
def test_training_step(benchmark, setup, algo):
    _bench_step(benchmark, setup, algo, [f"trainer.experiment_name={algo}"], variant="default")


@pytest.mark.parametrize("head", ["logits", "fused_head"])
@pytest.mark.parametrize("old_log_probs", ["separate", "from_update"])
@pytest.mark.parametrize("algo", ["grpo", "sfpo"])
def test_training_step_on_policy(benchmark, setup, algo, old_log_probs, head):
    """The same iteration on-policy (one mini-batch: ``ppo_mini_batch_size = data.train_batch_size``), with the
    separate old-log-prob forward (``old_log_prob_from_update=false``) or without it (``auto``: the first
    update pass supplies the old log-probs), through the model's logits or the fused LM head
    (``actor_rollout_ref.model.fused_lm_head``). ``bench/measure/measure_old_log_prob_reuse.py`` compares the
    reuse interleaved in one process on the embedded default."""
    import sfpo_train.trainer.config as config_lib

    preset, overrides, _ = setup
    batch = config_lib.load_config(preset, overrides).data.train_batch_size
    mode = "auto" if old_log_probs == "from_update" else "false"
    _bench_step(
        benchmark,
        setup,
        algo,
        [
            f"trainer.experiment_name={algo}-on-policy-{old_log_probs}-{head}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}",
            f"actor_rollout_ref.actor.old_log_prob_from_update={mode}",
            f"actor_rollout_ref.model.fused_lm_head={head == 'fused_head'}",
        ],
        variant=f"on-policy, old log-probs {old_log_probs}, {head}",
    )
    benchmark.extra_info["fused_lm_head"] = head == "fused_head"
    assert benchmark.extra_info["old_log_prob_from_update"] == (old_log_probs == "from_update")


def _bench_step(benchmark, setup, algo: str, extra: list[str], variant: str) -> None:
    """One arm of one variant; ``bench/summary.py`` sets SFPO against GRPO within each ``variant``."""
    if os.environ.get("SFPO_POISON_ALLOCATIONS") == "1":
        pytest.skip("run bench/ in a pytest process of its own (tests/conftest.py poisons allocations)")
    import sfpo_train.trainer.config as config_lib
    from sfpo_train.trainer import Trainer

    preset, overrides, model = setup
    cfg = config_lib.load_config(preset, overrides + extra + [f"actor_rollout_ref.actor.sfpo.enable={algo == 'sfpo'}"])
    trainer = Trainer.create(cfg, preset=preset)
    history: list[dict] = []
    benchmark.pedantic(lambda: history.append(trainer.train_step()), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)

    measured = history[-ROUNDS:]
    info = benchmark.extra_info
    info.update(
        op="training_step",
        variant=variant,
        algo=algo,
        model=model,
        preset=preset,
        device=str(trainer.device),
        device_name=torch.cuda.get_device_name() if trainer.device.type == "cuda" else "cpu",
        prompts=cfg.data.train_batch_size,
        responses_per_prompt=cfg.actor_rollout_ref.rollout.n,
        inner_steps=int(measured[-1]["sfpo/inner_steps_run"]),
        alpha=float(measured[-1]["sfpo/alpha"]),
    )
    for stage in STAGES:
        info[f"timing_s/{stage}"] = statistics.fmean(m.get(f"timing_s/{stage}", 0.0) for m in measured)
    for key in sorted({k for m in measured for k in m if k.startswith("memory/")}):
        info[key] = max(m.get(key, 0.0) for m in measured)
    peak = "perf/max_memory_allocated_gb" if trainer.device.type == "cuda" else "perf/cpu_memory_used_gb"
    info["peak_memory_gb"] = max(m[peak] for m in measured)
    info["peak_memory_reading"] = "torch peak allocated" if trainer.device.type == "cuda" else "process RSS"
    info["profiler_overhead_frac"] = statistics.fmean(m["perf/profiler_overhead_frac"] for m in measured)
    info["old_log_prob_from_update"] = all(m["actor/old_log_prob_from_update"] == 1.0 for m in measured)
    info["ppo_mini_batch_size"] = cfg.actor_rollout_ref.actor.ppo_mini_batch_size
    assert all(m["sfpo/inner_steps_run"] == (3 if algo == "sfpo" else 0) for m in measured)
