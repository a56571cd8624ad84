"""``sfpo train``: GRPO / SFPO with verl's config keys, offline, on CPU or one GPU.

With no arguments it trains SFPO (K=3, alpha=0.8) on the embedded default: a
small Qwen2 model, supervised to ~38% greedy accuracy on 3-digit addition
(``abc+def=``), and improves it with RL in a few minutes on 2 CPU cores.

Settings are verl's keys as ``key=value`` overrides, e.g.

    sfpo train actor_rollout_ref.actor.sfpo.enable=false          # plain GRPO
    sfpo train --algorithm dapo data.train_batch_size=32
    sfpo train --preset qwen2.5-0.5b                              # GPU, a 0.5B-shaped model
    sfpo train actor_rollout_ref.model.path=/models/my-lm data.train_files=train.parquet data.val_files=test.parquet
    sfpo train --resume runs/default-sfpo-20261123-101500         # continue a killed run

Each run writes runs/<experiment_name>/: config.yaml (the resolved config),
metrics.jsonl and metrics.csv (one row per iteration, verl's metric names:
critic/score/mean, actor/pg_loss, actor/entropy, timing_s/gen, sfpo/alpha, ...),
and checkpoints/global_step_<N>/ (a transformers model directory plus the
optimizer, LR scheduler, SFPO, RNG and data-order state, and the config).

One process at a time per run directory: a second sfpo train on it (new or
--resume) fails at once naming the holder's pid (an flock on <run>/.lock, which
the kernel drops when its holder dies, so a killed run never leaves a stale lock).
Ctrl-C or SIGTERM finishes the current iteration, saves a checkpoint, prints the
--resume command and exits with 130 (SIGINT) or 143 (SIGTERM); a second signal
aborts at once. --resume continues from the newest intact checkpoint (warning
about any newer one it skips). A run stopped before its first checkpoint (killed,
crashed) has nothing to resume: run the same command again (same
trainer.experiment_name) and it starts over from step 0.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings

import sfpo_train.trainer.config as config_lib
from sfpo_train.cli import threads
from sfpo_train.trainer.key_help import describe_keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="verl-style config overrides (every key is listed below)"
    )
    parser.add_argument(
        "--preset",
        choices=sorted(config_lib.PRESETS),
        default="default",
        help="starting configuration: default (the embedded task on CPU, a few minutes), smoke "
        "(3 tiny iterations, seconds), qwen2.5-0.5b (a Qwen2.5-0.5B-shaped bf16 model on a GPU)",
    )
    parser.add_argument(
        "--algorithm",
        choices=sorted(config_lib.ALGORITHMS),
        default="grpo",
        help="verl's recipe applied after the preset: grpo, drgrpo (no std, seq-mean-token-sum-norm), "
        "dapo (clip-higher 0.28, token-mean, dynamic sampling); SFPO wraps any of them",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest intact checkpoint (its saved config is used "
        "and must match the checkpoint's; only these keys may be overridden: "
        + ", ".join(config_lib.RESUMABLE_KEYS)
        + "). A run stopped before its first checkpoint cannot be "
        "resumed: run its sfpo train command again (same trainer.experiment_name) to restart it "
        "from step 0",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit without training"
    )


def epilog() -> str:
    return (
        "config keys (verl's names; values of --preset default, which other presets and --algorithm change):\n"
        + describe_keys(config_lib.load_config("default"))
    )


def main(args: argparse.Namespace) -> int:
    from sfpo_train.trainer.run_guard import RunWarning, StopInterrupt

    with warnings.catch_warnings():
        warnings.simplefilter("always", RunWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, RunWarning):
                print(f"sfpo train: warning: {message}", file=sys.stderr, flush=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            return _train(args)
        except StopInterrupt as e:
            if e.checkpoint is None:
                print(f"sfpo train: {e}; run the same command again to start over", file=sys.stderr)
            else:
                print(
                    f"sfpo train: {e}\nsfpo train: continue with: sfpo train --resume {shlex.quote(e.run_dir)}",
                    file=sys.stderr,
                )
            return e.exit_code
        except KeyboardInterrupt:
            print("\nsfpo train: interrupted; no checkpoint was written for the current step", file=sys.stderr)
            return 130


def _with_embedded_paths(cfg):
    """A copy of ``cfg`` showing the embedded task's real paths where the keys are null (what the run uses)."""
    from omegaconf import OmegaConf

    from sfpo_train.tasks import default_paths

    shown = OmegaConf.create(OmegaConf.to_container(cfg))
    keys = {"actor_rollout_ref.model.path": "model", "data.train_files": "train_files", "data.val_files": "val_files"}
    if any(OmegaConf.select(shown, key) is None for key in keys):
        paths = default_paths()
        for key, name in keys.items():
            if OmegaConf.select(shown, key) is None:
                OmegaConf.update(shown, key, paths[name])
    return shown


def _train(args: argparse.Namespace) -> int:
    from sfpo_train.trainer import Trainer, latest_checkpoint

    if args.resume:
        if args.preset != "default" or args.algorithm != "grpo":
            raise ValueError("--resume uses the run's saved config; drop --preset/--algorithm")
        print(f"sfpo train: {threads.configure_for_resume(args.resume)}", flush=True)
        trainer = Trainer.resume(args.resume, args.overrides)
        print(
            f"sfpo train: resuming {trainer.run_dir} from {trainer.resumed_from} (step {trainer.global_step})",
            flush=True,
        )
    else:
        cfg = config_lib.load_config(args.preset, args.overrides, args.algorithm)
        if args.print_config:
            config_lib.validate(cfg)
            print("# the resolved config; null paths resolved to the embedded default task's files, which the run uses")
            print(config_lib.to_yaml(_with_embedded_paths(cfg)), end="")
            return 0
        print(f"sfpo train: {threads.configure(cfg.actor_rollout_ref.model)}", flush=True)
        trainer = Trainer.create(cfg, preset=args.preset)
    cfg = trainer.cfg
    sfpo = cfg.actor_rollout_ref.actor.sfpo
    algorithm = (
        config_lib.algorithm_of(lambda key: config_lib.OmegaConf.select(cfg, key)).upper().replace("DRGRPO", "Dr. GRPO")
    )
    kind = f"SFPO (K={sfpo.inner_steps}, alpha={sfpo.alpha}) over {algorithm}" if sfpo.enable else algorithm
    print(
        f"sfpo train: {kind} on {trainer.model_path} ({trainer.device}), "
        f"{cfg.trainer.total_training_steps} iterations of {cfg.data.train_batch_size} prompts x "
        f"{cfg.actor_rollout_ref.rollout.n}; run directory {trainer.run_dir}",
        flush=True,
    )
    start_val = next(iter(trainer.last_val.values()), None)
    history = trainer.fit()
    rows = trainer.log.read()
    vals = [(r["training/global_step"], v) for r in rows for k, v in r.items() if k.startswith("val-core/")]
    if vals:
        first_step, first = vals[0]
        last_step, last = vals[-1]
        print(f"validation accuracy: {first:.3f} at step {first_step} -> {last:.3f} at step {last_step}")
    elif start_val is not None:
        print(f"validation accuracy: {start_val:.3f}")
    if history:
        total = sum(h["timing_s/step"] for h in history)
        print(f"{len(history)} iterations in {total:.1f} s; metrics in {trainer.log.jsonl} and {trainer.log.csv}")
    checkpoint = latest_checkpoint(trainer.run_dir)
    print(
        f"checkpoint: {checkpoint} (a transformers model directory in model/; continue with sfpo train --resume "
        f"{shlex.quote(trainer.run_dir)})"
        if checkpoint
        else "checkpoint: none written (trainer.save_freq <= 0)"
    )
    return 0
