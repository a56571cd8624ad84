"""``sfpo compare``: GRPO against SFPO on one preset over several seeds, then ``sfpo report`` on the runs.

For each seed s = 1..N, two runs in this process, one after the other: GRPO
(``actor_rollout_ref.actor.sfpo.enable=false``) and SFPO (the preset's SFPO
settings), both with ``trainer.seed=s`` and ``data.seed=s`` -- the same initial
weights, the same prompt order, the same validation set -- and the same
overrides. They differ only in the update rule: the rollouts differ from step 2
on because the policies do.

Runs go to ``OUT/grpo-s<s>`` and ``OUT/sfpo-s<s>`` (``OUT`` defaults to
``runs/compare-<preset>-<time>``); the report to ``OUT/report``. Its headline
measures are the paper's (Fig. 4, appendix C.5): rollouts and wall-clock each
arm needs to reach GRPO's best test accuracy ("not reached" where SFPO never
does), the step-time ratio SFPO/GRPO and SFPO's extra memory, as means with 95%
intervals over seeds (summary.csv), and a cost model projecting the step ratio to
other generation shares (cost_model.csv). Where the result does not point the
paper's way the report says so.

Validation. Where neither the user's overrides nor the preset set ``trainer.test_freq``,
compare sets it for the run's length (:func:`validation_every`: about
:data:`VALIDATION_POINTS` validations after step 0, never fewer than the trainer's
default of every 50 steps), so that a short compare still measures when each arm
first reaches GRPO's best; a compare continued in the same ``--out`` keeps the
frequency its runs were made with. Before the first run it says what a compare
of its size can and cannot show (:func:`scope_lines`).

On the embedded default 3 seeds x 300 steps took 5 min 37 s on 2 otherwise idle
CPU cores (measured; the default is now 5 seeds); ``sfpo report OUT --out OUT/report`` rebuilds the report
from the runs at any time.
Resumable: the same compare again with the same ``--out`` keeps the finished runs, continues an
interrupted one from its newest checkpoint (one stopped before its first checkpoint starts over) and
trains the missing ones (:func:`train_or_continue`).
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import sfpo_train.trainer.config as config_lib
from sfpo_train.reports.build import build_report
from sfpo_train.reports.stats import MIN_SEEDS
from sfpo_train.trainer.run_guard import DISK_FULL_ERRNOS, WriteError

# Keys compare sets per run; an override of one would break the pairing.
RESERVED = (
    "actor_rollout_ref.actor.sfpo.enable",
    "trainer.seed",
    "data.seed",
    "trainer.experiment_name",
    "trainer.default_local_dir",
    "trainer.total_training_steps",
)
ARM_SLUGS = ("grpo", "sfpo")  # run names <slug>-s<seed>, in the order compare trains them
# Validations after step 0 that compare aims at when it chooses trainer.test_freq: enough to place each arm's
# first reach of GRPO's best within a tenth of the run. On the embedded task a validation (500 problems,
# greedy) took 0.08-0.11 s against a 0.09 s GRPO step and a 0.24 s SFPO step (2 idle CPU cores, 1 thread);
# in a 2-seed 50-step compare, validating every 5 steps took 12-13% of the summed step time and added 5% to
# the command's CPU time (measured 2026-12-07, 2 cores at load 4-5, 1 thread; docs/reports.md).
VALIDATION_POINTS = 10
# The most runs one compare or sweep takes: 500 seeds of a compare, 40 of the full sweep grid. Each run
# takes seconds to hours, so more is a typo (a count meant for --steps?) rather than a plan.
MAX_RUNS = 1000


def check_run_count(runs: int, what: str) -> None:
    """``ValueError`` naming the limit if ``runs`` (``what`` says how they were counted) is over :data:`MAX_RUNS`."""
    if runs > MAX_RUNS:
        raise ValueError(
            f"{what}: {runs} runs, over the limit of {MAX_RUNS} runs one command trains "
            f"(each run takes seconds to hours; use fewer seeds)"
        )


@dataclass
class CompareResult:
    out_dir: str
    run_dirs: list[str]
    report_dir: str
    files: dict[str, str]
    seconds: float


class DiskFull(OSError):
    """The disk filled while compare or sweep wrote ``path`` (one line: ``disk full: <path>``)."""

    def __init__(self, path: str):
        super().__init__(errno.ENOSPC, "disk full", path)
        self.path = path

    def __str__(self) -> str:
        return f"disk full: no space left to write {self.path}"


def disk_full(error: OSError | WriteError, path: str) -> Exception:
    """``error`` as :class:`DiskFull` naming ``path`` (or the file it names) if it is ENOSPC / EDQUOT, else as it is.

    ``error`` is an ``OSError`` of compare's own writes or the trainer's :class:`WriteError` (a run's files).
    """
    if error.errno not in DISK_FULL_ERRNOS or isinstance(error, DiskFull):
        return error
    named = error.path if isinstance(error, WriteError) else error.filename
    return DiskFull(named if isinstance(named, str) else path)


def write_report(report_dir: str, build: Callable[[str], dict[str, str]]) -> dict[str, str]:
    """``build(directory)`` into a temporary sibling of ``report_dir``, then that directory as ``report_dir``.

    All or nothing: a failed build (a full disk: :class:`DiskFull` naming ``report_dir``) leaves no
    temporary directory and the previous report, if any, as it was; the next call starts afresh.
    Returns ``build``'s ``{file name: path}`` with the paths in ``report_dir``.
    """
    parent, name = os.path.split(os.path.abspath(report_dir))
    tmp, old = os.path.join(parent, f".{name}.tmp"), os.path.join(parent, f".{name}.old")
    for stale in (tmp, old):  # left by a process killed in here
        shutil.rmtree(stale, ignore_errors=True)
    try:
        files = build(tmp)
        if os.path.isdir(report_dir):
            os.replace(report_dir, old)
        os.replace(tmp, report_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old) and not os.path.exists(report_dir):
            os.replace(old, report_dir)
        raise disk_full(e, report_dir) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return {key: os.path.join(report_dir, os.path.relpath(path, tmp)) for key, path in files.items()}


def saved_test_freq(out_dir: str, plan: list[tuple[str, int, str]]) -> int | None:
    """``trainer.test_freq`` of the first run of ``plan`` already in ``out_dir`` (None: none there yet)."""
    for name, _, _ in plan:
        path = os.path.join(out_dir, name, "config.yaml")
        if os.path.isfile(path):
            return int(config_lib.config_from_yaml(path).trainer.test_freq)
    return None


def run_names(seeds: int, algorithm: str = "grpo") -> list[tuple[str, int, str]]:
    """``(name, seed, arm)`` in the order compare runs them: both arms of seed 1, then of seed 2, ...

    Names carry the algorithm: ``grpo-s1`` / ``sfpo-s1`` for GRPO, ``dapo-s1`` / ``sfpo-dapo-s1`` for DAPO.
    """

    def name(arm: str, seed: int) -> str:
        if algorithm == "grpo":
            return f"{arm}-s{seed}"
        return f"{algorithm}-s{seed}" if arm == "grpo" else f"sfpo-{algorithm}-s{seed}"

    return [(name(arm, seed), seed, arm) for seed in range(1, seeds + 1) for arm in ARM_SLUGS]


def validation_every(total_steps: int, test_freq: int) -> int:
    """The ``trainer.test_freq`` compare uses for a run of ``total_steps`` whose config has ``test_freq``:
    every ``ceil(total_steps / VALIDATION_POINTS)`` steps, or ``test_freq`` where that is already as often."""
    every = max(1, math.ceil(total_steps / VALIDATION_POINTS))
    return test_freq if 0 < test_freq <= every else every


def sets_test_freq(preset: str, overrides: list[str]) -> bool:
    """Whether the user's overrides or the preset choose ``trainer.test_freq`` (then compare leaves it)."""
    key = "trainer.test_freq"
    return key in config_lib.PRESETS[preset] or any(item.split("=", 1)[0].lstrip("+") == key for item in overrides)


def arm_config(
    preset: str,
    algorithm: str,
    overrides: list[str],
    *,
    arm: str,
    seed: int,
    steps: int | None,
    out_dir: str,
    name: str,
    test_freq: int | None = None,
):
    """The resolved config of one compare run (``ValueError`` on an override of a key compare sets).

    ``test_freq``: the validation frequency compare chose (:func:`validation_every`), None to leave the
    preset's or the user's.
    """
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+")
        if key in RESERVED:
            raise ValueError(
                f"override {item!r}: compare sets {key} itself"
                + (" (use --steps)" if key == "trainer.total_training_steps" else "")
            )
    own = [
        f"actor_rollout_ref.actor.sfpo.enable={'true' if arm == 'sfpo' else 'false'}",
        f"trainer.seed={seed}",
        f"data.seed={seed}",
        f"trainer.default_local_dir={out_dir}",
        f"trainer.experiment_name={name}",
    ]
    if steps is not None:
        own.append(f"trainer.total_training_steps={steps}")
    if test_freq is not None:
        own.append(f"trainer.test_freq={test_freq}")
    cfg = config_lib.load_config(preset, list(overrides) + own, algorithm)
    config_lib.validate(cfg)
    return cfg


def check_same_run(cfg, run_dir: str) -> None:
    """``ValueError`` if ``run_dir`` holds a run made with settings other than ``cfg``'s (its progress bar and loggers aside)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    saved = config_lib.config_from_yaml(path)
    # a run may be continued to more steps, never taken for one of fewer
    longer = saved.trainer.total_training_steps <= cfg.trainer.total_training_steps
    diff = {
        k: v
        for k, v in config_lib.config_diff(saved, cfg).items()
        if k not in ("trainer.progress_bar", "trainer.logger") and not (k == "trainer.total_training_steps" and longer)
    }
    if diff:
        listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in sorted(diff.items())[:6])
        raise ValueError(
            f"--out {os.path.dirname(run_dir)!r} already holds run {os.path.basename(run_dir)} made with "
            f"other settings ({listed}); use the same settings to continue it, or choose another --out"
        )


def train_or_continue(cfg, preset: str, log=None) -> str:
    """Train the run ``cfg`` names to its ``trainer.total_training_steps``; returns its directory.

    A finished run (all steps logged) is kept as it is; one with a checkpoint is continued from its
    newest intact checkpoint (``Trainer.resume``, with the longer step count if ``cfg`` asks for more);
    one stopped before its first checkpoint starts over (``Trainer.create``); a missing one is trained.
    """
    from sfpo_train.trainer import Trainer
    from sfpo_train.trainer import checkpoint as ckpt

    say = log or (lambda text: print(text, flush=True))
    run_dir = os.path.join(cfg.trainer.default_local_dir, cfg.trainer.experiment_name)
    total = cfg.trainer.total_training_steps
    if os.path.isfile(os.path.join(run_dir, "config.yaml")):
        check_same_run(cfg, run_dir)
        logged = ckpt.logged_steps(run_dir)
        if logged is not None and logged >= total:
            say(f"{run_dir}: finished ({logged} steps), kept")
            return run_dir
        found = ckpt.find_resumable(run_dir)
        if found is not None:
            say(f"{run_dir}: continuing from {found[0]} ({logged} of {total} steps logged)")
            trainer = Trainer.resume(
                run_dir,
                [
                    f"trainer.total_training_steps={total}",
                    f"trainer.progress_bar={str(cfg.trainer.progress_bar).lower()}",
                ],
            )
            trainer.fit()
            return trainer.run_dir
    trainer = Trainer.create(cfg, preset=preset)
    trainer.fit()
    return trainer.run_dir


def scope_lines(cfg, seeds: int, *, chosen: bool) -> list[str]:
    """What a compare of ``seeds`` seeds of runs like ``cfg`` (its SFPO arm) can and cannot show: one or two lines.

    ``chosen``: compare chose ``cfg``'s ``trainer.test_freq`` for the run's length (:func:`validation_every`).
    """
    total, every = cfg.trainer.total_training_steps, cfg.trainer.test_freq
    points = {total} | ({0} if cfg.trainer.val_before_train else set())
    if every > 0:
        points |= set(range(every, total + 1, every))
    can = ["step time and memory per stage, accuracy per seed and its mean"]
    cannot = []
    if seeds >= MIN_SEEDS:
        can.append(f"95% intervals over {seeds} seeds" + (" (wide with fewer than 5)" if seeds < 5 else ""))
    else:
        have = "1 seed gives one run per arm" if seeds == 1 else f"{seeds} give means only"
        cannot.append(f"intervals over seeds (they need {MIN_SEEDS} or more seeds; {have})")
    if not cfg.trainer.val_before_train:
        cannot.append("whether GRPO improved on its start, so no ratio to GRPO's best (trainer.val_before_train=false)")
    elif len(points) <= 2:
        cannot.append(
            f"rollouts and wall-clock to GRPO's best (validation only at steps 0 and {total}: set trainer.test_freq)"
        )
    else:
        how = f"chosen for {total} steps" if chosen else "trainer.test_freq"
        steps_ = f"{every} step" if every == 1 else f"{every} steps"
        can.append(
            f"rollouts and wall-clock to GRPO's best, to within {steps_} ({len(points)} validations, every "
            f"{steps_}: {how})"
        )
    sfpo = cfg.actor_rollout_ref.actor.sfpo
    if sfpo.enable and sfpo.entropy_control and total < sfpo.zscore_window:
        cannot.append(f"the entropy trigger (it needs {sfpo.zscore_window} steps of entropy, the runs have {total})")
    lines = [f"can show: {'; '.join(can)}"]
    if cannot:
        lines.append(f"cannot show: {'; '.join(cannot)}")
    return lines


def run_compare(
    preset: str = "default",
    *,
    seeds: int = 5,
    steps: int | None = None,
    out_dir: str | None = None,
    algorithm: str = "grpo",
    overrides: list[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> CompareResult:
    """Train both arms for every seed, then write the report; see the module docstring.

    ``log`` (default ``print``) gets what the compare can and cannot show, before the first run.
    """
    from tqdm.auto import tqdm

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    check_run_count(len(ARM_SLUGS) * seeds, f"--seeds {seeds}: {len(ARM_SLUGS)} arms x {seeds} seeds")
    overrides = list(overrides or [])
    out_dir = out_dir or os.path.join("runs", f"compare-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    plan = run_names(seeds, algorithm)

    say = log or (lambda text: print(text, flush=True))
    test_freq = None
    if not sets_test_freq(preset, overrides):
        test_freq = saved_test_freq(out_dir, plan)  # a compare continued: the frequency its runs were made with
        if test_freq is None:
            name, seed, arm = plan[0]
            base = arm_config(preset, algorithm, overrides, arm=arm, seed=seed, steps=steps, out_dir=out_dir, name=name)
            test_freq = validation_every(base.trainer.total_training_steps, base.trainer.test_freq)

    def config_of(name: str, seed: int, arm: str):
        return arm_config(
            preset,
            algorithm,
            overrides,
            arm=arm,
            seed=seed,
            steps=steps,
            out_dir=out_dir,
            name=name,
            test_freq=test_freq,
        )

    # Checked before the first run trains: the overrides (on seed 1 of each arm; the other seeds differ
    # only in the seed) and every run already in out_dir. The other configs are built one at a time.
    first = [config_of(name, seed, arm) for name, seed, arm in plan[: len(ARM_SLUGS)]]
    for name, seed, arm in plan:
        if os.path.isfile(os.path.join(out_dir, name, "config.yaml")):
            check_same_run(config_of(name, seed, arm), os.path.join(out_dir, name))
    for line in scope_lines(first[-1], seeds, chosen=test_freq is not None):
        say(f"sfpo compare: {line}")
    start = time.perf_counter()
    run_dirs = []
    bar = tqdm(total=len(plan), desc="sfpo compare", unit="run", disable=not progress, position=0, dynamic_ncols=True)
    try:
        for name, seed, arm in plan:
            cfg = config_of(name, seed, arm)
            cfg.trainer.progress_bar = progress  # the trainer's own bar (steps of this run) under compare's
            bar.set_postfix_str(name)
            run_dir = os.path.join(out_dir, name)
            try:
                run_dirs.append(train_or_continue(cfg, preset, log=bar.write if progress else None))
            except (OSError, WriteError) as e:
                raise disk_full(e, run_dir) from e
            bar.update(1)
    finally:
        bar.close()
    report_dir = os.path.join(out_dir, "report")
    title = f"sfpo compare: {algorithm} vs SFPO over {algorithm} on preset {preset!r}, {seeds} seed(s)"
    files = write_report(report_dir, lambda directory: build_report(run_dirs, directory, title=title))
    return CompareResult(out_dir, run_dirs, report_dir, files, time.perf_counter() - start)
