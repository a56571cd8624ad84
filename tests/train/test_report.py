"""``sfpo compare`` / ``sfpo report`` on real (tiny) runs: the files, their tables, and numbers that match the logs.

One compare of 2 seeds x (GRPO, SFPO) x 2 iterations, validated at every step,
is shared by the tests; the expected numbers are recomputed here from each
run's metrics.jsonl, or from the inputs of the hand-written runs. The report's
prose is not asserted word for word: its wording lives in the code; the tests
check the tables it shows (against the CSVs), and the pages' structure.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from sfpo_train import cli
from sfpo_train.reports import EXTRA_STAGES, STACKED_STAGES, build_report, headline_lines, headline_table, load_run
from sfpo_train.reports.compare import run_compare
from sfpo_train.reports.render import format_cell
from sfpo_train.reports.tables import run_summary
from tests.helpers.tiny_setup import tiny_overrides, write_data, write_tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUNS = ("grpo-s1", "sfpo-s1", "grpo-s2", "sfpo-s2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return root, tiny_overrides(write_tiny_model(str(root / "model")), write_data(str(root)))


@pytest.fixture(scope="module")
def compared(tiny):
    root, overrides = tiny
    return run_compare(
        "smoke",
        seeds=2,
        steps=2,
        out_dir=str(root / "compare"),
        progress=False,
        overrides=overrides + ["trainer.test_freq=1"],
    )


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def logs(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def accuracy(row: dict) -> float | None:
    values = [v for k, v in row.items() if k.startswith("val-core/") and k.endswith("/reward/mean@1")]
    return sum(values) / len(values) if values else None


def markdown_tables(md: str) -> list[pd.DataFrame]:
    """Every pipe table of a Markdown page, as strings (header row -> columns; the alignment row dropped)."""
    tables, block = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif block:
            assert set("".join(block[1])) <= set("-: "), f"no alignment row under {block[0]}"
            tables.append(pd.DataFrame(block[2:], columns=block[0]))
            block = []
    return tables


class _HtmlTables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def html_tables(page: str) -> list[pd.DataFrame]:
    parser = _HtmlTables()
    parser.feed(page)
    return [pd.DataFrame(rows[1:], columns=rows[0]) for rows in parser.tables]


def assert_shows(shown: pd.DataFrame, expected: pd.DataFrame, what: str) -> None:
    """A table of the page shows ``expected`` cell for cell, to the precision of its formatting."""
    assert shown.shape == expected.shape, what
    for col_shown, col in zip(shown, expected):
        for i, (cell, value) in enumerate(zip(shown[col_shown], expected[col])):
            where = f"{what}: {col} row {i}"
            if isinstance(value, str):
                assert cell == value, where
            elif isinstance(value, (bool, np.bool_)):
                assert cell == ("yes" if value else "no"), where
            elif pd.isna(value):
                assert cell == "n/a", where
            else:  # 3 decimals, or 2 significant digits below 0.01
                assert float(cell) == pytest.approx(float(value), rel=0.05, abs=5e-4), where


def table_with(tables: list[pd.DataFrame], column: str) -> pd.DataFrame:
    found = [t for t in tables if column in t]
    assert len(found) == 1, f"{len(found)} tables with a column {column!r}"
    return found[0]


@pytest.mark.parametrize(
    "value,shown",
    [
        (True, "yes"),
        (np.bool_(False), "no"),
        (math.nan, "n/a"),
        (np.float64(48.0), "48"),
        (np.int64(-1), "-1"),
        (123.456, "123"),
        (-12.34, "-12.3"),
        (1.23456, "1.235"),
        (0.0123, "0.012"),
        (0.0012345, "0.0012"),
        ("GRPO", "GRPO"),
    ],
)
def test_table_cells_are_formatted_by_size(value, shown):
    assert format_cell(value) == shown


def test_compare_writes_paired_runs_with_the_same_seeds(compared):
    assert [os.path.basename(d) for d in compared.run_dirs] == list(RUNS)
    for name in RUNS:
        rows = logs(os.path.join(compared.out_dir, name))
        assert [r["training/global_step"] for r in rows] == [0, 1, 2]
        alphas = [r["sfpo/alpha"] for r in rows[1:]]
        assert all(a == 0.8 for a in alphas) if name.startswith("sfpo") else all(a == 0.0 for a in alphas)
    # same seed: same initial weights and data, so the same validation before training and the same first batch
    for seed in (1, 2):
        g, s = (
            logs(os.path.join(compared.out_dir, f"grpo-s{seed}")),
            logs(os.path.join(compared.out_dir, f"sfpo-s{seed}")),
        )
        assert accuracy(g[0]) == accuracy(s[0])
        assert g[1]["critic/score/mean"] == s[1]["critic/score/mean"]
        assert g[1]["actor/entropy"] == s[1]["actor/entropy"]


def test_report_files_are_there_and_plots_are_pngs(compared):
    import matplotlib.image

    # on the CPU there is no memory plot (the process RSS says nothing per stage; the report says so)
    expected = {
        "report.md",
        "report.html",
        "runs.csv",
        "stage_time.csv",
        "stage_share.csv",
        "stage_memory.csv",
        "headline.csv",
        "summary.csv",
        "cost_model.csv",
        "stage_time_per_step.png",
        "stage_share.png",
        "reward_accuracy.png",
        "entropy_zscore_alpha.png",
    }
    assert set(compared.files) == expected
    for name in expected:
        path = os.path.join(compared.report_dir, name)
        assert os.path.getsize(path) > 0, name
        if name.endswith(".png"):
            with open(path, "rb") as f:
                assert f.read(8) == PNG_MAGIC, name
            image = matplotlib.image.imread(path)
            assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
    md = read(os.path.join(compared.report_dir, "report.md"))
    page = read(os.path.join(compared.report_dir, "report.html"))
    pngs = {n for n in expected if n.endswith(".png")}
    assert set(re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", md)) == pngs  # each plot shown, none missing
    assert set(re.findall(r"<img src='([^']+)'", page)) == pngs
    for csv in (n for n in expected if n.endswith(".csv")):
        assert csv in md, f"the report does not name {csv}"


def test_report_pages_show_the_csv_tables(compared):
    d = compared.report_dir
    md = read(os.path.join(d, "report.md"))
    page = read(os.path.join(d, "report.html"))
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    headings = re.findall(r"^## (.+)$", md, flags=re.MULTILINE)
    assert len(headings) >= 6 and len(set(headings)) == len(headings)
    assert [html.unescape(h) for h in re.findall(r"<h2>(.*?)</h2>", page)] == headings
    tables = markdown_tables(md)
    # the HTML page shows the same tables, cell for cell
    assert [t.to_dict("split") for t in html_tables(page)] == [t.to_dict("split") for t in tables]

    runs = pd.read_csv(os.path.join(d, "runs.csv"))
    assert_shows(table_with(tables, "profiler_overhead_pct"), runs, "runs.csv")
    head = pd.read_csv(os.path.join(d, "headline.csv"))
    shown = table_with(tables, "target_acc")
    assert shown.columns[0] == "seed" and set(shown.columns) <= set(head.columns)
    assert_shows(shown, head[list(shown.columns)], "headline.csv")
    for csv, unit, scale in (("stage_time.csv", "ms", 1e3), ("stage_share.csv", "%", 1)):
        expected = pd.read_csv(os.path.join(d, csv), index_col="stage") * scale
        shown = table_with(tables, f"GRPO {unit}").drop(columns="what")
        assert list(shown.columns) == ["stage", f"GRPO {unit}", f"SFPO {unit}"]
        assert_shows(shown, expected.reset_index(), csv)
    memory = pd.read_csv(os.path.join(d, "stage_memory.csv"))
    assert_shows(table_with(tables, "reading"), memory, "stage_memory.csv")


def test_tables_have_the_expected_rows_and_columns(compared):
    d = compared.report_dir
    runs = pd.read_csv(os.path.join(d, "runs.csv"))
    assert list(runs["run"]) == list(RUNS) and list(runs["arm"]) == ["GRPO", "SFPO"] * 2
    for col in ("seed", "steps", "rollouts", "wall_clock_s", "mean_step_s", "best_acc", "final_acc", "peak_memory_gb"):
        assert col in runs, col
    times = pd.read_csv(os.path.join(d, "stage_time.csv"), index_col="stage")
    assert list(times.index) == list(STACKED_STAGES) + list(EXTRA_STAGES)
    assert list(times.columns) == ["GRPO", "SFPO"]
    stacked = times.loc[list(STACKED_STAGES)].sum()
    assert stacked.to_numpy() == pytest.approx(times.loc["step"].to_numpy(), rel=1e-6)  # the stack tiles the step
    assert times.loc["sfpo_fast", "GRPO"] == 0 and times.loc["sfpo_fast", "SFPO"] > 0
    share = pd.read_csv(os.path.join(d, "stage_share.csv"), index_col="stage")
    assert share.loc[list(STACKED_STAGES)].sum().to_numpy() == pytest.approx([100, 100], rel=1e-6)
    memory = pd.read_csv(os.path.join(d, "stage_memory.csv"))
    assert list(memory.columns) == ["stage", "reading", "GRPO", "SFPO"]
    rss = memory[memory["reading"] == "rss_gb"]
    assert {"gen", "old_log_prob", "update_actor", "optimizer", "step", "testing"} <= set(rss["stage"])
    assert (rss[["GRPO", "SFPO"]] > 0).all().all()
    head = pd.read_csv(os.path.join(d, "headline.csv"))
    assert list(head["seed"]) == [1, 2]


def test_report_numbers_match_the_runs_logs(compared):
    d = compared.report_dir
    runs = pd.read_csv(os.path.join(d, "runs.csv")).set_index("run")
    times = pd.read_csv(os.path.join(d, "stage_time.csv"), index_col="stage")
    mean_step = {}
    for name in RUNS:
        rows = logs(os.path.join(compared.out_dir, name))
        train = rows[1:]  # 2 steps: both are timed (the warm-up step is left out only from 3 steps on)
        mean_step[name] = sum(r["timing_s/step"] for r in train) / len(train)
        accs = [accuracy(r) for r in rows]
        assert runs.loc[name, "mean_step_s"] == pytest.approx(mean_step[name])
        assert runs.loc[name, "rollouts"] == train[-1]["train/rollouts_total"] == 2 * 4 * 4  # 2 steps of 4 prompts x 4
        assert runs.loc[name, "wall_clock_s"] == pytest.approx(train[-1]["train/elapsed_s"])
        assert runs.loc[name, "initial_acc"] == pytest.approx(accs[0])
        assert runs.loc[name, "best_acc"] == pytest.approx(max(accs))
        assert runs.loc[name, "final_acc"] == pytest.approx(accs[-1])
    for arm, names in (("GRPO", ("grpo-s1", "grpo-s2")), ("SFPO", ("sfpo-s1", "sfpo-s2"))):
        assert times.loc["step", arm] == pytest.approx(sum(mean_step[n] for n in names) / 2)
        gen = [sum(r["timing_s/gen"] for r in logs(os.path.join(compared.out_dir, n))[1:]) / 2 for n in names]
        assert times.loc["gen", arm] == pytest.approx(sum(gen) / 2)

    head = pd.read_csv(os.path.join(d, "headline.csv")).set_index("seed")
    for seed in (1, 2):
        g, s = (
            logs(os.path.join(compared.out_dir, f"grpo-s{seed}")),
            logs(os.path.join(compared.out_dir, f"sfpo-s{seed}")),
        )
        target = max(accuracy(r) for r in g)
        g_hit = next(r for r in g if accuracy(r) >= target)
        s_hit = next((r for r in s if accuracy(r) >= target), None)
        assert head.loc[seed, "target_acc"] == pytest.approx(target)
        assert head.loc[seed, "grpo_rollouts"] == g_hit.get("train/rollouts_total", 0)
        assert bool(head.loc[seed, "sfpo_reached"]) == (s_hit is not None)
        if s_hit is not None:
            assert head.loc[seed, "sfpo_rollouts"] == s_hit.get("train/rollouts_total", 0)
        ratio = mean_step[f"sfpo-s{seed}"] / mean_step[f"grpo-s{seed}"]
        assert head.loc[seed, "step_time_ratio"] == pytest.approx(ratio)


def test_a_single_grpo_run_reports_without_a_headline(compared, tmp_path):
    files = build_report([os.path.join(compared.out_dir, "grpo-s1")], str(tmp_path / "one"))
    assert "headline.csv" not in files
    times = pd.read_csv(files["stage_time.csv"], index_col="stage")
    assert list(times.columns) == ["GRPO"]
    md = read(files["report.md"])
    assert "headline.csv" not in md
    assert all("target_acc" not in t for t in markdown_tables(md))
    assert all("SFPO" not in t.columns and "SFPO ms" not in t.columns for t in markdown_tables(md))


def write_run(root, name: str, seed: int, sfpo: bool, accuracies: list[float | None], steps: int = 4) -> str:
    """A run directory with logged metrics, no training: validation at step 0 (None: none) and every 2nd step."""
    d = root / name
    d.mkdir()
    (d / "config.yaml").write_text(
        f"trainer:\n  seed: {seed}\nactor_rollout_ref:\n  actor:\n    sfpo:\n"
        f"      enable: {str(sfpo).lower()}\n      alpha: 0.8\n"
    )
    rows = [{"training/global_step": 0, "val-core/x/reward/mean@1": accuracies[0]}] if accuracies[:1] != [None] else []
    for step in range(1, steps + 1):
        row = {
            "training/global_step": step,
            "timing_s/step": 1.0 + sfpo,
            "timing_s/gen": 0.5,
            "train/rollouts_total": 8 * step,
            "train/elapsed_s": (1.0 + sfpo) * step,
            "sfpo/inner_steps_run": 3.0 * sfpo,
            "perf/cpu_memory_used_gb": 1.0,
        }
        if step % 2 == 0 and len(accuracies) > step // 2:
            row["val-core/x/reward/mean@1"] = accuracies[step // 2]
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def assert_prose(head: pd.DataFrame) -> None:
    """``headline_lines`` runs on the table and leaks no raw NaN (its wording is the code's, not asserted here)."""
    note, measures, verdicts = headline_lines(head)
    assert measures and verdicts
    for text in [note, *measures, *verdicts]:
        assert isinstance(text, str) and text.strip() and not re.search(r"\bnan\b", text, flags=re.IGNORECASE), text


def test_headline_names_a_seed_whose_grpo_run_never_validated(tmp_path):
    paths = [
        write_run(tmp_path, "grpo-s1", 1, False, [0.2, 0.3, 0.4]),
        write_run(tmp_path, "sfpo-s1", 1, True, [0.2, 0.5, 0.6]),
        write_run(tmp_path, "grpo-s2", 2, False, [None]),
        write_run(tmp_path, "sfpo-s2", 2, True, [0.2, 0.1, 0.1]),
    ]
    head = headline_table([load_run(p) for p in paths])
    assert head["sfpo_reached"].dtype == bool  # was object (NaN in it), and headline_lines raised TypeError
    assert_prose(head)
    head = head.set_index("seed")
    assert head["target_known"].tolist() == [True, False] and head["sfpo_reached"].tolist() == [True, False]
    assert head["initial_known"].tolist() == [True, False] and head["grpo_improved"].tolist() == [True, False]
    # seed 1: GRPO's best (0.4) first at step 4 (4 x 8 rollouts, 4 x 1 s); SFPO's 0.5 at step 2 (2 x 8, 2 x 2 s)
    assert head.loc[1, "target_acc"] == pytest.approx(0.4)
    assert (head.loc[1, "grpo_best_step"], head.loc[1, "sfpo_step"]) == (4, 2)
    assert head.loc[1, "rollouts_ratio"] == 32 / 16 and head.loc[1, "time_ratio"] == 4.0 / 4.0
    assert head.loc[1, "step_time_ratio"] == 2.0  # SFPO's steps take 2 s, GRPO's 1 s
    # seed 2: no target, so nothing is measured against it
    assert head.loc[2, ["target_acc", "grpo_rollouts", "sfpo_rollouts", "rollouts_ratio", "time_ratio"]].isna().all()
    files = build_report(paths, str(tmp_path / "report"))
    shown = table_with(markdown_tables(read(files["report.md"])), "target_acc").set_index("seed")
    assert shown.loc["2", "target_acc"] == "n/a" and shown.loc["1", "rollouts_ratio"] == "2"


def test_headline_claims_no_improvement_without_the_step0_accuracy(tmp_path):
    # trainer.val_before_train=false: the first validation is at step 2, and accuracy never changes
    paths = [
        write_run(tmp_path, "grpo-s1", 1, False, [None, 0.3, 0.3]),
        write_run(tmp_path, "sfpo-s1", 1, True, [None, 0.3, 0.3]),
    ]
    head = headline_table([load_run(p) for p in paths])
    row = head.iloc[0]
    assert not row["grpo_improved"]  # was claimed: the first validation (step 2) was taken for the start
    assert math.isnan(row["rollouts_ratio"]) and math.isnan(row["time_ratio"])
    assert (row["grpo_rollouts"], row["sfpo_rollouts"]) == (16, 16)  # still measured: the first validated hit
    assert row["target_known"] and not row["initial_known"] and math.isnan(row["grpo_initial_acc"])
    assert_prose(head)
    summary = run_summary(load_run(paths[0]))
    assert math.isnan(summary["initial_acc"])  # not the step-2 accuracy
    assert (summary["best_acc"], summary["best_acc_step"], summary["final_acc"]) == (0.3, 2, 0.3)  # the first best
    assert (summary["steps"], summary["rollouts"], summary["wall_clock_s"]) == (4, 32, 4.0)
    assert summary["mean_step_s"] == 1.0 and summary["peak_memory_gb"] == 1.0 and summary["trigger_step"] == -1
    files = build_report(paths, str(tmp_path / "report"))
    assert pd.read_csv(files["runs.csv"])["initial_acc"].isna().all()
    shown = table_with(markdown_tables(read(files["report.md"])), "target_acc")
    assert shown["grpo_initial_acc"].tolist() == ["n/a"] and shown["rollouts_ratio"].tolist() == ["n/a"]


def test_report_cli_rejects_a_directory_without_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        cli.main(["report", str(tmp_path / "empty")])
    assert exc.value.code == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err


def test_report_cli_on_a_compare_directory(compared, tmp_path, capsys):
    assert cli.main(["report", compared.out_dir, "--out", str(tmp_path / "again")]) == 0
    again = pd.read_csv(tmp_path / "again" / "runs.csv")
    assert list(again["run"]) == sorted(RUNS)  # the directory's runs, in name order


def test_compare_rejects_overrides_of_what_it_sets(tiny, tmp_path):
    _, overrides = tiny
    with pytest.raises(ValueError, match="trainer.seed"):
        run_compare(
            "smoke", seeds=1, steps=1, out_dir=str(tmp_path), overrides=overrides + ["trainer.seed=3"], progress=False
        )
    with pytest.raises(ValueError, match="--seeds"):
        run_compare("smoke", seeds=0, out_dir=str(tmp_path), overrides=overrides, progress=False)
