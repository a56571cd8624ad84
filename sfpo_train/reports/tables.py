"""The per-run and per-arm tables of ``sfpo report``: stage times and shares, memory readings, one row per run."""

from __future__ import annotations

import math

import pandas as pd

from sfpo_train.reports.runs import Run, arms, column, nested

# The stages that tile one step, in execution order: label for tables and plots.
STACKED_STAGES = {
    "gen": "generation",
    "reward": "reward",
    "old_log_prob": "old log-prob",
    "ref": "ref log-prob",
    "adv": "advantage",
    "sfpo_snapshot": "SFPO snapshot",
    "sfpo_fast": "SFPO fast passes (K)",
    "sfpo_reposition": "SFPO reposition",
    "sfpo_slow": "slow correction (GRPO: the update)",
    "sync_weights": "weight sync",
    "unattributed": "unattributed",
}
# Reported beside them, not stacked: they overlap the stacked ones or lie outside the step.
EXTRA_STAGES = {
    "optimizer": "of which optimizer (in fast + slow)",
    "update_actor": "update_actor (snapshot..slow)",
    "step": "step (total)",
    "testing": "validation (per validation)",
}


def stage_times(run: Run) -> pd.DataFrame:
    """Per training step: seconds of each stacked stage (``unattributed`` = step minus the others) and the extras."""
    train = run.train
    out = pd.DataFrame({"global_step": train["training/global_step"].astype(int)})
    measured = [s for s in STACKED_STAGES if s != "unattributed"]
    for stage in measured:
        out[stage] = column(train, f"timing_s/{stage}").fillna(0.0)
    out["unattributed"] = (column(train, "timing_s/step") - out[measured].sum(axis=1)).clip(lower=0)
    for stage in EXTRA_STAGES:
        out[stage] = column(train, f"timing_s/{stage}")
    return out.reset_index(drop=True)


def mean_stage_times(run: Run) -> pd.Series:
    """Mean seconds per step of each stage over the run's timed steps (see :attr:`Run.timed`)."""
    times = stage_times(run)
    timed_steps = set(run.timed["training/global_step"].astype(int))
    return times[times["global_step"].isin(timed_steps)].drop(columns="global_step").mean()


def memory_readings(run: Run) -> pd.DataFrame:
    """Largest reading per (stage, reading) over the run: ``memory/<stage>/<reading>`` columns."""
    records = []
    for col in run.rows.columns:
        if col.startswith("memory/"):
            _, stage, reading = col.split("/", 2)
            records.append({"stage": stage, "reading": reading, "value": float(run.rows[col].max())})
    return pd.DataFrame(records, columns=["stage", "reading", "value"])


def peak_memory_gb(run: Run) -> tuple[float, str]:
    """The run's peak memory and what it is: torch's peak allocated on CUDA, else the process's peak RSS."""
    # On CPU the RSS at the end of each step, not the process's lifetime peak (VmHWM): the runs of one
    # compare share a process, and a later run would inherit an earlier run's peak.
    for col, what in (
        ("perf/max_memory_allocated_gb", "GPU peak allocated (torch)"),
        ("perf/cpu_memory_used_gb", "largest process RSS at a step's end"),
    ):
        if col in run.rows and run.rows[col].notna().any():
            return float(run.rows[col].max()), what
    return math.nan, "n/a"


def initial_accuracy(val: pd.DataFrame) -> float:
    """The accuracy before training (the step-0 validation row); NaN without one (``trainer.val_before_train=false``)."""
    first = val[val["step"] == 0]
    return float(first["accuracy"].iloc[0]) if len(first) else math.nan


def run_summary(run: Run) -> dict:
    """One row of runs.csv: what the run spent, its test accuracy (initial, best, final), trigger and memory."""
    val, train = run.val, run.train
    best = val.loc[val["accuracy"].idxmax()] if len(val) else None
    triggered = train[column(train, "sfpo/triggered").fillna(0) > 0]
    tail = train.tail(max(1, len(train) // 10))
    peak, _ = peak_memory_gb(run)
    done = int(train["training/global_step"].max()) if len(train) else 0
    planned = nested(run.config, "trainer.total_training_steps")
    return {
        "run": run.name,
        "arm": run.arm,
        "seed": run.seed,
        "steps": done,
        "planned_steps": int(planned) if planned is not None else done,
        "finished": planned is None or done >= int(planned),
        "rollouts": int(column(train, "train/rollouts_total").fillna(0).max()) if len(train) else 0,
        "wall_clock_s": float(column(train, "train/elapsed_s").max()) if len(train) else 0.0,
        "mean_step_s": float(mean_stage_times(run)["step"]) if len(train) else math.nan,
        "initial_acc": initial_accuracy(val),
        "best_acc": float(best["accuracy"]) if best is not None else math.nan,
        "best_acc_step": int(best["step"]) if best is not None else -1,
        "final_acc": float(val["accuracy"].iloc[-1]) if len(val) else math.nan,
        "final_reward": float(column(tail, "critic/score/mean").mean()),
        "trigger_step": int(triggered["training/global_step"].iloc[0]) if len(triggered) else -1,
        "peak_memory_gb": peak,
        "snapshot_mb": float(column(train, "sfpo/snapshot_bytes").max() / 1e6) if len(train) else 0.0,
        "profiler_overhead_pct": float(100 * column(train, "perf/profiler_overhead_frac").median()),
    }


def runs_table(summary: pd.DataFrame) -> pd.DataFrame:
    """runs.csv as the report shows it: :func:`run_summary` rows, ``trigger_step`` in words where the trigger
    did not fire (``never`` in an SFPO run, ``n/a`` in a GRPO run, which has none)."""
    shown = summary.copy()
    if "trigger_step" in shown:
        shown["trigger_step"] = [
            int(step) if step >= 0 else ("never" if arm == "SFPO" else "n/a")
            for step, arm in zip(shown["trigger_step"], shown["arm"])
        ]
    return shown


def algorithm_label(algorithm: str) -> str:
    """A recipe's name as the paper writes it: GRPO, Dr. GRPO, DAPO (others as they are)."""
    return {"grpo": "GRPO", "drgrpo": "Dr. GRPO", "dapo": "DAPO"}.get(algorithm, algorithm)


def arm_label(arm: str, algorithm: str) -> str:
    """What an arm's runs are: ``plain GRPO`` / ``SFPO over GRPO`` (DAPO, Dr. GRPO likewise)."""
    base = algorithm_label(algorithm)
    return f"SFPO over {base}" if arm == "SFPO" else f"plain {base}"


def folded_old_log_prob(runs: list[Run]) -> list[str]:
    """The arms whose every timed step took the old log-probs from the first update pass
    (``actor/old_log_prob_from_update`` 1), so that their ``old_log_prob`` stage is 0 s."""
    folded = []
    for arm in arms(runs):
        flags = pd.concat([column(r.timed, "actor/old_log_prob_from_update") for r in runs if r.arm == arm])
        if len(flags) and bool((flags.fillna(0) > 0).all()):
            folded.append(arm)
    return folded


def arm_stage_table(runs: list[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(seconds per step, percent of the step)``: rows stages, columns arms (mean over the arm's runs)."""
    per_arm = {}
    for arm in arms(runs):
        per_arm[arm] = pd.concat([mean_stage_times(r) for r in runs if r.arm == arm], axis=1).mean(axis=1)
    seconds = pd.DataFrame(per_arm).reindex(list(STACKED_STAGES) + list(EXTRA_STAGES))
    share = 100 * seconds.loc[list(STACKED_STAGES) + ["optimizer"]] / seconds.loc["step"]
    seconds.index.name = share.index.name = "stage"
    return seconds, share


def arm_memory_table(runs: list[Run]) -> pd.DataFrame:
    """Rows (stage, reading), columns arms: the largest reading over the arm's runs."""
    frames = []
    for run in runs:
        m = memory_readings(run)
        m["arm"] = run.arm
        frames.append(m)
    if not frames or all(f.empty for f in frames):
        return pd.DataFrame(columns=["stage", "reading"])
    table = pd.concat(frames).pivot_table(index=["stage", "reading"], columns="arm", values="value", aggfunc="max")
    order = {s: i for i, s in enumerate(list(STACKED_STAGES) + list(EXTRA_STAGES))}
    table = table.reset_index()
    table["_order"] = table["stage"].map(order).fillna(len(order))
    table = table.sort_values(["reading", "_order"]).drop(columns="_order").reset_index(drop=True)
    table.columns.name = None
    return table


def labelled(table: pd.DataFrame, unit: str, notes: dict[str, str] | None = None) -> pd.DataFrame:
    """A stage table (index: stages) for reading: the stage as a column, its label beside it, ``unit`` on each arm.

    ``notes``: ``{stage: label}`` in place of the usual label (e.g. why a stage is 0 here).
    """
    labels = {**STACKED_STAGES, **EXTRA_STAGES, **(notes or {})}
    out = table.rename(columns=lambda arm: f"{arm} {unit}").reset_index()
    out.insert(1, "what", [labels.get(s, s) for s in out["stage"]])
    return out
