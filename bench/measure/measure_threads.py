"""Whole ``sfpo train`` commands with 1 and 2 torch threads, on the machine as it is and beside one busy process.

Each run is the README's main job, ``sfpo train`` on the embedded default (300
iterations), with ``trainer.total_training_steps=STEPS`` (``--steps``) and its run
directory under OUT, in a fresh interpreter with ``OMP_NUM_THREADS`` set to the
arm's thread count. Conditions: ``idle`` (nothing added: run it when the machine
has no other work) and ``busy`` (this script starts one CPU-bound process, a
Python busy loop, a second before the command and stops it after). Rounds run
every (threads, condition) arm once, the order rotated one place per round.
Per run: wall-clock, CPU time (user + system of the command and what it waited
for, from ``wait4``), the 1-minute load average before and after, the thread count
the command reported, its accuracy line and step time.

Writes OUT/threads.csv (one row per run), OUT/threads.md (medians with min-max per
arm) and OUT/threads.provenance.json (device, versions, git revision, every command).

    PYTHONPATH=$PWD python bench/measure/measure_threads.py --steps 20 --rounds 2 --out runs/threads
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.provenance import machine_provenance, now, one_line
from bench.timed_command import run_timed

CONDITIONS = ("idle", "busy")
FIELDS = (
    "round",
    "position",
    "threads",
    "condition",
    "wall_s",
    "cpu_s",
    "cpu_per_wall",
    "load1_before",
    "load1_after",
    "reported_threads",
    "iterations",
    "step_time_s",
    "acc_start",
    "acc_end",
    "exit_code",
    "command",
)
ACCURACY = re.compile(r"validation accuracy: ([0-9.]+)(?: at step \d+ -> ([0-9.]+))?")
STEPS_LINE = re.compile(r"(\d+) iterations in ([0-9.]+) s")


def busy_process() -> subprocess.Popen:
    """One CPU-bound process (a Python busy loop) in a session of its own."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)


def train_argv(python: str, out: Path, name: str, steps: int | None, overrides: list[str]) -> list[str]:
    argv = [python, "-m", "sfpo_train.cli", "train"]
    if steps is not None:
        argv.append(f"trainer.total_training_steps={steps}")
    return argv + [
        f"trainer.default_local_dir={out / 'runs'}",
        f"trainer.experiment_name={name}",
        "trainer.progress_bar=false",
        *overrides,
    ]


def run_one(args, out: Path, rnd: int, position: int, threads: int, condition: str, log) -> tuple[dict, dict]:
    """One timed command of an arm: ``(CSV row, provenance record)``."""
    name = f"t{threads}-{condition}-r{rnd}"
    hog = busy_process() if condition == "busy" else None
    try:
        if hog is not None:
            time.sleep(1.0)  # running before the command starts
        log.write(f"### {name}\n")
        timed = run_timed(
            train_argv(args.python, out, name, args.steps, args.overrides),
            env={"OMP_NUM_THREADS": str(threads)},
            log=log,
            aliases={args.python: "python", str(out): "OUT"},
        )
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    text = "\n".join(timed.tail)
    acc = ACCURACY.search(text)
    steps = STEPS_LINE.search(text)
    row = {
        "round": rnd,
        "position": position,
        "threads": threads,
        "condition": condition,
        "wall_s": timed.wall_s,
        "cpu_s": timed.cpu_s,
        "cpu_per_wall": round(timed.cpu_s / timed.wall_s, 3) if timed.wall_s else "",
        "load1_before": timed.load_before[0] if timed.load_before else "",
        "load1_after": timed.load_after[0] if timed.load_after else "",
        "reported_threads": timed.torch_threads if timed.torch_threads is not None else "",
        "iterations": steps.group(1) if steps else "",
        "step_time_s": steps.group(2) if steps else "",
        "acc_start": acc.group(1) if acc else "",
        "acc_end": (acc.group(2) or acc.group(1)) if acc else "",
        "exit_code": timed.exit_code,
        "command": timed.command,
    }
    return row, {**timed.record(), "condition": condition}


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "n/a"
    med = statistics.median(values)
    return (
        fmt.format(med)
        if len(values) == 1
        else f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"
    )


def markdown_table(rows: list[dict]) -> str:
    """Per (condition, threads): runs, wall-clock, CPU time, step time, load before, final accuracy; medians with
    min-max; then the CPU time beside the busy process over the CPU time without, per thread count. ``rows``:
    threads.csv's rows (strings or numbers); failed runs count in "runs" only."""

    def floats(group: list[dict], key: str) -> list[float]:
        return [float(r[key]) for r in group if str(r.get(key, "")).strip() not in ("", "nan")]

    arms: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        arms.setdefault((str(r["condition"]), int(r["threads"])), []).append(r)
    order = sorted(arms, key=lambda a: (CONDITIONS.index(a[0]) if a[0] in CONDITIONS else 9, a[1]))
    lines = [
        "| machine | torch threads | runs (failed) | wall-clock s | CPU s | CPU / wall | step time s "
        "| load average before | test accuracy at the end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for condition, threads in order:
        group = arms[(condition, threads)]
        ok = [r for r in group if str(r["exit_code"]) == "0"]
        failed = len(group) - len(ok)
        machine = {"idle": "nothing added", "busy": "one busy process added"}.get(condition, condition)
        accs = sorted({str(r["acc_end"]) for r in ok if str(r["acc_end"])})
        lines.append(
            f"| {machine} | {threads} | {len(group)}" + (f" ({failed})" if failed else "") + " | "
            f"{_spread(floats(ok, 'wall_s'), '{:.1f}')} | {_spread(floats(ok, 'cpu_s'), '{:.1f}')} | "
            f"{_spread(floats(ok, 'cpu_per_wall'), '{:.2f}')} | {_spread(floats(ok, 'step_time_s'), '{:.1f}')} | "
            f"{_spread(floats(group, 'load1_before'), '{:.1f}')} | {', '.join(accs) or 'n/a'} |"
        )
    ratios = []
    for threads in sorted({t for _, t in arms}):
        idle, busy = (floats(arms.get((c, threads), []), "cpu_s") for c in CONDITIONS)
        if idle and busy:
            ratios.append(f"{threads} thread(s) {statistics.median(busy) / statistics.median(idle):.2f}x")
    if ratios:
        lines += ["", f"CPU time beside the busy process / without it (medians): {', '.join(ratios)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more sfpo train overrides for every run")
    parser.add_argument("--steps", type=int, default=100, help="trainer.total_training_steps of each run (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every arm (default 3)")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    parser.add_argument("--conditions", default="idle,busy", help="idle, busy or both (default idle,busy)")
    parser.add_argument("--out", required=True, help="directory for the runs, threads.csv, threads.md")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the commands (default this one)")
    args = parser.parse_args(argv)
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads {args.threads!r}: whole numbers separated by commas")
    conditions = args.conditions.split(",")
    if any(t < 1 for t in thread_counts) or not thread_counts:
        parser.error(f"--threads {args.threads!r}: each must be >= 1")
    if not conditions or any(c not in CONDITIONS for c in conditions):
        parser.error(f"--conditions {args.conditions!r}: idle, busy or idle,busy")
    if args.rounds < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--rounds and --steps must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prov = machine_provenance(args.python)
    arms = [(t, c) for c in conditions for t in thread_counts]
    rows, records = [], []
    with open(out / "threads.log", "a") as log:
        for rnd in range(1, args.rounds + 1):
            shift = (rnd - 1) % len(arms)
            for position, (threads, condition) in enumerate(arms[shift:] + arms[:shift], 1):
                row, record = run_one(args, out, rnd, position, threads, condition, log)
                rows.append(row)
                records.append(record)
                print(
                    f"round {rnd} {condition:4s} {threads} thread(s): wall {row['wall_s']:.1f} s, CPU {row['cpu_s']:.1f} s, "
                    f"load {row['load1_before']} -> {row['load1_after']}, exit {row['exit_code']}",
                    flush=True,
                )
    with open(out / "threads.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    prov.update(
        finished=now(),
        commands=records,
        settings={"steps": args.steps, "rounds": args.rounds, "threads": thread_counts, "conditions": conditions},
        command=shlex.join(
            ["python", "bench/measure/measure_threads.py", *(argv if argv is not None else sys.argv[1:])]
        )
        .replace(args.out, "OUT")
        .replace(args.python, "python"),
    )
    (out / "threads.provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    table = markdown_table(rows)
    (out / "threads.md").write_text(table + "\n" + one_line(prov) + "\n")
    print(table)
    failed = sum(1 for r in rows if r["exit_code"] != 0)
    if failed:
        print(
            f"{failed} of {len(rows)} runs failed; their output is in {os.path.join(out, 'threads.log')}",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
