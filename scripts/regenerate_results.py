"""Regenerate every measured table, plot and CSV the documentation shows, each with its provenance.

Each stage runs whole commands as a user would (a fresh interpreter running this
checkout), copies or derives its outputs into docs/results/ and docs/images/,
writes docs/results/<stage>.provenance.json (device: CPU model and GPUs; load
average before and after each command; torch threads; python, torch, triton,
transformers, trl, verl, vllm versions; git revision and whether the tree had
uncommitted changes; dates; the exact commands with their wall-clock and CPU
time), then rewrites the documents' generated blocks from those files:

    <!-- generated:NAME -->
    ...
    <!-- /generated:NAME -->

so a document cannot drift from its data. Stages that need what this machine
lacks (a GPU, vLLM, verl) say so and are skipped. A failed command stops its
stage (its log is WORK/<stage>.log) and the others go on; the exit status is 1.

    python scripts/regenerate_results.py --list              # the stages, their outputs and expected times
    python scripts/regenerate_results.py --dry-run           # what would run, nothing runs
    python scripts/regenerate_results.py                     # every stage that can run here
    python scripts/regenerate_results.py --only main,threads
    python scripts/regenerate_results.py --render-only       # rewrite the blocks from docs/results as it is
    python scripts/regenerate_results.py --only linear_loss --quick --root /tmp/check   # a pipeline check

Adding a stage is one entry in STAGES: its commands, how its outputs are collected
and which blocks it renders (see scripts/results_lib.py, Stage).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import result_stages as train  # noqa: E402
import result_stages_measure as measure  # noqa: E402
import result_stages_trl as trl  # noqa: E402
from results_lib import Context, Stage, rewrite_block, rewrite_document  # noqa: E402

from bench.provenance import machine_provenance, now  # noqa: E402
from bench.timed_command import run_timed  # noqa: E402

STAGES: list[Stage] = [
    Stage(
        name="main",
        produces="README's main-job table, docs/trainer.md's measured runs: docs/results/main-job.csv",
        expected="~5 min (SFPO 3 min 5 s, GRPO 99 s of step time: 1 thread, load ~2.5, docs/trainer.md)",
        commands=train.main_commands,
        collect=train.main_collect,
        render=train.main_render,
        blocks=("README.md#main-job", "docs/trainer.md#main-job-detail", "docs/trainer.md#main-job-time"),
    ),
    Stage(
        name="threads",
        produces="docs/threads.md's 1 vs 2 threads table: docs/results/threads-main-job.csv",
        expected="~15 min (8 runs of 20 steps; 1 thread well under a minute each, 2 threads beside a busy process "
        "several minutes: at 100 steps one such run took over 18 min)",
        commands=train.threads_commands,
        collect=train.threads_collect,
        render=train.threads_render,
        blocks=("docs/threads.md#threads-main-job",),
    ),
    Stage(
        name="compare",
        produces="README's headline table, story and plot, docs/reports.md's compare: "
        "docs/results/compare-default-5-seeds-*.csv, docs/images/compare-default-5-seeds.png",
        expected="~10 min on 2 idle cores (3 seeds took 5 min 37 s); 52.5 min at load 1-9",
        commands=train.compare_commands,
        collect=train.compare_collect,
        render=train.compare_render,
        blocks=(
            "README.md#compare-table",
            "README.md#compare-story",
            "README.md#compare-time",
            "docs/reports.md#compare-default",
        ),
    ),
    Stage(
        name="small_compare",
        produces="README's time of sfpo compare --seeds 2 --steps 50: docs/results/compare-small-summary.csv",
        expected="a few minutes (4 runs of 50 steps; not measured before)",
        commands=train.small_compare_commands,
        collect=train.small_compare_collect,
        render=train.small_compare_render,
        blocks=("README.md#small-compare-time",),
    ),
    Stage(
        name="sweep",
        produces="docs/reports.md's grid table and heat map: docs/results/sweep-default-60-steps-1-seed.csv, "
        "docs/images/sweep-k-alpha-60-steps.png",
        expected="13.7 min of CPU; 41.8 min of wall-clock at load 1-9",
        commands=train.sweep_commands,
        collect=train.sweep_collect,
        render=train.sweep_render,
        blocks=("docs/reports.md#sweep-default", "README.md#sweep-time"),
    ),
    Stage(
        name="update_pass",
        produces="docs/update_pass.md's old-log-prob reuse table: docs/results/old-log-prob-reuse.csv",
        expected="~1-2 min (4 trainers, 14 iterations each of 0.13-0.66 s of CPU)",
        commands=measure.update_pass_commands,
        collect=measure.update_pass_collect,
        render=measure.update_pass_render,
        blocks=("docs/update_pass.md#old-log-prob-reuse",),
    ),
    Stage(
        name="reposition_host",
        produces="docs/update_pass.md's Stage II host-time table: docs/results/reposition-host.csv",
        expected="under a minute (32 x 20 calls of 4 arms, each under 2 ms)",
        commands=measure.reposition_host_commands,
        collect=measure.reposition_host_collect,
        render=measure.reposition_host_render,
        blocks=("docs/update_pass.md#reposition-host",),
    ),
    Stage(
        name="linear_loss",
        produces="docs/linear_loss.md's CPU table: docs/results/linear-loss-cpu.csv",
        expected="under a minute (15 rounds of 4 rows of 60-170 ms)",
        commands=measure.linear_loss_commands,
        collect=measure.linear_loss_collect,
        render=measure.linear_loss_render,
        blocks=("docs/linear_loss.md#linear-loss-cpu",),
    ),
    Stage(
        name="bench_cpu",
        produces="bench/README.md's times of pytest bench/ --benchmark-only (without and with the Triton "
        "interpreter): docs/results/bench-cpu-time.csv, docs/results/bench-cpu*-summary.md",
        expected="~3 min of CPU without the interpreter (171 s measured); the interpreter run not timed before",
        commands=measure.bench_cpu_commands,
        collect=measure.bench_cpu_collect,
        render=measure.bench_cpu_render,
        blocks=("bench/README.md#bench-cpu-time",),
    ),
    Stage(
        name="vllm_step",
        produces="docs/vllm.md's HF vs vLLM iteration table: docs/results/vllm-step.csv",
        expected="~5 min (6 rounds of ~0.6 s and ~25 s iterations per engine, engine starts of 9-29 s)",
        commands=measure.vllm_step_commands,
        collect=measure.vllm_step_collect,
        render=measure.vllm_step_render,
        blocks=("docs/vllm.md#vllm-step",),
        needs=measure.needs_vllm,
        vllm=True,
    ),
    Stage(
        name="vllm_300",
        produces="docs/vllm.md's 300-iteration table: docs/results/vllm-300.csv",
        expected="~7 min (164 s and 180 s of step time plus start-up)",
        commands=measure.vllm_300_commands,
        collect=measure.vllm_300_collect,
        render=measure.vllm_300_render,
        blocks=("docs/vllm.md#vllm-300",),
        needs=measure.needs_vllm,
        vllm=True,
    ),
    Stage(
        name="verl_cpu",
        produces="docs/verl.md's times of verl's CPU job: docs/results/verl-cpu-smoke.csv",
        expected="~5-6 min (1 min 53 s, 1 min 34 s, 1 min 53 s)",
        commands=measure.verl_cpu_commands,
        collect=measure.verl_cpu_collect,
        render=measure.verl_cpu_render,
        blocks=("docs/verl.md#verl-cpu-smoke",),
        needs=measure.needs_verl,
    ),
    Stage(
        name="trl_bench",
        produces="docs/trl.md's TRL iteration and loss table and its targets: docs/results/trl-bench-cpu.md",
        expected="~4 min (8 arms x 17 rounds of 0.1-0.4 s, the loss at N=4096 V=32768 2 x 6 rounds of ~4 s)",
        commands=trl.trl_bench_commands,
        collect=trl.trl_bench_collect,
        render=trl.trl_bench_render,
        blocks=("docs/trl.md#trl-bench",),
        needs=trl.needs_trl,
        trl=True,
    ),
    Stage(
        name="trl_compare",
        produces="docs/trl.md's TRL GRPO vs TRL + SFPO vs sfpo train table: "
        "docs/results/trl-compare-300-steps-3-seeds.{csv,md}",
        expected="~13 min at load ~1-3 (12 runs: 3 seeds x 4 arms of 300 iterations, 33-101 s each)",
        commands=trl.trl_compare_commands,
        collect=trl.trl_compare_collect,
        render=trl.trl_compare_render,
        blocks=("docs/trl.md#trl-compare",),
        needs=trl.needs_trl,
        trl=True,
    ),
    Stage(
        name="bench_gpu",
        produces="bench/results/<device>-<date>/ (bench/run_gpu.sh: JSON, summary.md, meta.txt)",
        expected="GPU only; more than 10 min in all (bench/README.md splits it over calls)",
        commands=measure.bench_gpu_commands,
        collect=measure.bench_gpu_collect,
        render=measure.bench_gpu_render,
        needs=measure.needs_gpu,
    ),
]


def _select(only: str | None) -> list[Stage]:
    if not only:
        return list(STAGES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {s.name: s for s in STAGES}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"regenerate_results: --only {only!r}: unknown stage(s) {unknown}; known: {', '.join(known)}")
    return [known[n] for n in names]


def _shown(ctx: Context, argv: list[str], env: dict[str, str]) -> str:
    text = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    text = (text + " " if text else "") + shlex.join(argv)
    for path in sorted(ctx.aliases, key=len, reverse=True):
        text = text.replace(path, ctx.aliases[path])
    return text


def check_blocks(ctx: Context, stages: list[Stage]) -> list[str]:
    """One line per declared block that is missing from its document or there more than once."""
    problems = []
    for stage in stages:
        for name in stage.blocks:
            doc, _, block = name.partition("#")
            path = ctx.root / doc
            text = path.read_text(encoding="utf-8") if path.is_file() else ""
            try:
                rewrite_block(text, block, "")
            except ValueError as e:
                problems.append(f"{stage.name}: {doc}: {e}")
    return problems


def render(ctx: Context, stage: Stage) -> list[str]:
    """Rewrite the stage's blocks from its outputs; returns "document#block" of each."""
    by_doc: dict[str, dict[str, str]] = defaultdict(dict)
    for (doc, block), body in stage.render(ctx).items():
        if f"{doc}#{block}" not in stage.blocks:
            raise ValueError(f"stage {stage.name!r} rendered {doc}#{block}, which its entry does not declare")
        by_doc[doc][block] = body
    for doc, blocks in by_doc.items():
        rewrite_document(ctx.root / doc, blocks)
    return [f"{doc}#{block}" for doc, blocks in by_doc.items() for block in blocks]


def run_stage(ctx: Context, stage: Stage, regenerated_by: str, echo: bool) -> str:
    """Run one stage; returns "ok", "failed: ..." (its log named)."""
    python = ctx.vllm_python if stage.vllm else ctx.trl_python if stage.trl else ctx.python
    prov = {"stage": stage.name, "quick": ctx.quick, "expected": stage.expected, **machine_provenance(python)}
    timed = []
    log_path = ctx.work / f"{stage.name}.log"
    with open(log_path, "a") as log:
        for command in stage.commands(ctx):
            print(f"[{stage.name}] $ {_shown(ctx, command.argv, command.env)}", flush=True)
            log.write(f"$ {shlex.join(command.argv)}\n")
            log.flush()
            t = run_timed(
                command.argv,
                env=command.env,
                unset=command.unset,
                cwd=str(REPO_ROOT),
                log=log,
                echo=echo,
                aliases=ctx.aliases,
            )
            timed.append(t)
            print(f"[{stage.name}]   exit {t.exit_code}: {t.wall_s:.1f} s wall-clock, {t.cpu_s:.1f} s CPU", flush=True)
            if t.exit_code != 0:
                print("\n".join(f"[{stage.name}]   | {line}" for line in t.tail[-15:]), file=sys.stderr)
                return f"failed: exit {t.exit_code} (log: {log_path})"
    outputs, settings = stage.collect(ctx, timed)
    prov.update(
        finished=now(),
        regenerated_by=regenerated_by,
        settings=settings,
        commands=[t.record() for t in timed],
        outputs=[os.path.relpath(p, ctx.root) for p in outputs],
    )
    path = ctx.provenance_path(stage.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prov, indent=2) + "\n")
    blocks = render(ctx, stage)
    print(
        f"[{stage.name}] wrote {', '.join(prov['outputs'] + [os.path.relpath(path, ctx.root)])}; blocks {', '.join(blocks) or 'none'}"
    )
    return "ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="regenerate_results.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--list", action="store_true", help="list the stages: outputs, expected time, skipped or not")
    parser.add_argument("--dry-run", action="store_true", help="show each stage's commands; run nothing")
    parser.add_argument("--only", metavar="STAGE[,STAGE]", help="these stages only (default: all)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the blocks from the data as it is")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check that every block the stages declare is in its document exactly once; run nothing",
    )
    parser.add_argument("--root", default=str(REPO_ROOT), help="where docs/ and README.md are (default: this checkout)")
    parser.add_argument("--work", help="directory of the runs and logs (default ROOT/runs/regenerate-<time>)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings, to check the pipeline (not with ROOT = this checkout: its numbers measure nothing)",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter of the commands (default: this one)")
    parser.add_argument("--vllm-python", help="interpreter of the vLLM stages, from vLLM's own venv (default --python)")
    parser.add_argument(
        "--trl-python", help="interpreter of the TRL stages, from a venv with the trl extra (default --python)"
    )
    parser.add_argument("--echo", action="store_true", help="show the commands' output as they run")
    args = parser.parse_args(argv)
    stages = _select(args.only)
    root = Path(args.root).resolve()
    if args.quick and root == REPO_ROOT:
        parser.error("--quick writes numbers that measure nothing: give --root a copy of the documents")
    work = Path(args.work).resolve() if args.work else root / "runs" / f"regenerate-{time.strftime('%Y%m%d-%H%M%S')}"
    ctx = Context(
        root=root,
        work=work,
        python=args.python,
        vllm_python=args.vllm_python or args.python,
        trl_python=args.trl_python or args.python,
        quick=args.quick,
    )

    if args.list:
        for s in STAGES:
            reason = s.needs(ctx)
            print(
                f"{s.name:16s} {'skipped here: ' + reason if reason else 'runs here'}\n{'':16s} {s.produces}\n"
                f"{'':16s} expected: {s.expected}"
            )
        return 0
    if args.check:
        problems = check_blocks(ctx, stages)
        print("\n".join(problems) or f"{sum(len(s.blocks) for s in stages)} blocks, each in its document once")
        return 1 if problems else 0
    if args.render_only:
        for s in stages:
            try:
                print(f"[{s.name}] blocks {', '.join(render(ctx, s)) or 'none'}")
            except ValueError as e:
                print(f"[{s.name}] not rendered: {e}")
        return 0

    os.environ["PYTHONPATH"] = str(REPO_ROOT) + (
        os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""
    )
    if not args.dry_run:
        work.mkdir(parents=True, exist_ok=True)
    regenerated_by = _shown(
        ctx, ["python", "scripts/regenerate_results.py", *(argv if argv is not None else sys.argv[1:])], {}
    )
    results = {}
    for s in stages:
        reason = s.needs(ctx)
        if reason:
            results[s.name] = f"skipped: {reason}"
            print(f"[{s.name}] skipped: {reason}")
            continue
        if args.dry_run:
            print(f"[{s.name}] expected {s.expected}; writes {s.produces}; blocks {', '.join(s.blocks) or 'none'}")
            for command in s.commands(ctx):
                print(f"[{s.name}] $ {_shown(ctx, command.argv, command.env)}")
            results[s.name] = "dry run"
            continue
        try:
            results[s.name] = run_stage(ctx, s, regenerated_by, args.echo)
        except Exception as e:  # one stage's broken output must not cost the stages after it; its data is kept
            results[s.name] = f"failed: {type(e).__name__}: {e}"
    print("\n".join(f"{name}: {status}" for name, status in results.items()))
    return 1 if any(v.startswith("failed") for v in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
