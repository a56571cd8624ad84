"""The training stages of ``scripts/regenerate_results.py``: the main job, threads, the compares, the sweep.

Each stage is three functions (commands, collect, render) that the STAGES table
of the script names; see :class:`results_lib.Stage`.
"""

from __future__ import annotations

from pathlib import Path

from results_lib import (
    Command,
    Context,
    bullets,
    copy,
    duration,
    md_table,
    number,
    quick_note,
    read_csv,
    run_facts,
    section,
    timing_line,
    write_csv,
)

from bench.measure.measure_threads import markdown_table as threads_table
from bench.provenance import one_line


def _load(record: dict) -> str:
    before, after = record.get("load_before"), record.get("load_after")
    return f"{before[0]:.1f} → {after[0]:.1f}" if before and after else "n/a"


# --------------------------------------------------------------------------- main: the README's main job

MAIN_RUNS = {"sfpo": [], "grpo": ["actor_rollout_ref.actor.sfpo.enable=false"]}


def main_commands(ctx: Context) -> list[Command]:
    quick = ["trainer.total_training_steps=2"] if ctx.quick else []
    return [
        Command(
            ctx.sfpo(
                "train",
                *extra,
                f"trainer.default_local_dir={ctx.work / 'main'}",
                f"trainer.experiment_name={name}-default",
                "trainer.progress_bar=false",
                *quick,
            )
        )
        for name, extra in MAIN_RUNS.items()
    ]


def main_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    rows = []
    for (name, _), t in zip(MAIN_RUNS.items(), timed, strict=True):
        rows.append(
            {
                "run": name,
                "command": t.command,
                "torch_threads": t.torch_threads,
                "wall_s": t.wall_s,
                "cpu_s": t.cpu_s,
                "load1_before": t.load_before[0] if t.load_before else "",
                "load1_after": t.load_after[0] if t.load_after else "",
                **run_facts(ctx.work / "main" / f"{name}-default"),
            }
        )
    return [write_csv(ctx.results("main-job.csv"), rows)], {}


def main_render(ctx: Context) -> dict[tuple[str, str], str]:
    prov = ctx.provenance("main")
    rows = read_csv(ctx.results("main-job.csv"))
    labels = {"sfpo": "`sfpo train` (SFPO)", "grpo": "`sfpo train actor_rollout_ref.actor.sfpo.enable=false` (GRPO)"}
    short = md_table(
        ["command", "test accuracy", "wall-clock", "CPU time", "torch threads", "load average before → after"],
        [
            [
                labels.get(r["run"], r["run"]),
                f"{number(r['acc_start'])} → {number(r['acc_end'])}",
                duration(float(r["wall_s"])),
                duration(float(r["cpu_s"])),
                r["torch_threads"] or "n/a",
                f"{number(r['load1_before'], '{:.1f}')} → {number(r['load1_after'], '{:.1f}')}",
            ]
            for r in rows
        ],
    )
    detail = md_table(
        [
            "command",
            "iterations",
            "step time (sum)",
            "whole command",
            "CPU time",
            "torch threads",
            "test accuracy at step: value",
        ],
        [
            [
                labels.get(r["run"], r["run"]),
                r["iterations"],
                duration(float(r["step_time_s"])),
                duration(float(r["wall_s"])),
                duration(float(r["cpu_s"])),
                r["torch_threads"] or "n/a",
                ", ".join(r["val_curve"].split()),
            ]
            for r in rows
        ],
    )
    note = quick_note(prov)
    sfpo = next((r for r in rows if r["run"] == "sfpo"), rows[0])
    took = (
        f"{duration(float(sfpo['wall_s']))} at load {number(sfpo['load1_before'], '{:.1f}')} with "
        f"{sfpo['torch_threads'] or '?'} torch thread(s) ({prov['date'][:10]})"
    )
    return {
        ("README.md", "main-job"): f"{note}{short}\n\n{one_line(prov)}",
        ("docs/trainer.md", "main-job-detail"): f"{note}{detail}\n\n{one_line(prov)}",
        ("docs/trainer.md", "main-job-time"): note + took,
    }


# --------------------------------------------------------------------------- threads: 1 vs 2, idle and busy


def threads_commands(ctx: Context) -> list[Command]:
    # 20 iterations, 2 rounds: at 100 a run of 2 threads beside a busy process took over 18 min (2026-12-07)
    size = ["--steps", "2", "--rounds", "1"] if ctx.quick else ["--steps", "20", "--rounds", "2"]
    script = str(Path("bench") / "measure" / "measure_threads.py")
    return [Command([ctx.python, script, *size, "--out", str(ctx.work / "threads"), "--python", ctx.python])]


def threads_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    out = ctx.work / "threads"
    return [
        copy(out / "threads.csv", ctx.results("threads-main-job.csv")),
        copy(out / "threads.provenance.json", ctx.results("threads-main-job.runs.json")),
    ], {}


def threads_render(ctx: Context) -> dict[tuple[str, str], str]:
    import json

    prov = ctx.provenance("threads")
    runs = json.loads(ctx.results("threads-main-job.runs.json").read_text())
    settings = runs.get("settings", {})
    rows = read_csv(ctx.results("threads-main-job.csv"))
    text = (
        f"{quick_note(prov)}`sfpo train trainer.total_training_steps={settings.get('steps')}` (the embedded default "
        f"otherwise), {settings.get('rounds')} round(s) of every arm, `OMP_NUM_THREADS` set per arm, the order "
        'rotated each round; "nothing added": the machine as it was (its load average is in the table); "one '
        "busy process added\": a Python busy loop started a second before the command and stopped after it. Medians with min-max over the runs; CPU time is the command's user + system time. "
        "Per run: `docs/results/threads-main-job.csv`.\n\n"
        f"{threads_table(rows)}\n{one_line(runs)}"
    )
    return {("docs/threads.md", "threads-main-job"): text}


# --------------------------------------------------------------------------- compare: the default, 5 seeds x 300 steps

COMPARE = "compare-default-5-seeds"
COMPARE_FILES = ("summary.csv", "headline.csv", "cost_model.csv", "runs.csv")


def compare_commands(ctx: Context) -> list[Command]:
    size = ["--preset", "smoke", "--seeds", "2", "--steps", "2"] if ctx.quick else []
    return [Command(ctx.sfpo("compare", *size, "--out", str(ctx.work / "compare-default"), "--no-progress"))]


def _settings(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    sfpo = cfg.actor_rollout_ref.actor.sfpo
    return {
        "K": int(sfpo.inner_steps),
        "alpha": float(sfpo.alpha),
        "tau": float(sfpo.zscore_threshold),
        "steps": int(cfg.trainer.total_training_steps),
    }


def compare_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    out = ctx.work / "compare-default"
    report = out / "report"
    written = [copy(report / name, ctx.results(f"{COMPARE}-{name.replace('.csv', '')}.csv")) for name in COMPARE_FILES]
    written.append(copy(report / "report.md", ctx.results(f"{COMPARE}-report.md")))
    written.append(copy(report / "reward_accuracy.png", ctx.images(f"{COMPARE}.png")))
    seeds = len(list(out.glob("sfpo-s*")))
    return written, {**_settings(out / "sfpo-s1"), "seeds": seeds}


def _cell(row: dict, prefix: str, fmt: str) -> str:
    mean, low, high = (row.get(f"{prefix}_{k}", "") for k in ("mean", "ci_low", "ci_high"))
    if number(mean) == "n/a":
        return "n/a"
    if number(low) == "n/a" or number(high) == "n/a":
        return fmt.format(float(mean))
    return f"{fmt.format(float(mean))} [{fmt.format(float(low))}, {fmt.format(float(high))}]"


# measure -> (label, value format, "diff" or "ratio" for the paired column)
COMPARE_ROWS = {
    "final_acc": ("final test accuracy (greedy, step {steps})", "{:.3f}", "diff"),
    "best_acc": ("best test accuracy", "{:.3f}", "diff"),
    "rollouts_to_grpo_best": ("rollouts to reach GRPO's best", "{:,.0f}", "ratio"),
    "wall_clock_to_grpo_best": ("wall-clock to reach it (s, sum of step times)", "{:.0f}", "ratio"),
    "step_time": ("time per step (s)", "{:.3f}", "ratio"),
    "peak_memory": ("peak memory (GB; {note})", "{:.3f}", "diff"),
}


def compare_table(summary: list[dict], settings: dict) -> str:
    rows = []
    for r in summary:
        if r["measure"] not in COMPARE_ROWS:
            continue
        label, fmt, paired = COMPARE_ROWS[r["measure"]]
        label = label.format(steps=settings.get("steps", "?"), note=r.get("note", "").split(";")[0])
        if paired == "diff":
            pair = "SFPO \N{MINUS SIGN} GRPO " + _cell(r, "diff", "{:+.3f}")
        else:
            pair = "SFPO / GRPO " + _cell(r, "ratio", "{:.2f}x")
        rows.append([label, r["seeds"], _cell(r, "grpo", fmt), _cell(r, "sfpo", fmt), pair])
    alpha, tau = "\N{GREEK SMALL LETTER ALPHA}", "\N{GREEK SMALL LETTER TAU}"
    sfpo = f"SFPO (K={settings.get('K')}, {alpha}={settings.get('alpha'):g}, {tau}={settings.get('tau'):g})"
    header = [
        "measure (mean [95% t interval] over the seeds listed)",
        "seeds",
        "GRPO",
        sfpo,
        "SFPO vs GRPO, paired by seed",
    ]
    return md_table(header, rows)


def _compare_time(prov: dict) -> str:
    (record,) = prov["commands"]
    threads = record.get("torch_threads") or "?"
    return (
        f"{duration(record['wall_s'])} of wall-clock ({duration(record['cpu_s'])} of CPU time) with {threads} torch "
        f"thread(s) at load average {_load(record)}, measured {prov['date'][:10]}"
    )


def compare_render(ctx: Context) -> dict[tuple[str, str], str]:
    prov = ctx.provenance("compare")
    settings = prov.get("settings", {})
    summary = read_csv(ctx.results(f"{COMPARE}-summary.csv"))
    report = ctx.results(f"{COMPARE}-report.md").read_text()
    note = quick_note(prov)
    headline = section(report, "Headline")
    story = (
        f"{note}{headline}\n\n{bullets(section(report, 'Against the paper'))}\n\n"
        f"The compare took {_compare_time(prov)} ({settings.get('seeds')} seeds x {settings.get('steps')} steps x "
        f"both arms). {one_line(prov)}"
    )
    details = (
        f"{note}`sfpo compare` with its defaults ({settings.get('seeds')} seeds x {settings.get('steps')} steps x "
        f"both arms): {_compare_time(prov)}. The README shows the headline table and the reward/accuracy plot; "
        f"`docs/results/{COMPARE}-{{summary,headline,cost_model,runs}}.csv` are the report's tables and "
        f"`docs/results/{COMPARE}-report.md` the report.\n\n"
        f"{bullets(section(report, 'Over seeds'))}\n\n{bullets(section(report, 'Cost model'))}\n\n{one_line(prov)}"
    )
    return {
        ("README.md", "compare-table"): note + compare_table(summary, settings),
        ("README.md", "compare-story"): story,
        ("README.md", "compare-time"): note + _compare_time(prov),
        ("docs/reports.md", "compare-default"): details,
    }


# --------------------------------------------------------------------------- small compare: --seeds 2 --steps 50


def small_compare_commands(ctx: Context) -> list[Command]:
    size = ["--preset", "smoke", "--seeds", "2", "--steps", "2"] if ctx.quick else ["--seeds", "2", "--steps", "50"]
    return [Command(ctx.sfpo("compare", *size, "--out", str(ctx.work / "compare-small"), "--no-progress"))]


def small_compare_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    report = ctx.work / "compare-small" / "report"
    return [copy(report / "summary.csv", ctx.results("compare-small-summary.csv"))], {}


def small_compare_render(ctx: Context) -> dict[tuple[str, str], str]:
    prov = ctx.provenance("small_compare")
    return {("README.md", "small-compare-time"): quick_note(prov) + _compare_time(prov)}


# --------------------------------------------------------------------------- sweep: the grid at 60 steps, 1 seed

SWEEP = "sweep-default-60-steps-1-seed"


def sweep_commands(ctx: Context) -> list[Command]:
    if ctx.quick:
        size = ["--preset", "smoke", "--steps", "2", "--groups", "baseline", "k_alpha"]
    else:
        size = ["--steps", "60", "--seeds", "1", "trainer.test_freq=20"]
    return [Command(ctx.sfpo("sweep", *size, "--out", str(ctx.work / "sweep"), "--no-progress"))]


def sweep_collect(ctx: Context, timed: list) -> tuple[list[Path], dict]:
    report = ctx.work / "sweep" / "report"
    written = [copy(report / "sweep.csv", ctx.results(f"{SWEEP}.csv"))]
    if (report / "sweep_k_alpha.png").is_file():
        written.append(copy(report / "sweep_k_alpha.png", ctx.images("sweep-k-alpha-60-steps.png")))
    return written, {}


def sweep_render(ctx: Context) -> dict[tuple[str, str], str]:
    prov = ctx.provenance("sweep")
    rows = read_csv(ctx.results(f"{SWEEP}.csv"))
    targets = ", ".join(f"{number(r['best_acc_mean'])} at lr {r['lr']}" for r in rows if r["arm"] == "GRPO")
    table = md_table(
        ["point", "final acc", "best acc", "reached GRPO's best", "rollouts to it", "step / GRPO step (own stages)"],
        [
            [
                r["point"],
                number(r["final_acc_mean"]),
                number(r["best_acc_mean"]),
                r["reached_grpo_best"],
                number(r["rollouts_to_grpo_best_mean"], "{:.0f}"),
                number(r["step_ratio_own_stages"], "{:.2f}x"),
            ]
            for r in rows
        ],
    )
    (record,) = prov["commands"]
    sfpo = [r for r in rows if r["arm"] == "SFPO"]
    fired = sum(1 for r in sfpo if r["trigger_fired"] and not r["trigger_fired"].startswith("0 of"))
    by_point = {r["point"]: r for r in rows}
    lrs = [
        f"at lr {by_point[g]['lr']} SFPO {number(by_point[f]['final_acc_mean'])} against GRPO "
        f"{number(by_point[g]['final_acc_mean'])}"
        for g, f in (("grpo-lr1e-4", "sfpo-lr1e-4"), ("grpo-lr1e-5", "sfpo-lr1e-5"))
        if g in by_point and f in by_point
    ]
    steps = [float(r["step_s_mean"]) for r in rows if number(r["step_s_mean"]) != "n/a"]
    after = []
    if lrs:
        after.append(f"Final accuracy {'; '.join(lrs)}.")
    if steps:
        after.append(f"Wall-clock step times (`step_s_mean`) ranged over {min(steps):.2f}-{max(steps):.2f} s per step.")
    text = (
        f"{quick_note(prov)}What ran: `{record['command']}`: {timing_line(prov)}, "
        f"{record.get('torch_threads') or '?'} torch thread(s), load average {_load(record)}. The table: "
        f"`docs/results/{SWEEP}.csv`; the heat map below. The entropy trigger fired in {fired} of {len(sfpo)} "
        f"SFPO points. Targets (GRPO's best at the same lr): {targets}.\n\n{table}\n\n{' '.join(after)}\n\n"
        f"{one_line(prov)}"
    )
    cpu = f"{duration(sum(c['cpu_s'] for c in prov['commands']))} of CPU, measured {prov['date'][:10]}"
    return {("docs/reports.md", "sweep-default"): text, ("README.md", "sweep-time"): quick_note(prov) + cpu}
