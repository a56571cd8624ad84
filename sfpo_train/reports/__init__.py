"""Reports on training runs, ``sfpo report`` and ``sfpo compare``: per-stage time and memory, training curves, SFPO against GRPO.

Reads each run directory's ``config.yaml`` and ``metrics.jsonl`` (what ``sfpo
train`` and ``sfpo compare`` write) and writes, into ``--out``:

- ``report.md`` and ``report.html``: the tables and plots below, with the
  headline measures when both GRPO and SFPO runs are given;
- ``runs.csv``: one row per run (arm, seed, steps, rollouts, wall-clock, mean
  step time, initial (step 0, n/a without it) / best / final test accuracy,
  trigger step (``never`` where it did not fire, ``n/a`` for GRPO), peak memory,
  profiler overhead);
- ``stage_time.csv`` / ``stage_share.csv``: mean seconds per step of each stage
  and its share of the step, per arm (SFPO / GRPO);
- ``stage_memory.csv``: the largest reading of each stage per arm (peak
  allocated / reserved GB on CUDA, NVML's device memory and utilisation when
  present, process RSS on CPU);
- ``headline.csv`` (GRPO and SFPO runs paired by ``trainer.seed``): per seed,
  GRPO's initial and best test accuracy, the rollouts and wall-clock each arm
  needed to reach the best, their ratios (only where GRPO's step-0 accuracy is
  known and it improved on it), the step-time ratio and the extra memory (SFPO's
  peak minus GRPO's, per seed; the report's one number for it is its mean);
- ``summary.csv`` / ``cost_model.csv`` (with both arms): means over seeds with 95%
  intervals, ratios as geometric means with the interval on the log scale, no
  interval below 3 seeds (:mod:`~sfpo_train.reports.stats`);
- PNG plots: stacked per-stage time per step (arms side by side; over windows of
  steps beyond 40 steps), stage shares,
  peak memory per stage, reward and test accuracy against rollouts and
  wall-clock, entropy / z-score / alpha over steps with the trigger marked.

Definitions. Test accuracy: the mean over data sources of
``val-core/<source>/reward/mean@1`` (greedy, step 0 = before training).
Rollouts: ``train/rollouts_total`` (generated responses so far). Wall-clock:
``train/elapsed_s`` (the sum of ``timing_s/step``; validation and checkpoints
excluded, as they are the same for both arms). Stage means leave out the first
step (warm-up: lazy allocation, kernel compilation) when a run has 3 or more.

Modules, each importing only those above it: ``runs`` (run directories),
``tables`` (stage, memory and per-run tables), ``headline`` (SFPO against
GRPO and its prose), ``plots`` (the PNGs), ``render`` (CSV, Markdown, HTML),
``build`` (:func:`build_report`), ``compare`` (:func:`~sfpo_train.reports.compare.run_compare`,
which trains runs, so it is not imported with the package).
"""

from sfpo_train.reports.build import build_report
from sfpo_train.reports.headline import headline_lines, headline_table
from sfpo_train.reports.runs import load_run
from sfpo_train.reports.tables import EXTRA_STAGES, STACKED_STAGES

__all__ = ["EXTRA_STAGES", "STACKED_STAGES", "build_report", "headline_lines", "headline_table", "load_run"]
