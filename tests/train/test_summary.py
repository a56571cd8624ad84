"""summary.csv (intervals over seeds, paired by seed), cost_model.csv (the projection) and ``sfpo sweep``.

The interval's t quantiles are checked against a numerical integral of Student's t
density (torch.distributions); the tables against hand-written runs whose stage
times make every expected number a line of arithmetic, stated beside it.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
import torch

from sfpo_train import cli
from sfpo_train.reports import build_report, headline_table, load_run
from sfpo_train.reports.grid import GROUPS, grid_points, run_sweep, unique_runs
from sfpo_train.reports.stats import MIN_SEEDS, format_spread, mean_ci, ratio_ci, t975
from sfpo_train.reports.summary import cost_model_table, summary_table
from sfpo_train.reports.sweep_report import plot_k_alpha
from tests.helpers.run_files import write_stage_run
from tests.helpers.tiny_setup import tiny_overrides, write_data, write_tiny_model


def t_coverage(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` degrees of freedom, by the trapezoid rule on its density."""
    x = torch.linspace(-t, t, 400001, dtype=torch.float64)
    density = torch.distributions.StudentT(torch.tensor(float(df), dtype=torch.float64)).log_prob(x).exp()
    return float(torch.trapezoid(density, x))


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29, 30, 31, 45, 200])
def test_t_quantile_covers_95_percent(df):
    # the table rounds to 3 decimals, so coverage is 0.95 to within the density there times 5e-4
    assert t_coverage(t975(df), df) == pytest.approx(0.95, abs=3e-4)


def test_mean_ci_is_the_t_interval():
    values = [0.31, 0.42, 0.37, 0.29, 0.44]
    mean, low, high, n = mean_ci(values + [math.nan])  # NaN is not a seed's value
    half = t975(4) * np.std(values, ddof=1) / math.sqrt(5)
    assert n == 5 and mean == pytest.approx(np.mean(values))
    assert (low, high) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    assert mean_ci([0.5])[:3] == pytest.approx((0.5, math.nan, math.nan), nan_ok=True)
    assert mean_ci([0.5, 0.7])[:3] == pytest.approx((0.6, math.nan, math.nan), nan_ok=True)  # too few seeds
    assert mean_ci([])[3] == 0
    with pytest.raises(ValueError, match="df"):
        t975(0)


def test_ratio_ci_is_the_t_interval_of_the_log_ratios():
    ratios = [1.9, 4.6, 2.5, 3.3]
    logs = np.log(ratios)
    half = t975(3) * np.std(logs, ddof=1) / math.sqrt(4)
    mean, low, high, n = ratio_ci(ratios + [math.nan])
    assert n == 4 and mean == pytest.approx(math.exp(logs.mean()))
    assert (low, high) == pytest.approx((math.exp(logs.mean() - half), math.exp(logs.mean() + half)))
    # GRPO / SFPO is the reciprocal of SFPO / GRPO, bounds swapped
    inverse = ratio_ci([1 / r for r in ratios])
    assert inverse[:3] == pytest.approx((1 / mean, 1 / high, 1 / low))
    assert all(math.isnan(v) for v in ratio_ci([0.0, 1.0, 2.0])[:3])  # a ratio of 0 has no logarithm


def test_a_ratio_interval_is_never_negative():
    # step-time ratios of a busy machine: the t interval of the ratios themselves goes below 0
    spread = [0.5, 1.0, 8.0]
    assert mean_ci(spread)[1] < 0
    assert ratio_ci(spread)[1] > 0
    rng = np.random.default_rng(0)
    for n in range(3, 12):
        for _ in range(50):
            values = np.exp(rng.normal(0.0, 3.0, size=n))  # ratios over several orders of magnitude
            mean, low, high, _ = ratio_ci(values)
            assert 0 < low <= mean <= high


@pytest.mark.parametrize("values", [[2.0], [1.9, 4.6]])
def test_fewer_than_three_seeds_say_too_few_seeds(values):
    for interval in (mean_ci(values), ratio_ci(values)):
        mean, low, high, n = interval
        assert n == len(values) < MIN_SEEDS and math.isnan(low) and math.isnan(high)
        text = format_spread(*interval, "{:.2f}x")
        assert text == f"{mean:.2f}x [too few seeds]"
    assert format_spread(*ratio_ci([1.9, 4.6, 2.5]), "{:.2f}x").count("[") == 1  # 3 seeds: an interval
    assert "too few" not in format_spread(*ratio_ci([1.9, 4.6, 2.5]), "{:.2f}x")
    assert format_spread(*mean_ci([]), "{:.2f}") == "n/a"


@pytest.fixture
def three_seeds(tmp_path):
    """seed 1: SFPO reaches GRPO's best (0.4, step 4) at step 2; seed 2: GRPO's best 0.5 at step 2, SFPO never
    gets there; seed 3: the SFPO run stopped at 4 of 6 steps."""
    runs = [
        write_stage_run(tmp_path, "grpo-s1", 1, sfpo=False, accuracies=[0.2, 0.3, 0.4]),
        write_stage_run(tmp_path, "sfpo-s1", 1, sfpo=True, accuracies=[0.2, 0.5, 0.6]),
        write_stage_run(tmp_path, "grpo-s2", 2, sfpo=False, accuracies=[0.2, 0.5, 0.4]),
        write_stage_run(tmp_path, "sfpo-s2", 2, sfpo=True, accuracies=[0.2, 0.3, 0.3]),
        write_stage_run(tmp_path, "grpo-s3", 3, sfpo=False, accuracies=[0.2, 0.3, 0.9], steps=6, planned=6),
        write_stage_run(tmp_path, "sfpo-s3", 3, sfpo=True, accuracies=[0.2, 0.3, 0.9], steps=4, planned=6),
    ]
    return runs


def test_summary_pairs_by_seed_and_leaves_out_unfinished_runs(three_seeds):
    head = headline_table([load_run(p) for p in three_seeds])
    assert head["finished"].tolist() == [True, True, False]
    summary = summary_table(head).set_index("measure")
    for arm in ("grpo", "sfpo"):
        for stat in ("mean", "ci_low", "ci_high"):
            assert f"{arm}_{stat}" in summary
    rollouts = summary.loc["rollouts_to_grpo_best"]
    # only seed 1 has both arms at the target: GRPO 4 steps x 8 = 32 (not the 24 of seeds 1 and 2), SFPO 2 x 8
    assert (rollouts["n_seeds"], rollouts["seeds"], rollouts["grpo_mean"], rollouts["sfpo_mean"]) == (1, "1", 32, 16)
    assert "1 of 2" in rollouts["note"] and "3 left out" in rollouts["note"]
    final = summary.loc["final_acc"]
    assert final["seeds"] == "1 2"
    # 2 seeds: the mean, and no interval (the t interval would be 0.45 -+ 1.91, an accuracy below 0)
    assert final["sfpo_mean"] == pytest.approx((0.6 + 0.3) / 2)
    assert math.isnan(final["sfpo_ci_low"]) and math.isnan(final["sfpo_ci_high"])
    assert final["ratio_mean"] == pytest.approx(math.sqrt((0.6 / 0.4) * (0.3 / 0.4)))  # geometric mean per seed
    assert final["diff_mean"] == pytest.approx(((0.6 - 0.4) + (0.3 - 0.4)) / 2)  # per seed, then the mean
    memory = summary.loc["peak_memory"]
    assert memory["diff_mean"] == pytest.approx(0.5)  # SFPO's runs log 1.5 GB, GRPO's 1.0 GB


def test_cost_model_projects_the_measured_stage_times(three_seeds):
    runs = [load_run(p) for p in three_seeds]
    cost = cost_model_table(runs, headline_table(runs)).set_index("generation_share")
    assert list(cost.index[:5]) == [0.25, 0.5, 0.7, 0.8, 0.9] and set(cost["kind"][:5]) == {"projection"}
    # GRPO step 1.0 s with U = 0.25 s, so G = 0.75; at share 0.5, G = U: GRPO 0.5, SFPO 0.25 + 4 U + 0.05 = 1.3
    assert cost.loc[0.5, "step_ratio_sfpo_over_grpo"] == pytest.approx(1.3 / 0.5)  # U, G, S read from the SFPO run
    # to GRPO's best (seed 1 only): GRPO 4 steps x 0.5 s against SFPO 2 fast-pass steps x 1.3 s
    assert cost.loc[0.5, "time_to_grpo_best_ratio_grpo_over_sfpo"] == pytest.approx(2.0 / 2.6)
    assert cost.loc[0.5, "sfpo_wins_wall_clock"] == "no"
    # at 90%: G = 9 U = 2.25: GRPO 4 x 2.5 s against SFPO 2 x 3.3 s
    assert cost.loc[0.9, "time_to_grpo_best_ratio_grpo_over_sfpo"] == pytest.approx(10 / 6.6)
    assert cost.loc[0.9, "sfpo_wins_wall_clock"].startswith("yes")
    here = cost.iloc[-1]  # the share measured here, 0.75: the model must give back what was measured
    assert here.name == pytest.approx(0.75)
    assert here["step_ratio_sfpo_over_grpo"] == pytest.approx(here["measured_step_ratio"]) == pytest.approx(1.8)
    assert here["time_to_grpo_best_ratio_grpo_over_sfpo"] == pytest.approx(here["measured_time_ratio"])


def test_report_marks_unfinished_runs_and_a_trigger_that_never_fired(three_seeds, tmp_path):
    files = build_report(three_seeds, str(tmp_path / "report"))
    with open(files["report.md"]) as f:
        md = f.read()
    assert "sfpo-s3 stopped at 4 of 6 steps" in md
    assert "never fired" in md and "Vertical lines" not in md and "vertical lines" not in md
    assert "stage_memory.png" not in files  # CPU readings only: no memory plot
    assert not pd.read_csv(files["runs.csv"]).set_index("run").loc["sfpo-s3", "finished"]


def test_compare_smoke_writes_summary_and_cost_model(tmp_path):
    # the command, on the tiny model (the embedded one gives the same files, 3x slower)
    out = tmp_path / "cmp"
    tiny = tiny_overrides(write_tiny_model(str(tmp_path / "model")), write_data(str(tmp_path)))
    assert (
        cli.main(
            ["compare", "--preset", "smoke", "--seeds", "3", "--steps", "4", "--out", str(out), "--no-progress", *tiny]
        )
        == 0
    )
    summary = pd.read_csv(out / "report" / "summary.csv")
    assert {"measure", "grpo_mean", "grpo_ci_low", "grpo_ci_high", "sfpo_mean", "sfpo_ci_low", "sfpo_ci_high"} <= set(
        summary
    )
    assert summary.loc[summary["measure"] == "step_time", "n_seeds"].item() == 3
    cost = pd.read_csv(out / "report" / "cost_model.csv")
    assert cost["generation_share"].tolist()[:5] == [0.25, 0.5, 0.7, 0.8, 0.9]
    assert (cost["step_ratio_sfpo_over_grpo"] > 1).all()  # K = 3 extra passes always cost something


def test_grid_has_the_papers_points():
    points = grid_points()
    assert sum(p.group == "k_alpha" for p in points) == 16
    owners = unique_runs(points)
    assert len({o.name for o in owners.values()}) == 25  # 2 + 15 + 4 ablations + 4 lr runs; the rest coincide
    assert owners["grpo-lr3e-5"].name == "grpo" and owners["sfpo-lr3e-5"].name == owners["K3-a0.8"].name == "sfpo"
    assert owners["decay-hard"].name == "sfpo" and owners["no-reposition"].name == "no-reposition"
    with pytest.raises(ValueError, match="unknown group"):
        grid_points(("k_alpha", "nope"))
    assert set(GROUPS) == {p.group for p in points}


def test_sweep_runs_reports_and_continues(tmp_path):
    model, data = write_tiny_model(str(tmp_path / "model")), write_data(str(tmp_path))
    kwargs = {
        "groups": ("baseline", "stages"),
        "seeds": 1,
        "steps": 1,
        "out_dir": str(tmp_path / "sweep"),
        "progress": False,
        "overrides": tiny_overrides(model, data),
    }
    result = run_sweep("smoke", **kwargs, log=lambda text: None)
    table = pd.read_csv(result.files["sweep.csv"])
    assert table["point"].tolist() == ["grpo", "no-reposition", "no-slow-correction"]
    assert (table["seeds_finished"] == "1 of 1").all()
    assert table.set_index("point").loc["no-slow-correction", "slow_correction"] in (False, "False")
    metrics = os.path.join(tmp_path, "sweep", "grpo-s1", "metrics.jsonl")
    before = os.stat(metrics).st_mtime_ns
    said = []
    run_sweep("smoke", **kwargs, log=said.append)  # the same sweep again: every run is kept
    assert os.stat(metrics).st_mtime_ns == before
    assert sum("kept" in line for line in said) == 3
    with pytest.raises(ValueError, match="other settings"):
        run_sweep("smoke", **{**kwargs, "overrides": kwargs["overrides"] + ["data.train_batch_size=2"]})


def test_heat_map_over_k_and_alpha(tmp_path):
    rows = [
        {
            "point": f"K{k}-a{a:g}",
            "group": "k_alpha",
            "K": k,
            "alpha": a,
            "final_acc_mean": 0.1 * k + a,
            "step_ratio_own_stages": 1.0 + k,
        }
        for k in (1, 3)
        for a in (0.5, 1.0)
    ]
    path = str(tmp_path / "heat.png")
    assert plot_k_alpha(pd.DataFrame(rows), path) and os.path.getsize(path) > 1000
    assert not plot_k_alpha(pd.DataFrame(rows).assign(group="lr"), str(tmp_path / "none.png"))
