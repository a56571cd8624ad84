"""A TRL run as a run directory that ``sfpo report`` and ``sfpo compare`` read: :class:`RunDirectoryCallback`.

Add it to any ``trl.GRPOTrainer`` (``SFPOGRPOTrainer`` included) after building the trainer::

    trainer = SFPOGRPOTrainer(model=..., args=GRPOConfig(...), sfpo=SFPOConfig(...), ...)
    trainer.add_callback(RunDirectoryCallback(trainer, "runs/trl-sfpo-s1", val_rows=test_parquet))
    trainer.train()

It writes what ``sfpo train`` writes (:mod:`sfpo_train.reports.runs` reads it):

- ``config.yaml``: the run's settings under verl's key names (``trainer.seed``,
  ``actor_rollout_ref.actor.sfpo.{enable,alpha,inner_steps,zscore_threshold,...}``,
  ``data.train_batch_size``, ``actor_rollout_ref.rollout.n``, the optimizer, the
  clip ratios, ``loss_agg_mode``), so a report names the arm (SFPO when ``sfpo``
  is set with alpha > 0, else GRPO), the seed and the recipe; plus a ``trl``
  section with the GRPOConfig settings that have no verl name.
- ``metrics.jsonl`` / ``metrics.csv`` (:class:`~sfpo_train.trainer.metrics_log.MetricsLog`).

**One row is one generation**: an SFPO iteration (one generation, K + 1 update
passes) while alpha > 0, one pass's generation after the trigger, and for plain
GRPO the ``steps_per_generation * num_iterations`` micro-steps that use one
generation. That is one step of ``sfpo train``, so ``training/global_step`` is
the row number (row 0: the validation before training) and TRL's optimizer
step count is the column ``trl/global_step``. Each row holds:

- ``train/rollouts_total`` (completions generated so far, all processes),
  ``train/elapsed_s`` (the sum of ``timing_s/step``: validation is left out, as
  in ``sfpo train``);
- ``timing_s/step`` (the row's wall-clock), ``timing_s/gen`` (``_generate``),
  ``timing_s/reward`` (the reward functions), ``timing_s/old_log_prob`` and
  ``timing_s/ref`` (the no-grad forwards of the policy and the reference during
  generation), ``timing_s/adv`` (the rest of ``_generate_and_score_completions``:
  padding, advantages, TRL's bookkeeping), ``timing_s/update_actor`` (the rest
  of the row: update passes, optimizer steps, the Trainer's per-step work),
  ``timing_s/sfpo_{snapshot,fast,reposition,slow}`` (SFPO's stages; for plain
  GRPO ``timing_s/sfpo_slow`` is ``update_actor``, as ``sfpo train`` books a
  GRPO update under the slow pass), ``timing_s/testing`` on validated rows;
- ``critic/score/mean`` / ``critic/score/std`` (TRL's ``reward`` and
  ``reward_std`` of the row's generation), ``actor/entropy`` (TRL's ``entropy``
  of the row's first optimizer step: the policy that generated, on its
  responses), ``actor/update_entropy`` (its mean over the row's optimizer
  steps), ``actor/pg_loss``, ``actor/grad_norm``, ``actor/pg_clipfrac`` (means
  over the row's optimizer steps of TRL's ``loss``, ``grad_norm``,
  ``clip_ratio/region_mean``), ``actor/lr``, ``response_length/mean``,
  ``response_length/clip_ratio``;
- ``sfpo/*`` (alpha, zscore, triggered, inner_steps_run, snapshot_bytes,
  entropy) from ``SFPOGRPOTrainer``; ``trl/global_step``,
  ``trl/optimizer_steps`` (in this row), ``trl/generations`` (in this row);
  ``perf/cpu_memory_used_gb`` (the process's RSS at the row's end);
- ``val-core/<data_source>/reward/mean@1``: greedy accuracy on ``val_rows`` with
  :func:`sfpo_train.tasks.evaluate` (responses from
  :func:`~sfpo_train.tasks.generate_responses`, scored by
  :func:`sfpo_train.tasks.compute_score`), before training (row 0), every
  ``test_freq`` rows and on the last row.

How it gets there: the Trainer logs (and TRL averages, then clears, its metrics)
every ``logging_steps`` optimizer steps, so the callback has it log every
optimizer step (the console and ``report_to`` see every step too) and builds a
row from those logs; the generation-stage clocks wrap the trainer's own
``_generate_and_score_completions``, ``_generate``, ``_calculate_rewards`` and
``_get_per_token_logps_and_entropies`` (instance attributes, results unchanged).
Only the main process writes and validates. ``max_iterations`` stops training
after that many rows (``max_steps`` counts optimizer steps, and an SFPO
iteration takes K + 1 of them until the trigger fires). A training run stopped
between the passes of an SFPO iteration writes those steps as a last row marked
``trl/partial_iteration`` 1. A run resumed from a checkpoint keeps the rows up
to the checkpoint's optimizer step and continues the count; a new run refuses a
directory that already holds rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from transformers import TrainerCallback

from sfpo_train.trainer.metrics_log import MetricsLog
from sfpo_train.trainer.run_guard import write_atomic

# verl's loss_agg_mode for TRL's loss_type, where the two aggregate the same way (None: no verl equivalent).
# dapo normalises by the active tokens of the whole accumulated batch (verl's token-mean); bnpo by those of
# each micro-batch (token-mean only when an optimizer step is one micro-batch on one process).
LOSS_AGG_MODES = {"dapo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm"}

# TRL's per-step log keys -> the row's names, averaged over the row's optimizer steps
_MEAN_KEYS = {
    "reward": "critic/score/mean",
    "reward_std": "critic/score/std",
    "entropy": "actor/update_entropy",
    "loss": "actor/pg_loss",
    "grad_norm": "actor/grad_norm",
    "clip_ratio/region_mean": "actor/pg_clipfrac",
    "completions/mean_length": "response_length/mean",
    "completions/clipped_ratio": "response_length/clip_ratio",
}
_GENERATION_STAGES = ("gen", "reward", "old_log_prob", "ref")


class RunDirectoryCallback(TrainerCallback):
    """Writes ``trainer``'s run into ``run_dir`` as ``sfpo train`` does (see the module docstring).

    Args:
        trainer: the ``GRPOTrainer`` this callback is added to (``trainer.add_callback(callback)``).
        run_dir: the run directory (created; a new run refuses one whose ``metrics.jsonl`` has rows).
        val_rows: verl-layout rows to validate on (``prompt`` messages, ``data_source``,
            ``reward_model.ground_truth``), or the path of such a parquet file; None: no validation.
        test_freq: validate every this many rows (<= 0: only before training and at the end).
        val_before_train: validate before the first step (row 0).
        max_iterations: stop training after this many rows; None: TRL's ``max_steps`` decides.
        val_batch_size: prompts per generate call during validation (``sfpo train``'s default 256).
        val_max_new_tokens: response tokens during validation; None: ``max_completion_length``.
    """

    def __init__(
        self,
        trainer,
        run_dir: str | os.PathLike,
        *,
        val_rows: Sequence[dict] | str | os.PathLike | None = None,
        test_freq: int = 50,
        val_before_train: bool = True,
        max_iterations: int | None = None,
        val_batch_size: int = 256,
        val_max_new_tokens: int | None = None,
    ):
        from trl import GRPOTrainer

        if not isinstance(trainer, GRPOTrainer):
            raise ValueError(f"trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
        _check_int("test_freq", test_freq, minimum=None)
        _check_int("val_batch_size", val_batch_size, minimum=1)
        if max_iterations is not None:
            _check_int("max_iterations", max_iterations, minimum=1)
        if val_max_new_tokens is not None:
            _check_int("val_max_new_tokens", val_max_new_tokens, minimum=1)
        if not isinstance(val_before_train, bool):
            raise ValueError(f"val_before_train must be True or False, got {val_before_train!r}")
        run_dir = os.fspath(run_dir)
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise ValueError(f"run_dir={run_dir!r} exists and is not a directory")
        self.trainer = trainer
        self.run_dir = run_dir
        self.val_rows = _validation_rows(val_rows)
        self.test_freq = test_freq
        self.val_before_train = val_before_train
        self.max_iterations = max_iterations
        self.val_batch_size = val_batch_size
        self.val_max_new_tokens = val_max_new_tokens or trainer.args.max_completion_length
        self.log = MetricsLog(run_dir)
        self.rows_written = 0  # rows of this run after row 0 (training/global_step of the last one)
        self.rollouts_total = 0
        self.elapsed_s = 0.0
        self._last_row: dict | None = None
        self._clocks = _GenerationClocks(trainer)
        self._reset_row()

    # ----------------------------------------------------------------- events

    def on_train_begin(self, args, state, control, **kwargs):
        if self not in self.trainer.callback_handler.callbacks:
            raise ValueError("RunDirectoryCallback: add it to the trainer it was built with (trainer.add_callback)")
        self._sfpo_iterations = self._sfpo_iteration()
        self._micro_steps = 0
        self._clocks.generations = 0
        if self._main:
            os.makedirs(self.run_dir, exist_ok=True)
            self._resume_or_start(state)
            write_atomic(os.path.join(self.run_dir, "config.yaml"), self._config_yaml())
            if state.global_step == 0 and self.val_before_train and self.val_rows:
                seconds, val = self._validate()
                row = {"training/global_step": 0, "train/rollouts_total": 0, "train/elapsed_s": 0.0}
                row.update(val, **{"timing_s/testing": seconds, "perf/cpu_memory_used_gb": _rss_gb()})
                self._write(row)
        self._reset_row()
        return control

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro_steps += 1

    def on_step_end(self, args, state, control, **kwargs):
        self._micro_steps += 1
        control.should_log = True  # TRL averages and clears its metrics at each log: a row needs every step's
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "train_runtime" in logs or any(k.startswith("eval_") for k in logs) or not self.trainer.model.training:
            return control  # the end-of-training summary or an evaluation: not a step
        if state.global_step <= self._logged_step:
            return control
        self._logged_step = state.global_step
        self._steps.append(dict(logs))
        if self._row_complete():
            last = control.should_training_stop or (
                self.max_iterations is not None and self.rows_written + 1 >= self.max_iterations
            )
            self._close_row(state, last=last)
            if self.max_iterations is not None and self.rows_written >= self.max_iterations:
                control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._steps:  # stopped between the passes of an SFPO iteration (max_steps)
            self._close_row(state, last=True, partial=True)
        if self._main and self.val_rows and self._last_row is not None and not self._validated(self._last_row):
            seconds, val = self._validate()  # the end of training fell after a row that was not validated
            row = {**self._last_row, **val, "timing_s/testing": seconds}
            self.log.truncate_after(row["training/global_step"] - 1)
            self._write(row)
        if self._main:
            self.log.write_csv()
        return control

    # ----------------------------------------------------------------- rows

    @property
    def _main(self) -> bool:
        return self.trainer.accelerator.is_main_process

    def _sfpo_iteration(self) -> int | None:
        sfpo = getattr(self.trainer, "sfpo", None)
        return None if sfpo is None else sfpo.iteration

    def _reset_row(self) -> None:
        self._steps: list[dict] = []
        self._logged_step = getattr(self, "_logged_step", -1)
        self._clocks.reset()
        self._row_start = time.perf_counter()

    def _row_complete(self) -> bool:
        """Whether the optimizer step just logged finished the row's generation (see the module docstring)."""
        iteration = self._sfpo_iteration()
        if iteration is not None:  # SFPOGRPOTrainer: one row per finished SFPO iteration
            return iteration > self._sfpo_iterations
        # TRL's rule: a generation feeds steps_per_generation * num_iterations micro-steps
        every = self.trainer.args.steps_per_generation * self.trainer.num_iterations
        return self._clocks.generations > 0 and self._micro_steps >= self._clocks.generations * every

    def _close_row(self, state, *, last: bool, partial: bool = False) -> None:
        seconds = time.perf_counter() - self._row_start
        steps, clocks = self._steps, self._clocks
        self.rows_written += 1
        self.rollouts_total += clocks.completions
        self.elapsed_s += seconds
        self._sfpo_iterations = self._sfpo_iteration()
        generation = sum(clocks.seconds[s] for s in _GENERATION_STAGES)
        score = clocks.scoring
        row = {
            "training/global_step": self.rows_written,
            "training/epoch": state.epoch,
            "trl/global_step": state.global_step,
            "trl/optimizer_steps": len(steps),
            "trl/generations": clocks.generations_in_row,
            "train/rollouts_total": self.rollouts_total,
            "train/elapsed_s": self.elapsed_s,
            "timing_s/step": seconds,
            **{f"timing_s/{s}": clocks.seconds[s] for s in _GENERATION_STAGES},
            "timing_s/adv": max(0.0, score - generation),
            "timing_s/update_actor": max(0.0, seconds - score),
            "actor/entropy": _first(steps, "entropy"),
            "actor/lr": _first(steps, "learning_rate"),
            "perf/cpu_memory_used_gb": _rss_gb(),
        }
        row.update({name: _mean(steps, key) for key, name in _MEAN_KEYS.items()})
        for log in steps:  # SFPO's metrics arrive with the step that finished the iteration
            row.update({k: v for k, v in log.items() if k.startswith(("sfpo/", "timing_s/sfpo_"))})
        if getattr(self.trainer, "sfpo", None) is None:
            row["timing_s/sfpo_slow"] = row["timing_s/update_actor"]  # sfpo train books a GRPO update as the slow pass
        if partial:
            row["trl/partial_iteration"] = 1.0
        row = {k: _number(v) for k, v in row.items()}
        if self._main and self.val_rows and (last or (self.test_freq > 0 and self.rows_written % self.test_freq == 0)):
            testing, val = self._validate()
            row.update(val, **{"timing_s/testing": testing})
        if self._main:
            self._write(row)
        self._reset_row()

    def _write(self, row: dict) -> None:
        self.log.append(row)
        self._last_row = row

    @staticmethod
    def _validated(row: dict) -> bool:
        return any(k.startswith("val-core/") for k in row)

    def _validate(self) -> tuple[float, dict[str, float]]:
        start = time.perf_counter()
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        val = validation_accuracy(
            model,
            self.trainer.processing_class,
            self.val_rows,
            max_new_tokens=self.val_max_new_tokens,
            batch_size=self.val_batch_size,
        )
        return time.perf_counter() - start, val

    def _resume_or_start(self, state) -> None:
        rows = self.log.read()
        if state.global_step == 0:
            if rows:
                raise ValueError(
                    f"{self.log.jsonl} already holds {len(rows)} rows: give a new run_dir (a resumed run, "
                    "trainer.train(resume_from_checkpoint=...), continues one)"
                )
            return
        # A resumed run: keep the rows up to the checkpoint's optimizer step, continue from the last one.
        kept = [r for r in rows if r.get("trl/global_step", 0) <= state.global_step]
        self.log.truncate_after(kept[-1]["training/global_step"] if kept else -1)
        if kept:
            last = kept[-1]
            self.rows_written = int(last["training/global_step"])
            self.rollouts_total = int(last.get("train/rollouts_total") or 0)
            self.elapsed_s = float(last.get("train/elapsed_s") or 0.0)
            self._last_row = last

    # ----------------------------------------------------------------- config.yaml

    def _config_yaml(self) -> str:
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(OmegaConf.create(run_config(self.trainer, self.run_dir, self)))


def run_config(trainer, run_dir: str, callback: RunDirectoryCallback | None = None) -> dict:
    """``trainer``'s settings as a run directory's ``config.yaml``: verl's key names, plus a ``trl`` section."""
    import trl

    args = trainer.args
    processes = trainer.accelerator.num_processes
    generations = args.num_generations
    sfpo = getattr(trainer, "sfpo", None)
    sfpo_section = {"enable": False}
    if sfpo is not None:
        sfpo_section = {"enable": True, **dataclasses.asdict(sfpo.config)}
    max_iterations = callback.max_iterations if callback is not None else None
    return {
        "trainer": {
            "project_name": "sfpo-trl",
            "experiment_name": os.path.basename(os.path.normpath(run_dir)),
            "seed": int(args.seed),
            "total_training_steps": max_iterations,
            "test_freq": callback.test_freq if callback is not None else -1,
            "val_before_train": bool(callback.val_before_train) if callback is not None else False,
        },
        "data": {
            "train_batch_size": args.generation_batch_size // generations,
            "max_response_length": args.max_completion_length,
            "seed": int(args.data_seed if args.data_seed is not None else args.seed),
            "shuffle": bool(args.shuffle_dataset),
        },
        "actor_rollout_ref": {
            "actor": {
                "ppo_mini_batch_size": args.per_device_train_batch_size
                * processes
                * args.gradient_accumulation_steps
                // generations,
                "ppo_epochs": 1,
                "clip_ratio_low": float(args.epsilon),
                "clip_ratio_high": float(args.epsilon_high if args.epsilon_high is not None else args.epsilon),
                "loss_agg_mode": LOSS_AGG_MODES.get(args.loss_type),
                "entropy_coeff": float(args.entropy_coef),
                "use_kl_loss": args.beta != 0.0,
                "kl_loss_coef": float(args.beta),
                "optim": {
                    "lr": float(args.learning_rate),
                    "weight_decay": float(args.weight_decay),
                    "betas": [float(args.adam_beta1), float(args.adam_beta2)],
                    "eps": float(args.adam_epsilon),
                    "clip_grad": float(args.max_grad_norm),
                    "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                    "lr_warmup_steps": int(args.warmup_steps),
                },
                "sfpo": sfpo_section,
            },
            "rollout": {
                "name": "vllm" if args.use_vllm else "hf",
                "n": generations,
                "temperature": float(args.temperature),
                "top_p": float(args.top_p),
                "top_k": int(args.top_k) if args.top_k else -1,
            },
        },
        "algorithm": {
            "adv_estimator": "grpo",
            "norm_adv_by_std_in_grpo": args.scale_rewards not in ("none", False),
            "filter_groups": {"enable": False},
        },
        "trl": {
            "version": trl.__version__,
            "trainer": type(trainer).__name__,
            "loss_type": args.loss_type,
            "scale_rewards": str(args.scale_rewards),
            "num_iterations": int(args.num_iterations),
            "steps_per_generation": int(args.steps_per_generation),
            "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
            "per_device_train_batch_size": int(args.per_device_train_batch_size),
            "num_processes": int(processes),
            "max_steps": int(args.max_steps),
            "mask_truncated_completions": bool(args.mask_truncated_completions),
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "bf16": bool(args.bf16),
            "optim": str(getattr(args.optim, "value", args.optim)),
            "fused_head": bool(getattr(trainer, "fused_head", False)),
            "row": "one generation (an SFPO iteration while alpha > 0)",
        },
    }


def validation_accuracy(
    model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int, batch_size: int
) -> dict[str, float]:
    """``{"val-core/<data_source>/reward/mean@1": accuracy}``: greedy :func:`sfpo_train.tasks.evaluate` per source.

    Runs on a forked RNG (training's random stream is untouched) with the tokenizer
    padding on the left for the call (what :func:`~sfpo_train.tasks.generate_responses` needs).
    """
    from sfpo_train.tasks import evaluate

    by_source: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_source[str(row["data_source"])].append(row)
    side = tokenizer.padding_side
    devices = [next(model.parameters()).device] if next(model.parameters()).is_cuda else []
    out = {}
    try:
        tokenizer.padding_side = "left"
        with torch.random.fork_rng(devices=devices):
            for source, group in by_source.items():
                accuracy = evaluate(model, tokenizer, group, max_new_tokens=max_new_tokens, batch_size=batch_size)
                out[f"val-core/{source}/reward/mean@1"] = float(accuracy)
    finally:
        tokenizer.padding_side = side
    return out


class _GenerationClocks:
    """Seconds in the trainer's generation stages and the completions generated, since the last :meth:`reset`."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.generations = 0  # since training began (the row rule counts them)
        self.reset()
        if getattr(trainer, "_run_directory_clocks", None) is not None:
            raise ValueError("RunDirectoryCallback: this trainer already has one (one run directory per trainer)")
        trainer._run_directory_clocks = self
        self._wrap("_generate_and_score_completions", self._scored)
        self._wrap("_generate", functools.partial(self._timed, "gen"))
        self._wrap("_calculate_rewards", functools.partial(self._timed, "reward"))
        self._wrap("_get_per_token_logps_and_entropies", self._forward)
        self._in_generation = False

    def reset(self) -> None:
        self.seconds = dict.fromkeys(_GENERATION_STAGES, 0.0)
        self.scoring = 0.0  # all of _generate_and_score_completions
        self.completions = 0
        self.generations_in_row = 0

    def _wrap(self, name: str, wrapper) -> None:
        original = getattr(self.trainer, name)
        setattr(self.trainer, name, functools.wraps(original)(functools.partial(wrapper, original)))

    def _timed(self, stage: str, original, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if self.trainer.model.training:
                self.seconds[stage] += time.perf_counter() - start

    def _scored(self, original, inputs, *args, **kwargs):
        training = self.trainer.model.training
        start = time.perf_counter()
        self._in_generation = True
        try:
            output = original(inputs, *args, **kwargs)
        finally:
            self._in_generation = False
        if training:
            self.scoring += time.perf_counter() - start
            self.completions += len(inputs) * self.trainer.accelerator.num_processes
            self.generations += 1
            self.generations_in_row += 1
        return output

    def _forward(self, original, model, *args, **kwargs):
        if not (self._in_generation and self.trainer.model.training):
            return original(model, *args, **kwargs)
        stage = "old_log_prob" if model is self.trainer.model else "ref"
        start = time.perf_counter()
        try:
            return original(model, *args, **kwargs)
        finally:
            self.seconds[stage] += time.perf_counter() - start


def _validation_rows(val_rows) -> list[dict] | None:
    if val_rows is None:
        return None
    if isinstance(val_rows, (str, os.PathLike)):
        path = os.fspath(val_rows)
        if not os.path.isfile(path):
            raise ValueError(f"val_rows={path!r} is not a file (a verl-layout parquet file)")
        from sfpo_train.tasks import load_rows

        rows = load_rows(path)
    else:
        rows = list(val_rows)
    if not rows:
        raise ValueError("val_rows must hold at least one row")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"prompt", "data_source", "reward_model"} <= row.keys():
            raise ValueError(
                f"val_rows row {i} must be a verl-layout row (prompt, data_source, reward_model), got "
                f"{sorted(row) if isinstance(row, dict) else type(row).__name__}"
            )
    return rows


def _check_int(name: str, value, *, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        need = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {need}, got {value!r}")


def _values(steps: list[dict], key: str) -> list[float]:
    return [float(s[key]) for s in steps if isinstance(s.get(key), (int, float)) and math.isfinite(s[key])]


def _mean(steps: list[dict], key: str) -> float | None:
    values = _values(steps, key)
    return sum(values) / len(values) if values else None


def _first(steps: list[dict], key: str) -> float | None:
    values = _values(steps[:1], key)
    return values[0] if values else None


def _number(value):
    if value is None or isinstance(value, (bool, int)):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _rss_gb() -> float:
    from sfpo_train.trainer.profiler import GB, process_rss_bytes

    return process_rss_bytes() / GB
