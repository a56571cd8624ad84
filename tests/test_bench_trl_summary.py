"""The TRL rows in ``bench/summary.py``'s outputs (``bench/trl_summary.py``): each target's line says by how much it is
met or missed, a target whose rows did not run says so, and the memory target is judged only at its shape. Also the
CPU allocator's peak (``bench/cpu_memory.py``) that the loss rows report."""

from __future__ import annotations

import pandas as pd
import torch

from bench.cpu_memory import cpu_allocator_peak
from bench.summary import summary_lines
from bench.trl_summary import split_trl_rows, trl_section, trl_target_lines, verdict


def step_row(arm: str, median_ms: float, low_ms: float, high_ms: float, **extra) -> dict:
    trainer = "sfpo train" if arm.startswith("sfpo_train") else "trl"
    return {
        "extra_info.op": "trl_step",
        "extra_info.arm": arm,
        "extra_info.trainer": trainer,
        "extra_info.method": "sfpo" if "sfpo" in arm.removeprefix("sfpo_train") else "grpo",
        "extra_info.head": "sfpo_fused" if arm.endswith("fused") else "trl",
        "extra_info.activation_checkpointing": trainer == "trl" and not arm.endswith("no_ckpt"),
        "extra_info.prompts": 16,
        "extra_info.responses_per_prompt": 8,
        "extra_info.rounds": 15,
        "median_ms": median_ms,
        "stats.min": low_ms / 1e3,
        "stats.max": high_ms / 1e3,
        **{f"extra_info.{k}": v for k, v in extra.items()},
    }


def loss_row(impl: str, median_ms: float, peak_mib: float, n: int = 4096, v: int = 32768) -> dict:
    return {
        "extra_info.op": "trl_loss",
        "extra_info.impl": impl,
        "extra_info.n_tokens": n,
        "extra_info.vocab": v,
        "extra_info.rounds": 5,
        "extra_info.peak_alloc_bytes": peak_mib * 2**20,
        "extra_info.peak_alloc_mib": peak_mib,
        "median_ms": median_ms,
        "stats.min": median_ms / 1e3,
        "stats.max": median_ms / 1e3,
    }


SFPO_OWN = {
    "sfpo_own_share_median": 0.025,
    "sfpo_own_share_min": 0.02,
    "sfpo_own_share_max": 0.03,
    "sfpo_own_ms_median": 5.0,
    "timing_s/sfpo_snapshot_median": 0.001,
    "timing_s/sfpo_reposition_median": 0.001,
}


def full_run() -> pd.DataFrame:
    return pd.DataFrame(
        [
            step_row("trl_grpo", 100.0, 90.0, 110.0),
            step_row("trl_grpo_no_ckpt", 78.0, 75.0, 85.0),
            step_row("trl_grpo_fused", 95.0, 90.0, 100.0),
            step_row("trl_mu4", 190.0, 185.0, 195.0),
            step_row("trl_sfpo", 200.0, 190.0, 210.0, **SFPO_OWN),
            step_row("trl_sfpo_fused", 220.0, 210.0, 230.0),
            step_row("sfpo_train_grpo", 70.0, 65.0, 75.0),
            loss_row("trl", 1000.0, 2048.0),
            loss_row("sfpo_fused", 900.0, 200.0),
            {"extra_info.op": "reposition", "median_ms": 1.0},  # another benchmark's row in the same run
        ]
    )


def line_with(lines: list[str], text: str) -> str:
    (line,) = [line for line in lines if text in line]
    return line


def test_each_target_says_by_how_much_it_is_met_or_missed():
    lines = trl_target_lines(full_run())
    own = line_with(lines, "SFPO's own work")
    assert "2.50% of it" in own and "MISSED by 0.50 percentage points" in own
    assert "trl_sfpo - trl_mu4 (the same passes without SFPO) = +10.00 ms (+5.0% of the iteration)" in own
    grpo = line_with(lines, "own loss, GRPO iteration")
    assert "0.95x (range 0.82-1.11)" in grpo and "met by 0.05x" in grpo
    assert "MISSED by 0.10x" in line_with(lines, "own loss, SFPO iteration")
    assert "met by 0.10x" in line_with(lines, "loss + backward at N=4096 V=32768")
    memory = line_with(lines, "Peak memory")
    assert "2048.0 MiB / 200.0 MiB = 10.24x" in memory and "met by 2.24x" in memory
    standalone = line_with(lines, "sfpo train's GRPO iteration")
    assert "0.70x (range 0.59-0.83)" in standalone and "met by 0.10x" in standalone
    assert "without activation checkpointing (GRPOConfig turns it on; sfpo train has none): 0.90x" in standalone
    assert standalone.endswith("MISSED by 0.10x")


def test_targets_whose_rows_did_not_run_say_so_and_memory_is_judged_at_its_shape_only():
    frame = pd.DataFrame(
        [
            step_row("trl_grpo", 100.0, 90.0, 110.0),
            loss_row("trl", 10.0, 100.0, 512, 4096),
            loss_row("sfpo_fused", 9.0, 50.0, 512, 4096),
        ]
    )
    lines = trl_target_lines(frame)
    assert "not measured (trl_sfpo did not run)" in line_with(lines, "SFPO's own work")
    assert "not measured" in line_with(lines, "sfpo train's GRPO iteration")
    memory = line_with(lines, "Peak memory")
    assert "= 2.00x" in memory and "the target (>= 8x) is at N=4096 V=32768" in memory
    assert "met" not in memory and "MISSED" not in memory
    assert trl_target_lines(pd.DataFrame([{"extra_info.op": "reposition", "median_ms": 1.0}])) == []


def test_the_closing_summary_and_the_markdown_carry_the_trl_rows():
    frame = full_run()
    closing = summary_lines(frame, "cpu (x86_64, 2 threads)", [])
    assert any(line.startswith("- sfpo train's GRPO iteration") for line in closing)
    other, trl = split_trl_rows(frame)
    assert len(other) == 1 and len(trl) == 9
    section = trl_section(trl)
    arms = [line.split(" | ")[0].removeprefix("| ") for line in section.splitlines() if line.startswith("| trl_")]
    assert arms[:2] == ["trl_grpo", "trl_grpo_no_ckpt"]  # the arms in a fixed order, not by time
    assert "| trl_sfpo | trl | sfpo | trl | on | 16 x 8 | 200.0 (190.0-210.0) | 15 | 2.00 | 5.00 | 2.50% |" in section
    assert "| sfpo_fused | 4096 | 32768 | 900.0 (900.0-900.0) | 5 | 200.0 | - | 0.90 | 10.24 |" in section


def test_verdict_at_the_limit_is_met():
    assert verdict(0.8, 0.8, at_most=True) == "met by 0.00x"
    assert verdict(8.0, 8.0, at_most=False) == "met by 0.00x"
    assert verdict(7.5, 8.0, at_most=False) == "MISSED by 0.50x"


def test_cpu_allocator_peak_counts_what_one_call_holds_at_once():
    size = 2**20  # floats: 4 MiB a tensor

    def two_alive():
        a = torch.ones(size)
        b = torch.ones(size)  # a and b alive together: 8 MiB
        return float(a[0] + b[0])

    def one_at_a_time():
        for _ in range(2):
            torch.ones(size)  # freed before the next: 4 MiB at most

    both, single = cpu_allocator_peak(two_alive), cpu_allocator_peak(one_at_a_time)
    assert 8 * 2**20 <= both["peak_alloc_bytes"] < 9 * 2**20, both
    assert 4 * 2**20 <= single["peak_alloc_bytes"] < 5 * 2**20, single
