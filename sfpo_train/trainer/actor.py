"""The actor: the policy's log-prob forwards and one PPO update pass, the counterpart of verl's actor.

:meth:`Actor.update_pass` is what SFPO wraps (the loop hands ``SFPO.step`` a
pass that runs it and returns its metrics), exactly as the verl plugin wraps
verl's ``train_mini_batch``: one ordinary policy-gradient pass over the batch,
with its optimizer steps. Logits are the model's for the response positions only
(``logits_to_keep``); the loss and log-probs come from :mod:`sfpo_kernels`.
With ``actor_rollout_ref.model.fused_lm_head`` on there are no logits at all:
the base model's last hidden state at those positions and the LM head's
weight and bias go to :func:`sfpo_kernels.linear_grpo_loss` /
:func:`sfpo_kernels.linear_logprob_entropy`, which run the head chunk by chunk
over the response tokens only.

On-policy old log-probs (``actor.old_log_prob_from_update=auto``,
:meth:`Actor.old_log_probs_from_update`): when the first update pass starts at
theta_0, the rollout policy, and every forward of that pass sees theta_0 in a
mode that computes what the separate pass computes, the first pass's own
forward supplies the old log-probs and the entropy, and the separate
old-log-prob forward (:meth:`Actor.log_probs`) is skipped. The pass returns
them (:class:`UpdateResult`); the caller stores them for the later passes.

The actor reads its settings (:class:`~sfpo_train.trainer.settings.ActorSettings`)
at construction, never the config.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import NamedTuple

import torch

import sfpo_kernels
from sfpo_kernels.loss_options import GRPOLossOptions
from sfpo_train.trainer.algos import iteration_entropy, micro_batch_weights
from sfpo_train.trainer.batch import TrainBatch
from sfpo_train.trainer.lm_head import base_model, use_fused_head
from sfpo_train.trainer.profiler import StageProfiler
from sfpo_train.trainer.settings import ActorSettings


class UpdateResult(NamedTuple):
    """What one :meth:`Actor.update_pass` computed.

    ``metrics``: the pass's metrics (what ``SFPO.step`` averages). ``old_log_probs`` ``[N, R]`` and
    ``old_entropy`` (:func:`~sfpo_train.trainer.algos.iteration_entropy` of their entropies): set when
    this pass supplied the old log-probs (the batch had none), else None.
    """

    metrics: dict
    old_log_probs: torch.Tensor | None = None
    old_entropy: float | None = None


class Actor:
    """The trained ``model`` and its ``optimizer`` under ``settings`` (the ``actor_rollout_ref.actor`` keys)."""

    def __init__(
        self,
        settings: ActorSettings,
        model,
        optimizer: torch.optim.Optimizer,
        *,
        compute_dtype: torch.dtype,
        device: torch.device,
        profiler: StageProfiler,
    ):
        self.settings, self.model, self.optimizer = settings, model, optimizer
        self.compute_dtype, self.device, self.profiler = compute_dtype, device, profiler
        self.fused_head = use_fused_head(settings.fused_lm_head, model, device)

    @property
    def loss_options(self) -> GRPOLossOptions:
        return self.settings.loss

    def autocast(self):
        """The compute dtype's autocast (parameters stay fp32, the optimizer's master copy)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    @staticmethod
    def _inputs(rows: dict) -> dict:
        input_ids = torch.cat([rows["prompt_ids"], rows["responses"]], dim=1)
        attention_mask = torch.cat([rows["prompt_mask"], rows["response_mask"]], dim=1)
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": False,
        }

    def response_logits(self, model, rows: dict) -> torch.Tensor:
        """``[b, R, V]`` logits predicting each response token (a strided view of the model's output)."""
        length = rows["responses"].shape[1]
        with self.autocast():
            out = model(**self._inputs(rows), logits_to_keep=length + 1)
        return out.logits[:, :-1]

    def response_hidden(self, model, rows: dict) -> torch.Tensor:
        """``[b, R, H]`` last hidden states predicting each response token (the LM head's inputs)."""
        length = rows["responses"].shape[1]
        with self.autocast():
            out = base_model(model)(**self._inputs(rows))
        return out.last_hidden_state[:, -(length + 1) : -1]

    def _head(self, fn, model, hidden: torch.Tensor, *args, **kwargs):
        """``fn(hidden, weight, *args, bias=..., **kwargs)`` under the compute dtype's autocast (as the head ran)."""
        head = model.get_output_embeddings()
        with self.autocast():
            return fn(hidden, head.weight, *args, bias=head.bias, **kwargs)

    def old_log_probs_from_update(self, n_rows: int, planned_passes: tuple[str, ...]) -> bool:
        """Whether this iteration's first update pass supplies the old log-probs (``auto`` and on-policy).

        The reuse is exact (equal to the separate pass up to fp32 rounding from
        different micro-batch shapes) exactly when every forward of the first pass
        computes log p_theta0 as the separate pass would:

        - theta is theta_0 at every forward of the first pass: it is the
          iteration's first pass (SFPO's Stage I pass 1, or the single GRPO pass;
          some pass must be planned), it has one epoch, and the whole batch is one
          mini-batch, so its only optimizer step comes after its last forward.
          Micro-batches accumulate gradients (``backward`` changes ``.grad``,
          never a parameter), so a later micro-batch's forward still sees theta_0.
          With ``ppo_epochs > 1`` or several mini-batches later forwards see
          stepped parameters: never reused.
        - train mode computes what eval mode computes: the separate pass runs the
          model in eval mode, the update pass in train mode. They agree only
          without dropout (and batch-norm); a model with any active dropout is
          never reused (its train-mode forward is a random draw, not log p_theta0).
        - the same autocast and the same log-prob kernel as the separate pass
          (:func:`sfpo_kernels.logprob_entropy` on the detached logits, or
          :func:`sfpo_kernels.linear_logprob_entropy` on the hidden states with
          the fused head).
        """
        s = self.settings
        return (
            bool(planned_passes)
            and s.reuse_old_log_probs
            and s.on_policy(n_rows)
            and train_mode_is_eval_mode(self.model)
        )

    @torch.no_grad()
    def log_probs(self, model, batch: TrainBatch, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_probs, entropy)`` ``[N, R]`` of the batch's responses under ``model`` (the actor's or the reference)."""
        was_training = model.training
        model.eval()
        log_probs, entropy = [], []
        try:
            for index in torch.arange(len(batch.scores), device=self.device).split(micro):
                rows = batch.rows(index)
                backend = self.settings.kernel_backend
                if self.fused_head:  # response positions only: padding gets 0, which nothing reads unmasked
                    lp, h = self._head(
                        sfpo_kernels.linear_logprob_entropy,
                        model,
                        self.response_hidden(model, rows),
                        rows["responses"],
                        self.loss_options.temperature,
                        response_mask=rows["response_mask"],
                        backend=backend,
                    )
                else:
                    lp, h = sfpo_kernels.logprob_entropy(
                        self.response_logits(model, rows),
                        rows["responses"],
                        self.loss_options.temperature,
                        backend=backend,
                    )
                log_probs.append(lp)
                entropy.append(h)
        finally:
            model.train(was_training)
        return torch.cat(log_probs), torch.cat(entropy)

    def update_pass(self, batch: TrainBatch, *, supply_old_log_probs: bool = False) -> UpdateResult:
        """One ordinary PPO update on the batch: ``ppo_epochs`` x mini-batches, one optimizer step each.

        A mini-batch's micro-batches accumulate gradients weighted by their share
        of the mini-batch's aggregate (:func:`micro_batch_weights`), so the step
        does not depend on ``ppo_micro_batch_size_per_gpu`` (verl 0.9.1 normalises
        by the mini-batch's token / row count the same way). Metrics: ``pg_loss``
        and ``kl_loss`` are the mini-batch's aggregate, ``pg_clipfrac*`` and
        ``ppo_kl`` its token means, ``nonfinite_tokens`` its count, each then
        averaged over mini-batches; ``skipped_steps`` is the fraction of optimizer
        steps skipped for a non-finite gradient.

        ``supply_old_log_probs=True`` (with ``batch.old_log_probs is None``): this pass
        supplies them (on-policy, see :meth:`old_log_probs_from_update`): each
        micro-batch's old log-probs are its own detached log-probs (``ratio == 1``);
        the result carries them and their
        :func:`~sfpo_train.trainer.algos.iteration_entropy` (what the separate pass
        gives the trigger), which is also the metrics' ``entropy``. The batch is not
        changed: the caller stores them in the batch for the later passes, which must
        not supply their own (their forwards no longer see theta_0). Without the flag a
        batch with no old log-probs is refused.
        """
        s = self.settings
        n_rows = len(batch.scores)
        mini, micro = s.mini_batch_rows, s.micro_batch_rows
        o = s.loss
        per_mini: dict[str, list[torch.Tensor]] = defaultdict(list)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        supply = batch.old_log_probs is None
        if supply and not supply_old_log_probs:
            raise ValueError(
                "update_pass: batch.old_log_probs is None; compute them with Actor.log_probs, or pass "
                "supply_old_log_probs=True to the iteration's first pass and store what it returns in the batch"
            )
        if supply_old_log_probs and not supply:
            raise ValueError("update_pass: supply_old_log_probs=True, but batch.old_log_probs is already set")
        if supply and not s.on_policy(n_rows):
            raise ValueError(
                f"update_pass: batch.old_log_probs is None, but this pass is off-policy (ppo_epochs="
                f"{s.ppo_epochs}, {n_rows} responses in mini-batches of {mini}); compute them first "
                "with Actor.log_probs"
            )
        if supply:
            old_log_probs = torch.zeros(batch.responses.shape, dtype=torch.float32, device=self.device)
            old_entropy = torch.zeros_like(old_log_probs)
        self.model.train()
        for _ in range(s.ppo_epochs):
            order = torch.randperm(n_rows) if s.shuffle else torch.arange(n_rows)
            for mini_index in order.to(self.device).split(mini):
                self.optimizer.zero_grad(set_to_none=True)
                micro_batches = mini_index.split(micro)
                loss_weights = micro_batch_weights(batch.response_mask, micro_batches, o.loss_agg_mode)
                token_weights = micro_batch_weights(batch.response_mask, micro_batches, "token-mean")
                totals: dict[str, torch.Tensor] = defaultdict(float)
                for micro_index, w_loss, w_token in zip(micro_batches, loss_weights, token_weights):
                    rows = batch.rows(micro_index)
                    if self.fused_head:
                        hidden = self.response_hidden(self.model, rows)
                    else:
                        logits = self.response_logits(self.model, rows)
                    old = rows["old_log_probs"]
                    if supply:  # theta_0 and no optimizer step yet in this mini-batch: log p_theta0 itself
                        if self.fused_head:
                            with torch.no_grad():
                                old, entropy = self._head(
                                    sfpo_kernels.linear_logprob_entropy,
                                    self.model,
                                    hidden,
                                    rows["responses"],
                                    o.temperature,
                                    response_mask=rows["response_mask"],
                                    backend=s.kernel_backend,
                                )
                        else:
                            old, entropy = sfpo_kernels.logprob_entropy(
                                logits.detach(), rows["responses"], o.temperature, backend=s.kernel_backend
                            )
                        old = old.float()
                        old_log_probs[micro_index], old_entropy[micro_index] = old, entropy.float()
                    loss_args = (rows["responses"], old, rows["advantages"], rows["response_mask"])
                    rest = {"ref_log_probs": rows["ref_log_probs"], "backend": s.kernel_backend, "check_labels": False}
                    if self.fused_head:
                        out = self._head(
                            sfpo_kernels.linear_grpo_loss, self.model, hidden, *loss_args, options=o, **rest
                        )
                    else:
                        out = sfpo_kernels.grpo_loss(logits, *loss_args, options=o, **rest)
                    (out.loss * w_loss).backward()
                    for key, value in out.metrics.items():
                        if key == "entropy":  # this pass's entropy (SFPO's trigger_entropy=last_pass reads it),
                            # aggregated like the loss (loss_agg_mode, as verl's actor/entropy_loss), so the
                            # micro-batch size cannot change it; actor/entropy stays the old pass's
                            totals["entropy"] += value.detach().float() * w_loss
                            continue
                        weight = w_loss if key in ("pg_loss", "kl") else 1.0 if key == "nonfinite_tokens" else w_token
                        totals["actor/kl_loss" if key == "kl" else f"actor/{key}"] += value.detach().float() * weight
                for key, value in totals.items():
                    per_mini[key].append(value)
                with self.profiler.stage("optimizer"):  # nested in update_actor; timing_s/optimizer sums all passes
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, s.clip_grad)
                    finite = torch.isfinite(grad_norm)
                    if finite:
                        self.optimizer.step()
                    else:  # verl's rule: a non-finite gradient skips the step instead of poisoning the weights
                        self.optimizer.zero_grad(set_to_none=True)
                per_mini["actor/skipped_steps"].append((~finite).float())
                per_mini["actor/grad_norm"].append(grad_norm.detach().float())
        result = {k: float(torch.stack([torch.as_tensor(v) for v in values]).mean()) for k, values in per_mini.items()}
        if not supply:
            return UpdateResult(result)
        entropy = iteration_entropy(old_entropy, batch.response_mask, o.loss_agg_mode)
        result["entropy"] = entropy  # at theta_0 this pass's entropy is the old-log-prob one
        return UpdateResult(result, old_log_probs, entropy)


def train_mode_is_eval_mode(model: torch.nn.Module) -> bool:
    """No dropout with p > 0 (modules or a transformers config's ``*dropout*`` / ``*pdrop*`` entries), no batch-norm."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return False
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            return False
    config = getattr(model, "config", None)
    entries = config.to_dict() if hasattr(config, "to_dict") else {}
    return not any(
        ("dropout" in key or "pdrop" in key)
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value > 0
        for key, value in entries.items()
    )
