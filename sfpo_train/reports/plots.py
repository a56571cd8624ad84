"""The PNG plots of ``sfpo report`` (matplotlib, Agg backend: files only, no display).

Each function draws one figure from the runs or tables :mod:`sfpo_train.reports.runs` and
:mod:`sfpo_train.reports.tables` build and saves it to ``path``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sfpo_train.reports.runs import ARMS, Run, arms, column, nested
from sfpo_train.reports.tables import STACKED_STAGES, stage_times

ARM_COLORS = {"GRPO": "#4C72B0", "SFPO": "#DD8452"}
STAGE_COLORS = [
    "#4C72B0",
    "#55A868",
    "#8172B3",
    "#937860",
    "#DA8BC3",
    "#8C8C8C",
    "#DD8452",
    "#CCB974",
    "#C44E52",
    "#64B5CD",
    "#DDDDDD",
]  # one per stacked stage, in order


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


# At most this many bars per panel of the stage-time plot: longer runs are averaged over windows of steps.
MAX_BARS = 40
WINDOWS = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000)


def step_window(n_steps: int) -> int:
    """The width of the step windows the stage-time plot averages over: the smallest of :data:`WINDOWS` (then
    multiples of 1000) that leaves at most :data:`MAX_BARS` bars for ``n_steps`` steps."""
    for width in WINDOWS:
        if math.ceil(n_steps / width) <= MAX_BARS:
            return width
    return 1000 * math.ceil(n_steps / (1000 * MAX_BARS))


def window_means(per_step: pd.DataFrame, width: int) -> pd.DataFrame:
    """``per_step`` (index: training step >= 1) as means over windows of ``width`` steps (1..w, w+1..2w, ...),
    indexed by each window's first step."""
    first = (per_step.index.to_numpy() - 1) // width * width + 1
    return per_step.groupby(first).mean()


def stage_time_figure(runs: list[Run]):
    """The stacked per-stage seconds per step, one panel per arm (the mean over the arm's runs at each step,
    then over windows of :func:`step_window` steps when a run is longer than :data:`MAX_BARS` steps)."""
    plt = _plt()
    present = arms(runs)
    fig, axes = plt.subplots(
        1, len(present), figsize=(5.5 * len(present) + 2.6, 4.4), sharey=True, squeeze=False, layout="constrained"
    )
    for ax, arm in zip(axes[0], present):
        frames = [stage_times(r) for r in runs if r.arm == arm]
        per_step = pd.concat(frames).groupby("global_step")[list(STACKED_STAGES)].mean()
        width = step_window(int(per_step.index.max()) if len(per_step) else 1)
        mean = window_means(per_step, width) if width > 1 else per_step
        x = mean.index.to_numpy() + (width - 1) / 2  # each bar over the middle of its window
        bottom = np.zeros(len(mean))
        for (stage, label), color in zip(STACKED_STAGES.items(), STAGE_COLORS):
            values = mean[stage].to_numpy()
            if not values.any():
                continue
            ax.bar(x, values, bottom=bottom, width=0.85 * width, color=color, label=label)
            bottom = bottom + values
        ax.set_title(f"{arm}: {len(frames)} run(s)", fontsize=10)
        ax.set_xlabel("training step" if width == 1 else f"training step (mean over windows of {width} steps)")
    axes[0][0].set_ylabel("seconds per step")
    handles: dict[str, object] = {}
    for ax in axes[0]:
        ax.xaxis.get_major_locator().set_params(integer=True)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    ordered = [lab for lab in STACKED_STAGES.values() if lab in handles][::-1]  # top of the stack first
    if ordered:
        fig.legend([handles[lab] for lab in ordered], ordered, fontsize=8, loc="outside right upper")
    return fig


def plot_stage_time(runs: list[Run], path: str) -> None:
    """:func:`stage_time_figure` saved to ``path``."""
    _save(stage_time_figure(runs), path)


def stage_share_figure(share: pd.DataFrame):
    """Each arm's step as one horizontal bar split into its stages' percentages (the table stage_share.csv)."""
    plt = _plt()
    stacked = share.loc[list(STACKED_STAGES)].fillna(0)
    shown = [stage for stage in STACKED_STAGES if stacked.loc[stage].to_numpy().any()]
    # tall enough for the arms' bars and for the legend beside them (one line per stage shown)
    height = max(1.6 + 0.6 * share.shape[1], 0.6 + 0.2 * len(shown))
    fig, ax = plt.subplots(figsize=(10, height), layout="constrained")
    left = np.zeros(share.shape[1])
    for (stage, label), color in zip(STACKED_STAGES.items(), STAGE_COLORS):
        values = stacked.loc[stage].to_numpy()
        if stage not in shown:
            continue
        ax.barh(list(share.columns), values, left=left, color=color, label=label)
        for i, v in enumerate(values):
            if v >= 6:
                ax.text(left[i] + v / 2, i, f"{v:.0f}%", ha="center", va="center", fontsize=8)
        left = left + values
    ax.set_xlim(0, 100)
    ax.set_xlabel("percent of a step (mean over timed steps)")
    if shown:  # no stage timed (a run that logged only its steps): no legend
        fig.legend(fontsize=8, loc="outside right upper")
    return fig


def plot_stage_share(share: pd.DataFrame, path: str) -> None:
    """:func:`stage_share_figure` saved to ``path``."""
    _save(stage_share_figure(share), path)


def _save(fig, path: str) -> None:
    # the figure as laid out (constrained layout keeps every label inside it), not cropped to its artists
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_memory(memory: pd.DataFrame, path: str) -> None:
    """Peak memory per stage, arms side by side: the primary reading (CUDA peak allocated, else RSS)."""
    plt = _plt()
    reading = next((r for r in ("max_allocated_gb", "rss_gb") if r in set(memory.get("reading", []))), None)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    if reading is None:
        ax.text(0.5, 0.5, "no memory readings in these runs", ha="center", va="center")
    else:
        table = memory[memory["reading"] == reading].set_index("stage")
        shown = [a for a in ARMS if a in table]
        x = np.arange(len(table))
        width = 0.8 / max(1, len(shown))
        for i, arm in enumerate(shown):
            ax.bar(x + i * width, table[arm].to_numpy(), width, label=arm, color=ARM_COLORS[arm])
        ax.set_xticks(x + width * (len(shown) - 1) / 2, table.index, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{reading} (GB)")
        ax.set_title(
            "peak memory per stage" if reading == "max_allocated_gb" else "process RSS at the end of each stage"
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
ARM_SHADES = {"GRPO": "Blues", "SFPO": "Oranges"}  # one shade of the arm's colour per seed


def seed_styles(runs: list[Run]) -> dict[str, tuple[object, str, str]]:
    """``{run name: (colour, line style, marker)}``: the arm's colour in a shade of its own per seed (darkest
    first), and line styles and markers cycling over the arm's seeds, so no two runs of an arm look alike."""
    from matplotlib import colormaps

    styles = {}
    for arm in arms(runs):
        mine = sorted((r for r in runs if r.arm == arm), key=lambda r: (r.seed, r.name))
        cmap = colormaps[ARM_SHADES.get(arm, "Greys")]
        for i, run in enumerate(mine):
            shade = 0.9 - 0.45 * i / max(1, len(mine) - 1)
            styles[run.name] = (cmap(shade), LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)])
    return styles


def plot_curves(runs: list[Run], head: pd.DataFrame, path: str) -> None:
    """Training reward (rolling mean) and test accuracy against rollouts and against wall-clock."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    styles = seed_styles(runs)
    for run in runs:
        color, ls, marker = styles[run.name]
        label = f"{run.arm} seed {run.seed}"
        train = run.train
        window = max(1, len(train) // 20)
        reward = column(train, "critic/score/mean").rolling(window, min_periods=1).mean()
        for col, x in ((0, column(train, "train/rollouts_total")), (1, column(train, "train/elapsed_s"))):
            axes[0][col].plot(x, reward, color=color, ls=ls, lw=1.2, label=label)
        val = run.val
        for col, x in ((0, val["rollouts"]), (1, val["elapsed_s"])):
            axes[1][col].plot(x, val["accuracy"], color=color, ls=ls, marker=marker, ms=3.5, lw=1.2, label=label)
    if "target_acc" in head and len(head):
        for ax in axes[1]:
            ax.axhline(head["target_acc"].mean(), color="gray", ls=":", lw=1, label="GRPO's best (mean over seeds)")
    for col, xlabel in ((0, "rollouts (generated responses)"), (1, "wall-clock (s, sum of step times)")):
        axes[0][col].set_xlabel(xlabel)
        axes[1][col].set_xlabel(xlabel)
        axes[0][col].set_ylabel("training reward (rolling mean)")
        axes[1][col].set_ylabel("test accuracy (greedy)")
    axes[1][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dynamics(runs: list[Run], path: str) -> None:
    """Entropy, the entropy z-score and alpha over steps; the trigger step marked on SFPO runs."""
    plt = _plt()
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    seeds = sorted({r.seed for r in runs})
    styles = seed_styles(runs)
    for run in runs:
        train = run.train
        step = train["training/global_step"]
        color, ls, _ = styles[run.name]
        label = f"{run.arm} seed {run.seed}"
        axes[0].plot(step, column(train, "actor/entropy"), color=color, ls=ls, lw=1, label=label)
        if run.arm == "SFPO":
            axes[1].plot(step, column(train, "sfpo/zscore"), color=color, ls=ls, lw=1, label=label)
            axes[2].plot(step, column(train, "sfpo/alpha"), color=color, ls=ls, lw=1.2, label=label)
            fired = train[column(train, "sfpo/triggered").fillna(0) > 0]
            if len(fired):
                s = fired["training/global_step"].iloc[0]
                for ax in axes:
                    ax.axvline(s, color=color, ls=ls, lw=0.8, alpha=0.6)
                axes[2].annotate(
                    f"trigger (seed {run.seed})",
                    (s, 0),
                    xytext=(3, 4 + 10 * seeds.index(run.seed)),
                    textcoords="offset points",
                    fontsize=7,
                    color=color,
                )
    thresholds = {
        float(nested(r.config, "actor_rollout_ref.actor.sfpo.zscore_threshold", math.nan))
        for r in runs
        if r.arm == "SFPO"
    }
    for tau in thresholds:
        if math.isfinite(tau):
            axes[1].axhline(tau, color="gray", ls=":", lw=1, label=f"threshold {tau:g}")
    axes[0].set_ylabel("entropy (old policy, token mean)")
    axes[1].set_ylabel("entropy z-score")
    axes[2].set_ylabel("alpha")
    axes[2].set_xlabel("training step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
