"""``sfpo report RUN [RUN ...]``: per-stage time and memory, training curves, and SFPO against GRPO.

Reads each run directory's ``config.yaml`` and ``metrics.jsonl`` (what ``sfpo
train`` and ``sfpo compare`` write) and writes, into ``--out``:

- ``report.md`` and ``report.html``: the tables and plots below, with the
  headline measures when both GRPO and SFPO runs are given;
- ``runs.csv``: one row per run (arm, seed, steps, rollouts, wall-clock, mean
  step time, initial (step 0, n/a without it) / best / final test accuracy,
  trigger step, peak memory, profiler overhead);
- ``stage_time.csv`` / ``stage_share.csv``: mean seconds per step of each stage
  and its share of the step, per arm (SFPO / GRPO);
- ``stage_memory.csv``: the largest reading of each stage per arm (peak
  allocated / reserved GB on CUDA, NVML's device memory and utilisation when
  present, process RSS on CPU);
- ``headline.csv`` (GRPO and SFPO runs paired by ``trainer.seed``): per seed,
  GRPO's initial and best test accuracy, the rollouts and wall-clock each arm
  needed to reach the best, their ratios (only where GRPO's step-0 accuracy is
  known and it improved on it), the step-time ratio and the extra memory;
- PNG plots: stacked per-stage time per step (arms side by side), stage shares,
  peak memory per stage, reward and test accuracy against rollouts and
  wall-clock, entropy / z-score / alpha over steps with the trigger marked.

Definitions. Test accuracy: the mean over data sources of
``val-core/<source>/reward/mean@1`` (greedy, step 0 = before training).
Rollouts: ``train/rollouts_total`` (generated responses so far). Wall-clock:
``train/elapsed_s`` (the sum of ``timing_s/step``; validation and checkpoints
excluded, as they are the same for both arms). Stage means leave out the first
step (warm-up: lazy allocation, kernel compilation) when a run has 3 or more.
"""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

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
ARM_COLORS = {"GRPO": "#4C72B0", "SFPO": "#DD8452"}
STAGE_COLORS = ["#4C72B0", "#55A868", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#DD8452", "#CCB974", "#C44E52",
                "#64B5CD", "#DDDDDD"]  # fmt: skip
# The paper's numbers our headline measures are set against (Fig. 4, appendix C.5).
PAPER = {
    "rollouts": "3.21-4.93x fewer rollouts than GRPO to reach GRPO's best accuracy (Fig. 4a)",
    "wall_clock": "2.62-4.19x less wall-clock to reach it (Fig. 4b)",
    "step_time": "an SFPO step ~1.37x a GRPO step, generation ~80% of a GRPO step (appendix C.5)",
    "memory": "no extra GPU memory (section 4.3)",
}


# --------------------------------------------------------------------------- loading runs


@dataclass
class Run:
    """One run directory: its config and its metrics (row 0 may be the validation before training)."""

    path: str
    name: str
    arm: str  # "SFPO" or "GRPO"
    seed: int
    config: dict
    rows: pd.DataFrame  # every row of metrics.jsonl, sorted by training/global_step

    @property
    def train(self) -> pd.DataFrame:
        """The training steps (global_step >= 1)."""
        return self.rows[self.rows["training/global_step"] >= 1]

    @property
    def timed(self) -> pd.DataFrame:
        """The steps stage means are taken over: all but the first when there are 3 or more."""
        train = self.train
        return train.iloc[1:] if len(train) >= 3 else train

    @property
    def val(self) -> pd.DataFrame:
        """Validation rows: step, accuracy (mean over data sources), rollouts and wall-clock so far."""
        cols = [c for c in self.rows.columns if c.startswith("val-core/") and c.endswith("/reward/mean@1")]
        if not cols:
            return pd.DataFrame(columns=["step", "accuracy", "rollouts", "elapsed_s"])
        rows = self.rows.dropna(subset=cols, how="all")
        out = pd.DataFrame({
            "step": rows["training/global_step"].astype(int),
            "accuracy": rows[cols].mean(axis=1),
            "rollouts": rows.get("train/rollouts_total", pd.Series(0, index=rows.index)).fillna(0),
            "elapsed_s": rows.get("train/elapsed_s", pd.Series(0.0, index=rows.index)).fillna(0.0),
        })  # fmt: skip
        return out.reset_index(drop=True)


def _nested(config: dict, dotted: str, default=None):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def load_run(path: str) -> Run:
    """A run directory written by ``sfpo train`` / ``sfpo compare``; ``ValueError`` naming what is missing."""
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isdir(path):
        raise ValueError(f"RUN {path!r} is not a directory")
    if not os.path.isfile(metrics):
        raise ValueError(f"RUN {path!r} holds no metrics.jsonl (not a run directory of sfpo train)")
    with open(metrics) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f"RUN {path!r}: metrics.jsonl is empty (the run logged no step yet)")
    rows = pd.DataFrame(records)
    if "training/global_step" not in rows:
        raise ValueError(f"RUN {path!r}: metrics.jsonl has no training/global_step column")
    rows = rows.sort_values("training/global_step", kind="stable").reset_index(drop=True)
    config: dict = {}
    config_path = os.path.join(path, "config.yaml")
    if os.path.isfile(config_path):
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    sfpo = _nested(config, "actor_rollout_ref.actor.sfpo", {}) or {}
    if sfpo:
        is_sfpo = bool(sfpo.get("enable", True)) and float(sfpo.get("alpha", 0.0)) > 0
    else:  # no config: the logged alpha says which rule ran
        is_sfpo = bool((rows.get("sfpo/alpha", pd.Series([0.0])).fillna(0) > 0).any())
    seed = int(_nested(config, "trainer.seed", 0) or 0)
    return Run(os.path.abspath(path), os.path.basename(os.path.normpath(path)), "SFPO" if is_sfpo else "GRPO", seed,
               config, rows)  # fmt: skip


def expand_run_paths(paths: list[str]) -> list[str]:
    """Each RUN as given; a directory without metrics.jsonl whose subdirectories are runs stands for those."""
    out = []
    for path in paths:
        if not os.path.isdir(path):
            raise ValueError(f"RUN {path!r} is not a directory")
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            out.append(path)
            continue
        children = sorted(os.path.join(path, d) for d in os.listdir(path)
                          if os.path.isfile(os.path.join(path, d, "metrics.jsonl")))  # fmt: skip
        if not children:
            raise ValueError(f"RUN {path!r} holds no metrics.jsonl, nor do its subdirectories")
        out.extend(children)
    return out


# --------------------------------------------------------------------------- tables


def _col(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name] if name in frame else pd.Series(np.nan, index=frame.index)


def stage_times(run: Run) -> pd.DataFrame:
    """Per training step: seconds of each stacked stage (``unattributed`` = step minus the others) and the extras."""
    train = run.train
    out = pd.DataFrame({"global_step": train["training/global_step"].astype(int)})
    for stage in STACKED_STAGES:
        if stage != "unattributed":
            out[stage] = _col(train, f"timing_s/{stage}").fillna(0.0)
    out["unattributed"] = (_col(train, "timing_s/step") - out[[s for s in STACKED_STAGES if s != "unattributed"]].sum(axis=1)).clip(lower=0)
    for stage in EXTRA_STAGES:
        out[stage] = _col(train, f"timing_s/{stage}")
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
    for col, what in (("perf/max_memory_allocated_gb", "GPU peak allocated (torch)"),
                      ("perf/cpu_memory_used_gb", "largest process RSS at a step's end")):  # fmt: skip
        if col in run.rows and run.rows[col].notna().any():
            return float(run.rows[col].max()), what
    return math.nan, "n/a"


def run_summary(run: Run) -> dict:
    val, train = run.val, run.train
    best = val.loc[val["accuracy"].idxmax()] if len(val) else None
    triggered = train[_col(train, "sfpo/triggered").fillna(0) > 0]
    tail = train.tail(max(1, len(train) // 10))
    peak, _ = peak_memory_gb(run)
    return {
        "run": run.name, "arm": run.arm, "seed": run.seed, "steps": int(len(train)),
        "rollouts": int(_col(train, "train/rollouts_total").max()) if len(train) else 0,
        "wall_clock_s": float(_col(train, "train/elapsed_s").max()) if len(train) else 0.0,
        "mean_step_s": float(mean_stage_times(run)["step"]) if len(train) else math.nan,
        "initial_acc": initial_accuracy(val),
        "best_acc": float(best["accuracy"]) if best is not None else math.nan,
        "best_acc_step": int(best["step"]) if best is not None else -1,
        "final_acc": float(val["accuracy"].iloc[-1]) if len(val) else math.nan,
        "final_reward": float(_col(tail, "critic/score/mean").mean()),
        "trigger_step": int(triggered["training/global_step"].iloc[0]) if len(triggered) else -1,
        "peak_memory_gb": peak,
        "snapshot_mb": float(_col(train, "sfpo/snapshot_bytes").max() / 1e6) if len(train) else 0.0,
        "profiler_overhead_pct": float(100 * _col(train, "perf/profiler_overhead_frac").median()),
    }  # fmt: skip


def arm_stage_table(runs: list[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(seconds per step, percent of the step)``: rows stages, columns arms (mean over the arm's runs)."""
    per_arm = {}
    for arm in _arms(runs):
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


def _arms(runs: list[Run]) -> list[str]:
    return [a for a in ("GRPO", "SFPO") if any(r.arm == a for r in runs)]


# --------------------------------------------------------------------------- the headline (paper Fig. 4, C.5)


def initial_accuracy(val: pd.DataFrame) -> float:
    """The accuracy before training (the step-0 validation row); NaN without one (``trainer.val_before_train=false``)."""
    first = val[val["step"] == 0]
    return float(first["accuracy"].iloc[0]) if len(first) else math.nan


def first_reaching(val: pd.DataFrame, target: float) -> pd.Series | None:
    """The first validation row with accuracy >= target (None: never)."""
    hit = val[val["accuracy"] >= target - 1e-12]
    return hit.iloc[0] if len(hit) else None


def pair_runs(runs: list[Run]) -> list[tuple[int, Run, Run]]:
    """(seed, GRPO run, SFPO run) for every seed that has both; the first run of each arm per seed."""
    by_seed: dict[int, dict[str, Run]] = {}
    for run in runs:
        by_seed.setdefault(run.seed, {}).setdefault(run.arm, run)
    return [(s, arms["GRPO"], arms["SFPO"]) for s, arms in sorted(by_seed.items()) if len(arms) == 2]


def headline_table(runs: list[Run]) -> pd.DataFrame:
    """Per seed: GRPO's best test accuracy (the target) and what each arm spent to first reach it.

    ``target_known``: GRPO's run has a validation row (else the target and
    everything measured against it are NaN, ``sfpo_reached`` False).
    ``initial_known``: it has the step-0 row, the accuracy before training
    (``grpo_initial_acc``); ``grpo_improved`` is True only where that is known
    and the target lies above it. ``rollouts_ratio`` = GRPO's rollouts / SFPO's
    (> 1: SFPO needed fewer, the paper's direction), ``time_ratio`` likewise
    for wall-clock; NaN unless GRPO improved and SFPO reached the target: where
    GRPO's best is its initial accuracy both reach it at step 0, and where the
    initial accuracy is unknown the same may hold unseen.
    """
    records = []
    for seed, grpo, sfpo in pair_runs(runs):
        gv, sv = grpo.val, sfpo.val
        initial = initial_accuracy(gv)
        row = {"seed": seed, "grpo_run": grpo.name, "sfpo_run": sfpo.name, "target_known": bool(len(gv)),
               "initial_known": not math.isnan(initial), "grpo_initial_acc": initial, "target_acc": math.nan,
               "grpo_improved": False, "grpo_best_step": -1, "grpo_rollouts": math.nan, "grpo_time_s": math.nan,
               "sfpo_reached": False, "sfpo_step": -1, "sfpo_rollouts": math.nan, "sfpo_time_s": math.nan,
               "rollouts_ratio": math.nan, "time_ratio": math.nan,
               "grpo_final_acc": float(gv["accuracy"].iloc[-1]) if len(gv) else math.nan,
               "sfpo_final_acc": float(sv["accuracy"].iloc[-1]) if len(sv) else math.nan}  # fmt: skip
        if len(gv):
            target = float(gv["accuracy"].max())
            g_hit, s_hit = first_reaching(gv, target), first_reaching(sv, target)
            row.update(target_acc=target, grpo_best_step=int(g_hit["step"]), grpo_rollouts=float(g_hit["rollouts"]),
                       grpo_time_s=float(g_hit["elapsed_s"]))  # fmt: skip
            if s_hit is not None:
                row.update(sfpo_reached=True, sfpo_step=int(s_hit["step"]), sfpo_rollouts=float(s_hit["rollouts"]),
                           sfpo_time_s=float(s_hit["elapsed_s"]))  # fmt: skip
            # GRPO's best lies after step 0 and the step-0 accuracy is known: it improved on its start
            row["grpo_improved"] = row["initial_known"] and row["grpo_best_step"] > 0
            ok = row["sfpo_reached"] and row["grpo_improved"] and row["sfpo_rollouts"] > 0
            row["rollouts_ratio"] = row["grpo_rollouts"] / row["sfpo_rollouts"] if ok else math.nan
            row["time_ratio"] = row["grpo_time_s"] / row["sfpo_time_s"] if ok and row["sfpo_time_s"] > 0 else math.nan
        gs, ss = run_summary(grpo), run_summary(sfpo)
        row["grpo_step_s"], row["sfpo_step_s"] = gs["mean_step_s"], ss["mean_step_s"]
        row["step_time_ratio"] = ss["mean_step_s"] / gs["mean_step_s"]
        # SFPO's steps that ran the fast passes (before the entropy trigger): the paper's per-step comparison
        timed = sfpo.timed
        active = timed[_col(timed, "sfpo/inner_steps_run").fillna(0) > 0]["timing_s/step"]
        row["active_step_time_ratio"] = float(active.mean()) / gs["mean_step_s"] if len(active) else math.nan
        gt, st = mean_stage_times(grpo), mean_stage_times(sfpo)
        row["grpo_gen_share_pct"] = 100 * gt["gen"] / gt["step"]
        (g_mem, what), (s_mem, _) = peak_memory_gb(grpo), peak_memory_gb(sfpo)
        row["extra_memory_gb"], row["memory_reading"] = s_mem - g_mem, what
        row["sfpo_snapshot_mb"] = ss["snapshot_mb"]
        records.append(row)
    return pd.DataFrame(records)


def _spread(values: pd.Series, fmt: str = "{:.2f}") -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values.iloc[0])
    return f"{fmt.format(values.mean())} (min {fmt.format(values.min())}, max {fmt.format(values.max())})"


def _seeds(head: pd.DataFrame, mask: pd.Series) -> str:
    return ", ".join(str(seed) for seed in head.loc[mask, "seed"])


def headline_lines(head: pd.DataFrame) -> tuple[list[str], list[str]]:
    """``(measures, verdicts)`` as Markdown bullets: mean (min, max) over seeds, and how they compare with the paper.

    A seed counts for the rollouts / wall-clock verdicts only where it is
    measurable: GRPO's run has validation rows (a target), its step-0
    accuracy is known, and GRPO improved on it; the others are named.
    """
    n = len(head)
    has_target = head["target_known"].astype(bool)
    known = head["initial_known"].astype(bool)
    improved_seeds = head["grpo_improved"].astype(bool)
    reached_seeds = has_target & head["sfpo_reached"].astype(bool)
    n_target, n_known, improved = int(has_target.sum()), int(known.sum()), int(improved_seeds.sum())
    reached = int(reached_seeds.sum())
    no_target, unknown = ~has_target, has_target & ~known
    compared = head["rollouts_ratio"].notna()
    lines = [f"Over {n} seed(s); each number is the mean over seeds with the min and max over seeds in brackets."]
    if n_target == 0:
        lines.append("- GRPO's best test accuracy (the target): **not measurable**: no GRPO run has a validation row "
                     "(trainer.test_freq, trainer.val_before_train).")  # fmt: skip
    else:
        lines += [
            f"- GRPO's best test accuracy (the target): {_spread(head['target_acc'], '{:.3f}')}"
            + (f" over {n_target} seed(s); not measurable in seed(s) {_seeds(head, no_target)}, whose GRPO run has no "
               "validation row" if no_target.any() else "") + ".",
            (f"- GRPO improved on its initial accuracy (step 0) in {improved} of {n_known} seed(s)"
             + (f"; its initial accuracy is unknown in seed(s) {_seeds(head, unknown)} (no step-0 validation: "
                "trainer.val_before_train=false), so there it is not known whether GRPO improved and no GRPO/SFPO "
                "ratio is taken" if unknown.any() else "") + "."
             if n_known else "- GRPO's initial accuracy is unknown (no step-0 validation: trainer.val_before_train="
             "false), so it is not known whether GRPO improved and no GRPO/SFPO ratio is taken."),
            f"- SFPO reached it in {reached} of {n_target} seed(s)"
            + ("" if reached == n_target else f" (not reached: seed(s) {_seeds(head, has_target & ~reached_seeds)})") + ".",
            f"- Rollouts to reach it: GRPO {_spread(head['grpo_rollouts'], '{:.0f}')}, SFPO {_spread(head['sfpo_rollouts'], '{:.0f}')}; "
            f"GRPO/SFPO {_spread(head['rollouts_ratio'], '{:.2f}x')} over the {int(compared.sum())} seed(s) where both are "
            "defined (SFPO reached the target, GRPO improved on its known initial accuracy).",
            f"- Wall-clock to reach it: GRPO {_spread(head['grpo_time_s'], '{:.1f} s')}, SFPO {_spread(head['sfpo_time_s'], '{:.1f} s')}; "
            f"GRPO/SFPO {_spread(head['time_ratio'], '{:.2f}x')}.",
            f"- Final test accuracy: GRPO {_spread(head['grpo_final_acc'], '{:.3f}')}, SFPO {_spread(head['sfpo_final_acc'], '{:.3f}')}.",
        ]  # fmt: skip
    lines += [
        f"- Step time: GRPO {_spread(head['grpo_step_s'], '{:.3f} s')}, SFPO {_spread(head['sfpo_step_s'], '{:.3f} s')}; "
        f"SFPO/GRPO {_spread(head['step_time_ratio'], '{:.2f}x')}; counting only SFPO's steps with the fast passes "
        f"(before the entropy trigger) {_spread(head['active_step_time_ratio'], '{:.2f}x')}. Generation is "
        f"{_spread(head['grpo_gen_share_pct'], '{:.0f}%')} of a GRPO step here.",
        f"- Extra memory of SFPO ({head['memory_reading'].iloc[0]}): {_spread(head['extra_memory_gb'], '{:+.3f} GB')}; "
        f"its snapshot of theta_0 (held from before the fast passes to the reposition): {_spread(head['sfpo_snapshot_mb'], '{:.2f} MB')}.",
    ]  # fmt: skip

    # why each seed left out of the rollouts / wall-clock verdicts is not measurable
    why = [f"seed(s) {_seeds(head, mask)}: {reason}" for mask, reason in (
        (no_target, "GRPO's run has no validation row (validate with trainer.test_freq)"),
        (unknown, "GRPO's initial accuracy unknown (no step-0 validation; set trainer.val_before_train=true)"),
        (known & ~improved_seeds, "GRPO never improved on its initial accuracy, so both arms 'reach' it before "
                                  "training (train longer, --steps, or on a task with room to learn)"),
    ) if mask.any()]  # fmt: skip
    verdicts = []
    if improved == 0:
        verdicts.append(f"- Rollouts and wall-clock to GRPO's best: **not measurable here**: {'; '.join(why)}.")
    else:
        left_out = f" ({n - improved} seed(s) not measurable: {'; '.join(why)})" if why else ""
        reached_m = int((improved_seeds & reached_seeds).sum())
        r, t = head.loc[improved_seeds, "rollouts_ratio"], head.loc[improved_seeds, "time_ratio"]
        if reached_m == improved and r.notna().all() and (r > 1).all():
            verdicts.append(f"- Rollouts: same direction as the paper ({PAPER['rollouts']}): SFPO needed {_spread(r)}x "
                            f"fewer in {improved} measurable seed(s){left_out}.")  # fmt: skip
        else:
            verdicts.append(f"- Rollouts: **does not show the paper's direction in every measurable seed** (paper: "
                            f"{PAPER['rollouts']}): SFPO reached GRPO's best in {reached_m} of {improved} measurable "
                            f"seed(s) and needed fewer rollouts in {int((r > 1).sum())} of {improved}{left_out}.")  # fmt: skip
        if reached_m == improved and t.notna().all() and (t > 1).all():
            verdicts.append(f"- Wall-clock: same direction as the paper ({PAPER['wall_clock']}): {_spread(t)}x less.")
        else:
            verdicts.append(f"- Wall-clock: **does not show the paper's direction in every measurable seed** (paper: "
                            f"{PAPER['wall_clock']}): SFPO got there sooner in {int((t > 1).sum())} of {improved}.")  # fmt: skip
    ratio = head["active_step_time_ratio"].mean()
    if math.isnan(ratio):  # the trigger fired before the first timed step: no SFPO step ran its fast passes
        ratio = head["step_time_ratio"].mean()
    gen = head["grpo_gen_share_pct"].mean()
    verdicts.append(f"- Step time (SFPO steps with the fast passes): SFPO/GRPO {ratio:.2f}x here against the paper's "
                    f"~1.37x ({PAPER['step_time']}). "
                    + (f"Generation is only {gen:.0f}% of a GRPO step here, so SFPO's K extra passes weigh far more than in "
                       "the paper's long-rollout regime." if gen < 60 and ratio > 1.6 else "Comparable regime.")) # fmt: skip
    extra = head["extra_memory_gb"].max()
    verdicts.append(f"- Memory: paper: {PAPER['memory']}; here SFPO's peak is {extra:+.3f} GB against GRPO's "
                    f"({head['memory_reading'].iloc[0]}); by design SFPO holds one copy of the trainable parameters "
                    "(the snapshot) during the fast passes, 0 with snapshot_offload=cpu."
                    + ("" if head["memory_reading"].iloc[0].startswith("GPU") else
                       " On the CPU the RSS difference is only indicative (the runs of one compare share a process "
                       "and the allocator keeps freed memory); the snapshot's size is exact."))  # fmt: skip
    return lines, verdicts


# --------------------------------------------------------------------------- Markdown / HTML


def _fmt(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "n/a"
        if value.is_integer():
            return str(int(value))
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.2g}"
    return str(value).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame, index: bool = False) -> str:
    frame = frame.reset_index() if index else frame
    headers = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _labelled(table: pd.DataFrame) -> pd.DataFrame:
    labels = {**STACKED_STAGES, **EXTRA_STAGES}
    out = table.copy()
    out.insert(0, "what", [labels.get(s, s) for s in out.index])
    return out


PLOTS = {
    "stage_time_per_step.png": "Seconds per step by stage",
    "stage_share.png": "Share of a step by stage",
    "stage_memory.png": "Memory per stage",
    "reward_accuracy.png": "Reward and test accuracy against rollouts and wall-clock",
    "entropy_zscore_alpha.png": "Entropy, z-score and alpha over steps (trigger marked)",
}


def build_report(run_paths: list[str], out_dir: str, *, title: str | None = None) -> dict[str, str]:
    """Write the report for ``run_paths`` into ``out_dir``; returns ``{file name: path}`` of what it wrote."""
    if not run_paths:
        raise ValueError("RUN: give at least one run directory")
    runs = [load_run(p) for p in expand_run_paths(list(run_paths))]
    if not any(len(r.train) for r in runs):
        raise ValueError("RUN: none of the runs has a training step in metrics.jsonl yet")
    os.makedirs(out_dir, exist_ok=True)
    written: dict[str, str] = {}

    def path(name: str) -> str:
        written[name] = os.path.join(out_dir, name)
        return written[name]

    summary = pd.DataFrame([run_summary(r) for r in runs])
    summary.to_csv(path("runs.csv"), index=False)
    seconds, share = arm_stage_table(runs)
    seconds.to_csv(path("stage_time.csv"))
    share.to_csv(path("stage_share.csv"))
    memory = arm_memory_table(runs)
    memory.to_csv(path("stage_memory.csv"), index=False)
    head = headline_table(runs)
    if len(head):
        head.to_csv(path("headline.csv"), index=False)
    from sfpo_train.reports.plots import plot_curves, plot_dynamics, plot_memory, plot_stage_share, plot_stage_time

    plot_stage_time(runs, path("stage_time_per_step.png"))
    plot_stage_share(share, path("stage_share.png"))
    plot_memory(memory, path("stage_memory.png"))
    plot_curves(runs, head, path("reward_accuracy.png"))
    plot_dynamics(runs, path("entropy_zscore_alpha.png"))

    overhead = pd.concat([_col(r.train, "perf/profiler_overhead_frac") for r in runs]).dropna() * 100
    sections: list[tuple[str, list[str]]] = []
    intro = [f"Runs: {', '.join(r.name for r in runs)} ({', '.join(f'{a}: {sum(r.arm == a for r in runs)}' for a in _arms(runs))})."]
    if overhead.size:
        intro.append(f"Profiler overhead (its own bookkeeping per step, over the step time): median {overhead.median():.2f}%, "
                     f"max {overhead.max():.2f}% of a step.")  # fmt: skip
    sections.append(("", intro))
    if len(head):
        measures, verdicts = headline_lines(head)
        sections.append(("Headline: SFPO against GRPO (paper Fig. 4, appendix C.5)", measures))
        sections.append(("Against the paper", verdicts))
        cols = [c for c in ("seed", "grpo_initial_acc", "target_acc", "grpo_rollouts", "sfpo_rollouts", "rollouts_ratio",
                            "grpo_time_s", "sfpo_time_s", "time_ratio", "step_time_ratio", "active_step_time_ratio", "extra_memory_gb") if c in head]  # fmt: skip
        sections.append(("Per seed (headline.csv)", [markdown_table(head[cols])]))
    sections.append(("Runs (runs.csv)", [markdown_table(summary)]))
    sections.append(("Time per stage (stage_time.csv, in seconds; milliseconds per step below)", [
        "Mean over each run's steps (the first step left out as warm-up when a run has 3 or more), then over the "
        "arm's runs. The stacked stages add up to `step` exactly: `unattributed` is the rest (LR scheduler, batch "
        "assembly, SFPO's bookkeeping inside update_actor, the profiler itself). `optimizer` (gradient clipping + "
        "AdamW step, every pass) lies inside the fast and slow passes and is not stacked.",
        "", markdown_table(_labelled(seconds * 1e3).rename(columns=lambda c: c if c == "what" else f"{c} ms"), index=True),
        "", "![](stage_time_per_step.png)", "",
        "Share of the step, percent (stage_share.csv):", "",
        markdown_table(_labelled(share).rename(columns=lambda c: c if c == "what" else f"{c} %"), index=True), "",
        "![](stage_share.png)"]))  # fmt: skip
    if len(memory):
        sections.append(("Memory per stage (stage_memory.csv)", [
            "CUDA: max_allocated_gb / max_reserved_gb are torch's peaks during the stage (peaks reset when it starts); "
            "device_used_gb and gpu_util_pct come from NVML when the stage ends. CPU: rss_gb is the process's resident "
            "set size when the stage ends. The largest reading over the arm's runs.", "",
            markdown_table(memory), "", "![](stage_memory.png)"]))  # fmt: skip
    sections.append(("Reward and test accuracy", ["![](reward_accuracy.png)"]))
    sections.append(("Entropy, z-score and alpha", ["Vertical lines: the step the entropy trigger fired (alpha -> 0 after it).",
                                                    "", "![](entropy_zscore_alpha.png)"]))  # fmt: skip
    title = title or "SFPO report: per-stage profile and training"
    md = [f"# {title}", ""]
    for heading, body in sections:
        if heading:
            md += [f"## {heading}", ""]
        md += body + [""]
    with open(path("report.md"), "w") as f:
        f.write("\n".join(md))
    with open(path("report.html"), "w") as f:
        f.write(_html(title, sections))
    return written


def _html(title: str, sections: list[tuple[str, list[str]]]) -> str:
    """The Markdown report's content as a standalone page (tables as HTML tables, the PNGs inline by name)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]  # fmt: skip
    for heading, body in sections:
        if heading:
            parts.append(f"<h2>{html.escape(heading)}</h2>")
        bullets = []
        for block in body:
            if block.startswith("| "):
                parts.append(_md_table_to_html(block))
            elif block.startswith("![]("):
                parts.append(f"<p><img src='{html.escape(block[4:-1])}'></p>")
            elif block.startswith("- "):
                bullets.append(block)
            elif block:
                parts.append(f"<p>{_inline(block)}</p>")
        if bullets:
            parts.append("<ul>" + "".join(f"<li>{_inline(b[2:])}</li>" for b in bullets) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _inline(text: str) -> str:
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _md_table_to_html(block: str) -> str:
    lines = block.splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines if not line.startswith("|---")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

def default_out(run_paths: list[str]) -> str:
    """``<RUN>/report`` for one run, else ``report/`` in the runs' common parent directory."""
    runs = [os.path.abspath(os.path.normpath(p)) for p in expand_run_paths(run_paths)]
    if len(runs) == 1:
        return os.path.join(runs[0], "report")
    return os.path.join(os.path.commonpath([os.path.dirname(r) for r in runs]), "report")
