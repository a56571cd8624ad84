"""SFPO against GRPO, the paper's headline measures (Fig. 4, appendix C.5): a table per seed and its prose.

GRPO's best test accuracy is the target; each arm's rollouts and wall-clock to
first reach it, the step-time ratio and SFPO's extra memory are set against
the paper's numbers (:data:`PAPER`).
"""

from __future__ import annotations

import math

import pandas as pd

from sfpo_train.reports.runs import Run, column
from sfpo_train.reports.stats import INTERVAL, format_spread, mean_ci, ratio_ci
from sfpo_train.reports.tables import initial_accuracy, mean_stage_times, peak_memory_gb, run_summary

# The paper's numbers our headline measures are set against (Fig. 4, appendix C.5).
PAPER = {
    "rollouts": "3.21-4.93x fewer rollouts than GRPO to reach GRPO's best accuracy (Fig. 4a)",
    "wall_clock": "2.62-4.19x less wall-clock to reach it (Fig. 4b)",
    "step_time": "an SFPO step ~1.37x a GRPO step, generation ~80% of a GRPO step (appendix C.5)",
    "memory": "no extra GPU memory (section 4.3)",
}


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
        row = {
            "seed": seed,
            "grpo_run": grpo.name,
            "sfpo_run": sfpo.name,
            "target_known": bool(len(gv)),
            "initial_known": not math.isnan(initial),
            "grpo_initial_acc": initial,
            "target_acc": math.nan,
            "grpo_improved": False,
            "grpo_best_step": -1,
            "grpo_rollouts": math.nan,
            "grpo_time_s": math.nan,
            "sfpo_reached": False,
            "sfpo_step": -1,
            "sfpo_rollouts": math.nan,
            "sfpo_time_s": math.nan,
            "rollouts_ratio": math.nan,
            "time_ratio": math.nan,
            "grpo_final_acc": float(gv["accuracy"].iloc[-1]) if len(gv) else math.nan,
            "sfpo_final_acc": float(sv["accuracy"].iloc[-1]) if len(sv) else math.nan,
            "grpo_best_acc": float(gv["accuracy"].max()) if len(gv) else math.nan,
            "sfpo_best_acc": float(sv["accuracy"].max()) if len(sv) else math.nan,
        }
        if len(gv):
            target = float(gv["accuracy"].max())
            g_hit, s_hit = first_reaching(gv, target), first_reaching(sv, target)
            row.update(
                target_acc=target,
                grpo_best_step=int(g_hit["step"]),
                grpo_rollouts=float(g_hit["rollouts"]),
                grpo_time_s=float(g_hit["elapsed_s"]),
            )
            if s_hit is not None:
                row.update(
                    sfpo_reached=True,
                    sfpo_step=int(s_hit["step"]),
                    sfpo_rollouts=float(s_hit["rollouts"]),
                    sfpo_time_s=float(s_hit["elapsed_s"]),
                )
            # GRPO's best lies after step 0 and the step-0 accuracy is known: it improved on its start
            row["grpo_improved"] = row["initial_known"] and row["grpo_best_step"] > 0
            ok = row["sfpo_reached"] and row["grpo_improved"] and row["sfpo_rollouts"] > 0
            row["rollouts_ratio"] = row["grpo_rollouts"] / row["sfpo_rollouts"] if ok else math.nan
            row["time_ratio"] = row["grpo_time_s"] / row["sfpo_time_s"] if ok and row["sfpo_time_s"] > 0 else math.nan
        gs, ss = run_summary(grpo), run_summary(sfpo)
        row["finished"] = bool(gs["finished"] and ss["finished"])
        row["steps"] = f"{gs['steps']}/{gs['planned_steps']}, {ss['steps']}/{ss['planned_steps']}"
        row["grpo_step_s"], row["sfpo_step_s"] = gs["mean_step_s"], ss["mean_step_s"]
        row["step_time_ratio"] = ss["mean_step_s"] / gs["mean_step_s"]
        # SFPO's steps that ran the fast passes (before the entropy trigger): the paper's per-step comparison
        timed = sfpo.timed
        active = timed[column(timed, "sfpo/inner_steps_run").fillna(0) > 0]["timing_s/step"]
        row["active_step_time_ratio"] = float(active.mean()) / gs["mean_step_s"] if len(active) else math.nan
        gt = mean_stage_times(grpo)
        row["grpo_gen_share_pct"] = 100 * gt["gen"] / gt["step"]
        (g_mem, what), (s_mem, _) = peak_memory_gb(grpo), peak_memory_gb(sfpo)
        row["extra_memory_gb"], row["memory_reading"] = s_mem - g_mem, what
        row["grpo_peak_memory_gb"], row["sfpo_peak_memory_gb"] = g_mem, s_mem
        row["sfpo_snapshot_mb"] = ss["snapshot_mb"]
        records.append(row)
    return pd.DataFrame(records)


def _spread(values: pd.Series, fmt: str = "{:.2f}", *, ratio: bool = False) -> str:
    """The mean over seeds with its 95% interval in brackets (:func:`~sfpo_train.reports.stats.format_spread`);
    ``ratio``: the geometric mean, its interval on the log scale."""
    return format_spread(*(ratio_ci if ratio else mean_ci)(values.dropna()), fmt)


def extra_memory_text(head: pd.DataFrame) -> str:
    """SFPO's extra memory, the one number the report gives for it: per seed SFPO's peak minus GRPO's (the same
    reading, the same seed), then the mean over seeds, with what was read."""
    return (
        f"{_spread(head['extra_memory_gb'], '{:+.3f} GB')} (per seed SFPO's peak minus GRPO's, mean over seeds; "
        f"{head['memory_reading'].iloc[0]})"
    )


def _seeds(head: pd.DataFrame, mask: pd.Series) -> str:
    return ", ".join(str(seed) for seed in head.loc[mask, "seed"])


def headline_lines(head: pd.DataFrame) -> tuple[str, list[str], list[str]]:
    """``(note, measures, verdicts)``: what the numbers are, one sentence per measure as mean (min, max) over
    seeds, and one per measure on how it compares with the paper. Plain text but for ``**bold**``.

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
    note = (
        f"Over {n} seed(s); each number is the mean over seeds with its interval in brackets ({INTERVAL}); "
        "where a measure is defined in only some seeds, both arms' means are over those seeds."
    )
    measures: list[str] = []
    if n_target == 0:
        measures.append(
            "GRPO's best test accuracy (the target): **not measurable**: no GRPO run has a validation row "
            "(trainer.test_freq, trainer.val_before_train)."
        )
    else:
        measures += [
            f"GRPO's best test accuracy (the target): {_spread(head['target_acc'], '{:.3f}')}"
            + (
                f" over {n_target} seed(s); not measurable in seed(s) {_seeds(head, no_target)}, whose GRPO run has no "
                "validation row"
                if no_target.any()
                else ""
            )
            + ".",
            (
                f"GRPO improved on its initial accuracy (step 0) in {improved} of {n_known} seed(s)"
                + (
                    f"; its initial accuracy is unknown in seed(s) {_seeds(head, unknown)} (no step-0 validation: "
                    "trainer.val_before_train=false), so there it is not known whether GRPO improved and no GRPO/SFPO "
                    "ratio is taken"
                    if unknown.any()
                    else ""
                )
                + "."
                if n_known
                else "GRPO's initial accuracy is unknown (no step-0 validation: trainer.val_before_train="
                "false), so it is not known whether GRPO improved and no GRPO/SFPO ratio is taken."
            ),
            f"SFPO reached it in {reached} of {n_target} seed(s)"
            + ("" if reached == n_target else f" (not reached: seed(s) {_seeds(head, has_target & ~reached_seeds)})")
            + ".",
            (
                f"Rollouts to reach it, over the {int(compared.sum())} seed(s) where both arms reached it and GRPO improved on "
                f"its known initial accuracy ({_seeds(head, compared) or 'none'}): GRPO {_spread(head.loc[compared, 'grpo_rollouts'], '{:.0f}')}, "
                f"SFPO {_spread(head.loc[compared, 'sfpo_rollouts'], '{:.0f}')}; GRPO/SFPO {_spread(head['rollouts_ratio'], '{:.2f}x', ratio=True)}."
            ),
            (
                f"Wall-clock to reach it, the same seed(s): GRPO {_spread(head.loc[compared, 'grpo_time_s'], '{:.1f} s')}, "
                f"SFPO {_spread(head.loc[compared, 'sfpo_time_s'], '{:.1f} s')}; GRPO/SFPO {_spread(head['time_ratio'], '{:.2f}x', ratio=True)}."
            ),
            f"Final test accuracy: GRPO {_spread(head['grpo_final_acc'], '{:.3f}')}, SFPO {_spread(head['sfpo_final_acc'], '{:.3f}')}.",
        ]
    measures += [
        f"Step time: GRPO {_spread(head['grpo_step_s'], '{:.3f} s')}, SFPO {_spread(head['sfpo_step_s'], '{:.3f} s')}; "
        f"SFPO/GRPO {_spread(head['step_time_ratio'], '{:.2f}x', ratio=True)}; counting only SFPO's steps with the "
        f"fast passes (before the entropy trigger) {_spread(head['active_step_time_ratio'], '{:.2f}x', ratio=True)}. "
        "Generation is "
        f"{_spread(head['grpo_gen_share_pct'], '{:.0f}%')} of a GRPO step here.",
        f"Extra memory of SFPO: {extra_memory_text(head)}; its snapshot of theta_0 (held from the fast passes "
        f"through the slow one): "
        + ("n/a" if head["sfpo_snapshot_mb"].isna().all() else f"{head['sfpo_snapshot_mb'].max():.2f} MB")
        + ".",
    ]

    # why each seed left out of the rollouts / wall-clock verdicts is not measurable
    why = [
        f"seed(s) {_seeds(head, mask)}: {reason}"
        for mask, reason in (
            (no_target, "GRPO's run has no validation row (validate with trainer.test_freq)"),
            (unknown, "GRPO's initial accuracy unknown (no step-0 validation; set trainer.val_before_train=true)"),
            (
                known & ~improved_seeds,
                "GRPO never improved on its initial accuracy, so both arms 'reach' it before "
                "training (train longer, --steps, or on a task with room to learn)",
            ),
        )
        if mask.any()
    ]
    verdicts = []
    if improved == 0:
        verdicts.append(f"Rollouts and wall-clock to GRPO's best: **not measurable here**: {'; '.join(why)}.")
    else:
        left_out = f" ({n - improved} seed(s) not measurable: {'; '.join(why)})" if why else ""
        reached_m = int((improved_seeds & reached_seeds).sum())
        r, t = head.loc[improved_seeds, "rollouts_ratio"], head.loc[improved_seeds, "time_ratio"]
        if reached_m == improved and r.notna().all() and (r > 1).all():
            verdicts.append(
                f"Rollouts: same direction as the paper ({PAPER['rollouts']}): SFPO needed {_spread(r, '{:.2f}x', ratio=True)} "
                f"fewer in {improved} measurable seed(s){left_out}."
            )
        else:
            verdicts.append(
                f"Rollouts: **does not show the paper's direction in every measurable seed** (paper: "
                f"{PAPER['rollouts']}): SFPO reached GRPO's best in {reached_m} of {improved} measurable "
                f"seed(s) and needed fewer rollouts in {int((r > 1).sum())} of {improved}{left_out}."
            )
        if reached_m == improved and t.notna().all() and (t > 1).all():
            verdicts.append(
                f"Wall-clock: same direction as the paper ({PAPER['wall_clock']}): {_spread(t, '{:.2f}x', ratio=True)} less."
            )
        else:
            verdicts.append(
                f"Wall-clock: **does not show the paper's direction in every measurable seed** (paper: "
                f"{PAPER['wall_clock']}): SFPO got there sooner in {int((t > 1).sum())} of {improved}."
            )
    ratio = ratio_ci(head["active_step_time_ratio"])[0]  # the geometric mean, as in the measures above
    if math.isnan(ratio):  # the trigger fired before the first timed step: no SFPO step ran its fast passes
        ratio = ratio_ci(head["step_time_ratio"])[0]
    gen = head["grpo_gen_share_pct"].mean()
    verdicts.append(
        f"Step time (SFPO steps with the fast passes): SFPO/GRPO {ratio:.2f}x here against the paper's "
        f"~1.37x ({PAPER['step_time']}). "
        + (
            f"Generation is only {gen:.0f}% of a GRPO step here, so SFPO's K extra passes weigh far more than in "
            "the paper's long-rollout regime."
            if gen < 60 and ratio > 1.6
            else "Comparable regime."
        )
    )
    verdicts.append(
        f"Memory: paper: {PAPER['memory']}; here SFPO's extra memory is {extra_memory_text(head)}; by design SFPO holds one copy of the trainable parameters "
        "(the snapshot) from the fast passes through the slow one, 0 with snapshot_offload=cpu."
        + (
            ""
            if head["memory_reading"].iloc[0].startswith("GPU")
            else " On the CPU the RSS difference is only indicative (the runs of one compare share a process "
            "and the allocator keeps freed memory); the snapshot's size is exact."
        )
    )
    return note, measures, verdicts
