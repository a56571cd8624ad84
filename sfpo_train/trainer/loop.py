"""The standalone trainer's loop: :class:`Trainer` wires the parts, runs ``train_step``, validates and checkpoints.

One iteration (``trainer.total_training_steps`` of them):

1. ``gen`` / ``reward`` (:class:`~sfpo_train.trainer.collect.RolloutCollector`):
   ``data.train_batch_size`` prompts, ``rollout.n`` sampled responses each, verl's
   ``compute_score`` on every decoded response, DAPO's dynamic sampling when on.
2. ``old_log_prob`` (and ``ref`` with ``use_kl_loss``): per-token log-probs and
   entropies of the responses (:meth:`Actor.log_probs`). The entropy aggregated
   with ``loss_agg_mode`` is ``actor/entropy`` and SFPO's trigger input. When
   on-policy (``actor.old_log_prob_from_update=auto``,
   :meth:`Actor.old_log_probs_from_update`) the first update pass's forward
   gives both instead and this stage is skipped (``timing_s/old_log_prob`` 0,
   ``actor/old_log_prob_from_update`` 1): the pass returns them and the loop
   stores them in the batch for the later passes.
3. ``adv``: GRPO's group-normalised outcome advantage (Dr. GRPO: without the std).
4. ``update_actor``: :meth:`sfpo_train.SFPO.step` around :meth:`Actor.update_pass`,
   one ordinary PPO update pass. SFPO runs it K+1 times with the reposition
   between; with SFPO off the same code runs with alpha = 0: one pass, plain GRPO.
5. the LR scheduler steps once; the rollout engine gets the new weights;
   validation and checkpoints when due (:mod:`~sfpo_train.trainer.checkpoint`).

The config is read when the trainer is built: each part gets its settings
(:mod:`~sfpo_train.trainer.settings`) then; ``Trainer.cfg`` is the run's record
(saved with every checkpoint), and changing it afterwards changes nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
import warnings
from collections import defaultdict

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import sfpo_train.trainer.config as config_lib
from sfpo_train.sfpo import SFPO
from sfpo_train.trainer import checkpoint as ckpt
from sfpo_train.trainer import run_guard
from sfpo_train.trainer.actor import Actor
from sfpo_train.trainer.algos import grpo_advantages, iteration_entropy, lr_lambda
from sfpo_train.trainer.batch import TrainBatch
from sfpo_train.trainer.collect import RolloutCollector
from sfpo_train.trainer.data import PromptSampler, load_prompts
from sfpo_train.trainer.metrics_log import MetricsLog
from sfpo_train.trainer.profiler import StageProfiler
from sfpo_train.trainer.reward import check_data_sources, load_reward_fn
from sfpo_train.trainer.rollout import HFRollout
from sfpo_train.trainer.settings import ActorSettings, CollectSettings, LoopSettings
from sfpo_train.trainer.trackers import Trackers, console_write

RESUMABLE_KEYS = config_lib.RESUMABLE_KEYS
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device='cuda' but torch sees no CUDA device; use trainer.device=cpu")
    return torch.device(name)


def _check_model_dir(path: str, key: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{key}={path!r} is not a transformers model directory (no config.json)")


class Trainer:
    """Build with :meth:`create` (a new run) or :meth:`resume` (a run directory), then :meth:`fit`."""

    def __init__(self, cfg: DictConfig, run_dir: str, *, checkpoint: str | None = None):
        # cfg is validated: create() and resume() check every key before they touch the run directory
        self.cfg, self.run_dir = cfg, run_dir
        self.device = resolve_device(cfg.trainer.device)
        arr = cfg.actor_rollout_ref
        self.compute_dtype = DTYPES[arr.model.dtype]
        defaults = _default_paths() if None in (cfg.data.train_files, cfg.data.val_files, arr.model.path) else {}
        self.model_path = arr.model.path or defaults["model"]
        _check_model_dir(self.model_path, "actor_rollout_ref.model.path")
        train_files = cfg.data.train_files or defaults["train_files"]
        val_files = cfg.data.val_files or defaults["val_files"]

        _seed_everything(cfg.trainer.seed)
        import transformers
        from transformers import AutoTokenizer

        transformers.utils.logging.disable_progress_bar()  # our own bar is the one to watch

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if self.tokenizer.pad_token_id is None or self.tokenizer.eos_token_id is None:
            raise ValueError(
                f"actor_rollout_ref.model.path={self.model_path!r}: the tokenizer needs a pad and an eos token"
            )
        self.tokenizer.padding_side = "left"
        data = cfg.data
        common = dict(
            prompt_key=data.prompt_key, reward_fn_key=data.reward_fn_key, max_prompt_length=data.max_prompt_length
        )
        self.train_prompts = load_prompts(train_files, self.tokenizer, key="data.train_files", **common)
        self.val_prompts = load_prompts(
            val_files, self.tokenizer, key="data.val_files", max_samples=data.val_max_samples, **common
        )
        self.sampler = PromptSampler(
            len(self.train_prompts), data.train_batch_size, shuffle=data.shuffle, seed=data.seed
        )
        self.reward_fn = load_reward_fn(cfg.custom_reward_function.path, cfg.custom_reward_function.name)
        check_data_sources(  # a data source no reward function knows stops the run now, not at its first batch
            self.reward_fn,
            {
                f"data.train_files={train_files!r}": [p.data_source for p in self.train_prompts],
                f"data.val_files={val_files!r}": [p.data_source for p in self.val_prompts],
            },
        )

        self.model = self._build_model(checkpoint)
        self._resuming = checkpoint is not None
        self.ref_model = None
        if arr.actor.use_kl_loss:
            self.ref_model = self._build_model(None).requires_grad_(False).eval()
        params = [p for p in self.model.parameters() if p.requires_grad]
        optim = arr.actor.optim
        self.optimizer = torch.optim.AdamW(
            params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
        )
        total = cfg.trainer.total_training_steps
        warmup = optim.lr_warmup_steps if optim.lr_warmup_steps > 0 else int(optim.lr_warmup_steps_ratio * total)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total, warmup, optim.lr_scheduler_type, optim.min_lr_ratio)
        )
        self.profiler = StageProfiler(self.device)
        self.settings = LoopSettings.from_config(cfg)
        self.actor = Actor(
            ActorSettings.from_config(cfg),
            self.model,
            self.optimizer,
            compute_dtype=self.compute_dtype,
            device=self.device,
            profiler=self.profiler,
        )
        self.sfpo = SFPO(self.model, config_lib.sfpo_config(cfg))
        self.rollout = self._build_rollout()
        self.collector = RolloutCollector(
            CollectSettings.from_config(cfg),
            rollout=self.rollout,
            tokenizer=self.tokenizer,
            reward_fn=self.reward_fn,
            prompts=self.train_prompts,
            sampler=self.sampler,
            profiler=self.profiler,
            device=self.device,
        )
        self.log = MetricsLog(run_dir)
        self.global_step = 0
        self.rollouts_total = 0
        self.elapsed_s = 0.0
        self.last_val: dict = {}
        self._saved_step: int | None = None  # the step of this run's newest checkpoint, written or resumed from
        self.resumed_from: str | None = None  # the checkpoint directory a resumed run continues from

    # ----------------------------------------------------------------- construction

    @classmethod
    def create(cls, cfg: DictConfig, *, preset: str = "default") -> Trainer:
        """A new run under ``trainer.default_local_dir/<experiment_name>``; refuses to overwrite one.

        Every key is validated before anything is created; then the run directory is locked
        (:func:`~sfpo_train.trainer.run_guard.lock_run_dir`). A run directory whose run was stopped
        before its first checkpoint is started again (with a warning); one with a checkpoint, or a
        finished one, is refused.
        """
        config_lib.validate(cfg)  # before anything changes, the caller's cfg included
        if cfg.trainer.experiment_name is None:  # e.g. default-sfpo-dapo-<time>, default-dapo-<time>
            cfg.trainer.experiment_name = config_lib.default_experiment_name(cfg, preset)
        run_dir = os.path.join(cfg.trainer.default_local_dir, cfg.trainer.experiment_name)
        locked_here = not run_guard.holds_lock(run_dir)
        try:
            created = run_guard.lock_run_dir(run_dir)
        except (run_guard.WriteError, OSError) as e:  # read-only, no permission, a file in the way ...
            if e.errno in run_guard.DISK_FULL_ERRNOS:
                raise  # a full disk is freed, not moved away from (and sfpo compare reads its errno)
            raise ValueError(run_guard.unwritable_run_dir(run_dir, e, cfg.trainer.default_local_dir)) from None
        try:
            restart = ckpt.restart_reason(run_dir)
            if restart is not None:
                warnings.warn(restart, run_guard.RunWarning, stacklevel=2)
            trainer = cls(cfg, run_dir)
            if restart is not None:
                ckpt.clear_run(run_dir)
            run_guard.write_atomic(os.path.join(run_dir, ckpt.CONFIG_FILE), config_lib.to_yaml(cfg))
        except BaseException:
            if locked_here:  # leave no lock behind a failed start (and a directory it created: nothing)
                run_guard.unlock_run_dir(run_dir, remove=created)
            raise
        return trainer

    @classmethod
    def resume(cls, run_dir: str, overrides: list[str] | None = None) -> Trainer:
        """Continue the run in ``run_dir`` from its newest intact checkpoint (``overrides`` limited to RESUMABLE_KEYS).

        ``config.yaml`` must still equal the checkpoint's config except for RESUMABLE_KEYS.
        """
        cfg = config_lib.resumed_config(run_dir, overrides)
        path = os.path.join(run_dir, ckpt.CONFIG_FILE)
        locked_here = not run_guard.holds_lock(run_dir)
        run_guard.lock_run_dir(run_dir)
        try:  # nothing is written before the checkpoint is chosen and checked; a failure releases the lock
            found = ckpt.find_resumable(run_dir)
            if found is None:
                raise ValueError(
                    f"--resume {run_dir!r}: the run has no checkpoint yet (trainer.save_freq); one stopped "
                    f"before its first checkpoint ({ckpt.logged_steps(run_dir)} steps logged) starts again "
                    "from step 0 when you run its sfpo train command again (same "
                    "trainer.experiment_name)"
                )
            checkpoint, state = found
            _check_same_config(
                config_lib.parse_config(state["config"], os.path.join(checkpoint, ckpt.STATE_FILE)), cfg, path
            )
            total = cfg.trainer.total_training_steps
            if total < state["global_step"]:
                raise ValueError(
                    f"--resume: trainer.total_training_steps={total} is below the step of the checkpoint it "
                    f"resumes from ({state['global_step']}, {checkpoint}); a run cannot end before where it is"
                )
            trainer = cls(cfg, run_dir, checkpoint=checkpoint)
            trainer._load_checkpoint(state)
            trainer.resumed_from = checkpoint
            run_guard.write_atomic(path, config_lib.to_yaml(cfg))
        except BaseException:
            if locked_here:  # a lock this process held already (another Trainer on the run) stays held
                run_guard.unlock_run_dir(run_dir)
            raise
        return trainer

    def _build_model(self, checkpoint: str | None):
        from transformers import AutoConfig, AutoModelForCausalLM

        model_cfg = self.cfg.actor_rollout_ref.model
        kwargs = dict(dtype=torch.float32, attn_implementation=model_cfg.attn_implementation)
        if checkpoint is not None:
            return AutoModelForCausalLM.from_pretrained(os.path.join(checkpoint, "model"), **kwargs).to(self.device)
        base = AutoConfig.from_pretrained(self.model_path)
        entries = base.to_dict()
        overrides = OmegaConf.to_container(model_cfg.override_config)
        unknown = sorted(k for k in overrides if k not in entries)
        if unknown:
            raise ValueError(
                f"actor_rollout_ref.model.override_config: {unknown} are not entries of {type(base).__name__}"
            )
        if "num_hidden_layers" in overrides:
            entries.pop("layer_types", None)  # per-layer lists follow the new depth (rebuilt from defaults)
        hf_config = type(base)(**{**entries, **overrides})
        if model_cfg.random_init:
            with _seeded(self.cfg.trainer.seed):
                model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(self.model_path, config=hf_config, **kwargs)
        # Parameters stay fp32 (the optimizer's master copy); bf16/fp16 is the compute dtype via autocast.
        return model.to(self.device)

    def _build_rollout(self):
        rollout = self.cfg.actor_rollout_ref.rollout
        if rollout.name == "hf":
            return HFRollout(self.model, self.tokenizer, self.actor.autocast)
        from sfpo_train.trainer import vllm_rollout

        vllm_rollout.import_vllm()  # a missing or broken install fails before anything is written
        data, dtype = self.cfg.data, self.cfg.actor_rollout_ref.model.dtype
        max_model_len = data.max_prompt_length + data.max_response_length
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and max_model_len > positions:  # vLLM refuses what HF generate would run past
            raise ValueError(
                f"actor_rollout_ref.rollout.name=vllm: data.max_prompt_length + data.max_response_length "
                f"= {max_model_len} exceeds the model's max_position_embeddings ({positions}); lower "
                "them, or raise it with actor_rollout_ref.model.override_config"
            )
        engine_dir = os.path.join(self.run_dir, "rollout_model")
        self.model.save_pretrained(engine_dir)
        self.tokenizer.save_pretrained(engine_dir)
        sequences = max(data.train_batch_size * rollout.n, data.val_batch_size)
        kv_bytes = vllm_rollout.kv_cache_bytes(rollout, self.model.config, dtype, self.device, sequences, max_model_len)
        # The first load and the first iteration's sync (a resumed run: and _load_checkpoint's) are checked against
        # the model (vllm_rollout's docstring).
        try:
            engine = vllm_rollout.VLLMRollout(
                engine_dir,
                self.tokenizer,
                device=self.device,
                dtype=dtype,
                max_model_len=max_model_len,
                seed=self.cfg.trainer.seed,
                gpu_memory_utilization=rollout.gpu_memory_utilization,
                kv_cache_memory_bytes=kv_bytes,
                probe_prompts=[p.input_ids for p in self.val_prompts[:4]],
                autocast=self.actor.autocast,
                checked_syncs=3 if self._resuming else 2,
            )
            engine.sync_weights(self.model)
        except BaseException:  # a failed start leaves no engine copy (and a new run no directory) behind
            shutil.rmtree(engine_dir, ignore_errors=True)
            raise
        return engine

    # ----------------------------------------------------------------- one iteration

    def train_step(self) -> dict:
        alpha = self.sfpo.alpha
        lr = self.optimizer.param_groups[0]["lr"]
        actor = self.actor.settings
        with self.profiler.stage("step"):
            batch, metrics, generated = self.collector.collect()
            self.rollouts_total += generated
            reuse = self.actor.old_log_probs_from_update(len(batch.scores), self.sfpo.planned_passes())
            mean_entropy = None  # reuse: the first update pass returns it (SFPO.step records it from there)
            if reuse:  # the old-log-prob work is inside update_actor now; the stage is kept, at 0 s
                self.profiler.add_time("old_log_prob", 0.0)
            else:
                with self.profiler.stage("old_log_prob"):
                    batch.old_log_probs, entropy = self.actor.log_probs(self.model, batch, actor.log_prob_micro_rows)
                    mean_entropy = iteration_entropy(entropy, batch.response_mask, actor.loss.loss_agg_mode)
            if self.ref_model is not None:
                with self.profiler.stage("ref"):
                    batch.ref_log_probs, _ = self.actor.log_probs(self.ref_model, batch, actor.ref_log_prob_micro_rows)
            with self.profiler.stage("adv"):
                adv = grpo_advantages(batch.scores, self.settings.n, self.settings.norm_adv_by_std)
                batch.advantages = adv[:, None] * batch.response_mask.float()
            supplied: dict = {}

            def update_pass(b: TrainBatch) -> dict:
                """One actor pass for SFPO; old log-probs it supplied are stored for the later passes."""
                result = self.actor.update_pass(b, supply_old_log_probs=b.old_log_probs is None)
                if result.old_log_probs is not None:
                    b.old_log_probs, supplied["entropy"] = result.old_log_probs, result.old_entropy
                return result.metrics

            with self.profiler.stage("update_actor"):
                old_entropy = mean_entropy if self.sfpo.config.trigger_entropy == "old_log_prob" else None
                update = self.sfpo.step(update_pass, batch, entropy=old_entropy)
            if reuse:
                mean_entropy = supplied["entropy"]  # the first pass supplied it (and, for old_log_prob, the trigger's)
            # the update passes' entropy (mean over passes; the last pass's stays as sfpo/last/entropy)
            update["actor/update_entropy"] = update.pop("entropy", math.nan)
            self.lr_scheduler.step()
            with self.profiler.stage("sync_weights"):
                self.rollout.sync_weights(self.model)
        self.global_step += 1
        step_metrics = self.profiler.collect()
        self.elapsed_s += step_metrics["timing_s/step"]
        for stage in ("sfpo_snapshot", "sfpo_fast", "sfpo_reposition", "sfpo_slow"):
            step_metrics[f"timing_s/{stage}"] = update.pop(f"timing_s/{stage}")
        metrics.update(update)
        metrics.update(step_metrics)
        check = getattr(self.rollout, "last_check", None)
        if check is not None and check["sync"] == self.rollout.syncs:  # this step's sync was checked (vLLM)
            metrics["rollout/sync_check_max_abs_diff"] = check["max_abs_diff"]
        metrics.update(self._batch_metrics(batch))
        num_tokens = int(batch.prompt_mask.sum() + batch.response_mask.sum())
        metrics.update(
            {
                "training/global_step": self.global_step,
                "training/epoch": self.sampler.epoch,
                "actor/entropy": mean_entropy,
                "actor/lr": lr,
                "sfpo/alpha_used": alpha,
                "actor/old_log_prob_from_update": float(reuse),
                "perf/total_num_tokens": num_tokens,
                "perf/time_per_step": step_metrics["timing_s/step"],
                "perf/throughput": num_tokens / max(step_metrics["timing_s/step"], 1e-9),
                "train/rollouts_total": self.rollouts_total,
                "train/elapsed_s": self.elapsed_s,
            }
        )
        return metrics

    def _batch_metrics(self, batch: TrainBatch) -> dict:
        out = {}
        mask = batch.response_mask.bool()
        valid_adv = batch.advantages[mask]
        response_length = batch.response_mask.sum(1).float()
        prompt_length = batch.prompt_mask.sum(1).float()
        for name, values in (
            ("critic/score", batch.scores),
            ("critic/rewards", batch.scores),
            ("critic/advantages", valid_adv),
            ("response_length", response_length),
            ("prompt_length", prompt_length),
        ):
            out[f"{name}/mean"] = float(values.mean()) if values.numel() else 0.0
            out[f"{name}/max"] = float(values.max()) if values.numel() else 0.0
            out[f"{name}/min"] = float(values.min()) if values.numel() else 0.0
        out["response_length/clip_ratio"] = float((response_length == batch.responses.shape[1]).float().mean())
        return out

    # ----------------------------------------------------------------- validation

    def validate(self) -> dict:
        """Greedy (``rollout.val_kwargs``) mean score per data source: ``val-core/<data_source>/reward/mean@1``."""
        settings = self.collector.sampling(True)
        per_source: dict[str, list[float]] = defaultdict(list)
        size = self.settings.val_batch_size
        # Forked RNG: sampled validation (val_kwargs.do_sample) must not shift training's random stream,
        # so test_freq can change on resume without changing the trajectory.
        devices = [self.device] if self.device.type == "cuda" else []
        with self.profiler.stage("testing"), torch.random.fork_rng(devices=devices):
            for start in range(0, len(self.val_prompts), size):
                prompts = self.val_prompts[start : start + size]
                batch = self.rollout.generate([p.input_ids for p in prompts], settings)
                scores = self.collector.score(prompts, batch, 1)[0].tolist()
                for p, s in zip(prompts, scores):
                    per_source[p.data_source].append(s)
        metrics = {f"val-core/{src}/reward/mean@1": sum(v) / len(v) for src, v in per_source.items()}
        self.last_val = metrics
        return metrics

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> str:
        """``checkpoints/global_step_<N>/`` with everything :meth:`resume` needs (see :mod:`.checkpoint`)."""
        state = {
            "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "sfpo": self.sfpo.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": ckpt.rng_state(),
            "rollouts_total": self.rollouts_total,
            "elapsed_s": self.elapsed_s,
            "last_val": self.last_val,
            "config": config_lib.to_yaml(self.cfg),
        }
        path = ckpt.save_checkpoint(self.run_dir, self.global_step, self.model, self.tokenizer, state)
        self._saved_step = self.global_step
        return path

    def _load_checkpoint(self, state: dict) -> None:
        """Restore everything but the model (built from the checkpoint) from a :func:`ckpt.load_state` dict."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.sfpo.load_state_dict(state["sfpo"])
        self.sampler.load_state_dict(state["sampler"])
        self.global_step = int(state["global_step"])
        self.rollouts_total = int(state["rollouts_total"])
        self.elapsed_s = float(state["elapsed_s"])
        self.last_val = dict(state["last_val"])
        ckpt.set_rng_state(state["rng"])
        self.rollout.sync_weights(self.model)
        self.log.truncate_after(self.global_step)
        self._saved_step = self.global_step

    # ----------------------------------------------------------------- the loop

    def fit(self, stop_after: int | None = None) -> list[dict]:
        """Train to ``trainer.total_training_steps`` (or ``stop_after`` more steps); returns the steps' metrics.

        SIGINT / SIGTERM stop it after the current step with a checkpoint there:
        :class:`~sfpo_train.trainer.run_guard.StopInterrupt` says where. The previous handlers are back on return.
        """
        with run_guard.StopOnSignal() as stop:
            return self._fit(stop_after, stop)

    def _record(self, metrics: dict) -> None:
        """A row to ``metrics.jsonl`` (what the reports read), then to ``trainer.logger``'s backends."""
        self.log.append(metrics)
        self._trackers.log(metrics, int(metrics["training/global_step"]))

    def _fit(self, stop_after: int | None, stop: run_guard.StopOnSignal) -> list[dict]:
        loop = self.settings
        with Trackers(  # a W&B run that cannot start stops here, before any work; closed when fit ends
            loop.logger,
            project=loop.project_name,
            experiment=loop.experiment_name,
            config=OmegaConf.to_container(self.cfg, resolve=True),
            start_step=self.global_step + 1 if self.global_step > 0 else 0,  # a resume hides the steps it redoes
            write=console_write,
        ) as self._trackers:
            return self._fit_steps(stop_after, stop)

    def _fit_steps(self, stop_after: int | None, stop: run_guard.StopOnSignal) -> list[dict]:
        from tqdm.auto import tqdm

        loop = self.settings
        total = loop.total_training_steps
        history = []
        save_seconds = None
        if self.global_step == 0 and loop.val_before_train:
            val = self.validate()
            val.update({"training/global_step": 0, **self.profiler.collect()})
            self._record(val)
        bar = tqdm(
            total=total,
            initial=self.global_step,
            disable=not loop.progress_bar,
            unit="step",
            dynamic_ncols=True,
            desc=loop.experiment_name,
        )
        try:
            while self.global_step < total and (stop_after is None or len(history) < stop_after):
                if stop.signum is not None:  # set by the handler during the previous step (or validation)
                    raise self._stopped(stop.signum)
                metrics = self.train_step()
                last = self.global_step == total
                if last or (loop.test_freq > 0 and self.global_step % loop.test_freq == 0):
                    metrics.update(self.validate())
                    metrics.update(
                        {
                            k: v
                            for k, v in self.profiler.collect().items()
                            if k.startswith(("timing_s/", "memory/testing/"))
                        }
                    )
                if save_seconds is not None:
                    metrics["timing_s/save_checkpoint"] = save_seconds  # the previous step's checkpoint
                    save_seconds = None
                # The row is on disk before the checkpoint: a kill in between never loses a logged step.
                self._record(metrics)
                history.append(metrics)
                if loop.save_freq > 0 and (last or self.global_step % loop.save_freq == 0):
                    start = time.perf_counter()
                    self.save_checkpoint()
                    save_seconds = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(self._postfix(metrics), refresh=False)
            if stop.signum is not None:  # the signal came during the last step: still a stop, not a success
                raise self._stopped(stop.signum)
        except BaseException:
            bar.close()
            with contextlib.suppress(Exception):  # best effort: the error that stopped the run is the one to report
                self.log.write_csv()
            raise
        bar.close()
        self.log.write_csv()
        return history

    def _stopped(self, signum: int) -> run_guard.StopInterrupt:
        """The stop on ``signum``, with a checkpoint at the current step (saved now unless it exists)."""
        checkpoint = None
        if self.global_step > 0:
            if self._saved_step != self.global_step:
                self.save_checkpoint()
            checkpoint = os.path.join(self.run_dir, "checkpoints", f"{ckpt.CHECKPOINT_PREFIX}{self.global_step}")
        return run_guard.StopInterrupt(signum, self.global_step, self.run_dir, checkpoint)

    def _postfix(self, metrics: dict) -> dict:
        out = {
            "reward": f"{metrics['critic/score/mean']:.3f}",
            "entropy": f"{metrics['actor/entropy']:.3f}",
            "alpha": f"{metrics['sfpo/alpha']:.2f}",
        }
        val = next(iter(self.last_val.values()), None)
        if val is not None:
            out["val"] = f"{val:.3f}"
        return out


def _check_same_config(saved: DictConfig, cfg: DictConfig, path: str) -> None:
    """``ValueError`` naming every key outside RESUMABLE_KEYS whose value in ``cfg`` differs from the checkpoint's."""
    diff = {k: v for k, v in config_lib.config_diff(saved, cfg).items() if k not in RESUMABLE_KEYS}
    if diff:
        listed = "; ".join(f"{k}: checkpoint {a!r}, config.yaml {b!r}" for k, (a, b) in sorted(diff.items())[:12])
        more = f" (and {len(diff) - 12} more)" if len(diff) > 12 else ""
        raise ValueError(
            f"{path} does not match the run's checkpoint in {len(diff)} key(s) that cannot change in a "
            f"resumed run: {listed}{more}; restore it (only {', '.join(RESUMABLE_KEYS)} may change, as "
            "--resume overrides)"
        )


def _default_paths() -> dict:
    from sfpo_train.tasks import default_paths

    return default_paths()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _seeded(seed: int):
    """Deterministic model initialisation without disturbing the run's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
