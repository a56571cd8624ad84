"""TRL GRPO vs TRL + SFPO vs ``sfpo train`` on the embedded addition task, same seeds, one process.

For each seed s = 1..N, one after the other (in this order, so the machine's load
falls on every arm alike):

- ``trl-grpo-s<s>``: ``trl.GRPOTrainer`` with ``sfpo train``'s default settings
  mapped onto ``GRPOConfig`` (:func:`grpo_settings`);
- ``trl-sfpo-s<s>``: ``SFPOGRPOTrainer`` with the same settings and the default
  preset's SFPO (K = 3, alpha = 0.8, tau = 3, what ``sfpo compare`` runs);
- ``train-grpo-s<s>`` / ``train-sfpo-s<s>``: ``python -m sfpo_train.cli train``
  with the same seed (``trainer.seed`` and ``data.seed``), GRPO
  (``actor_rollout_ref.actor.sfpo.enable=false``) and SFPO, in a subprocess.

Every run validates greedily on the shipped test problems before training, every
``--test-freq`` iterations and at the end; a TRL run's directory is written by
:class:`~sfpo_train.trl.run_log.RunDirectoryCallback`, one row per generation, as
``sfpo train`` writes one row per iteration. Then ``sfpo report`` on the TRL runs
(OUT/report-trl) and on the ``sfpo train`` runs (OUT/report-train), and:

- OUT/trl-compare.csv: one row per run (final, best and initial accuracy,
  rollouts and wall-clock to the same trainer's GRPO best of that seed,
  wall-clock, seconds per iteration, update passes, trigger iteration);
- OUT/trl-compare.md: the same as a table, mean over seeds and per seed;
- OUT/trl-compare-provenance.md: date, CPU, load before and after each run,
  threads, versions, git revision, the command.

Wall-clock is ``train/elapsed_s`` (validation left out, as in ``sfpo report``).
``--threads`` sets torch's intra-op threads here and ``OMP_NUM_THREADS`` for the
``sfpo train`` subprocesses. Importable: :func:`run` returns the written paths;
:func:`write_tables` rebuilds the CSV and Markdown from finished run directories.
The same seed gives the same accuracies whatever ``--test-freq`` (validation runs
on a forked RNG in both trainers); a run directory already finished is kept, so
the same command continues an interrupted comparison.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARMS = ("trl-grpo", "trl-sfpo", "train-grpo", "train-sfpo")
ARM_LABELS = {
    "trl-grpo": "TRL GRPO",
    "trl-sfpo": "TRL + SFPO",
    "train-grpo": "sfpo train GRPO",
    "train-sfpo": "sfpo train SFPO",
}


def grpo_settings(cfg, *, seed: int) -> dict:
    """``GRPOConfig`` keyword arguments equal to ``sfpo train``'s ``cfg`` where TRL has the setting.

    One optimizer step per PPO mini-batch (``per_device_train_batch_size`` = mini-batch
    prompts x n, ``steps_per_generation`` = prompts / mini-batch, no gradient
    accumulation); ``loss_type="dapo"`` normalises by the tokens of the optimizer
    step's batch, verl's ``token-mean``. ``ValueError`` for a setting TRL cannot mirror.
    """
    arr = cfg.actor_rollout_ref
    actor, optim, rollout = arr.actor, arr.actor.optim, arr.rollout
    prompts, mini, n = cfg.data.train_batch_size, actor.ppo_mini_batch_size, rollout.n
    unsupported = {
        "actor_rollout_ref.actor.ppo_epochs": (actor.ppo_epochs, 1),
        "actor_rollout_ref.actor.loss_agg_mode": (actor.loss_agg_mode, "token-mean"),
        "actor_rollout_ref.actor.use_kl_loss": (actor.use_kl_loss, False),
        "actor_rollout_ref.actor.optim.lr_scheduler_type": (optim.lr_scheduler_type, "constant"),
        "algorithm.filter_groups.enable": (cfg.algorithm.filter_groups.enable, False),
    }
    for key, (value, needed) in unsupported.items():
        if value != needed:
            raise ValueError(f"{key}={value!r}: this comparison maps only {key}={needed!r} onto GRPOConfig")
    if prompts % mini:
        raise ValueError(f"data.train_batch_size={prompts} must be a multiple of ppo_mini_batch_size={mini}")
    return dict(
        per_device_train_batch_size=mini * n,
        steps_per_generation=prompts // mini,
        gradient_accumulation_steps=1,
        num_generations=n,
        max_completion_length=cfg.data.max_response_length,
        learning_rate=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_epsilon=optim.eps,
        max_grad_norm=optim.clip_grad,
        lr_scheduler_type="constant",
        warmup_steps=max(optim.lr_warmup_steps, 0),
        epsilon=actor.clip_ratio_low,
        epsilon_high=actor.clip_ratio_high,
        loss_type="dapo",
        scale_rewards="group" if cfg.algorithm.norm_adv_by_std_in_grpo else "none",
        beta=0.0,
        entropy_coef=actor.entropy_coeff,
        temperature=rollout.temperature,
        top_p=rollout.top_p,
        top_k=max(rollout.top_k, 0),
        shuffle_dataset=cfg.data.shuffle,
        seed=seed,
        bf16=False,
        gradient_checkpointing=False,
        optim="adamw_torch",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )


def run_trl(run_dir: Path, *, seed: int, steps: int, sfpo: bool, test_freq: int, val_samples: int | None) -> None:
    """One TRL run (GRPO, or SFPO with the default preset's settings) of ``steps`` generations into ``run_dir``."""
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    import sfpo_train.trainer.config as config_lib
    from sfpo_train.tasks import default_paths, load_rows
    from sfpo_train.trl import SFPOGRPOTrainer
    from sfpo_train.trl.run_log import RunDirectoryCallback
    from sfpo_train.trl.task import addition_dataset, addition_reward, model_path

    cfg = config_lib.load_config("default")
    settings = grpo_settings(cfg, seed=seed)
    sfpo_config = config_lib.sfpo_config(cfg) if sfpo else None
    passes = sfpo_config.inner_steps + 1 if sfpo else 1  # upper bound: the callback stops after `steps` generations
    settings["max_steps"] = steps * passes * settings["steps_per_generation"]
    scratch = tempfile.TemporaryDirectory(prefix="trl-compare-")  # TRL's output_dir: nothing is saved there
    args = trl.GRPOConfig(output_dir=scratch.name, **settings)
    model = AutoModelForCausalLM.from_pretrained(
        model_path(), dtype=torch.float32, attn_implementation=cfg.actor_rollout_ref.model.attn_implementation
    )
    trainer = SFPOGRPOTrainer(
        model=model,
        reward_funcs=addition_reward,
        args=args,
        train_dataset=addition_dataset("train"),
        processing_class=AutoTokenizer.from_pretrained(model_path()),
        sfpo=sfpo_config,
    )
    for quiet in (PrinterCallback, ProgressCallback):  # a line per optimizer step buries the script's own
        trainer.remove_callback(quiet)
    val_rows = load_rows(default_paths()["val_files"])
    trainer.add_callback(
        RunDirectoryCallback(
            trainer,
            run_dir,
            val_rows=val_rows[:val_samples] if val_samples else val_rows,
            test_freq=test_freq,
            max_iterations=steps,
            val_batch_size=cfg.data.val_batch_size,
        )
    )
    with scratch:
        trainer.train()


def run_sfpo_train(out: Path, name: str, *, seed: int, steps: int, sfpo: bool, test_freq: int, val_samples, threads):
    """``python -m sfpo_train.cli train`` with the default preset into ``out/name`` (a subprocess)."""
    command = [
        sys.executable,
        "-m",
        "sfpo_train.cli",
        "train",
        f"trainer.seed={seed}",
        f"data.seed={seed}",
        f"trainer.total_training_steps={steps}",
        f"trainer.test_freq={test_freq}",
        "trainer.save_freq=-1",
        "trainer.progress_bar=false",
        f"trainer.default_local_dir={out}",
        f"trainer.experiment_name={name}",
    ]
    if not sfpo:
        command.append("actor_rollout_ref.actor.sfpo.enable=false")
    if val_samples:
        command.append(f"data.val_max_samples={val_samples}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    done = subprocess.run(command, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


# --------------------------------------------------------------------------- results


def run_results(out: Path, names: list[str]) -> list[dict]:
    """One dict per run directory: accuracies, rollouts and wall-clock to the GRPO best of its trainer and seed."""
    import pandas as pd

    from sfpo_train.reports.headline import first_reaching
    from sfpo_train.reports.runs import column, load_run
    from sfpo_train.reports.tables import initial_accuracy

    runs = {name: load_run(str(out / name)) for name in names}
    results = []
    for name, run in runs.items():
        arm, seed = name.rsplit("-s", 1)
        trainer = arm.split("-")[0]
        grpo = runs.get(f"{trainer}-grpo-s{seed}") or runs.get(f"trl-grpo-s{seed}")
        target = float(grpo.val["accuracy"].max()) if grpo is not None and len(grpo.val) else math.nan
        val, train = run.val, run.train
        hit = first_reaching(val, target) if not math.isnan(target) else None
        triggered = train[column(train, "sfpo/triggered").fillna(0) > 0]
        passes = column(train, "sfpo/inner_steps_run").fillna(0) + 1
        results.append(
            {
                "run": name,
                "arm": arm,
                "seed": int(seed),
                "iterations": len(train),
                "update_passes": int(passes.sum()),
                "rollouts": int(column(train, "train/rollouts_total").max()),
                "initial_acc": initial_accuracy(val),
                "best_acc": float(val["accuracy"].max()),
                "final_acc": float(val["accuracy"].iloc[-1]),
                "grpo_best_acc": target,
                "grpo_best_from": f"{grpo.name}" if grpo is not None else "",
                "rollouts_to_grpo_best": float(hit["rollouts"]) if hit is not None else math.nan,
                "time_to_grpo_best_s": float(hit["elapsed_s"]) if hit is not None else math.nan,
                "iteration_at_grpo_best": int(hit["step"]) if hit is not None else -1,
                "wall_clock_s": float(column(train, "train/elapsed_s").max()),
                "s_per_iteration": float(pd.to_numeric(column(run.timed, "timing_s/step")).mean()),
                "gen_s_per_iteration": float(pd.to_numeric(column(run.timed, "timing_s/gen")).mean()),
                "trigger_iteration": int(triggered["training/global_step"].iloc[0]) if len(triggered) else -1,
            }
        )
    return results


def markdown_table(results: list[dict], arms: list[str]) -> str:
    """Mean over seeds per arm, then every run; rollouts / time to GRPO's best over the seeds that reached it."""
    import pandas as pd

    frame = pd.DataFrame(results)
    header = (
        "| arm | seeds | final acc | best acc | rollouts to GRPO's best (reached) | wall-clock to it (s) "
        "| wall-clock (s) | s / iteration | update passes | trigger iteration |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for arm in arms:
        rows = frame[frame["arm"] == arm]
        if rows.empty:
            continue
        reached = rows["rollouts_to_grpo_best"].notna()
        trig = rows.loc[rows["trigger_iteration"] > 0, "trigger_iteration"]
        lines.append(
            f"| {ARM_LABELS[arm]} | {', '.join(map(str, rows['seed']))} | {rows['final_acc'].mean():.3f} "
            f"| {rows['best_acc'].mean():.3f} | {_mean(rows.loc[reached, 'rollouts_to_grpo_best'], '{:.0f}')} "
            f"({int(reached.sum())}/{len(rows)}) | {_mean(rows.loc[reached, 'time_to_grpo_best_s'], '{:.1f}')} "
            f"| {rows['wall_clock_s'].mean():.1f} | {rows['s_per_iteration'].mean():.3f} "
            f"| {rows['update_passes'].mean():.0f} | {_mean(trig, '{:.0f}')} ({len(trig)}/{len(rows)} fired) |"
        )
    per_run = []
    for r in results:
        reached = not math.isnan(r["rollouts_to_grpo_best"])
        per_run.append(
            f"| {r['run']} | {r['seed']} | {r['final_acc']:.3f} | {r['best_acc']:.3f} "
            f"| {r['rollouts_to_grpo_best']:.0f} (iteration {r['iteration_at_grpo_best']}) "
            if reached
            else f"| {r['run']} | {r['seed']} | {r['final_acc']:.3f} | {r['best_acc']:.3f} | not reached "
        )
        per_run[-1] += (
            f"| {r['time_to_grpo_best_s']:.1f} | {r['wall_clock_s']:.1f} | {r['s_per_iteration']:.3f} "
            f"| {r['update_passes']} | {r['trigger_iteration'] if r['trigger_iteration'] > 0 else '-'} |"
            if reached
            else f"| - | {r['wall_clock_s']:.1f} | {r['s_per_iteration']:.3f} | {r['update_passes']} "
            f"| {r['trigger_iteration'] if r['trigger_iteration'] > 0 else '-'} |"
        )
    per_run_header = header.replace("| arm | seeds |", "| run | seed |").replace(" (reached)", "")
    return (
        "Mean over seeds (rollouts and wall-clock to GRPO's best: over the seeds that reached it; GRPO's best is the "
        "best greedy test accuracy of the same trainer's GRPO run of that seed).\n\n"
        + header
        + "\n".join(lines)
        + "\n\nPer run.\n\n"
        + per_run_header
        + "\n".join(per_run)
        + "\n"
    )


def _mean(values, fmt: str) -> str:
    values = [v for v in values if not math.isnan(v)]
    return fmt.format(sum(values) / len(values)) if values else "n/a"


# --------------------------------------------------------------------------- provenance


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        return rev.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"python {platform.python_version()}"]
    for package in ("torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            out.append(f"{package} (not installed)")
    return ", ".join(out)


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def provenance(command: str, threads: int, started: str, timeline: list[dict], seconds: float) -> str:
    lines = [
        "# Provenance of trl-compare",
        "",
        f"- date (UTC): {started} to {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"
        f" ({seconds / 60:.1f} min)",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores; {platform.system()} {platform.release()}",
        f"- threads: {threads} (torch intra-op threads for the TRL runs, OMP_NUM_THREADS for sfpo train)",
        f"- versions: {_versions()}",
        f"- git revision: {_git_rev()}",
        f"- command: {command}",
        "",
        "Load average (1 / 5 / 15 min) before and after each run; the machine was shared:",
        "",
        "| run | load before | load after | seconds (whole process: loading, training, validation) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t['run']} | {t['load_before']} | {t['load_after']} | {t['seconds']:.0f} |" for t in timeline]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the comparison


def run(
    out,
    seeds: int = 3,
    steps: int = 300,
    threads: int = 1,
    *,
    arms: tuple[str, ...] = ARMS,
    test_freq: int = 50,
    val_samples: int | None = None,
    log=None,
) -> dict[str, str]:
    """Train every arm for seeds 1..``seeds``, ``steps`` iterations each, into ``out``; returns ``{what: path}``.

    A run directory that already exists is reused as it is (a run whose
    ``metrics.jsonl`` is there counts as done), so the same call continues an
    interrupted comparison; delete ``out`` for a fresh one.
    """
    import torch

    log = log or functools.partial(print, flush=True)
    for name, value, low in (("seeds", seeds, 1), ("steps", steps, 1), ("threads", threads, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise ValueError(f"arms must be some of {', '.join(ARMS)}, got {', '.join(arms) or 'none'}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    begin = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    timeline, names = [], []
    try:
        for seed in range(1, seeds + 1):
            for arm in (a for a in ARMS if a in arms):
                name = f"{arm}-s{seed}"
                names.append(name)
                if (out / name / "metrics.jsonl").exists() and _finished(out / name, steps):
                    log(f"trl_compare: {name} already done, kept")
                    continue
                load_before, start = _load(), time.perf_counter()
                log(f"trl_compare: {name} ({steps} iterations, seed {seed}), load {load_before}")
                kwargs = dict(seed=seed, steps=steps, sfpo=arm.endswith("sfpo"), test_freq=test_freq)
                if (out / name).exists():  # an unfinished run starts again
                    shutil.rmtree(out / name)
                if arm.startswith("trl"):
                    run_trl(out / name, val_samples=val_samples, **kwargs)
                else:
                    run_sfpo_train(out, name, val_samples=val_samples, threads=threads, **kwargs)
                seconds = time.perf_counter() - start
                timeline.append({"run": name, "load_before": load_before, "load_after": _load(), "seconds": seconds})
                log(f"trl_compare: {name} done in {seconds:.0f} s")
    finally:
        torch.set_num_threads(previous_threads)

    paths = {}
    for trainer in ("trl", "train"):
        dirs = [str(out / n) for n in names if n.startswith(trainer + "-")]
        if dirs:
            report = out / f"report-{trainer}"
            env = dict(
                os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
            )
            cmd = [sys.executable, "-m", "sfpo_train.cli", "report", *dirs, "--out", str(report)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                raise RuntimeError(f"{shlex.join(cmd)} failed:\n{done.stderr[-3000:]}")
            paths[f"report-{trainer}"] = str(report / "report.md")

    csv, md = write_tables(out, names, steps=steps, threads=threads, test_freq=test_freq, val_samples=val_samples)
    command = shlex.join(
        ["python", "scripts/trl_compare.py", "--seeds", str(seeds), "--steps", str(steps), "--threads", str(threads)]
        + (["--arms", ",".join(arms)] if tuple(arms) != ARMS else [])
        + (["--test-freq", str(test_freq)] if test_freq != 50 else [])
        + (["--val-samples", str(val_samples)] if val_samples else [])
        + ["--out", _shown_path(out)]
    )
    prov = out / "trl-compare-provenance.md"
    prov.write_text(provenance(command, threads, started, timeline, time.perf_counter() - begin))
    paths.update({"csv": str(csv), "markdown": str(md), "provenance": str(prov)})
    return paths


def _shown_path(path: Path) -> str:
    """``path`` relative to the working directory when under it, else as given (the provenance's command)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_tables(out: Path, names: list[str], *, steps: int, threads: int, test_freq: int, val_samples) -> tuple:
    """OUT/trl-compare.csv and OUT/trl-compare.md from the run directories ``names`` (they can be rebuilt any time)."""
    import pandas as pd

    results = run_results(out, names)
    csv = out / "trl-compare.csv"
    pd.DataFrame(results).to_csv(csv, index=False)
    seeds = sorted({r["seed"] for r in results})
    arms = [a for a in ARMS if any(r["arm"] == a for r in results)]
    md = out / "trl-compare.md"
    md.write_text(
        f"# TRL GRPO vs TRL + SFPO vs sfpo train: {steps} iterations, seeds {', '.join(map(str, seeds))}\n\n"
        f"The embedded addition task and model, {threads} thread(s), one run at a time; greedy accuracy on "
        f"{val_samples or 'all 500'} test problems before training, every {test_freq} iterations and at the end. "
        "Wall-clock is training time (validation left out). Machine, load and versions: "
        "the provenance file written with this one.\n\n" + markdown_table(results, arms)
    )
    return csv, md


def _finished(run_dir: Path, steps: int) -> bool:
    from sfpo_train.reports.runs import load_run

    try:
        run = load_run(str(run_dir))
    except ValueError:
        return False
    return len(run.train) >= steps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl_compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N for every arm (default 3)")
    parser.add_argument("--steps", type=int, default=300, help="iterations (generations) per run (default 300)")
    parser.add_argument("--out", type=Path, default=Path("runs/trl-compare"), help="output directory")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (default 1)")
    parser.add_argument(
        "--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)} (default: all)"
    )
    parser.add_argument("--test-freq", type=int, default=50, help="validate every N iterations (default 50)")
    parser.add_argument(
        "--val-samples", type=int, default=None, help="validate on the first N test problems (default: all 500)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported (run() imports it)
    try:
        paths = run(
            args.out,
            args.seeds,
            args.steps,
            args.threads,
            arms=tuple(a for a in args.arms.split(",") if a),
            test_freq=args.test_freq,
            val_samples=args.val_samples,
        )
    except ValueError as e:
        print(f"trl_compare.py: {e}", file=sys.stderr)
        return 2
    for what, path in paths.items():
        print(f"{what}: {path}")
    print(Path(paths["markdown"]).read_text())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # this checkout's sfpo_train, not another installed copy
    sys.exit(main())
