"""The short summary ``pytest bench/ --benchmark-only`` prints at its end (``bench.summary.summary_lines``) and the
Markdown of ``bench/summary.py``: sfpo against each baseline with the shapes named and the spread shown, what CPU
numbers cannot say, and why rows skipped; on the CPU the GRPO loss has its line (the torch backend)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from bench import summary
from bench.summary import CPU_NOTE, ratio_lines, skip_lines, summary_lines

ROOT = Path(__file__).resolve().parents[1]


def test_ratio_lines_set_sfpo_against_each_baseline_of_the_same_work():
    rows = [
        {
            "extra_info.op": "reposition",
            "extra_info.dtype": "float32",
            "extra_info.backend": "triton",
            "extra_info.impl": "sfpo_kernels.reposition_[triton]",
            "median_ms": 2.0,
        },
        {
            "extra_info.op": "reposition",
            "extra_info.dtype": "float32",
            "extra_info.backend": "baseline",
            "extra_info.impl": "foreach_lerp",
            "median_ms": 3.0,
        },
        {
            "extra_info.op": "reposition",
            "extra_info.dtype": "float32",
            "extra_info.backend": "baseline",
            "extra_info.impl": "authors_loop",
            "median_ms": 10.0,
        },
        {
            "extra_info.op": "reposition",
            "extra_info.dtype": "bfloat16",
            "extra_info.backend": "baseline",
            "extra_info.impl": "foreach_lerp",
            "median_ms": 1.0,
        },  # no sfpo row of this dtype: no line
        {"extra_info.op": "training_step", "extra_info.algo": "grpo", "median_ms": 100.0},
        {"extra_info.op": "training_step", "extra_info.algo": "sfpo", "median_ms": 250.0},
    ]
    lines = ratio_lines(pd.DataFrame(rows))
    assert len(lines) == 2
    assert lines[0].startswith("reposition float32: sfpo_kernels.reposition_[triton] 2 ms;")
    assert "foreach_lerp 1.50x" in lines[0] and "authors_loop 5.00x" in lines[0]
    assert "SFPO/GRPO 2.50x" in lines[1]
    assert ratio_lines(pd.DataFrame()) == []


def loss_row(impl: str, backend: str, median_ms: float, q1_ms: float, q3_ms: float, **extra) -> dict:
    """A flattened benchmark row of the loss table (times in ms; pytest-benchmark's stats are in seconds)."""
    return {
        "extra_info.op": "grpo_loss",
        "extra_info.mode": "full",
        "extra_info.n_tokens": 64,
        "extra_info.vocab": 512,
        "extra_info.dtype": "float32",
        "extra_info.kl": "off",
        "extra_info.impl": impl,
        "extra_info.backend": backend,
        "median_ms": median_ms,
        "stats.q1": q1_ms / 1e3,
        "stats.q3": q3_ms / 1e3,
        **extra,
    }


def rows_of_two() -> list[tuple[str, str, float]]:
    """``(impl, backend, median ms)`` of one sfpo row and one baseline row of the same work."""
    return [("sfpo_torch", "torch", 1.0), ("verl_eager", "baseline", 2.0)]


def test_ratio_lines_name_the_shape_as_integers_and_show_the_spread():
    rows = [
        loss_row("sfpo_torch", "torch", 2.0, 1.5, 2.5),
        loss_row("verl_eager", "baseline", 3.0, 2.5, 4.0),
        {"extra_info.op": "reposition", "extra_info.dtype": "float32", "median_ms": 1.0},  # NaN shapes: floats
    ]
    frame = pd.DataFrame(rows)
    assert frame["extra_info.n_tokens"].dtype == float  # what a mixed run's JSON gives
    (line,) = ratio_lines(frame)
    assert line.startswith("grpo_loss full N=64 V=512 float32: sfpo_torch 2 ms (IQR 1.5-2.5); "), line
    # the ratio of medians, then baseline q1 / sfpo q3 .. baseline q3 / sfpo q1
    assert line.endswith("baseline/sfpo: verl_eager 1.50x (1.00-2.67)"), line
    kl = [loss_row(i, b, m, m, m, **{"extra_info.kl": "low_var_kl"}) for i, b, m in rows_of_two()]
    assert " kl=low_var_kl: " in ratio_lines(pd.DataFrame(kl))[0]


def test_summary_lines_say_on_a_cpu_that_the_ratios_do_not_speak_to_the_gpu_targets():
    frame = pd.DataFrame([loss_row(i, b, m, m, m) for i, b, m in rows_of_two()])
    on_cpu = summary_lines(frame, "cpu (x86_64, 2 threads)", [])
    on_gpu = summary_lines(frame, "NVIDIA H100 80GB HBM3", [])
    assert on_cpu[0] == CPU_NOTE and CPU_NOTE not in on_gpu
    assert any(line.startswith("grpo_loss full N=64 V=512") for line in on_gpu)
    assert summary_lines(pd.DataFrame(), "cpu", []) == [CPU_NOTE, "no sfpo/baseline pair ran (see the tables above)"]


def test_skip_lines_group_the_rows_by_reason_most_first():
    skipped = [
        {"name": "test_a[x]", "reason": "liger-kernel not installed"},
        {"name": "test_b[1]", "reason": "backend 'cuda' needs a CUDA device"},
        {"name": "test_b[2]", "reason": "backend 'cuda' needs a CUDA device"},
    ]
    assert skip_lines(skipped) == [
        "2 skipped: backend 'cuda' needs a CUDA device (e.g. test_b[1])",
        "1 skipped: liger-kernel not installed (e.g. test_a[x])",
    ]
    assert skip_lines([]) == []


def test_a_cpu_run_of_the_loss_benchmark_has_a_grpo_loss_line_and_its_skips(tmp_path):
    """The real benchmark file on the CPU (tiny shapes, no interpreter): the torch backend against verl's eager
    path, the skipped rows with their reasons in the JSON, and bench/summary.py's Markdown of it all."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SFPO_POISON_ALLOCATIONS")}
    env.update(SFPO_BENCH_SIZE="tiny", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_bench_grpo_loss.py", "--benchmark-only", "-q", "-p",
         "no:cacheprovider", f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = done.stdout
    assert CPU_NOTE in printed
    assert re.search(r"^grpo_loss full N=64 V=512 float32: sfpo_torch .* ms \(IQR .*verl_eager", printed, re.M), printed
    assert re.search(r"^logprob_entropy fwd N=64 V=512 float32: sfpo_torch ", printed, re.M), printed
    assert re.search(r"^\d+ skipped: torch.compile rows run on a GPU only", printed, re.M), printed
    reasons = {row["reason"] for row in json.loads(out.read_text())[summary.SKIPPED_KEY]}
    assert any("TRITON_INTERPRET=1" in r for r in reasons), reasons
    markdown = tmp_path / "summary.md"
    assert summary.main([str(out), "-o", str(markdown)]) == 0
    text = markdown.read_text()
    assert CPU_NOTE in text and "## Rows that did not run" in text
    assert "- grpo_loss full N=64 V=512 float32: sfpo_torch" in text
