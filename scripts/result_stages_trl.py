"""The TRL stages of ``scripts/regenerate_results.py``: SFPOGRPOTrainer's benchmark and its comparison with
TRL's GRPO and ``sfpo train`` (see :class:`results_lib.Stage`).

They run with ``--trl-python``, an interpreter of a venv with the ``trl`` extra:
TRL 1.16 and verl 0.9.1 cannot share one.
"""

from __future__ import annotations

from pathlib import Path

from result_stages_measure import _has_module
from results_lib import Command, Context, copy

from bench.provenance import one_line

TRL_SECTION = "## SFPO in TRL"


def needs_trl(ctx: Context) -> str | None:
    if _has_module(ctx.trl_python, "trl"):
        return None
    return "TRL is not installed for --trl-python (pip install -e '.[trl]' in a venv without verl: docs/trl.md)"


def trl_bench_commands(ctx: Context) -> list[Command]:
    json_path = str(ctx.work / "trl-bench.json")
    argv = [ctx.trl_python, "-m", "pytest", "bench/test_bench_trl.py", "--benchmark-only", "-p", "no:cacheprovider"]
    env = {"SFPO_BENCH_TRL": "small" if ctx.quick else "full", "OMP_NUM_THREADS": "1"}
    summary = str(ctx.work / "trl-bench-summary.md")
    return [
        Command([*argv, f"--benchmark-json={json_path}"], env, ("TRITON_INTERPRET",)),
        Command([ctx.trl_python, str(Path("bench") / "summary.py"), json_path, "-o", summary]),
    ]


def trl_bench_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    summary = (ctx.work / "trl-bench-summary.md").read_text()
    if TRL_SECTION not in summary:
        raise ValueError(f"{ctx.work / 'trl-bench-summary.md'}: no '{TRL_SECTION}' section")
    out = ctx.results("trl-bench-cpu.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(summary[summary.index(TRL_SECTION) :])
    return [out, copy(ctx.work / "trl-bench.json", ctx.results("trl-bench-cpu.json"))], {
        "SFPO_BENCH_TRL": "small" if ctx.quick else "full"
    }


def trl_bench_render(ctx: Context) -> dict[tuple[str, str], str]:
    prov = ctx.provenance("trl_bench")
    section = ctx.results("trl-bench-cpu.md").read_text().strip()
    body = section.split("\n", 1)[1].strip()  # the section's own heading is the document's
    return {("docs/trl.md", "trl-bench"): f"{body}\n\n{one_line(prov)}"}


# --------------------------------------------------------------------------- trl_compare: TRL vs TRL + SFPO vs sfpo train

TRL_COMPARE = "trl-compare-300-steps-3-seeds"


def trl_compare_commands(ctx: Context) -> list[Command]:
    size = ["--seeds", "1", "--steps", "2", "--test-freq", "1", "--val-samples", "16"] if ctx.quick else []
    settings = size or ["--seeds", "3", "--steps", "300", "--test-freq", "10"]
    argv = [ctx.trl_python, str(Path("scripts") / "trl_compare.py"), *settings, "--threads", "1"]
    return [Command([*argv, "--out", str(ctx.work / "trl-compare")], {"OMP_NUM_THREADS": "1"})]


def trl_compare_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    out = ctx.work / "trl-compare"
    written = [
        copy(out / f"trl-compare{suffix}", ctx.results(f"{TRL_COMPARE}{suffix}"))
        for suffix in (".csv", ".md", "-provenance.md")
    ]
    return written, {}


def trl_compare_render(ctx: Context) -> dict[tuple[str, str], str]:
    prov = ctx.provenance("trl_compare")
    table = ctx.results(f"{TRL_COMPARE}.md").read_text().strip()
    body = table.split("\n", 1)[1].strip()  # below the file's own title
    return {("docs/trl.md", "trl-compare"): f"{body}\n\n{one_line(prov)}"}
