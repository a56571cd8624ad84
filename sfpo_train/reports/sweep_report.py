"""The report of ``sfpo sweep``: one row per grid point (sweep.csv), a K x alpha heat map, Markdown and HTML.

Per point, over the seeds whose run finished (all its steps): the final and best
test accuracy (mean and 95% t interval, :mod:`sfpo_train.reports.stats`), the
target (the same seed's GRPO run's best test accuracy: the ``grpo`` baseline, or
for the ``lr`` points GRPO at the same lr), in how many seeds the point reached
it and the rollouts it needed there, the mean step time and its ratio to the
baseline's, and in how many seeds the entropy trigger fired. A point's seeds
that did not finish are counted as such, never averaged in.
"""

from __future__ import annotations

import math
import os

import pandas as pd

from sfpo_train.reports.headline import first_reaching
from sfpo_train.reports.render import Image, Paragraph, Section, Table, write_csvs, write_pages
from sfpo_train.reports.runs import load_run, nested
from sfpo_train.reports.stats import INTERVAL, mean_ci
from sfpo_train.reports.summary import update_split
from sfpo_train.reports.tables import run_summary

HEATMAP = "sweep_k_alpha.png"


def _run(out_dir: str, name: str):
    path = os.path.join(out_dir, name)
    if not os.path.isfile(os.path.join(path, "metrics.jsonl")):
        return None
    try:
        run = load_run(path)
    except ValueError:
        return None
    return run if len(run.train) else None


def _target_run(point, owners: dict) -> str:
    """The GRPO point a point is measured against: GRPO at the same lr for the lr line, else the baseline."""
    if point.group == "lr" and point.sfpo:
        return point.name.replace("sfpo-", "grpo-", 1)
    return "grpo"


def sweep_table(out_dir: str, points: list, owners: dict, *, seeds: int) -> pd.DataFrame:
    """One row per point (see the module docstring); runs not there yet count as not finished."""
    records = []
    for point in points:
        owner = owners[point.name]
        target_owner = owners.get(_target_run(point, owners))
        finals, bests, rollouts, steps_s, base_s, own = [], [], [], [], [], []
        finished = reached = fired = 0
        settings: dict = {}
        for seed in range(1, seeds + 1):
            run = _run(out_dir, f"{owner.name}-s{seed}")
            if run is None:
                continue
            summary = run_summary(run)
            if not settings:
                sfpo = nested(run.config, "actor_rollout_ref.actor.sfpo", {}) or {}
                settings = {
                    "K": sfpo.get("inner_steps"),
                    "alpha": sfpo.get("alpha"),
                    "decay": sfpo.get("decay"),
                    "entropy_control": sfpo.get("entropy_control"),
                    "reposition": sfpo.get("reposition"),
                    "slow_correction": sfpo.get("slow_correction"),
                    "lr": nested(run.config, "actor_rollout_ref.actor.optim.lr"),
                }
            if not summary["finished"]:
                continue
            finished += 1
            finals.append(summary["final_acc"])
            bests.append(summary["best_acc"])
            steps_s.append(summary["mean_step_s"])
            own.append(own_step_ratio(run))
            fired += summary["trigger_step"] >= 0
            base = _run(out_dir, f"{target_owner.name}-s{seed}") if target_owner is not None else None
            if base is not None and run_summary(base)["finished"] and len(base.val):
                base_s.append(run_summary(base)["mean_step_s"])
                hit = first_reaching(run.val, float(base.val["accuracy"].max()))
                if hit is not None:
                    reached += 1
                    rollouts.append(float(hit["rollouts"]))
        final, final_lo, final_hi, _ = mean_ci(finals)
        best, _, _, _ = mean_ci(bests)
        step_s = mean_ci(steps_s)[0]
        base_step = mean_ci(base_s)[0]
        if not point.sfpo:  # GRPO: the SFPO settings do not apply
            settings.update(K="", alpha="", decay="", entropy_control="", reposition="", slow_correction="")
        if settings.get("lr") is not None:
            settings["lr"] = f"{float(settings['lr']):.0e}".replace("e-0", "e-")
        records.append(
            {
                "point": point.name,
                "group": point.group,
                "arm": "SFPO" if point.sfpo else "GRPO",
                "run": owner.name,
                **{
                    k: settings.get(k)
                    for k in ("K", "alpha", "decay", "entropy_control", "reposition", "slow_correction", "lr")
                },
                "seeds_finished": f"{finished} of {seeds}",
                "final_acc_mean": final,
                "final_acc_ci_low": final_lo,
                "final_acc_ci_high": final_hi,
                "best_acc_mean": best,
                "reached_grpo_best": f"{reached} of {len(base_s)}" if base_s else "n/a",
                "rollouts_to_grpo_best_mean": mean_ci(rollouts)[0],
                "step_s_mean": step_s,
                "step_ratio_vs_grpo": step_s / base_step if base_step and not math.isnan(base_step) else math.nan,
                "step_ratio_own_stages": mean_ci(own)[0],
                "trigger_fired": f"{fired} of {finished}" if point.sfpo else "",
            }
        )
    return pd.DataFrame(records)


def own_step_ratio(run) -> float:
    """A step of this run over a GRPO step built from its own stage times, ``step / (step - passes - S + U)``.

    ``U`` = the update passes' time / their number (K+1 while alpha > 0), ``S`` = snapshot + reposition:
    every number from this run's timed steps, so a machine load that changed between runs cancels
    (the measured ``step_ratio_vs_grpo`` divides by another run's step). 1.0 for a GRPO run.
    """
    timed = run.timed
    passes, n_passes, extra = update_split(timed)
    u = (passes / n_passes.where(n_passes > 0)).mean()
    step = timed["timing_s/step"].mean()
    grpo_step = step - passes.mean() - extra.mean() + u
    return float(step / grpo_step) if grpo_step > 0 else math.nan


def plot_k_alpha(table: pd.DataFrame, path: str) -> bool:
    """Heat maps over K x alpha: final test accuracy and step time / GRPO's. False when no K x alpha point ran."""
    grid = table[(table["group"] == "k_alpha") & table["final_acc_mean"].notna()]
    if grid.empty:
        return False
    from sfpo_train.reports.plots import _plt

    plt = _plt()
    ks = sorted({int(k) for k in grid["K"]})
    alphas = sorted({float(a) for a in grid["alpha"]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, col, title, fmt in (
        (axes[0], "final_acc_mean", "final test accuracy (mean over seeds)", "{:.3f}"),
        (axes[1], "step_ratio_own_stages", "step time / a GRPO step (own stage times)", "{:.2f}x"),
    ):
        values = [[math.nan] * len(alphas) for _ in ks]
        for _, row in grid.iterrows():
            values[ks.index(int(row["K"]))][alphas.index(float(row["alpha"]))] = row[col]
        image = ax.imshow(values, cmap="viridis", aspect="auto", origin="lower")
        for i in range(len(ks)):
            for j in range(len(alphas)):
                if not math.isnan(values[i][j]):
                    ax.text(j, i, fmt.format(values[i][j]), ha="center", va="center", color="w", fontsize=9)
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("alpha")
        ax.set_ylabel("K (fast passes)")
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.85)
    base = table[table["point"] == "grpo"]["final_acc_mean"]
    if len(base) and not math.isnan(base.iloc[0]):
        fig.suptitle(f"SFPO over K x alpha; GRPO's final test accuracy: {base.iloc[0]:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


SHOWN = (
    "point",
    "group",
    "K",
    "alpha",
    "decay",
    "entropy_control",
    "reposition",
    "slow_correction",
    "lr",
    "seeds_finished",
    "final_acc_mean",
    "final_acc_ci_low",
    "final_acc_ci_high",
    "best_acc_mean",
    "reached_grpo_best",
    "rollouts_to_grpo_best_mean",
    "step_s_mean",
    "step_ratio_vs_grpo",
    "step_ratio_own_stages",
    "trigger_fired",
)


def build_sweep_report(
    out_dir: str, report_dir: str, points: list, owners: dict, *, seeds: int, title: str
) -> dict[str, str]:
    """sweep.csv, the heat map and sweep.md / sweep.html (as report.md / report.html) into ``report_dir``."""
    os.makedirs(report_dir, exist_ok=True)
    table = sweep_table(out_dir, points, owners, seeds=seeds)
    written = write_csvs(report_dir, {"sweep.csv": (table, False)})
    blocks = [
        Paragraph(
            f"{len(points)} points, {len({o.name for o in owners.values()})} distinct runs per seed, "
            f"{seeds} seed(s). Accuracy: greedy test accuracy at the run's last validation; "
            f"intervals: {INTERVAL}. Target: the same seed's GRPO run's best test accuracy (the lr points: "
            "GRPO at the same lr). Unfinished runs are counted in seeds_finished and left out of every "
            "mean. step_s_mean and step_ratio_vs_grpo are wall-clock of runs made one after the other, so "
            "they move with the machine's load; step_ratio_own_stages sets each run's step against a GRPO "
            "step built from its own stage times (one load)."
        ),
        Table(table[list(SHOWN)]),
    ]
    if plot_k_alpha(table, os.path.join(report_dir, HEATMAP)):
        written[HEATMAP] = os.path.join(report_dir, HEATMAP)
        blocks.append(Image(HEATMAP, "SFPO over K x alpha"))
    written.update(write_pages(report_dir, title, [Section("", blocks)]))
    return written
