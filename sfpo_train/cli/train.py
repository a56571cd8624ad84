"""``sfpo train``: GRPO / SFPO with verl's config keys, offline, on CPU or one GPU.

With no arguments it trains SFPO (K=3, alpha=0.8) on the embedded default: a
small Qwen2 model, supervised to ~38% greedy accuracy on 3-digit addition
(``abc+def=``), and improves it with RL in a few minutes on 2 CPU cores.

Settings are verl's keys as ``key=value`` overrides, e.g.

    sfpo train actor_rollout_ref.actor.sfpo.enable=false          # plain GRPO
    sfpo train --algorithm dapo data.train_batch_size=32
    sfpo train --preset qwen2.5-0.5b                              # GPU, a 0.5B-shaped model
    sfpo train actor_rollout_ref.model.path=/models/my-lm data.train_files=train.parquet data.val_files=test.parquet
    sfpo train --resume runs/{example_run}     # continue a stopped run

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
about any newer one it skips); on a finished run it says so and how to train it
longer. A run stopped before its first checkpoint has nothing to resume: sfpo
train prints the command that starts it over from step 0 in the same directory
(its arguments plus its trainer.experiment_name).

Arguments and config keys are checked before torch and transformers are loaded,
so a mistake is reported at once.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings

import sfpo_train.trainer.config as config_lib  # torch-free: keys are checked before torch is loaded
from sfpo_train.cli import threads  # torch-free until configure() runs
from sfpo_train.trainer.key_help import describe_keys

EXAMPLE_TIME = 1796379300.0  # the time in the example run name of --help


def description() -> str:
    """The ``--help`` description: this docstring, its example run named as a run of ``sfpo train`` is named."""
    example = config_lib.default_experiment_name(config_lib.load_config("default"), "default", when=EXAMPLE_TIME)
    return __doc__.replace("{example_run}", example)


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
        "resumed: run its sfpo train command again with its trainer.experiment_name (sfpo train prints it) "
        "to restart it from step 0",
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

    run = _Run(args)
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
            return _train(args, run)
        except StopInterrupt as e:
            print(f"sfpo train: {e}", file=sys.stderr)
            run.print_next_command()
            return e.exit_code
        except KeyboardInterrupt:
            print("\nsfpo train: interrupted; no checkpoint was written for the current step", file=sys.stderr)
            run.print_next_command()
            return 130


class _Run:
    """What an interrupted ``sfpo train`` tells the user to type next, once its run directory is known."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run_dir: str | None = None
        self.experiment_name: str | None = None

    def next_command(self) -> str | None:
        """``--resume`` where the run has a checkpoint; else, where it left a run directory, the same command
        with its ``trainer.experiment_name`` (it starts over in that directory); None if it left nothing."""
        from sfpo_train.trainer.checkpoint import latest_checkpoint

        if self.run_dir is None or not os.path.isdir(self.run_dir):
            return None
        if latest_checkpoint(self.run_dir):
            return shlex.join(["sfpo", "train", "--resume", self.run_dir])
        if not os.path.exists(os.path.join(self.run_dir, config_lib.RUN_CONFIG_FILE)):
            return None
        return shlex.join(["sfpo", "train", *same_run_arguments(self.args, self.experiment_name)])

    def print_next_command(self) -> None:
        command = self.next_command()
        if command is None:
            print("sfpo train: nothing was written; run the same command again", file=sys.stderr)
        elif "--resume" in command:
            print(f"sfpo train: continue with: {command}", file=sys.stderr)
        else:
            print(
                f"sfpo train: no checkpoint yet; start it over in the same directory with: {command}", file=sys.stderr
            )


def same_run_arguments(args: argparse.Namespace, experiment_name: str | None) -> list[str]:
    """``args`` as ``sfpo train`` arguments, with ``trainer.experiment_name`` added where the run was named for
    the user, so that they name the same run directory again."""
    out = []
    if args.preset != "default":
        out += ["--preset", args.preset]
    if args.algorithm != "grpo":
        out += ["--algorithm", args.algorithm]
    out += list(args.overrides)
    named = any(item.split("=", 1)[0].lstrip("+") == "trainer.experiment_name" for item in args.overrides)
    if experiment_name is not None and not named:
        out.append(f"trainer.experiment_name={experiment_name}")
    return out


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


def _train(args: argparse.Namespace, run: _Run) -> int:
    """Check every argument and key (no torch yet), then load torch and the trainer and train."""
    if args.resume:
        if args.preset != "default" or args.algorithm != "grpo":
            raise ValueError("--resume uses the run's saved config; drop --preset/--algorithm")
        cfg = config_lib.resumed_config(args.resume, args.overrides)
    else:
        cfg = config_lib.load_config(args.preset, args.overrides, args.algorithm)
        config_lib.validate(cfg)
        if args.print_config:
            print("# the resolved config; null paths resolved to the embedded default task's files, which the run uses")
            print(config_lib.to_yaml(_with_embedded_paths(cfg)), end="")
            return 0
        if cfg.trainer.experiment_name is None:  # named here, so an interrupted start can say how to reuse it
            cfg.trainer.experiment_name = config_lib.default_experiment_name(cfg, args.preset)
            run.experiment_name = cfg.trainer.experiment_name
    # Every check above ran without torch; from here on torch and transformers load.
    print(f"sfpo train: {threads.configure(cfg.actor_rollout_ref.model)}", flush=True)
    from sfpo_train.trainer import Trainer, latest_checkpoint

    if args.resume:
        run.run_dir = args.resume
        trainer = Trainer.resume(args.resume, args.overrides)
        print(
            f"sfpo train: resuming {trainer.run_dir} from {trainer.resumed_from} (step {trainer.global_step})",
            flush=True,
        )
    else:
        run.run_dir = os.path.join(cfg.trainer.default_local_dir, cfg.trainer.experiment_name)
        trainer = Trainer.create(cfg, preset=args.preset)
    cfg = trainer.cfg
    total = cfg.trainer.total_training_steps
    if args.resume and trainer.global_step >= total:
        print(
            f"sfpo train: {trainer.run_dir} is finished: its checkpoint {trainer.resumed_from} is at step "
            f"{trainer.global_step} of trainer.total_training_steps={total}; {_train_longer(trainer.run_dir, total)}",
            flush=True,
        )
        return 0
    sfpo = cfg.actor_rollout_ref.actor.sfpo
    algorithm = (
        config_lib.algorithm_of(lambda key: config_lib.OmegaConf.select(cfg, key)).upper().replace("DRGRPO", "Dr. GRPO")
    )
    kind = f"SFPO (K={sfpo.inner_steps}, alpha={sfpo.alpha}) over {algorithm}" if sfpo.enable else algorithm
    print(
        f"sfpo train: {kind} on {trainer.model_path} ({trainer.device}), "
        f"{total} iterations of {cfg.data.train_batch_size} prompts x "
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
        seconds = sum(h["timing_s/step"] for h in history)
        print(f"{len(history)} iterations in {seconds:.1f} s; metrics in {trainer.log.jsonl} and {trainer.log.csv}")
    checkpoint = latest_checkpoint(trainer.run_dir)
    print(
        f"checkpoint: {checkpoint} (a transformers model directory in model/); {_train_longer(trainer.run_dir, total)}"
        if checkpoint
        else "checkpoint: none written (trainer.save_freq <= 0)"
    )
    return 0


def _train_longer(run_dir: str, total: int) -> str:
    """How to continue a finished run: raise ``trainer.total_training_steps`` (a key a resume may change)."""
    key = "trainer.total_training_steps"
    assert key in config_lib.RESUMABLE_KEYS
    command = shlex.join(["sfpo", "train", "--resume", run_dir, f"{key}={2 * total}"])
    return f"to train it longer, raise {key}: {command}"
