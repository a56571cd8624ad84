"""SFPO against GRPO over seeds with confidence intervals (summary.csv), and the cost model (cost_model.csv).

``summary_table(head)``: one row per measure, from the per-seed headline table
(:func:`~sfpo_train.reports.headline.headline_table`). Each row uses one set of
seeds for both arms, the seeds where the measure is defined for both (paired by
seed: never a mean over different seeds), and names it. Columns:
``<arm>_mean``, ``<arm>_ci_low``, ``<arm>_ci_high`` (arm = grpo, sfpo), the paired
difference ``diff_*`` (SFPO - GRPO, per seed, then mean and interval) and the
paired ratio ``ratio_*`` (SFPO / GRPO per seed; its geometric mean over seeds, the
interval on the log scale). Intervals: :data:`~sfpo_train.reports.stats.INTERVAL`
(NaN bounds with fewer than 3 seeds). Seeds whose runs did not finish all
their steps are left out of every row and named in its note.

``cost_model_table(runs, head)``: a projection, not a measurement. A GRPO step is
``G + U`` (``U``: one update pass, ``G``: everything else: generation, reward,
log-probs, advantage, weight sync), an SFPO step with its fast passes
``G + (K+1) U + S`` (``S``: snapshot + reposition). ``G``, ``U`` and ``S`` are
measured in the SFPO run's steps with the fast passes (``U`` = the passes' time
/ (K+1)), so all three come from one process under one machine load; the GRPO
run's own measured step is the check (``measured_step_ratio``). At a generation share ``g = G / (G + U)`` of a
GRPO step the projected step ratio is ``(G + (K+1) U + S) / (G + U)``, and the
projected wall-clock to GRPO's best, per seed, ``n_grpo (G + U)`` against
``a (G + (K+1) U + S) + (n_sfpo - a)(G + U)``, with ``n_grpo`` / ``n_sfpo`` the
steps each arm measured to reach GRPO's best and ``a`` the SFPO steps among them
that ran the fast passes (before the entropy trigger). One row per share in
:data:`SHARES` plus the share measured here.
"""

from __future__ import annotations

import math

import pandas as pd

from sfpo_train.reports.runs import Run, column
from sfpo_train.reports.stats import format_spread, mean_ci, ratio_ci

SHARES = (0.25, 0.50, 0.70, 0.80, 0.90)


def _seeds(frame: pd.DataFrame) -> str:
    return " ".join(str(int(s)) for s in frame["seed"])


def _row(measure: str, unit: str, pairs: pd.DataFrame, grpo_col: str, sfpo_col: str, note: str) -> dict:
    """One measure over the seeds in ``pairs`` where both columns are finite."""
    both = pairs[pairs[grpo_col].notna() & pairs[sfpo_col].notna()]
    g, s = both[grpo_col].astype(float), both[sfpo_col].astype(float)
    row = {"measure": measure, "unit": unit, "n_seeds": len(both), "seeds": _seeds(both)}
    for arm, values in (("grpo", g), ("sfpo", s)):
        row[f"{arm}_mean"], row[f"{arm}_ci_low"], row[f"{arm}_ci_high"], _ = mean_ci(values)
    row["diff_mean"], row["diff_ci_low"], row["diff_ci_high"], _ = mean_ci(s - g)
    ratio = (s / g).where(g != 0)
    row["ratio_mean"], row["ratio_ci_low"], row["ratio_ci_high"], _ = ratio_ci(ratio)
    row["note"] = note
    return row


def summary_table(head: pd.DataFrame) -> pd.DataFrame:
    """summary.csv: final / best accuracy, rollouts and wall-clock to GRPO's best, step time, peak memory."""
    n = len(head)
    done = head[head["finished"].astype(bool)] if "finished" in head else head
    unfinished = head.loc[~head.index.isin(done.index), "seed"].tolist()
    left_out = f"; seed(s) {' '.join(map(str, unfinished))} left out (a run did not finish)" if unfinished else ""
    target = done[done["target_known"].astype(bool)]
    measurable = done[done["grpo_improved"].astype(bool)]
    reached = measurable[measurable["sfpo_reached"].astype(bool)]
    reach = (
        f"SFPO reached GRPO's best in {len(reached)} of {len(measurable)} seed(s) where GRPO improved on its "
        f"step-0 accuracy; both arms' means are over those {len(reached)} seed(s)"
    )
    memory = head["memory_reading"].iloc[0] if n else "n/a"
    rows = [
        _row(
            "final_acc",
            "accuracy",
            target,
            "grpo_final_acc",
            "sfpo_final_acc",
            "greedy test accuracy at the last validation" + left_out,
        ),
        _row("best_acc", "accuracy", target, "grpo_best_acc", "sfpo_best_acc", "best greedy test accuracy" + left_out),
        _row("rollouts_to_grpo_best", "rollouts", reached, "grpo_rollouts", "sfpo_rollouts", reach + left_out),
        _row("wall_clock_to_grpo_best", "s", reached, "grpo_time_s", "sfpo_time_s", reach + left_out),
        _row(
            "step_time",
            "s",
            done,
            "grpo_step_s",
            "sfpo_step_s",
            "mean seconds per step, warm-up step left out" + left_out,
        ),
        _row(
            "peak_memory",
            "GB",
            done,
            "grpo_peak_memory_gb",
            "sfpo_peak_memory_gb",
            f"{memory}; diff = SFPO's extra memory" + left_out,
        ),
    ]
    return pd.DataFrame(rows)


UNIT_FORMAT = {"accuracy": "{:.3f}", "rollouts": "{:.0f}", "s": "{:.2f}", "GB": "{:.3f}"}


def summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    """summary.csv for reading: each row's numbers in its unit's format (a column holds several units)."""
    shown = summary.drop(columns="note").astype(object)
    for i, row in summary.iterrows():
        for col in shown.columns:
            value = row[col]
            if col.endswith(("_mean", "_ci_low", "_ci_high")) and isinstance(value, float):
                f = "{:.3f}" if col.startswith("ratio_") else UNIT_FORMAT.get(row["unit"], "{:.3f}")
                shown.at[i, col] = "n/a" if math.isnan(value) else f.format(value)
    return shown


def summary_lines(summary: pd.DataFrame) -> list[str]:
    """One sentence per measure: both arms' mean [interval] over the same seeds, and the paired difference."""
    out = []
    for _, r in summary.iterrows():
        unit = "" if r["unit"] in ("accuracy", "rollouts") else f" {r['unit']}"
        f = UNIT_FORMAT.get(r["unit"], "{:.3f}") + unit

        def ci(prefix: str, f: str = f, r: pd.Series = r) -> str:
            values = (r[f"{prefix}_{stat}"] for stat in ("mean", "ci_low", "ci_high"))
            return format_spread(*values, int(r["n_seeds"]), f)

        if r["n_seeds"] == 0:
            out.append(f"{r['measure']}: not measurable in any seed ({r['note']}).")
            continue
        out.append(
            f"{r['measure']} ({r['unit']}, seeds {r['seeds']}): GRPO {ci('grpo')}, SFPO {ci('sfpo')}; "
            f"SFPO - GRPO {ci('diff')}, SFPO / GRPO {ci('ratio', '{:.2f}x')}. {r['note']}."
        )
    return out


def update_split(timed: pd.DataFrame) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Per timed step: the update passes' seconds, how many passes ran, and snapshot + reposition seconds.

    The passes are K fast ones plus the slow one unless ``slow_correction=false`` (a
    step whose slow stage took no time had none); an alpha-0 step ran one slow pass.
    """

    def stage(name: str) -> pd.Series:
        return column(timed, f"timing_s/{name}").fillna(0.0)

    slow = stage("sfpo_slow")
    n_passes = column(timed, "sfpo/inner_steps_run").fillna(0) + (slow > 0)
    return stage("sfpo_fast") + slow, n_passes, stage("sfpo_snapshot") + stage("sfpo_reposition")


def _active_steps(run: Run, upto: int) -> int:
    train = run.train
    steps = train[train["training/global_step"] <= upto]
    return int((column(steps, "sfpo/inner_steps_run").fillna(0) > 0).sum())


def cost_model_table(runs: list[Run], head: pd.DataFrame) -> pd.DataFrame:
    """cost_model.csv (see the module docstring): one row per generation share, labelled a projection."""
    by_name = {r.name: r for r in runs}
    parts, seeds = [], []
    for _, h in head.iterrows():
        sfpo = by_name[h["sfpo_run"]]  # its own stage times; the GRPO run enters as the measured check
        if "finished" in h and not h["finished"]:
            continue
        # G, U and S from the SFPO run's steps with the fast passes: one run, one process, one machine load
        # (the GRPO run ran before it, maybe under another load: its measured step is the model's check)
        timed = sfpo.timed
        active = timed[column(timed, "sfpo/inner_steps_run").fillna(0) > 0]
        if not len(active):
            continue
        passes, n_passes, extra = update_split(active)
        u = float((passes / n_passes).mean())
        s = float(extra.mean())
        g = float(column(active, "timing_s/step").fillna(0.0).mean()) - float(passes.mean()) - s
        if not (u > 0 and g > 0):
            continue
        measured_time = h["time_ratio"]
        steps = None
        if h["grpo_improved"] and h["sfpo_reached"]:
            steps = (int(h["grpo_best_step"]), int(h["sfpo_step"]), _active_steps(sfpo, int(h["sfpo_step"])))
        parts.append(
            {
                "U": u,
                "G": g,
                "S": s,
                "passes": float(n_passes.mean()),
                "steps": steps,
                "measured_time_ratio": measured_time,
                "measured_step_ratio": h["active_step_time_ratio"],
            }
        )
        seeds.append(int(h["seed"]))
    if not parts:
        return pd.DataFrame(columns=["generation_share", "kind"])
    measured_share = sum(p["G"] / (p["G"] + p["U"]) for p in parts) / len(parts)
    rows = []
    for share, kind in [(g, "projection") for g in SHARES] + [(measured_share, "projection at the measured share")]:
        step_ratios, time_ratios = [], []
        for p in parts:
            G = share / (1 - share) * p["U"]  # the G that gives this share with the measured U
            grpo_step, sfpo_step = G + p["U"], G + p["passes"] * p["U"] + p["S"]  # passes: K + 1, or K
            step_ratios.append(sfpo_step / grpo_step)
            if p["steps"] is not None:
                n_g, n_s, a = p["steps"]
                time_ratios.append(n_g * grpo_step / (a * sfpo_step + (n_s - a) * grpo_step))
        step = ratio_ci(step_ratios)
        t_mean, t_lo, t_hi, t_n = ratio_ci(time_ratios)
        wins = (
            "n/a"
            if t_n == 0
            else ("yes" if t_mean > 1 else "no")
            + (
                ""
                if math.isnan(t_lo)
                else " (interval above 1)"
                if t_lo > 1
                else " (interval below 1)"
                if t_hi < 1
                else " (interval spans 1)"
            )
        )
        rows.append(
            {
                "generation_share": round(share, 4),
                "kind": kind,
                "n_seeds": len(parts),
                "step_ratio_sfpo_over_grpo": step[0],
                "step_ratio_ci_low": step[1],
                "step_ratio_ci_high": step[2],
                "time_to_grpo_best_ratio_grpo_over_sfpo": t_mean,
                "time_ratio_ci_low": t_lo,
                "time_ratio_ci_high": t_hi,
                "time_ratio_seeds": t_n,
                "sfpo_wins_wall_clock": wins,
                # the model checked against the measurement, at the share measured here
                "measured_step_ratio": ratio_ci(p["measured_step_ratio"] for p in parts)[0]
                if kind != "projection"
                else math.nan,
                "measured_time_ratio": ratio_ci(p["measured_time_ratio"] for p in parts)[0]
                if kind != "projection"
                else math.nan,
            }
        )
    return pd.DataFrame(rows)


def cost_model_lines(cost: pd.DataFrame, head: pd.DataFrame) -> list[str]:
    """The projection in words: the step ratio and whether the rollout saving wins wall-clock at each share."""
    if cost.empty:
        return ["Cost model: not computable (no finished pair of runs with a timed update pass)."]
    out = [
        (
            "**Projection, not a measurement**: the measured stage times with the non-update part of a GRPO step "
            "(generation, reward, log-probs, the rest) scaled to each share; intervals over seeds as above."
        )
    ]
    for _, r in cost.iterrows():
        step = f"{r['step_ratio_sfpo_over_grpo']:.2f}x"
        if r["time_ratio_seeds"]:
            ratio = format_spread(
                r["time_to_grpo_best_ratio_grpo_over_sfpo"],
                r["time_ratio_ci_low"],
                r["time_ratio_ci_high"],
                int(r["time_ratio_seeds"]),
                "{:.2f}x",
            )
            time = f"GRPO/SFPO wall-clock to GRPO's best {ratio}: SFPO wins wall-clock: {r['sfpo_wins_wall_clock']}"
        else:
            time = "wall-clock to GRPO's best: no seed where it is measurable"
        out.append(f"generation share {100 * r['generation_share']:.0f}% ({r['kind']}): SFPO/GRPO step {step}; {time}.")
    here = cost.iloc[-1]
    if not math.isnan(here["measured_step_ratio"]):
        out.append(
            f"Check of the model at the share measured here: projected step ratio "
            f"{here['step_ratio_sfpo_over_grpo']:.2f}x, measured {here['measured_step_ratio']:.2f}x (SFPO's steps "
            "with the fast passes; the arms run one after the other, so a change in machine load between them "
            "shows up here)."
            + (
                ""
                if math.isnan(here["measured_time_ratio"])
                else f" Measured GRPO/SFPO wall-clock to GRPO's best: {here['measured_time_ratio']:.2f}x."
            )
        )
    return out
