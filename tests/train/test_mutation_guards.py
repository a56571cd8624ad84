"""The standalone trainer really repositions, and the profiler really counts its own bookkeeping.

Each test here fails when one specific piece of the product is switched off while
every other test still passes: Stage II skipped inside the trainer's SFPO step, and
the profiler's overhead accounting dropped (``perf/profiler_overhead_s`` stuck at 0).
Runs are one seeded iteration of the ``smoke`` preset on the tiny Qwen2 of
``tests/helpers/tiny_setup.py``, on the CPU (the torch backend, whatever machine
runs the tests), so two runs that share a fast trajectory share it bit for bit.
"""

from __future__ import annotations

import time

import pytest
import torch

import sfpo_train.trainer.config as config_lib
import sfpo_train.trainer.profiler as profiler_lib
from sfpo_train.trainer import Trainer
from sfpo_train.trainer.profiler import StageProfiler
from tests.helpers.manual_clock import ManualClock
from tests.helpers.tiny_setup import tiny_overrides, write_data, write_tiny_model

ALPHA = 0.5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    return write_tiny_model(str(root / "model")), write_data(str(root))


def one_iteration(tiny, tmp_path, name: str, *overrides: str) -> Trainer:
    model, data = tiny
    cfg = config_lib.load_config(
        "smoke",
        tiny_overrides(model, data)
        + [
            f"trainer.default_local_dir={tmp_path}",
            f"trainer.experiment_name={name}",
            "trainer.device=cpu",
            "trainer.progress_bar=false",
            "trainer.total_training_steps=1",
            "trainer.val_before_train=false",
            "actor_rollout_ref.actor.sfpo.backend=torch",
            *overrides,
        ],
    )
    return Trainer.create(cfg)


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}


def test_trainer_step_lands_on_the_reposition_of_the_fast_trajectory(tiny, tmp_path):
    """Without the slow pass one SFPO iteration ends at theta_0 + alpha (theta_K - theta_0), bit for bit.

    alpha = 1 keeps theta_K (no reposition), so that run gives theta_K; a run with
    alpha = 0.5 makes the same fast passes (alpha only enters Stage II) and must end
    half-way back to theta_0. A trainer that skipped Stage II would end at theta_K.
    """
    no_slow = "actor_rollout_ref.actor.sfpo.slow_correction=false"
    fast_only = one_iteration(tiny, tmp_path, "alpha1", no_slow, "actor_rollout_ref.actor.sfpo.alpha=1.0")
    theta_0 = trainable(fast_only)
    fast_only.fit()
    theta_k = trainable(fast_only)
    assert any(not torch.equal(theta_0[k], theta_k[k]) for k in theta_0), "the fast passes changed nothing"

    repositioned = one_iteration(tiny, tmp_path, "alpha05", no_slow, f"actor_rollout_ref.actor.sfpo.alpha={ALPHA}")
    assert trainable(repositioned).keys() == theta_0.keys()
    for k in theta_0:
        assert torch.equal(trainable(repositioned)[k], theta_0[k]), f"{k}: the runs start apart"
    (history,) = repositioned.fit()
    assert history["sfpo/alpha"] == ALPHA and history["sfpo/inner_steps_run"] == 3
    got = trainable(repositioned)
    expected = [t.clone() for t in theta_k.values()]
    torch._foreach_lerp_(expected, list(theta_0.values()), 1.0 - ALPHA)  # theta_0 + alpha (theta_K - theta_0)
    for (name, value), want in zip(got.items(), expected):
        assert torch.equal(value, want), f"{name} is not theta_0 + {ALPHA} (theta_K - theta_0)"


def test_profile_of_an_sfpo_step_holds_the_reposition(tiny, tmp_path):
    """torch.profiler's record of one trainer iteration holds Stage II's lerp, once per dtype group, timed.

    The torch backend repositions with one ``torch._foreach_lerp_`` per (device, dtype)
    group: the tiny fp32 model has one group and nothing else in the iteration calls it
    (the CPU AdamW steps each tensor on its own). With alpha = 1 there is no reposition.
    """
    counts, reposition_s = {}, {}
    for alpha in (ALPHA, 1.0):
        trainer = one_iteration(tiny, tmp_path, f"profiled{alpha}", f"actor_rollout_ref.actor.sfpo.alpha={alpha}")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            (history,) = trainer.fit()
        counts[alpha] = sum(e.count for e in prof.key_averages() if e.key == "aten::_foreach_lerp_")
        reposition_s[alpha] = history["timing_s/sfpo_reposition"]
        assert history["sfpo/inner_steps_run"] == 3 and history["timing_s/sfpo_slow"] > 0
        dtypes = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
        assert dtypes == {torch.float32}
    assert counts == {ALPHA: 1, 1.0: 0}
    assert reposition_s[ALPHA] > 0  # the stage is timed where it ran


class _BookkeepingProfiler(StageProfiler):
    """The CUDA code path on the CPU, whose peak-memory resets and reads take known times and sync waits none."""

    RESET_S = 0.0625
    READ_S = 0.03125

    def __init__(self, clock: ManualClock):
        super().__init__(torch.device("cpu"), use_nvml=False)
        self.cuda = True
        self.clock = clock

    def _sync(self) -> None:
        pass

    def _reset_peaks(self) -> None:
        self.clock.advance(self.RESET_S)

    def _fold_peaks(self, stages) -> None:
        self.clock.advance(self.READ_S)


def test_profiler_overhead_is_the_time_of_its_own_bookkeeping(monkeypatch):
    """Bookkeeping on entering and leaving a stage and in collect() is overhead, outside every stage's time."""
    clock = ManualClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    prof = _BookkeepingProfiler(clock)
    reset, read = prof.RESET_S, prof.READ_S
    peak_rss = profiler_lib.process_peak_rss_bytes

    def slow_peak_rss() -> int:  # the real reading, taking READ_S on the clock
        clock.advance(read)
        return peak_rss()

    monkeypatch.setattr(profiler_lib, "process_peak_rss_bytes", slow_peak_rss)
    with prof.stage("step"):  # entering: a reset (no enclosing stage to fold peaks into)
        with prof.stage("gen"):  # entering: step's peaks read, then a reset
            clock.advance(0.5)
        clock.advance(0.25)  # leaving gen read its peaks; leaving step will too
    out = prof.collect()
    assert out["perf/profiler_overhead_s"] == 2 * reset + 3 * read + read  # + collect()'s read of the peak RSS
    assert out["perf/cpu_memory_peak_gb"] > 0
    assert out["timing_s/gen"] == 0.5
    # gen's entry and exit bookkeeping happened inside step's span: step holds it, as unattributed time
    assert out["timing_s/step"] == 0.5 + 0.25 + reset + 2 * read
    assert out["timing_s/other"] == 0.25 + reset + 2 * read
    assert out["perf/profiler_overhead_frac"] == out["perf/profiler_overhead_s"] / out["timing_s/step"]
    assert prof.collect()["perf/profiler_overhead_s"] == read  # the next iteration starts from zero


def test_trainer_reports_a_positive_profiler_overhead(tiny, tmp_path):
    """With the real clock the profiler's reads of /proc and its dictionaries take measurable time."""
    (history,) = one_iteration(tiny, tmp_path, "overhead").fit()
    assert history["perf/profiler_overhead_s"] > 0
    assert 0 < history["perf/profiler_overhead_frac"] < 1
