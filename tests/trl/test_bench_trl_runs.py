"""``bench/test_bench_trl.py`` at its CI scale runs every row with real TRL, and the summary judges every target.

The benchmark drives TRL's ``Trainer.train()`` one iteration at a time from a thread per trainer; this
keeps that machinery, the arms' settings (each must run K + 1 passes per SFPO iteration) and the summary's
lines working as TRL and the trainers change. Nothing here reads a timing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from bench import summary
from bench.trl_arms import ARMS
from tests.helpers.trl_setup import trl_parts

ROOT = Path(__file__).resolve().parents[2]


def test_every_row_runs_and_every_target_is_met_or_missed(tmp_path):
    trl_parts()  # skips without TRL
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SFPO_POISON_ALLOCATIONS")}
    env.update(SFPO_BENCH_TRL="small", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_bench_trl.py", "--benchmark-only", "-q", "-p",
         "no:cacheprovider", f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = json.loads(out.read_text())["benchmarks"]
    arms = {r["extra_info"]["arm"] for r in rows if r["extra_info"]["op"] == "trl_step"}
    assert arms == set(ARMS)
    assert {r["extra_info"]["impl"] for r in rows if r["extra_info"]["op"] == "trl_loss"} == {"trl", "sfpo_fused"}
    sfpo = next(r for r in rows if r["extra_info"].get("arm") == "trl_sfpo")["extra_info"]
    assert 0 < sfpo["sfpo_own_ms_median"] < sfpo["cpu_ms_median"]
    loss = [r["extra_info"] for r in rows if r["extra_info"]["op"] == "trl_loss"]
    assert all(info["peak_alloc_bytes"] > 0 for info in loss), loss
    printed = done.stdout
    targets = [line for line in printed.splitlines() if line.startswith("- ") and re.search(r"target [<>]", line)]
    assert len(targets) == 5, printed[-4000:]  # own share, fused time x3 (GRPO, SFPO, loss), sfpo train's step
    assert all(re.search(r"(met|MISSED) by \d", line) for line in targets), targets
    assert "the target (>= 8x) is at N=4096 V=32768" in printed  # memory: judged only at the full shape
    markdown = tmp_path / "summary.md"
    assert summary.main([str(out), "-o", str(markdown)]) == 0
    text = markdown.read_text()
    assert "## SFPO in TRL: one training iteration and the loss" in text
    assert all(f"| {arm} |" in text for arm in ARMS)
