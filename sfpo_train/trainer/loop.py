"""The standalone GRPO / SFPO trainer (verl's config names, one process, CPU or one GPU).

One iteration (``trainer.total_training_steps`` of them):

1. ``gen``: ``data.train_batch_size`` prompts, ``rollout.n`` sampled responses each;
   ``reward``: verl's ``compute_score`` on every decoded response. With
   ``algorithm.filter_groups.enable`` (DAPO) groups whose rewards are all equal
   are dropped and more prompts are sampled until the batch is full.
2. ``old_log_prob`` (and ``ref`` with ``use_kl_loss``): per-token log-probs and
   entropies of the sampled responses, :func:`sfpo_kernels.logprob_entropy`.
   The token-mean entropy is ``actor/entropy`` and SFPO's trigger input.
3. ``adv``: GRPO's group-normalised outcome advantage
   ``(r - mean_group) / (std_group + 1e-6)`` (Dr. GRPO: without the std).
4. ``update_actor``: :meth:`sfpo_train.SFPO.step` around one ordinary PPO update
   pass (``ppo_epochs`` x mini-batches, each one optimizer step with gradient
   accumulation over micro-batches, :func:`sfpo_kernels.grpo_loss`). SFPO runs it
   K+1 times with the reposition between; with SFPO off the same code runs with
   alpha = 0: one pass, plain GRPO.
5. the LR scheduler steps once; validation and checkpoints when due.

Checkpoints hold everything a resumed run needs to reach the same weights as an
uninterrupted one: model, optimizer, LR scheduler, SFPO state, RNG states and
the data position.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import sfpo_kernels
from sfpo_kernels import reference
import sfpo_train.trainer.config as config_lib
from sfpo_train.trainer.data import PromptSampler, left_pad, load_prompts
from sfpo_train.trainer.profiler import StageProfiler
from sfpo_train.trainer.reward import load_reward_fn, score_one
from sfpo_train.trainer.rollout import HFRollout, RolloutBatch, SamplingSettings, VLLMRollout
from sfpo_train.sfpo import SFPO

GRPO_EPS = 1e-6
CHECKPOINT_PREFIX = "global_step_"
LATEST_FILE = "latest_checkpointed_iteration.txt"
RESUMABLE_KEYS = ("trainer.total_training_steps", "trainer.save_freq", "trainer.test_freq", "trainer.progress_bar")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def grpo_advantages(scores: torch.Tensor, group_size: int, norm_by_std: bool) -> torch.Tensor:
    """GRPO's outcome advantage per response; ``scores`` ``[G * group_size]``, groups contiguous.

    ``(r - mean_g) / (std_g + 1e-6)`` with the unbiased std (``torch.std``), or
    ``r - mean_g`` (Dr. GRPO). A group of one has mean 0 and std 1, as in verl.
    """
    groups = scores.view(-1, group_size).double()
    if group_size == 1:
        mean, std = torch.zeros_like(groups), torch.ones_like(groups)
    else:
        mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    adv = groups - mean
    if norm_by_std:
        adv = adv / (std + GRPO_EPS)
    return adv.reshape(-1).float()


def micro_batch_weights(response_mask: torch.Tensor, micro_batches: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """Each micro-batch's share of its mini-batch's aggregate under ``mode``.

    ``sum_i w_i * agg(micro_i) == agg(mini-batch)``: token-mean weights by
    response tokens, the seq-* modes by non-empty rows, token-sum by 1. Returned
    as device tensors (no host sync).
    """
    if mode == "token-sum":
        return [torch.ones((), device=response_mask.device) for _ in micro_batches]
    if mode == "token-mean":
        counts = [response_mask[index].sum().float() for index in micro_batches]
    else:
        counts = [(response_mask[index].sum(dim=1) > 0).sum().float() for index in micro_batches]
    total = torch.stack(counts).sum().clamp(min=1.0)
    return [c / total for c in counts]


def lr_lambda(total_steps: int, warmup_steps: int, kind: str, min_lr_ratio: float):
    """verl 0.9.1's schedules: linear warm-up ``step / warmup_steps`` (so iteration 0 runs at lr 0, as
    ``get_constant_schedule_with_warmup`` / ``get_cosine_schedule_with_warmup`` do), then constant or
    cosine down to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return step / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device='cuda' but torch sees no CUDA device; use trainer.device=cpu")
    return torch.device(name)


def _check_model_dir(path: str, key: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{key}={path!r} is not a transformers model directory (no config.json)")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- metrics log


class MetricsLog:
    """``metrics.jsonl`` (one object per step) and ``metrics.csv`` (the same, as a table) in the run directory."""

    def __init__(self, run_dir: str):
        self.jsonl = os.path.join(run_dir, "metrics.jsonl")
        self.csv = os.path.join(run_dir, "metrics.csv")

    def append(self, metrics: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")

    def read(self) -> list[dict]:
        if not os.path.exists(self.jsonl):
            return []
        with open(self.jsonl) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (a resumed run re-does them)."""
        rows = [r for r in self.read() if r.get("training/global_step", 0) <= step]
        with open(self.jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    def write_csv(self) -> None:
        import pandas as pd

        rows = self.read()
        if rows:
            pd.DataFrame(rows).to_csv(self.csv, index=False)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; pandas reads null back as NaN
    return value


# --------------------------------------------------------------------------- the trainer


@dataclass
class TrainBatch:
    """One iteration's rollouts, ``N = B * n`` responses: ``[N, P]`` prompts, ``[N, R]`` the rest."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    responses: torch.Tensor
    response_mask: torch.Tensor
    scores: torch.Tensor  # [N]
    advantages: torch.Tensor | None = None  # [N, R]
    old_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> dict:
        fields = ("prompt_ids", "prompt_mask", "responses", "response_mask", "advantages", "old_log_probs",
                  "ref_log_probs")  # fmt: skip
        return {f: (None if getattr(self, f) is None else getattr(self, f)[index]) for f in fields}


class Trainer:
    """Build with :meth:`create` (a new run) or :meth:`resume` (a run directory), then :meth:`fit`."""

    def __init__(self, cfg: DictConfig, run_dir: str, *, checkpoint: str | None = None):
        config_lib.validate(cfg)
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
            raise ValueError(f"actor_rollout_ref.model.path={self.model_path!r}: the tokenizer needs a pad and an eos token")
        self.tokenizer.padding_side = "left"
        data = cfg.data
        common = dict(prompt_key=data.prompt_key, reward_fn_key=data.reward_fn_key, max_prompt_length=data.max_prompt_length)
        self.train_prompts = load_prompts(train_files, self.tokenizer, key="data.train_files", **common)
        self.val_prompts = load_prompts(val_files, self.tokenizer, key="data.val_files", max_samples=data.val_max_samples,
                                        **common)  # fmt: skip
        self.sampler = PromptSampler(len(self.train_prompts), data.train_batch_size, shuffle=data.shuffle, seed=data.seed)
        self.reward_fn = load_reward_fn(cfg.custom_reward_function.path, cfg.custom_reward_function.name)

        self.model = self._build_model(checkpoint)
        self.ref_model = None
        if arr.actor.use_kl_loss:
            self.ref_model = self._build_model(None).requires_grad_(False).eval()
        params = [p for p in self.model.parameters() if p.requires_grad]
        optim = arr.actor.optim
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                           weight_decay=optim.weight_decay)  # fmt: skip
        total = cfg.trainer.total_training_steps
        warmup = optim.lr_warmup_steps if optim.lr_warmup_steps > 0 else int(optim.lr_warmup_steps_ratio * total)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total, warmup, optim.lr_scheduler_type, optim.min_lr_ratio))
        self.sfpo = SFPO(self.model, config_lib.sfpo_config(cfg))
        self.loss_options = config_lib.loss_options(cfg)
        self.rollout = self._build_rollout()
        self.profiler = StageProfiler(self.device)
        self.log = MetricsLog(run_dir)
        self.global_step = 0
        self.rollouts_total = 0
        self.elapsed_s = 0.0
        self.last_val: dict = {}

    # ----------------------------------------------------------------- construction

    @classmethod
    def create(cls, cfg: DictConfig, *, preset: str = "default") -> Trainer:
        """A new run under ``trainer.default_local_dir/<experiment_name>``; refuses to overwrite one."""
        if cfg.trainer.experiment_name is None:
            kind = "sfpo" if cfg.actor_rollout_ref.actor.sfpo.enable else "grpo"
            cfg.trainer.experiment_name = f"{preset}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = os.path.join(cfg.trainer.default_local_dir, cfg.trainer.experiment_name)
        if os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise ValueError(f"run directory {run_dir!r} already holds a run: continue it with --resume {run_dir}, "
                             "or choose another trainer.experiment_name")  # fmt: skip
        trainer = cls(cfg, run_dir)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(config_lib.to_yaml(cfg))
        return trainer

    @classmethod
    def resume(cls, run_dir: str, overrides: list[str] | None = None) -> Trainer:
        """Continue the run in ``run_dir`` from its latest checkpoint (``overrides`` limited to RESUMABLE_KEYS)."""
        path = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(path):
            raise ValueError(f"--resume {run_dir!r}: not a run directory (no config.yaml)")
        cfg = config_lib.config_from_yaml(path)
        for item in overrides or []:
            key = item.split("=", 1)[0].lstrip("+")
            if key not in RESUMABLE_KEYS:
                raise ValueError(f"--resume: {key} cannot change in a resumed run (only {', '.join(RESUMABLE_KEYS)})")
        cfg = config_lib.apply_overrides(cfg, list(overrides or []), "command line")
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise ValueError(f"--resume {run_dir!r}: the run has no checkpoint yet (trainer.save_freq)")
        trainer = cls(cfg, run_dir, checkpoint=checkpoint)
        trainer._load_checkpoint(checkpoint)
        with open(path, "w") as f:
            f.write(config_lib.to_yaml(cfg))
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
            raise ValueError(f"actor_rollout_ref.model.override_config: {unknown} are not entries of "
                             f"{type(base).__name__}")  # fmt: skip
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
            return HFRollout(self.model, self.tokenizer, self.autocast)
        if self.device.type != "cuda":
            raise ValueError("actor_rollout_ref.rollout.name=vllm needs trainer.device=cuda")
        engine_dir = os.path.join(self.run_dir, "rollout_model")
        self.model.save_pretrained(engine_dir)
        self.tokenizer.save_pretrained(engine_dir)
        engine = VLLMRollout(engine_dir, self.tokenizer, dtype=self.cfg.actor_rollout_ref.model.dtype,
                             gpu_memory_utilization=rollout.gpu_memory_utilization, seed=self.cfg.trainer.seed,
                             max_model_len=self.cfg.data.max_prompt_length + self.cfg.data.max_response_length)  # fmt: skip
        engine.sync_weights(self.model)
        return engine

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    # ----------------------------------------------------------------- rollouts and rewards

    def _sampling(self, validation: bool) -> SamplingSettings:
        r = self.cfg.actor_rollout_ref.rollout
        s = r.val_kwargs if validation else r
        return SamplingSettings(n=s.n, do_sample=s.do_sample, temperature=s.temperature if s.do_sample else 1.0,
                                top_p=s.top_p, top_k=s.top_k, max_new_tokens=self.cfg.data.max_response_length)  # fmt: skip

    def _score(self, prompts, batch: RolloutBatch, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(score, acc)`` per response; ``acc`` is a reward dict's ``"acc"`` entry, else the score."""
        texts = self.tokenizer.batch_decode(
            [row[mask.bool()].tolist() for row, mask in zip(batch.responses.cpu(), batch.response_mask.cpu())],
            skip_special_tokens=True)  # fmt: skip
        scores, accs = [], []
        for i, text in enumerate(texts):
            p = prompts[i // n]
            score, extra = score_one(self.reward_fn, i, p.data_source, p.text, text, p.ground_truth, p.extra_info)
            scores.append(score)
            accs.append(extra.get("acc", score))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=self.device)  # noqa: E731
        return as_tensor(scores), as_tensor(accs)

    def _collect(self) -> tuple[TrainBatch, dict]:
        """Generate and score; with dynamic sampling, keep only groups with differing rewards until the batch is full."""
        settings, n = self._sampling(False), self.cfg.actor_rollout_ref.rollout.n
        want = self.cfg.data.train_batch_size
        filtering = self.cfg.algorithm.filter_groups
        kept: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per group
        num_gen_batches = 0
        while True:
            num_gen_batches += 1
            prompts = [self.train_prompts[i] for i in self.sampler.next_batch()]
            with self.profiler.stage("gen"):
                rollout = self.rollout.generate([p.input_ids for p in prompts], settings)
            self.rollouts_total += len(prompts) * n
            with self.profiler.stage("reward"):
                scores, accs = self._score(prompts, rollout, n)
            groups = (accs if filtering.metric == "acc" else scores).view(-1, n)
            keep = (groups.amax(1) != groups.amin(1)) if filtering.enable else torch.ones(len(prompts), dtype=torch.bool)
            for g in keep.nonzero().flatten().tolist():
                rows = slice(g * n, (g + 1) * n)
                kept.append((prompts[g].input_ids, rollout.responses[rows], rollout.response_mask[rows], scores[rows]))
            if len(kept) >= want:
                break
            limit = filtering.max_num_gen_batches
            if limit > 0 and num_gen_batches >= limit:
                raise RuntimeError(
                    f"dynamic sampling kept {len(kept)} of the {want} groups it needs after {num_gen_batches} generation "
                    f"batches (algorithm.filter_groups.max_num_gen_batches={limit}): nearly every group's rewards are "
                    "all equal, so the data is too easy or too hard for the model; raise the limit (0: none) or "
                    "turn filter_groups off")  # fmt: skip
        kept = kept[:want]
        prompt_ids, prompt_mask = left_pad([ids for ids, *_ in kept for _ in range(n)], self.tokenizer.pad_token_id,
                                           self.device)  # fmt: skip
        batch = TrainBatch(prompt_ids, prompt_mask, torch.cat([k[1] for k in kept]), torch.cat([k[2] for k in kept]),
                           torch.cat([k[3] for k in kept]))  # fmt: skip
        return batch, {"train/num_gen_batches": float(num_gen_batches)}

    # ----------------------------------------------------------------- log-probs and the update pass

    def _response_logits(self, model, rows: dict) -> torch.Tensor:
        """``[b, R, V]`` logits predicting each response token (a strided view of the model's output)."""
        input_ids = torch.cat([rows["prompt_ids"], rows["responses"]], dim=1)
        attention_mask = torch.cat([rows["prompt_mask"], rows["response_mask"]], dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        length = rows["responses"].shape[1]
        with self.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                        logits_to_keep=length + 1)  # fmt: skip
        return out.logits[:, :-1]

    @torch.no_grad()
    def _log_probs(self, model, batch: TrainBatch, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = model.training
        model.eval()
        log_probs, entropy = [], []
        try:
            for index in torch.arange(len(batch.scores), device=self.device).split(micro):
                rows = batch.rows(index)
                lp, h = sfpo_kernels.logprob_entropy(self._response_logits(model, rows), rows["responses"],
                                                     self.loss_options.temperature,
                                                     backend=self.cfg.actor_rollout_ref.actor.kernel_backend)  # fmt: skip
                log_probs.append(lp)
                entropy.append(h)
        finally:
            model.train(was_training)
        return torch.cat(log_probs), torch.cat(entropy)

    def update_pass(self, batch: TrainBatch) -> dict:
        """One ordinary PPO update on the batch: ``ppo_epochs`` x mini-batches, one optimizer step each.

        A mini-batch's micro-batches accumulate gradients weighted by their share
        of the mini-batch's aggregate (:func:`micro_batch_weights`), so the step
        does not depend on ``ppo_micro_batch_size_per_gpu`` (verl 0.9.1 normalises
        by the mini-batch's token / row count the same way). Metrics: ``pg_loss``
        and ``kl_loss`` are the mini-batch's aggregate, ``pg_clipfrac*`` and
        ``ppo_kl`` its token means, ``nonfinite_tokens`` its count, each then
        averaged over mini-batches; ``skipped_steps`` is the fraction of optimizer
        steps skipped for a non-finite gradient.
        """
        actor = self.cfg.actor_rollout_ref.actor
        n_rows = len(batch.scores)
        mini = actor.ppo_mini_batch_size * self.cfg.actor_rollout_ref.rollout.n
        micro = min(actor.ppo_micro_batch_size_per_gpu, mini)
        o = self.loss_options
        per_mini: dict[str, list[torch.Tensor]] = defaultdict(list)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.model.train()
        for _ in range(actor.ppo_epochs):
            order = torch.randperm(n_rows) if actor.shuffle else torch.arange(n_rows)
            for mini_index in order.to(self.device).split(mini):
                self.optimizer.zero_grad(set_to_none=True)
                micro_batches = mini_index.split(micro)
                loss_weights = micro_batch_weights(batch.response_mask, micro_batches, o.loss_agg_mode)
                token_weights = micro_batch_weights(batch.response_mask, micro_batches, "token-mean")
                totals: dict[str, torch.Tensor] = defaultdict(float)
                for micro_index, w_loss, w_token in zip(micro_batches, loss_weights, token_weights):
                    rows = batch.rows(micro_index)
                    out = sfpo_kernels.grpo_loss(
                        self._response_logits(self.model, rows), rows["responses"], rows["old_log_probs"],
                        rows["advantages"], rows["response_mask"], ref_log_probs=rows["ref_log_probs"],
                        temperature=o.temperature, clip_ratio_low=o.clip_ratio_low, clip_ratio_high=o.clip_ratio_high,
                        clip_ratio_c=o.clip_ratio_c, kl_coef=o.kl_coef, kl_type=o.kl_type, entropy_coef=o.entropy_coef,
                        loss_agg_mode=o.loss_agg_mode, backend=actor.kernel_backend, check_labels=False,
                    )  # fmt: skip
                    (out.loss * w_loss).backward()
                    for key, value in out.metrics.items():
                        if key == "entropy":  # actor/entropy is the old-log-prob pass's (verl's meaning)
                            continue
                        weight = w_loss if key in ("pg_loss", "kl") else 1.0 if key == "nonfinite_tokens" else w_token
                        totals["actor/kl_loss" if key == "kl" else f"actor/{key}"] += value.detach().float() * weight
                for key, value in totals.items():
                    per_mini[key].append(value)
                with self.profiler.stage("optimizer"):  # nested in update_actor; timing_s/optimizer sums all passes
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, actor.optim.clip_grad)
                    finite = torch.isfinite(grad_norm)
                    if finite:
                        self.optimizer.step()
                    else:  # verl's rule: a non-finite gradient skips the step instead of poisoning the weights
                        self.optimizer.zero_grad(set_to_none=True)
                per_mini["actor/skipped_steps"].append((~finite).float())
                per_mini["actor/grad_norm"].append(grad_norm.detach().float())
        return {k: float(torch.stack([torch.as_tensor(v) for v in values]).mean()) for k, values in per_mini.items()}

    # ----------------------------------------------------------------- one iteration

    def train_step(self) -> dict:
        cfg = self.cfg
        actor = cfg.actor_rollout_ref.actor
        alpha = self.sfpo.alpha
        lr = self.optimizer.param_groups[0]["lr"]
        with self.profiler.stage("step"):
            batch, metrics = self._collect()
            micro = cfg.actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu
            with self.profiler.stage("old_log_prob"):
                batch.old_log_probs, entropy = self._log_probs(self.model, batch, micro)
                mask = batch.response_mask.float()
                # verl's actor/entropy: the old-log-prob pass's entropy aggregated with the actor's loss_agg_mode
                mean_entropy = float(reference.agg_loss(entropy, mask, self.loss_options.loss_agg_mode))
            if self.ref_model is not None:
                with self.profiler.stage("ref"):
                    batch.ref_log_probs, _ = self._log_probs(self.ref_model, batch,
                                                             cfg.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu)
            with self.profiler.stage("adv"):
                adv = grpo_advantages(batch.scores, cfg.actor_rollout_ref.rollout.n, cfg.algorithm.norm_adv_by_std_in_grpo)
                batch.advantages = adv[:, None] * mask
            with self.profiler.stage("update_actor"):
                update = self.sfpo.step(self.update_pass, batch, entropy=mean_entropy)
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
        metrics.update(self._batch_metrics(batch))
        num_tokens = int(batch.prompt_mask.sum() + batch.response_mask.sum())
        metrics.update({
            "training/global_step": self.global_step, "training/epoch": self.sampler.epoch,
            "actor/entropy": mean_entropy, "actor/lr": lr, "sfpo/alpha_used": alpha,
            "perf/total_num_tokens": num_tokens, "perf/time_per_step": step_metrics["timing_s/step"],
            "perf/throughput": num_tokens / max(step_metrics["timing_s/step"], 1e-9),
            "train/rollouts_total": self.rollouts_total, "train/elapsed_s": self.elapsed_s,
        })  # fmt: skip
        return metrics

    def _batch_metrics(self, batch: TrainBatch) -> dict:
        out = {}
        mask = batch.response_mask.bool()
        valid_adv = batch.advantages[mask]
        response_length = batch.response_mask.sum(1).float()
        prompt_length = batch.prompt_mask.sum(1).float()
        for name, values in (("critic/score", batch.scores), ("critic/rewards", batch.scores),
                             ("critic/advantages", valid_adv), ("response_length", response_length),
                             ("prompt_length", prompt_length)):  # fmt: skip
            out[f"{name}/mean"] = float(values.mean()) if values.numel() else 0.0
            out[f"{name}/max"] = float(values.max()) if values.numel() else 0.0
            out[f"{name}/min"] = float(values.min()) if values.numel() else 0.0
        out["response_length/clip_ratio"] = float((response_length == batch.responses.shape[1]).float().mean())
        return out

    # ----------------------------------------------------------------- validation

    def validate(self) -> dict:
        """Greedy (``rollout.val_kwargs``) mean score per data source: ``val-core/<data_source>/reward/mean@1``."""
        settings = self._sampling(True)
        per_source: dict[str, list[float]] = defaultdict(list)
        size = self.cfg.data.val_batch_size
        # Forked RNG: sampled validation (val_kwargs.do_sample) must not shift training's random stream,
        # so test_freq can change on resume without changing the trajectory.
        devices = [self.device] if self.device.type == "cuda" else []
        with self.profiler.stage("testing"), torch.random.fork_rng(devices=devices):
            for start in range(0, len(self.val_prompts), size):
                prompts = self.val_prompts[start:start + size]
                batch = self.rollout.generate([p.input_ids for p in prompts], settings)
                scores = self._score(prompts, batch, 1)[0].tolist()
                for p, s in zip(prompts, scores):
                    per_source[p.data_source].append(s)
        metrics = {f"val-core/{src}/reward/mean@1": sum(v) / len(v) for src, v in per_source.items()}
        self.last_val = metrics
        return metrics

    # ----------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> str:
        """``checkpoints/global_step_<N>/`` written to a temporary name first, so a kill never leaves half a checkpoint."""
        root = os.path.join(self.run_dir, "checkpoints")
        final = os.path.join(root, f"{CHECKPOINT_PREFIX}{self.global_step}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.model.save_pretrained(os.path.join(tmp, "model"))
        self.tokenizer.save_pretrained(os.path.join(tmp, "model"))
        torch.save({
            "global_step": self.global_step, "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(), "sfpo": self.sfpo.state_dict(),
            "sampler": self.sampler.state_dict(), "rng": _rng_state(), "rollouts_total": self.rollouts_total,
            "elapsed_s": self.elapsed_s, "last_val": self.last_val,
        }, os.path.join(tmp, "trainer_state.pt"))  # fmt: skip
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(root, LATEST_FILE + ".tmp"), "w") as f:
            f.write(str(self.global_step))
        os.replace(os.path.join(root, LATEST_FILE + ".tmp"), os.path.join(root, LATEST_FILE))
        return final

    def _load_checkpoint(self, path: str) -> None:
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.sfpo.load_state_dict(state["sfpo"])
        self.sampler.load_state_dict(state["sampler"])
        self.global_step = int(state["global_step"])
        self.rollouts_total = int(state["rollouts_total"])
        self.elapsed_s = float(state["elapsed_s"])
        self.last_val = dict(state["last_val"])
        _set_rng_state(state["rng"])
        self.rollout.sync_weights(self.model)
        self.log.truncate_after(self.global_step)

    # ----------------------------------------------------------------- the loop

    def fit(self, stop_after: int | None = None) -> list[dict]:
        """Train to ``trainer.total_training_steps`` (or ``stop_after`` more steps); returns the steps' metrics."""
        from tqdm.auto import tqdm

        cfg = self.cfg.trainer
        total = cfg.total_training_steps
        history = []
        save_seconds = None
        if self.global_step == 0 and cfg.val_before_train:
            val = self.validate()
            val.update({"training/global_step": 0, **self.profiler.collect()})
            self.log.append(val)
        bar = tqdm(total=total, initial=self.global_step, disable=not cfg.progress_bar, unit="step", dynamic_ncols=True,
                   desc=self.cfg.trainer.experiment_name)  # fmt: skip
        try:
            while self.global_step < total and (stop_after is None or len(history) < stop_after):
                metrics = self.train_step()
                last = self.global_step == total
                if last or (cfg.test_freq > 0 and self.global_step % cfg.test_freq == 0):
                    metrics.update(self.validate())
                    metrics.update({k: v for k, v in self.profiler.collect().items()
                                    if k.startswith(("timing_s/", "memory/testing/"))})  # fmt: skip
                if save_seconds is not None:
                    metrics["timing_s/save_checkpoint"] = save_seconds  # the previous step's checkpoint
                    save_seconds = None
                # The row is on disk before the checkpoint: a kill in between never loses a logged step.
                self.log.append(metrics)
                history.append(metrics)
                if cfg.save_freq > 0 and (last or self.global_step % cfg.save_freq == 0):
                    start = time.perf_counter()
                    self.save_checkpoint()
                    save_seconds = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(self._postfix(metrics), refresh=False)
        finally:
            bar.close()
            self.log.write_csv()
        return history

    def _postfix(self, metrics: dict) -> dict:
        out = {"reward": f"{metrics['critic/score/mean']:.3f}", "entropy": f"{metrics['actor/entropy']:.3f}",
               "alpha": f"{metrics['sfpo/alpha']:.2f}"}  # fmt: skip
        val = next(iter(self.last_val.values()), None)
        if val is not None:
            out["val"] = f"{val:.3f}"
        return out


def latest_checkpoint(run_dir: str) -> str | None:
    root = os.path.join(run_dir, "checkpoints")
    marker = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        path = os.path.join(root, f"{CHECKPOINT_PREFIX}{int(f.read().strip())}")
    return path if os.path.isdir(path) else None


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
