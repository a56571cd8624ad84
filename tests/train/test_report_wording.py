"""What the report says about the runs it was given: its title, the trigger, a folded stage, the extra memory,
where it is written, and plots a reader can read.

Hand-written run directories (:func:`~tests.helpers.run_files.write_stage_run`, metrics edited where a test
needs a logged flag); no training.
"""

from __future__ import annotations

import json
import os

import matplotlib
import pandas as pd
import pytest

from sfpo_train import cli
from sfpo_train.reports import build_report, load_run
from sfpo_train.reports.headline import headline_lines, headline_table
from sfpo_train.reports.plots import (
    MAX_BARS,
    seed_styles,
    stage_share_figure,
    stage_time_figure,
    step_window,
    window_means,
)
from sfpo_train.reports.tables import arm_stage_table
from tests.helpers.run_files import write_stage_run

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen


def read(path) -> str:
    with open(path) as f:
        return f.read()


def set_metrics(run_dir: str, values) -> None:
    """Add ``values(step)`` (a dict) to every training row of ``run_dir``'s metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in read(path).splitlines()]
    for row in rows:
        if row["training/global_step"] >= 1:
            row.update(values(row["training/global_step"]))
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def runs_table_of(md: str) -> pd.DataFrame:
    """The Markdown table under ``## Runs (runs.csv)``."""
    section = md.split("## Runs (runs.csv)", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return pd.DataFrame(cells[2:], columns=cells[0])


# --------------------------------------------------------------------------- title and arms


def test_a_one_run_report_speaks_of_that_run(tmp_path):
    run = write_stage_run(tmp_path, "grpo-s1", 1, sfpo=False, accuracies=[0.2, 0.3, 0.4])
    files = build_report([run], str(tmp_path / "report"))
    md = read(files["report.md"])
    assert md.splitlines()[0] == "# sfpo report: run grpo-s1 (plain GRPO)"
    assert "GRPO arm" not in md and "SFPO arm" not in md and "SFPO report (" not in md
    assert "<title>sfpo report: run grpo-s1 (plain GRPO)</title>" in read(files["report.html"])
    # a GRPO run has no trigger: n/a, not -1, in the CSV and on the page
    assert pd.read_csv(files["runs.csv"], keep_default_na=False)["trigger_step"].tolist() == ["n/a"]
    assert runs_table_of(md)["trigger_step"].tolist() == ["n/a"]


def test_titles_of_one_arm_and_of_both(tmp_path):
    sfpo = [write_stage_run(tmp_path, f"sfpo-s{s}", s, sfpo=True, accuracies=[0.2, 0.3]) for s in (1, 2)]
    grpo = write_stage_run(tmp_path, "grpo-s1", 1, sfpo=False, accuracies=[0.2, 0.3])
    one_arm = read(build_report(sfpo, str(tmp_path / "a"))["report.md"])
    assert one_arm.splitlines()[0] == "# sfpo report: 2 runs of SFPO over GRPO"
    assert "SFPO arm" not in one_arm and "GRPO arm" not in one_arm
    both = read(build_report([grpo, *sfpo], str(tmp_path / "b"))["report.md"])
    assert both.splitlines()[0] == "# sfpo report: GRPO against SFPO over GRPO, 3 runs"
    assert "the GRPO arm is plain GRPO" in both


def test_trigger_step_reads_never_where_it_did_not_fire(tmp_path):
    fired = write_stage_run(tmp_path, "sfpo-s1", 1, sfpo=True, accuracies=[0.2, 0.3], steps=6)
    set_metrics(fired, lambda step: {"sfpo/triggered": float(step >= 3)})
    quiet = write_stage_run(tmp_path, "sfpo-s2", 2, sfpo=True, accuracies=[0.2, 0.3], steps=6)
    set_metrics(quiet, lambda step: {"sfpo/triggered": 0.0})
    files = build_report([fired, quiet], str(tmp_path / "report"))
    csv = pd.read_csv(files["runs.csv"], dtype=str).set_index("run")["trigger_step"]
    assert csv.to_dict() == {"sfpo-s1": "3", "sfpo-s2": "never"}
    shown = runs_table_of(read(files["report.md"])).set_index("run")["trigger_step"]
    assert shown.to_dict() == {"sfpo-s1": "3", "sfpo-s2": "never"}


# --------------------------------------------------------------------------- stage times and memory


@pytest.mark.parametrize("folded", [True, False])
def test_a_zero_old_log_prob_says_why(tmp_path, folded):
    run = write_stage_run(tmp_path, "grpo-s1", 1, sfpo=False, accuracies=[0.2, 0.3])
    set_metrics(run, lambda step: {"actor/old_log_prob_from_update": float(folded), "timing_s/old_log_prob": 0.0})
    md = read(build_report([run], str(tmp_path / "report"))["report.md"])
    row = next(line for line in md.splitlines() if line.startswith("| old_log_prob"))
    assert ("first update pass" in row) == folded
    assert ("`old_log_prob` is 0 in GRPO" in md) == folded


def test_the_extra_memory_is_one_number_with_its_definition(tmp_path):
    # SFPO's peak over GRPO's: +0.5 GB in seed 1, +0.1 GB in seed 2: the mean +0.300 GB, never the max +0.500
    paths = []
    for seed, sfpo_gb in ((1, 1.5), (2, 1.1)):
        paths.append(write_stage_run(tmp_path, f"grpo-s{seed}", seed, sfpo=False, accuracies=[0.2, 0.3, 0.4]))
        paths.append(write_stage_run(tmp_path, f"sfpo-s{seed}", seed, sfpo=True, accuracies=[0.2, 0.4, 0.5]))
        set_metrics(paths[-1], lambda step, gb=sfpo_gb: {"perf/cpu_memory_used_gb": gb})
    _, measures, verdicts = headline_lines(headline_table([load_run(p) for p in paths]))
    said = [line for line in measures + verdicts if "extra memory" in line.lower()]
    assert len(said) == 2  # the headline's measure and the comparison with the paper
    for line in said:
        assert "+0.300 GB" in line and "+0.500" not in line and "mean over seeds" in line


# --------------------------------------------------------------------------- where the report goes


def test_report_does_not_overwrite_a_report_unasked(tmp_path, capsys):
    compare = tmp_path / "cmp"
    compare.mkdir()
    runs = [
        write_stage_run(compare, "grpo-s1", 1, sfpo=False, accuracies=[0.2, 0.3, 0.4]),
        write_stage_run(compare, "sfpo-s1", 1, sfpo=True, accuracies=[0.2, 0.4, 0.5]),
    ]
    report = compare / "report"
    build_report(runs, str(report), title="sfpo compare: the compare's own")
    before = {p: read(report / p) for p in ("report.md", "headline.csv")}
    with pytest.raises(SystemExit) as exc:  # the compare's directory: its default out is the compare's report
        cli.main(["report", str(compare)])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "sfpo compare: the compare's own" in err and f"--out {report}" in err and "--out DIR" in err
    assert {p: read(report / p) for p in before} == before  # untouched
    # asked for: a new report elsewhere, or this one replaced as a whole (no file of the old one left)
    assert cli.main(["report", runs[0], "--out", str(tmp_path / "elsewhere")]) == 0
    assert cli.main(["report", runs[0], "--out", str(report)]) == 0
    assert not (report / "headline.csv").exists()  # one GRPO run: no headline; the compare's is gone
    assert read(report / "report.md").startswith("# sfpo report: run grpo-s1")
    assert [p.name for p in compare.iterdir() if p.name.startswith(".")] == []  # no temporary left


# --------------------------------------------------------------------------- plots


def test_long_runs_are_plotted_over_step_windows(tmp_path):
    assert step_window(40) == 1 and step_window(50) == 2 and step_window(300) == 10 and step_window(10**5) == 3000
    for steps in (1, 39, 41, 299, 300, 301, 5000, 123457):
        assert -(-steps // step_window(steps)) <= MAX_BARS
    per_step = pd.DataFrame({"gen": [float(s) for s in range(1, 26)]}, index=range(1, 26))
    windows = window_means(per_step, 10)
    assert windows.index.tolist() == [1, 11, 21]
    assert windows["gen"].tolist() == [5.5, 15.5, 23.0]  # means of 1..10, 11..20, 21..25
    run = write_stage_run(tmp_path, "sfpo-s1", 1, sfpo=True, accuracies=[0.2], steps=300)
    fig = stage_time_figure([load_run(run)])
    centres = {round(bar.get_x() + bar.get_width() / 2, 6) for bar in fig.axes[0].patches}
    assert sorted(centres) == [w + 4.5 for w in range(1, 300, 10)]  # one bar over the middle of each window
    assert "windows of 10 steps" in fig.axes[0].get_xlabel()


def assert_text_inside(fig) -> None:
    """Every drawn part of ``fig`` lies on its canvas: each axes with its labels, ticks and title, and each
    legend, which overlaps no axes (a legend over the last tick label hid it)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    axes = [(ax.get_xlabel() or "axes", ax.get_tightbbox(renderer, bbox_extra_artists=[])) for ax in fig.axes]
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    parts = axes + [("legend", legend.get_window_extent(renderer)) for legend in legends]
    assert fig.axes and fig.axes[0].get_xlabel()
    for what, extent in parts:
        inside = extent.x0 >= box.x0 - 1 and extent.y0 >= box.y0 - 1
        assert inside and extent.x1 <= box.x1 + 1 and extent.y1 <= box.y1 + 1, f"{what} outside the figure"
    for legend in legends:
        for what, extent in axes:
            assert not legend.get_window_extent(renderer).overlaps(extent), f"the legend covers {what}"


@pytest.mark.parametrize("arms", [("grpo",), ("sfpo",), ("grpo", "sfpo")])
def test_stage_plots_keep_every_label_inside(tmp_path, arms):
    runs = []
    for arm in arms:
        path = write_stage_run(tmp_path, f"{arm}-s1", 1, sfpo=arm == "sfpo", accuracies=[0.2])
        set_metrics(path, lambda step: {f"timing_s/{s}": 0.01 for s in ("old_log_prob", "ref", "adv", "sync_weights")})
        runs.append(load_run(path))
    _, share = arm_stage_table(runs)
    for fig in (stage_share_figure(share), stage_time_figure(runs)):
        assert_text_inside(fig)
        plt.close(fig)


def test_seeds_of_an_arm_look_different(tmp_path):
    paths = [
        write_stage_run(tmp_path, f"{arm}-s{seed}", seed, sfpo=arm == "sfpo", accuracies=[0.2])
        for arm in ("grpo", "sfpo")
        for seed in range(1, 6)
    ]
    styles = seed_styles([load_run(p) for p in paths])
    looks = [(tuple(color), line, marker) for color, line, marker in styles.values()]
    assert len(styles) == 10 and len(set(looks)) == 10
    assert len({color for color, _, _ in looks}) == 10  # a shade of its own per run, not only a line style
