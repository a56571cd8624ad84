"""``build_report``: a report's tables, plots and pages from run directories (see :mod:`sfpo_train.reports`)."""

from __future__ import annotations

import os

import pandas as pd

from sfpo_train.reports.headline import headline_lines, headline_table
from sfpo_train.reports.plots import plot_curves, plot_dynamics, plot_memory, plot_stage_share, plot_stage_time
from sfpo_train.reports.render import Bullets, Image, Paragraph, Section, Table, write_csvs, write_pages
from sfpo_train.reports.runs import Run, arms, column, expand_run_paths, load_run
from sfpo_train.reports.stats import INTERVAL
from sfpo_train.reports.summary import cost_model_lines, cost_model_table, summary_display, summary_lines, summary_table
from sfpo_train.reports.tables import (
    algorithm_label,
    arm_label,
    arm_memory_table,
    arm_stage_table,
    folded_old_log_prob,
    labelled,
    run_summary,
    runs_table,
)

# The plots: file name -> what it shows (the image's alt text).
PLOTS = {
    "stage_time_per_step.png": "Seconds per step by stage",
    "stage_share.png": "Share of a step by stage",
    "stage_memory.png": "Memory per stage",
    "reward_accuracy.png": "Reward and test accuracy against rollouts and wall-clock",
    "entropy_zscore_alpha.png": "Entropy, z-score and alpha over steps (trigger marked)",
}
# The columns of headline.csv the report shows, in this order.
HEADLINE_COLUMNS = (
    "seed",
    "finished",
    "grpo_initial_acc",
    "target_acc",
    "grpo_rollouts",
    "sfpo_rollouts",
    "rollouts_ratio",
    "grpo_time_s",
    "sfpo_time_s",
    "time_ratio",
    "step_time_ratio",
    "active_step_time_ratio",
    "extra_memory_gb",
)


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
    csvs = {
        "runs.csv": (runs_table(summary), False),
        "stage_time.csv": (seconds, True),
        "stage_share.csv": (share, True),
        "stage_memory.csv": (memory, False),
    }
    tables = {}
    if len(head):
        tables["summary"], tables["cost"] = summary_table(head), cost_model_table(runs, head)
        csvs.update(
            {
                "headline.csv": (head, False),
                "summary.csv": (tables["summary"], False),
                "cost_model.csv": (tables["cost"], False),
            }
        )
    written = write_csvs(out_dir, csvs)

    png = {name: os.path.join(out_dir, name) for name in PLOTS if name != "stage_memory.png" or on_gpu(memory)}
    plot_stage_time(runs, png["stage_time_per_step.png"])
    plot_stage_share(share, png["stage_share.png"])
    if "stage_memory.png" in png:
        plot_memory(memory, png["stage_memory.png"])
    plot_curves(runs, head, png["reward_accuracy.png"])
    plot_dynamics(runs, png["entropy_zscore_alpha.png"])
    written.update(png)

    sections = report_sections(runs, summary, seconds, share, memory, head, tables)
    written.update(write_pages(out_dir, title or default_title(runs), sections))
    return written


def default_title(runs: list[Run]) -> str:
    """What the report is about: one run (and which arm), the runs of one arm, or both arms against each other."""
    algorithms = sorted({r.algorithm for r in runs})
    present = arms(runs)
    if len(present) == 2:
        base = ", ".join(algorithm_label(a) for a in algorithms)
        return f"sfpo report: {base} against SFPO over {base}, {len(runs)} runs"
    what = ", ".join(arm_label(present[0], a) for a in algorithms)
    if len(runs) == 1:
        return f"sfpo report: run {runs[0].name} ({what})"
    return f"sfpo report: {len(runs)} runs of {what}"


def on_gpu(memory: pd.DataFrame) -> bool:
    """Whether the runs have CUDA memory readings (on the CPU the memory plot is left out: see the report)."""
    return "reading" in memory and bool((memory["reading"] == "max_allocated_gb").any())


def _image(name: str) -> Image:
    return Image(name, PLOTS[name])


def report_sections(
    runs: list[Run],
    summary: pd.DataFrame,
    seconds: pd.DataFrame,
    share: pd.DataFrame,
    memory: pd.DataFrame,
    head: pd.DataFrame,
    tables: dict | None = None,
) -> list[Section]:
    """The report's sections, from the tables :func:`build_report` writes as CSV."""
    tables = tables or {}
    present = arms(runs)
    counts = ", ".join(f"{a}: {sum(r.arm == a for r in runs)}" for a in present)
    base = "/".join(algorithm_label(a) for a in sorted({r.algorithm for r in runs}))
    if len(present) == 2:
        arm = "GRPO arm" if base == "GRPO" else "arm labelled GRPO"
        what = f"the {arm} is plain {base}, the SFPO arm SFPO over the same recipe"
    elif present == ["SFPO"]:
        what = f"every run is SFPO over {base}; with no plain {base} run there is no SFPO-against-GRPO headline"
    else:
        what = f"every run is plain {base}, without SFPO; with no SFPO run there is no SFPO-against-GRPO headline"
    intro = Section("", [Paragraph(f"Runs: {', '.join(r.name for r in runs)} ({counts}); {what}.")])
    unfinished = summary[~summary["finished"].astype(bool)]
    if len(unfinished):
        listed = "; ".join(
            f"{r['run']} stopped at {r['steps']} of {r['planned_steps']} steps" for _, r in unfinished.iterrows()
        )
        intro.blocks.append(
            Paragraph(
                f"**Unfinished runs**: {listed}. Their final_acc is the last validation before "
                "the stop, not the end of training; their seeds are left out of summary.csv "
                "and the cost model (`finished` in runs.csv and headline.csv)."
            )
        )
    overhead = pd.concat([column(r.train, "perf/profiler_overhead_frac") for r in runs]).dropna() * 100
    if overhead.size:
        intro.blocks.append(
            Paragraph(
                f"Profiler overhead (its own bookkeeping per step, over the step time): median "
                f"{overhead.median():.2f}%, max {overhead.max():.2f}% of a step."
            )
        )
    sections = [intro]
    if len(head):
        note, measures, verdicts = headline_lines(head)
        sections += [
            Section("Headline: SFPO against GRPO (paper Fig. 4, appendix C.5)", [Paragraph(note), Bullets(measures)]),
            Section(
                "Over seeds with 95% intervals (summary.csv)",
                [
                    Paragraph(
                        f"Paired by seed: each row uses the same seeds for both arms (listed); {INTERVAL}; "
                        "diff and ratio are taken per seed (SFPO - GRPO, SFPO / GRPO), then the diff's mean and the "
                        "ratio's geometric mean over seeds."
                    ),
                    Bullets(summary_lines(tables["summary"])),
                    Table(summary_display(tables["summary"])),
                ],
            ),
            Section("Against the paper", [Bullets(verdicts)]),
            Section(
                "Cost model: a projection to other generation shares (cost_model.csv)",
                [Bullets(cost_model_lines(tables["cost"], head)), Table(tables["cost"])],
            ),
            Section("Per seed (headline.csv)", [Table(head[[c for c in HEADLINE_COLUMNS if c in head]])]),
        ]
    sections.append(
        Section(
            "Runs (runs.csv)",
            [
                Paragraph(
                    "trigger_step: the step at which SFPO's entropy trigger fired (never: it did not; n/a: a GRPO "
                    "run, which has no trigger)."
                ),
                Table(runs_table(summary)),
            ],
        )
    )
    folded = folded_old_log_prob(runs)
    stage_notes = {"old_log_prob": "old log-prob (0: in the first update pass)"} if folded else {}
    sections.append(
        Section(
            "Time per stage, milliseconds per step (stage_time.csv: the same in seconds)",
            [
                Paragraph(
                    "Mean over each run's steps (the first step left out as warm-up when a run has 3 or more), then "
                    "over the arm's runs. The stacked stages add up to `step` exactly: `unattributed` is the rest (LR "
                    "scheduler, batch assembly, SFPO's bookkeeping inside update_actor, the profiler itself). "
                    "`optimizer` (gradient clipping + AdamW step, every pass) lies inside the fast and slow passes and "
                    "is not stacked."
                    + (
                        f" `old_log_prob` is 0 in {' and '.join(folded)}: on-policy "
                        "(actor.old_log_prob_from_update=auto) the first update pass computes the old log-probs "
                        "and entropy in its own forward, so that time is inside the update pass."
                        if folded
                        else ""
                    )
                ),
                Table(labelled(seconds * 1e3, "ms", stage_notes)),
                _image("stage_time_per_step.png"),
                Paragraph("Share of the step, percent (stage_share.csv):"),
                Table(labelled(share, "%", stage_notes)),
                _image("stage_share.png"),
            ],
        )
    )
    if len(memory):
        blocks = [
            Paragraph(
                "CUDA: max_allocated_gb / max_reserved_gb are torch's peaks during the stage (peaks reset when "
                "it starts); device_used_gb and gpu_util_pct come from NVML when the stage ends. CPU: rss_gb is "
                "the process's resident set size when the stage ends. The largest reading over the arm's runs."
            ),
            Table(memory),
        ]
        if on_gpu(memory):
            blocks.append(_image("stage_memory.png"))
        else:
            blocks.append(
                Paragraph(
                    "No plot on the CPU: the RSS is the whole process's (runs of one compare share "
                    "it, and the allocator keeps freed memory), nearly the same at every stage, so "
                    "it does not show what a stage allocates; the snapshot's exact size is "
                    "snapshot_mb in runs.csv."
                )
            )
        sections.append(Section("Memory per stage (stage_memory.csv)", blocks))
    sections.append(Section("Reward and test accuracy", [_image("reward_accuracy.png")]))
    fired = summary[(summary["arm"] == "SFPO") & (summary["trigger_step"] >= 0)]
    n_sfpo = int((summary["arm"] == "SFPO").sum())
    if len(fired):
        where = ", ".join(f"{r['run']} at step {r['trigger_step']}" for _, r in fired.iterrows())
        trigger = (
            f"The entropy trigger fired in {len(fired)} of {n_sfpo} SFPO run(s) ({where}); vertical lines mark "
            "those steps (alpha follows the decay after them)."
        )
    else:
        trigger = (
            f"The entropy trigger never fired in the {n_sfpo} SFPO run(s): alpha stayed at its initial value "
            "throughout."
            if n_sfpo
            else "No SFPO run: alpha is 0 throughout."
        )
    sections.append(Section("Entropy, z-score and alpha", [Paragraph(trigger), _image("entropy_zscore_alpha.png")]))
    return sections


def default_out(run_paths: list[str]) -> str:
    """``<RUN>/report`` for one run, else ``report/`` in the runs' common parent directory."""
    runs = [os.path.abspath(os.path.normpath(p)) for p in expand_run_paths(run_paths)]
    if len(runs) == 1:
        return os.path.join(runs[0], "report")
    return os.path.join(os.path.commonpath([os.path.dirname(r) for r in runs]), "report")
