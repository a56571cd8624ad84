"""``build_report``: a report's tables, plots and pages from run directories (see :mod:`sfpo_train.reports`)."""

from __future__ import annotations

import os

import pandas as pd

from sfpo_train.reports.headline import headline_lines, headline_table
from sfpo_train.reports.plots import plot_curves, plot_dynamics, plot_memory, plot_stage_share, plot_stage_time
from sfpo_train.reports.render import Bullets, Image, Paragraph, Section, Table, write_csvs, write_pages
from sfpo_train.reports.runs import Run, arms, column, expand_run_paths, load_run
from sfpo_train.reports.tables import arm_memory_table, arm_stage_table, labelled, run_summary

# The plots: file name -> what it shows (the image's alt text).
PLOTS = {
    "stage_time_per_step.png": "Seconds per step by stage",
    "stage_share.png": "Share of a step by stage",
    "stage_memory.png": "Memory per stage",
    "reward_accuracy.png": "Reward and test accuracy against rollouts and wall-clock",
    "entropy_zscore_alpha.png": "Entropy, z-score and alpha over steps (trigger marked)",
}
# The columns of headline.csv the report shows, in this order.
HEADLINE_COLUMNS = ("seed", "grpo_initial_acc", "target_acc", "grpo_rollouts", "sfpo_rollouts", "rollouts_ratio",
                    "grpo_time_s", "sfpo_time_s", "time_ratio", "step_time_ratio", "active_step_time_ratio",
                    "extra_memory_gb")  # fmt: skip


def build_report(run_paths: list[str], out_dir: str, *, title: str | None = None) -> dict[str, str]:
    """Write the report for ``run_paths`` into ``out_dir``; returns ``{file name: path}`` of what it wrote."""
    if not run_paths:
        raise ValueError("RUN: give at least one run directory")
    runs = [load_run(p) for p in expand_run_paths(list(run_paths))]
    if not any(len(r.train) for r in runs):
        raise ValueError("RUN: none of the runs has a training step in metrics.jsonl yet")
    os.makedirs(out_dir, exist_ok=True)

    summary = pd.DataFrame([run_summary(r) for r in runs])
    seconds, share = arm_stage_table(runs)
    memory = arm_memory_table(runs)
    head = headline_table(runs)
    csvs = {"runs.csv": (summary, False), "stage_time.csv": (seconds, True), "stage_share.csv": (share, True),
            "stage_memory.csv": (memory, False)}  # fmt: skip
    if len(head):
        csvs["headline.csv"] = (head, False)
    written = write_csvs(out_dir, csvs)

    png = {name: os.path.join(out_dir, name) for name in PLOTS}
    plot_stage_time(runs, png["stage_time_per_step.png"])
    plot_stage_share(share, png["stage_share.png"])
    plot_memory(memory, png["stage_memory.png"])
    plot_curves(runs, head, png["reward_accuracy.png"])
    plot_dynamics(runs, png["entropy_zscore_alpha.png"])
    written.update(png)

    sections = report_sections(runs, summary, seconds, share, memory, head)
    written.update(write_pages(out_dir, title or "SFPO report: per-stage profile and training", sections))
    return written


def _image(name: str) -> Image:
    return Image(name, PLOTS[name])


def report_sections(runs: list[Run], summary: pd.DataFrame, seconds: pd.DataFrame, share: pd.DataFrame,
                    memory: pd.DataFrame, head: pd.DataFrame) -> list[Section]:
    """The report's sections, from the tables :func:`build_report` writes as CSV."""
    counts = ", ".join(f"{a}: {sum(r.arm == a for r in runs)}" for a in arms(runs))
    intro = Section("", [Paragraph(f"Runs: {', '.join(r.name for r in runs)} ({counts}).")])
    overhead = pd.concat([column(r.train, "perf/profiler_overhead_frac") for r in runs]).dropna() * 100
    if overhead.size:
        intro.blocks.append(Paragraph(f"Profiler overhead (its own bookkeeping per step, over the step time): median "
                                      f"{overhead.median():.2f}%, max {overhead.max():.2f}% of a step."))  # fmt: skip
    sections = [intro]
    if len(head):
        note, measures, verdicts = headline_lines(head)
        sections += [
            Section("Headline: SFPO against GRPO (paper Fig. 4, appendix C.5)", [Paragraph(note), Bullets(measures)]),
            Section("Against the paper", [Bullets(verdicts)]),
            Section("Per seed (headline.csv)", [Table(head[[c for c in HEADLINE_COLUMNS if c in head]])]),
        ]
    sections.append(Section("Runs (runs.csv)", [Table(summary)]))
    sections.append(Section("Time per stage (stage_time.csv, in seconds; milliseconds per step below)", [
        Paragraph("Mean over each run's steps (the first step left out as warm-up when a run has 3 or more), then "
                  "over the arm's runs. The stacked stages add up to `step` exactly: `unattributed` is the rest (LR "
                  "scheduler, batch assembly, SFPO's bookkeeping inside update_actor, the profiler itself). "
                  "`optimizer` (gradient clipping + AdamW step, every pass) lies inside the fast and slow passes and "
                  "is not stacked."),
        Table(labelled(seconds * 1e3, "ms")), _image("stage_time_per_step.png"),
        Paragraph("Share of the step, percent (stage_share.csv):"),
        Table(labelled(share, "%")), _image("stage_share.png"),
    ]))  # fmt: skip
    if len(memory):
        sections.append(Section("Memory per stage (stage_memory.csv)", [
            Paragraph("CUDA: max_allocated_gb / max_reserved_gb are torch's peaks during the stage (peaks reset when "
                      "it starts); device_used_gb and gpu_util_pct come from NVML when the stage ends. CPU: rss_gb is "
                      "the process's resident set size when the stage ends. The largest reading over the arm's runs."),
            Table(memory), _image("stage_memory.png"),
        ]))  # fmt: skip
    sections.append(Section("Reward and test accuracy", [_image("reward_accuracy.png")]))
    sections.append(Section("Entropy, z-score and alpha", [
        Paragraph("Vertical lines: the step the entropy trigger fired (alpha -> 0 after it)."),
        _image("entropy_zscore_alpha.png"),
    ]))  # fmt: skip
    return sections


def default_out(run_paths: list[str]) -> str:
    """``<RUN>/report`` for one run, else ``report/`` in the runs' common parent directory."""
    runs = [os.path.abspath(os.path.normpath(p)) for p in expand_run_paths(run_paths)]
    if len(runs) == 1:
        return os.path.join(runs[0], "report")
    return os.path.join(os.path.commonpath([os.path.dirname(r) for r in runs]), "report")
