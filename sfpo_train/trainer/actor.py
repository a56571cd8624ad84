"""The actor: the policy's log-prob forwards and one PPO update pass, the counterpart of verl's actor.

:meth:`Actor.update_pass` is what SFPO wraps (``SFPO.step(actor.update_pass,
batch, entropy)``), exactly as the verl plugin wraps verl's
``train_mini_batch``: one ordinary policy-gradient pass over the batch, with its
optimizer steps. Logits are the model's for the response positions only
(``logits_to_keep``); the loss and log-probs come from :mod:`sfpo_kernels`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from omegaconf import DictConfig

import sfpo_kernels
from sfpo_kernels.fused_loss import GRPOLossOptions
from sfpo_train.trainer.algos import micro_batch_weights
from sfpo_train.trainer.batch import TrainBatch
from sfpo_train.trainer.profiler import StageProfiler


class Actor:
    """The trained ``model`` and its ``optimizer`` under the ``actor_rollout_ref.actor`` settings of ``cfg``."""

    def __init__(self, cfg: DictConfig, model, optimizer: torch.optim.Optimizer, loss_options: GRPOLossOptions, *,
                 compute_dtype: torch.dtype, device: torch.device, profiler: StageProfiler):  # fmt: skip
        self.cfg, self.model, self.optimizer, self.loss_options = cfg, model, optimizer, loss_options
        self.compute_dtype, self.device, self.profiler = compute_dtype, device, profiler

    def autocast(self):
        """The compute dtype's autocast (parameters stay fp32, the optimizer's master copy)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def response_logits(self, model, rows: dict) -> torch.Tensor:
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
    def log_probs(self, model, batch: TrainBatch, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_probs, entropy)`` ``[N, R]`` of the batch's responses under ``model`` (the actor's or the reference)."""
        was_training = model.training
        model.eval()
        log_probs, entropy = [], []
        try:
            for index in torch.arange(len(batch.scores), device=self.device).split(micro):
                rows = batch.rows(index)
                lp, h = sfpo_kernels.logprob_entropy(self.response_logits(model, rows), rows["responses"],
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
                        self.response_logits(self.model, rows), rows["responses"], rows["old_log_probs"],
                        rows["advantages"], rows["response_mask"], ref_log_probs=rows["ref_log_probs"],
                        temperature=o.temperature, clip_ratio_low=o.clip_ratio_low, clip_ratio_high=o.clip_ratio_high,
                        clip_ratio_c=o.clip_ratio_c, kl_coef=o.kl_coef, kl_type=o.kl_type, entropy_coef=o.entropy_coef,
                        loss_agg_mode=o.loss_agg_mode, backend=actor.kernel_backend, check_labels=False,
                    )  # fmt: skip
                    (out.loss * w_loss).backward()
                    for key, value in out.metrics.items():
                        if key == "entropy":  # this pass's entropy (SFPO's trigger_entropy=last_pass reads it);
                            totals["entropy"] += value.detach().float() * w_token  # actor/entropy stays the old pass's
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
