"""StageProfiler: stage times add up to the step, memory readings are present, nesting keeps peaks.

No test here bounds how long anything takes (that is bench/test_bench_training.py's job, which
also records ``perf/profiler_overhead_frac`` and ``timing_s/other``). The unit tests drive the
profiler with a clock that only moves when the test moves it, so every time is an exact sum of
dyadic seconds and is compared with ``==``; the trainer tests run real (tiny) SFPO iterations on
the CPU and check only what holds at any speed: keys, nesting and the sum to the step.
"""

from __future__ import annotations

import time

import pytest
import torch

import sfpo_train.trainer.config as config_lib
from sfpo_train.trainer import Trainer
from sfpo_train.trainer.profiler import GB, StageProfiler, nvml_handle
from tests.helpers.devices import requires_cuda
from tests.helpers.manual_clock import ManualClock
from tests.helpers.tiny_setup import tiny_overrides, write_data, write_tiny_model

TOP_LEVEL = ("gen", "reward", "old_log_prob", "adv", "update_actor", "sync_weights")
SFPO_STAGES = ("sfpo_snapshot", "sfpo_fast", "sfpo_reposition", "sfpo_slow")


@pytest.fixture
def clock(monkeypatch):
    manual = ManualClock()
    monkeypatch.setattr(time, "perf_counter", manual)
    return manual


def test_stages_nest_accumulate_and_add_up_to_the_step(clock):
    prof = StageProfiler(torch.device("cpu"))
    with prof.stage("step"):
        for seconds in (0.25, 0.5):  # entered twice: accumulates
            with prof.stage("gen"):
                clock.advance(seconds)
        with prof.stage("update_actor"):
            clock.advance(0.125)
            with prof.stage("optimizer"):
                clock.advance(0.0625)
        prof.add_time("sfpo_fast", 0.5)  # timed elsewhere: reported, not a child of step
        clock.advance(0.03125)  # between stages: unattributed
    out = prof.collect()
    assert {k for k in out if k.startswith("timing_s/")} == {
        f"timing_s/{s}" for s in ("step", "gen", "update_actor", "optimizer", "sfpo_fast", "other")
    }
    assert out["timing_s/gen"] == 0.75
    assert out["timing_s/optimizer"] == 0.0625
    assert out["timing_s/update_actor"] == 0.125 + 0.0625  # a child's time lies inside its parent's
    assert out["timing_s/sfpo_fast"] == 0.5
    assert out["timing_s/step"] == 0.75 + 0.1875 + 0.03125  # add_time is not part of the step's span
    assert out["timing_s/other"] == 0.03125  # only the direct children count: optimizer is not subtracted twice
    assert out["timing_s/gen"] + out["timing_s/update_actor"] + out["timing_s/other"] == out["timing_s/step"]
    assert {k for k in out if k.startswith("memory/")} == {
        f"memory/{s}/rss_gb" for s in ("step", "gen", "update_actor", "optimizer")
    }
    for stage in ("step", "gen", "update_actor", "optimizer"):
        assert out[f"memory/{stage}/rss_gb"] > 0, stage
    assert out["perf/cpu_memory_used_gb"] > 0 and out["perf/cpu_memory_peak_gb"] >= out["perf/cpu_memory_used_gb"] * 0.5
    assert out["perf/profiler_overhead_s"] == 0.0  # the clock never moved inside the profiler's bookkeeping
    assert out["perf/profiler_overhead_frac"] == 0.0
    assert not any(k.startswith("perf/max_memory") for k in out)  # CUDA readings only on CUDA

    again = prof.collect()  # a new iteration starts empty
    assert not any(k.startswith(("timing_s/", "memory/")) for k in again)


def test_a_stage_that_raises_is_still_recorded(clock):
    prof = StageProfiler(torch.device("cpu"))
    with pytest.raises(RuntimeError), prof.stage("step"):
        clock.advance(0.5)
        with prof.stage("gen"):
            clock.advance(0.25)
            raise RuntimeError("boom")
    out = prof.collect()
    assert "memory/gen/rss_gb" in out
    assert (out["timing_s/gen"], out["timing_s/step"], out["timing_s/other"]) == (0.25, 0.75, 0.5)


class _QueuedWorkProfiler(StageProfiler):
    """The CUDA code path on the CPU: a sync moves the clock by the queued "GPU work"; memory hooks are no-ops."""

    def __init__(self, clock: ManualClock):
        super().__init__(torch.device("cpu"), use_nvml=False)
        self.cuda = True
        self.clock = clock
        self.queued_s = 0.0

    def _sync(self) -> None:
        self.clock.advance(self.queued_s)
        self.queued_s = 0.0

    def _reset_peaks(self) -> None:
        pass

    def _fold_peaks(self, stages) -> None:
        pass


def test_sync_waits_are_not_counted_as_overhead(clock):
    prof = _QueuedWorkProfiler(clock)
    with prof.stage("step"), prof.stage("update_actor"):
        prof.queued_s = 0.25  # the backward, still running on the device
        with prof.stage("optimizer"):  # entering waits for it
            prof.queued_s = 0.125  # the optimizer's own kernels: waited for when it ends
    out = prof.collect()
    assert out["timing_s/optimizer"] == 0.125  # the wait on exit is the stage's own work
    assert out["timing_s/update_actor"] == 0.25 + 0.125  # the wait on entry is the enclosing stage's work
    assert out["perf/profiler_overhead_s"] == 0.0  # neither wait is bookkeeping


def test_no_nvml_off_cuda():
    assert nvml_handle(torch.device("cpu")) is None
    assert not StageProfiler(torch.device("cpu")).has_nvml


@requires_cuda
def test_cuda_peaks_fold_into_the_enclosing_stage_and_nvml_reads():
    device = torch.device("cuda")
    prof = StageProfiler(device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    with prof.stage("step"):
        big = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 256 MiB, freed before the child
        del big
        with prof.stage("small"):
            small = torch.empty(2**20, dtype=torch.uint8, device=device)
            del small
    out = prof.collect()
    assert out["memory/step/max_allocated_gb"] * GB >= base + 256 * 2**20  # the child's reset did not lose it
    assert out["memory/small/max_allocated_gb"] * GB < base + 256 * 2**20
    assert out["perf/max_memory_allocated_gb"] == out["memory/step/max_allocated_gb"]
    if prof.has_nvml:
        assert out["memory/step/device_used_gb"] > 0 and 0 <= out["memory/step/gpu_util_pct"] <= 100


@pytest.fixture(scope="module")
def sfpo_history(tmp_path_factory):
    root = tmp_path_factory.mktemp("profiled")
    model = write_tiny_model(str(root / "model"))
    data = write_data(str(root))
    cfg = config_lib.load_config(
        "smoke",
        tiny_overrides(model, data)
        + [
            f"trainer.default_local_dir={root}",
            "trainer.experiment_name=run",
            "trainer.progress_bar=false",
            "trainer.total_training_steps=2",
            "trainer.val_before_train=false",
        ],
    )
    return Trainer.create(cfg).fit()


def test_trainer_stage_times_add_up_to_the_step(sfpo_history):
    assert len(sfpo_history) == 2
    for m in sfpo_history:
        assert m["sfpo/inner_steps_run"] == 3  # SFPO ran: fast passes, reposition and slow pass were timed
        top = sum(m[f"timing_s/{s}"] for s in TOP_LEVEL)
        assert top + m["timing_s/other"] == pytest.approx(m["timing_s/step"], rel=1e-9)
        # SFPO's own laps lie inside update_actor; the optimizer steps inside the fast and slow passes
        assert sum(m[f"timing_s/{s}"] for s in SFPO_STAGES) <= m["timing_s/update_actor"]
        assert 0 < m["timing_s/optimizer"] <= m["timing_s/sfpo_fast"] + m["timing_s/sfpo_slow"]
        assert all(m[f"timing_s/{s}"] > 0 for s in SFPO_STAGES)


def test_trainer_memory_and_overhead_are_logged(sfpo_history):
    for m in sfpo_history:
        for stage in (*TOP_LEVEL, "optimizer", "step"):
            assert m[f"memory/{stage}/rss_gb"] > 0, stage
        assert m["perf/cpu_memory_used_gb"] > 0
        assert m["perf/profiler_overhead_frac"] == pytest.approx(m["perf/profiler_overhead_s"] / m["timing_s/step"])
    last = sfpo_history[-1]  # validated at the last step: the testing stage is timed and measured too
    assert last["timing_s/testing"] > 0 and last["memory/testing/rss_gb"] > 0
