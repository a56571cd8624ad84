"""``sfpo sweep``: the paper's ablations as one resumable grid of runs, then a table and a heat map.

The grid (each point one run per seed, all on one preset and algorithm, the same
seeds and data order as ``sfpo compare``):

- ``baseline``: plain GRPO (``sfpo.enable=false``): the target every SFPO point is measured against;
- ``k_alpha``: K in {1, 3, 5, 7} x alpha in {0.3, 0.5, 0.8, 1.0} (paper Fig. 5), named ``K<k>-a<alpha>``;
- ``decay``: linear decay of alpha after the trigger over :data:`LINEAR_DECAY_STEPS` iterations
  (Fig. 7; hard decay is the ``K3-a0.8`` point);
- ``entropy``: no entropy control, alpha constant (Fig. 6);
- ``stages``: without the reposition (Stage II) and without the slow correction (Stage III) (Fig. 5d);
- ``lr``: GRPO and SFPO at lr 1e-5, 3e-5 and 1e-4.

Every SFPO point not in ``k_alpha`` uses the preset's K and alpha (3, 0.8 on the default).
Points with the same settings are one run (lr 3e-5 is the default lr: ``lr3e-05`` is the
``baseline`` and ``K3-a0.8`` runs). Runs go to ``OUT/<point>-s<seed>``, the report to
``OUT/report``; running the same sweep again continues it (finished runs kept, an interrupted
one continued from its newest checkpoint), as :func:`~sfpo_train.reports.compare.train_or_continue`
does for ``sfpo compare``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import sfpo_train.trainer.config as config_lib
from sfpo_train.reports.compare import (
    RESERVED,
    check_run_count,
    check_same_run,
    disk_full,
    train_or_continue,
    write_report,
)
from sfpo_train.trainer.run_guard import WriteError

K_VALUES = (1, 3, 5, 7)
ALPHAS = (0.3, 0.5, 0.8, 1.0)
LRS = (1e-5, 3e-5, 1e-4)
LINEAR_DECAY_STEPS = 20
GROUPS = ("baseline", "k_alpha", "decay", "entropy", "stages", "lr")
# the order points train in: the baseline and the K x alpha grid (the heat map) first, then the ablations
TRAIN_ORDER = ("baseline", "k_alpha", "decay", "entropy", "stages", "lr")
SFPO_KEY = "actor_rollout_ref.actor.sfpo."
LR_KEY = "actor_rollout_ref.actor.optim.lr"


@dataclass(frozen=True)
class Point:
    """One setting of the grid: its name, group, whether SFPO is on, and its overrides of the preset."""

    name: str
    group: str
    sfpo: bool
    overrides: tuple[str, ...]

    @property
    def key(self) -> tuple:
        """What makes two points the same run."""
        return (self.sfpo, tuple(sorted(self.overrides)))


def _lr_name(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def grid_points(
    groups: tuple[str, ...] = GROUPS, *, default_lr: float = 3e-5, k: int = 3, alpha: float = 0.8
) -> list[Point]:
    """The grid's points in ``groups`` (table order); ``default_lr``, ``k``, ``alpha``: the preset's values."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"--groups: unknown group(s) {', '.join(unknown)}; known: {', '.join(GROUPS)}")
    s = SFPO_KEY
    points: list[Point] = []
    if "baseline" in groups:
        points.append(Point("grpo", "baseline", False, ()))
    if "k_alpha" in groups:
        for kk in K_VALUES:
            for a in ALPHAS:
                own = () if (kk, a) == (k, alpha) else (f"{s}inner_steps={kk}", f"{s}alpha={a}")
                points.append(Point(f"K{kk}-a{a:g}", "k_alpha", True, own))
    if "decay" in groups:
        points.append(Point("decay-hard", "decay", True, ()))
        points.append(
            Point("decay-linear", "decay", True, (f"{s}decay=linear", f"{s}decay_steps={LINEAR_DECAY_STEPS}"))
        )
    if "entropy" in groups:
        points.append(Point("entropy-control", "entropy", True, ()))
        points.append(Point("no-entropy-control", "entropy", True, (f"{s}entropy_control=false",)))
    if "stages" in groups:
        points.append(Point("no-reposition", "stages", True, (f"{s}reposition=false",)))
        points.append(Point("no-slow-correction", "stages", True, (f"{s}slow_correction=false",)))
    if "lr" in groups:
        for lr in LRS:
            own = () if abs(lr - default_lr) <= 1e-12 else (f"{LR_KEY}={lr}",)
            points.append(Point(f"grpo-lr{_lr_name(lr)}", "lr", False, own))
            points.append(Point(f"sfpo-lr{_lr_name(lr)}", "lr", True, own))
    return points


def unique_runs(points: list[Point]) -> dict[str, Point]:
    """``{point name: the point that names its run}``: points with the same settings share one run.

    The run of the preset's own settings is named ``grpo`` / ``sfpo``; any other run after the
    first of its points in :data:`TRAIN_ORDER`.
    """
    owner: dict[tuple, Point] = {}
    out = {}
    for p in sorted(points, key=lambda p: TRAIN_ORDER.index(p.group)):
        if p.key not in owner:
            owner[p.key] = p if p.overrides else Point("sfpo" if p.sfpo else "grpo", p.group, p.sfpo, ())
        out[p.name] = owner[p.key]
    return out


@dataclass
class SweepResult:
    out_dir: str
    run_dirs: dict[str, str]  # point name -> run directory (shared by points with the same settings)
    report_dir: str
    files: dict[str, str]
    seconds: float


def sweep_plan(
    preset: str,
    algorithm: str,
    overrides: list[str],
    *,
    groups: tuple[str, ...],
    seeds: int,
    steps: int | None,
    out_dir: str,
):
    """``(points, owners, runs, config_of)``: the grid, checked before anything runs.

    ``runs``: ``(run name, seed)`` in training order (seed 1 of every run first); ``config_of(name, seed)``
    builds one run's resolved config. Checked here: the counts, the overrides (each run's config of
    seed 1; the other seeds differ only in the seed) and every run already in ``out_dir``; the other
    configs are built one at a time as their runs start.
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    taken = (
        RESERVED
        + (LR_KEY,)
        + tuple(
            SFPO_KEY + k
            for k in (
                "inner_steps",
                "alpha",
                "decay",
                "decay_steps",
                "entropy_control",
                "reposition",
                "slow_correction",
            )
        )
    )
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+")
        if key in taken:
            raise ValueError(
                f"override {item!r}: the sweep sets {key} itself"
                + (" (use --steps)" if key == "trainer.total_training_steps" else "")
            )
    base = config_lib.load_config(preset, list(overrides), algorithm)
    arr = base.actor_rollout_ref.actor
    points = grid_points(
        groups, default_lr=float(arr.optim.lr), k=int(arr.sfpo.inner_steps), alpha=float(arr.sfpo.alpha)
    )
    owners = unique_runs(points)
    by_name = {owner.name: owner for owner in owners.values()}  # each run once, in training order
    check_run_count(len(by_name) * seeds, f"--seeds {seeds}: {len(by_name)} runs of the grid x {seeds} seeds")

    def config_of(run: str, seed: int):
        owner = by_name[run]
        own = [
            f"{SFPO_KEY}enable={'true' if owner.sfpo else 'false'}",
            f"trainer.seed={seed}",
            f"data.seed={seed}",
            f"trainer.default_local_dir={out_dir}",
            f"trainer.experiment_name={run}-s{seed}",
        ]
        if steps is not None:
            own.append(f"trainer.total_training_steps={steps}")
        cfg = config_lib.load_config(preset, list(overrides) + list(owner.overrides) + own, algorithm)
        config_lib.validate(cfg)
        return cfg

    runs = [(run, seed) for seed in range(1, seeds + 1) for run in by_name]
    for run in by_name:
        config_of(run, 1)
    for run, seed in runs:
        run_dir = os.path.join(out_dir, f"{run}-s{seed}")
        if os.path.isfile(os.path.join(run_dir, "config.yaml")):
            check_same_run(config_of(run, seed), run_dir)
    return points, owners, runs, config_of


def run_sweep(
    preset: str = "default",
    *,
    groups: tuple[str, ...] = GROUPS,
    seeds: int = 1,
    steps: int | None = None,
    out_dir: str | None = None,
    algorithm: str = "grpo",
    overrides: list[str] | None = None,
    progress: bool = True,
    log=print,
) -> SweepResult:
    """Train (or continue) every run of the grid, seed by seed in :data:`TRAIN_ORDER`, then write the report."""
    from sfpo_train.reports.sweep_report import build_sweep_report

    out_dir = out_dir or os.path.join("runs", f"sweep-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    points, owners, order, config_of = sweep_plan(
        preset, algorithm, list(overrides or []), groups=groups, seeds=seeds, steps=steps, out_dir=out_dir
    )
    start = time.perf_counter()
    for i, (name, seed) in enumerate(order, 1):
        cfg = config_of(name, seed)
        cfg.trainer.progress_bar = progress
        t0 = time.perf_counter()
        try:
            run_dir = train_or_continue(cfg, preset, log=log)
        except (OSError, WriteError) as e:
            raise disk_full(e, os.path.join(out_dir, f"{name}-s{seed}")) from e
        log(
            f"sfpo sweep: [{i}/{len(order)}] {os.path.basename(run_dir)} done after {time.perf_counter() - t0:.0f} s "
            f"({(time.perf_counter() - start) / 60:.1f} min so far)"
        )
    run_dirs = {p.name: os.path.join(out_dir, owners[p.name].name) for p in points}
    report_dir = os.path.join(out_dir, "report")
    title = f"sfpo sweep on preset {preset!r} ({algorithm}), {seeds} seed(s)"
    files = write_report(
        report_dir, lambda directory: build_sweep_report(out_dir, directory, points, owners, seeds=seeds, title=title)
    )
    return SweepResult(out_dir, run_dirs, report_dir, files, time.perf_counter() - start)
