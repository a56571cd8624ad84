"""sfpo's fused LM head as the loss of TRL's ``GRPOTrainer`` (trl 1.16.0), with TRL's values and gradients.

:func:`compute_fused_loss` is a drop-in for ``GRPOTrainer._compute_loss(model,
inputs)``: it runs the model's backbone for the last hidden states at the
completion positions (no LM-head logits), hands them with the output
embedding's weight and bias to :func:`sfpo_kernels.linear_logprob_entropy`
(the head chunk by chunk over the completion tokens only, log-probs and
entropy with their gradients), and builds TRL's loss from those per-token
values: the clipped policy gradient through
:func:`sfpo_kernels.grpo_math.grpo_loss_from_log_probs` with the
:class:`~sfpo_kernels.GRPOLossOptions` of :func:`fused_loss_options`, then TRL's
normaliser, KL term and entropy bonus. Together the head and that call are
:func:`sfpo_kernels.linear_grpo_loss`; they run as two calls because TRL's
``top_entropy_quantile`` picks the tokens from the current entropies before the
loss. It logs what TRL logs into ``trainer._metrics[mode]`` (``entropy``, the
``clip_ratio/*`` family, ``kl`` when ``beta != 0``, ``policy_loss`` and
``entropy_coef`` with an entropy bonus), so logs read the same.

How TRL's settings map (``GRPOLossOptions`` field <- ``GRPOConfig`` field):

- ``temperature`` <- ``temperature`` (TRL divides the logits by it: the same);
- ``clip_ratio_low`` <- ``epsilon``; ``clip_ratio_high`` <- ``epsilon_high``
  (``epsilon`` when None);
- ``clip_ratio_c`` <- ``delta`` (None: no dual clip). TRL's two-sided clip
  ``-min(min(r, delta) A, clip(r) A)`` equals verl's dual clip with
  ``clip_ratio_c = delta`` whenever ``delta > 1 + epsilon_high``;
- ``loss_agg_mode`` and the factor TRL's normaliser adds (``B`` the micro-batch's
  rows, ``R`` those with a completion token left after masking, ``GA`` the
  gradient-accumulation steps of the window, 1 in eval; ``num_items_in_batch``
  the generation batch's completion tokens over all processes, ``P`` the
  processes, ``S`` ``steps_per_generation``):

  ========== ============================ =================================================
  loss_type  verl loss_agg_mode            TRL's loss = that aggregate x
  ========== ============================ =================================================
  grpo       seq-mean-token-mean           ``|R| / B / GA`` (TRL averages over every row,
                                           a fully masked one as 0; verl over ``R``)
  bnpo       token-mean                    ``1 / GA``
  dr_grpo    token-sum                     ``1 / (B * max_completion_length * GA)`` (verl's
                                           seq-mean-token-sum-norm divides by the padded
                                           length and ``|R|`` instead)
  dapo       token-sum                     ``P * S / (num_items_in_batch * GA)`` in train,
                                           ``P / num_items_in_batch`` in eval
  luspo      token-sum                     ``1 / (B * GA)`` (seq-mean-token-sum over every row)
  ========== ============================ =================================================

- ``kl_coef`` and ``entropy_coef`` stay 0 here: TRL's KL is ``exp(ref - logp) -
  (ref - logp) - 1`` without verl's clamps (verl's ``low_var_kl`` clamps it to
  [-10, 10]), times the ratio with ``use_bias_correction_kl``, normalised like the
  policy term; TRL's entropy bonus is a token mean over the tokens the loss acts
  on whatever the ``loss_type``. Both are computed from the head's per-token
  log-probs and entropy, which carry their gradients.
- Token weights TRL multiplies into the policy term (the ``top_entropy_quantile``
  mask, the ``off_policy_mask_threshold`` sequence mask, vLLM's importance-sampling
  ratio) are non-negative, so they are folded into the advantages:
  ``w max(-A r, -A clip(r)) = max(-(wA) r, -(wA) clip(r))``; the aggregation's
  denominators keep every completion token, as TRL's do.

Refused with a ``ValueError`` naming the ``GRPOConfig`` field and value, at
construction (:func:`fused_loss_options`, :func:`check_fused_model`), because the
fused loss would compute something else: ``loss_type`` ``cispo``, ``sapo``,
``vespo`` (no counterpart among verl's clipped policy losses);
``importance_sampling_level="sequence"`` (the ratio here is per token);
``epsilon`` outside [0, 1); ``delta`` not above ``1 + epsilon_high``; a model
whose logits are not ``lm_head(last hidden state)`` (soft-capping or scaling);
vision-language models; an MoE router auxiliary loss; prompt-learning PEFT.
LoRA (and other adapters that leave the inputs alone) works: the backbone's
forward runs through the adapters.

One difference stays, on tokens no training run should see: verl (and so
sfpo) clamps the log-ratio ``logp - old`` to [-20, 20] before ``exp``; TRL does
not. They differ only at a token whose probability changed by more than
``e^20`` (4.9e8) since the rollout, where without ``delta`` TRL's loss of a
negative-advantage token is itself unbounded.
"""

from __future__ import annotations

import functools
import math
import types
import weakref

import torch
import trl
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor
from trl.trainer.utils import nanmax, nanmin

from sfpo_kernels import linear_logprob_entropy
from sfpo_kernels.grpo_math import agg_loss, grpo_loss_from_log_probs
from sfpo_kernels.loss_options import GRPOLossOptions, LossOptionError
from sfpo_train.trainer.lm_head import base_model, unfusable_reason

# TRL's loss_type -> verl's loss_agg_mode (the factor on top is in _normaliser).
LOSS_AGG_MODES = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "token-sum",
    "dapo": "token-sum",
    "luspo": "token-sum",
}
# TRL scales the head's logits by these text-config entries too (add_fused_lm_head); beyond lm_head.LOGIT_TRANSFORMS.
TRL_LOGIT_SCALES = ("output_multiplier", "lm_head_multiplier")
# Inputs that only vision-language models carry.
MULTIMODAL_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
# The trl release whose GRPOTrainer._compute_loss this module reproduces (it reads that class's attributes).
TRL_VERSION = "1.16.0"
# The keyword the patched forward takes to return the backbone's output instead of logits.
HIDDEN_STATE_KWARG = "sfpo_last_hidden_state"


# --------------------------------------------------------------------------- settings


def loss_options(
    *,
    loss_type: str,
    importance_sampling_level: str,
    epsilon: float,
    epsilon_high: float | None,
    delta: float | None,
    temperature: float,
) -> GRPOLossOptions:
    """:func:`fused_loss_options` on the named settings (``GRPOConfig``'s names), the trainer's or the config's."""
    if loss_type not in LOSS_AGG_MODES:
        raise ValueError(
            f"GRPOConfig.loss_type={loss_type!r} has no counterpart in the fused loss (verl's clipped policy "
            f"gradient); supported: {', '.join(LOSS_AGG_MODES)}"
        )
    if importance_sampling_level != "token":
        raise ValueError(
            f"GRPOConfig.importance_sampling_level={importance_sampling_level!r} is not supported by the fused loss "
            "(its ratio is per token); use 'token'"
        )
    high = epsilon if epsilon_high is None else epsilon_high
    if delta is not None and not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 1.0 + high):
        raise ValueError(
            f"GRPOConfig.delta={delta!r}: the fused loss needs delta > 1 + epsilon_high = {1.0 + high!r}, where TRL's "
            "two-sided clip equals verl's dual clip (or delta=None)"
        )
    fields = {"temperature": "temperature", "clip_ratio_low": "epsilon", "clip_ratio_high": "epsilon_high"}
    try:
        return GRPOLossOptions(
            temperature=temperature,
            clip_ratio_low=epsilon,
            clip_ratio_high=high,
            clip_ratio_c=None if delta is None else float(delta),
            kl_coef=0.0,
            entropy_coef=0.0,
            loss_agg_mode=LOSS_AGG_MODES[loss_type],
        )
    except LossOptionError as e:
        key = fields.get(e.option, e.option)
        if e.option == "clip_ratio_high" and epsilon_high is None:
            key = "epsilon"
        raise ValueError(f"GRPOConfig.{key}={e.value!r} is not supported by the fused loss: {e}") from None


def fused_loss_options(args) -> GRPOLossOptions:
    """The :class:`GRPOLossOptions` reproducing ``args``' (a ``trl.GRPOConfig``) policy-gradient term.

    Raises ``ValueError`` naming the ``GRPOConfig`` field and its value for a
    setting the fused loss cannot reproduce exactly (see the module docstring).
    ``kl_coef`` and ``entropy_coef`` are 0: :func:`compute_fused_loss` adds TRL's
    KL term and entropy bonus itself.
    """
    return loss_options(
        loss_type=args.loss_type,
        importance_sampling_level=args.importance_sampling_level,
        epsilon=args.epsilon,
        epsilon_high=args.epsilon_high,
        delta=args.delta,
        temperature=args.temperature,
    )


def _trainer_options(trainer) -> GRPOLossOptions:
    """The options from the trainer's attributes, the ones ``GRPOTrainer._compute_loss`` reads."""
    return loss_options(
        loss_type=trainer.loss_type,
        importance_sampling_level=trainer.importance_sampling_level,
        epsilon=trainer.epsilon_low,
        epsilon_high=trainer.epsilon_high,
        delta=trainer.args.delta,
        temperature=trainer.temperature,
    )


_CAUSAL_LMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _causal_lm(model):
    """The transformers model under a PEFT wrapper (TRL patches that one).

    Resolved once per model: accelerate's ``is_peft_model`` looks the package up on every
    call, which cost ~8% of a micro-step of the embedded model (measured on the CPU).
    """
    lm = _CAUSAL_LMS.get(model)
    if lm is None:
        lm = model.get_base_model() if is_peft_model(model) else model
        _CAUSAL_LMS[model] = lm
    return lm


def check_fused_model(trainer) -> None:
    """``ValueError`` unless the fused head computes ``trainer.model``'s own log-probs (see the module docstring)."""
    if getattr(trainer, "_is_vlm", False):
        raise ValueError(
            "the fused loss takes text-only causal LMs; this trainer's processing_class is a ProcessorMixin "
            "(a vision-language model)"
        )
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError(
            f"GRPOConfig.router_aux_loss_coef: the fused loss has no MoE router auxiliary loss (coefficient "
            f"{trainer.router_aux_loss_coef!r}); set router_aux_loss_coef=0.0"
        )
    model = trainer.model
    if is_peft_model(model) and model.active_peft_config.is_prompt_learning:
        raise ValueError(
            f"the fused loss does not support prompt-learning PEFT ({type(model.active_peft_config).__name__}): "
            "it changes the model's inputs; use an adapter such as LoRA"
        )
    lm = _causal_lm(model)
    reason = unfusable_reason(lm)
    text_config = lm.config.get_text_config()
    for key in TRL_LOGIT_SCALES:
        value = getattr(text_config, key, None)
        if reason is None and value is not None and value != 1.0:
            reason = f"{type(lm).__name__} transforms its logits after the head ({key}={value!r})"
    if reason is not None:
        raise ValueError(f"the fused loss cannot replace this model's LM head: {reason}")


def install_hidden_state_forward(model) -> None:
    """Let ``model(..., sfpo_last_hidden_state=True)`` return the backbone's output (no LM head); idempotent.

    Patched on the instance of the transformers model (under PEFT), as TRL patches
    its own fused head, so the call goes through every wrapper (accelerate's
    DDP, PEFT's adapters) like TRL's forward does; without the keyword the
    forward is the one it replaces (generation is unchanged).
    """
    lm = _causal_lm(model)
    if getattr(lm, "_sfpo_hidden_state_forward", False):
        return
    inner_forward = lm.forward

    @functools.wraps(type(lm).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, **kwargs):
        if not kwargs.pop(HIDDEN_STATE_KWARG, False):
            return inner_forward(*args, **kwargs)
        if kwargs.pop("labels", None) is not None:
            raise ValueError(f"{HIDDEN_STATE_KWARG}=True returns hidden states, not a loss: pass no labels")
        kwargs["use_cache"] = False
        return base_model(self)(*args, **kwargs)

    lm.forward = types.MethodType(forward, lm)
    lm._sfpo_hidden_state_forward = True


def prepare_fused_loss(trainer) -> GRPOLossOptions:
    """Everything :func:`compute_fused_loss` needs, checked once: call it at the end of the trainer's ``__init__``.

    Returns :func:`fused_loss_options` of ``trainer.args``; raises ``ValueError``
    for a setting or model the fused loss cannot reproduce (``RuntimeError`` under
    another trl than :data:`TRL_VERSION`); patches the model's
    forward (:func:`install_hidden_state_forward`).
    """
    if trl.__version__ != TRL_VERSION:
        raise RuntimeError(
            f"the fused loss reproduces trl {TRL_VERSION}'s GRPOTrainer loss; trl {trl.__version__} is installed"
        )
    options = fused_loss_options(trainer.args)
    check_fused_model(trainer)
    install_hidden_state_forward(trainer.model)
    return options


# --------------------------------------------------------------------------- the loss


def _completion_hidden(trainer, model, inputs) -> torch.Tensor:
    """``[B, C, H]`` last hidden states that predict the completion tokens (TRL's ``logits_to_keep`` positions)."""
    present = [key for key in MULTIMODAL_INPUTS if inputs.get(key) is not None]
    if present:
        raise ValueError(f"the fused loss takes text-only inputs; these inputs carry {', '.join(present)}")
    install_hidden_state_forward(trainer.model)
    completion_ids = inputs["completion_ids"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with trainer.accelerator.autocast():
        out = model(input_ids=input_ids, attention_mask=attention_mask, **{HIDDEN_STATE_KWARG: True})
    length = completion_ids.shape[1]
    return out.last_hidden_state[:, -(length + 1) : -1]


def _head_log_probs(trainer, model, inputs, keep: torch.Tensor, temperature: float, chunk_size, backend):
    """``(log_probs, entropy)`` ``[B, C]`` fp32 of the completion tokens through the fused head (0 where not ``keep``)."""
    hidden = _completion_hidden(trainer, model, inputs)
    head = _causal_lm(trainer.model).get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):  # TRL gathers a sharded head for each forward; here it is refused
        raise ValueError("the fused loss needs the whole LM head on one device; its weight is a sharded DTensor (FSDP)")
    if trainer.args.cast_lm_head_to_fp32:  # as TRL: fp32 hidden states and head, outside autocast
        hidden = hidden.float()
        context = torch.autocast(hidden.device.type, enabled=False)
    else:
        context = trainer.accelerator.autocast()
    hidden = hidden.to(weight.device)
    with context:
        return linear_logprob_entropy(
            hidden,
            weight,
            inputs["completion_ids"].to(weight.device),
            temperature,
            bias=bias,
            response_mask=keep,
            chunk_size=chunk_size,
            backend=backend,
        )


def _normaliser(trainer, loss_type: str, mask: torch.Tensor, inputs, mode: str):
    """``(factor, accumulation)``: TRL's loss is ``agg(x) * factor / accumulation`` (see the module docstring)."""
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    rows = mask.shape[0]
    if loss_type == "grpo":
        return mask.any(-1).sum().to(torch.float32) / rows, accumulation
    if loss_type == "bnpo":
        return 1.0, accumulation
    if loss_type == "dr_grpo":
        return 1.0 / (rows * trainer.max_completion_length), accumulation
    if loss_type == "luspo":
        return 1.0 / rows, accumulation
    # dapo: num_items_in_batch counts the generation batch over all processes; scaled to one accumulation window
    tokens = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
    if mode == "train":
        tokens = tokens * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
    return 1.0 / tokens, 1.0


def _token_weights(trainer, inputs, log_probs, old, advantages, mask, entropy_mask):
    """The product of the non-negative weights TRL multiplies into the policy term (None: there are none)."""
    weights = []
    if trainer.off_policy_mask_threshold is not None:  # [B, 1]: 0 drops a sequence
        weights.append(
            trainer.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=log_probs,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old),
                mask=mask,
                off_policy_threshold=trainer.off_policy_mask_threshold,
            )
        )
    if entropy_mask is not None:
        weights.append(entropy_mask)
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:  # [B, T] or [B, 1]
        weights.append(inputs["importance_sampling_ratio"])
    return functools.reduce(torch.mul, weights) if weights else None


def compute_fused_loss(
    trainer, model, inputs, *, chunk_size: int | None = None, backend: str | None = None, on_entropy=None
) -> torch.Tensor:
    """``GRPOTrainer._compute_loss(model, inputs)`` on sfpo's fused head: TRL's loss value, gradients and metrics.

    ``trainer`` is the ``trl.GRPOTrainer`` (its settings, accelerator and
    metrics), ``model`` the module ``compute_loss`` receives (possibly wrapped
    by accelerate), ``inputs`` one micro-batch from ``_prepare_inputs``. Reads the
    trainer's attributes as TRL's ``_compute_loss`` does (``entropy_coef`` moves
    with ``use_adaptive_entropy``) and updates the adaptive entropy controller
    as TRL does. ``chunk_size`` (rows of logits alive at once) and ``backend``
    go to :func:`sfpo_kernels.linear_logprob_entropy` (None: its defaults).
    ``on_entropy(entropy, mask)``, if given, receives the detached ``[B, C]`` token
    entropies and the loss's token mask (SFPO's trigger reads them).
    Raises ``ValueError`` for what the fused loss cannot reproduce (see the
    module docstring; :func:`prepare_fused_loss` checks it up front).
    """
    options = _trainer_options(trainer)
    mode = "train" if trainer.model.training else "eval"
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    keep = mask.bool()
    log_probs, entropy = _head_log_probs(trainer, model, inputs, keep, options.temperature, chunk_size, backend)
    mask = mask.to(log_probs.device)
    if on_entropy is not None:
        on_entropy(entropy.detach(), mask)

    entropy_mask = None
    if trainer.top_entropy_quantile < 1.0:
        entropy_mask = trainer.get_high_entropy_mask(entropy.detach(), mask, 1 - trainer.top_entropy_quantile)

    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = inputs.get("old_per_token_logps")
    old = log_probs.detach() if old is None else old
    weights = _token_weights(trainer, inputs, log_probs, old, advantages, mask, entropy_mask)
    folded = advantages.expand_as(log_probs) if weights is None else advantages * weights
    pg, _ = grpo_loss_from_log_probs(log_probs, entropy, old, folded, keep, options=options)

    loss_type = trainer.loss_type
    factor, accumulation = _normaliser(trainer, loss_type, keep, inputs, mode)
    loss = pg * factor
    ratio = torch.exp(log_probs - old)  # TRL's coef_1, unclamped (its KL correction and clip metrics read it)
    per_token_kl = None
    if trainer.beta != 0.0:
        d = inputs["ref_per_token_logps"] - log_probs
        per_token_kl = torch.exp(d) - d - 1
        if trainer.args.use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        loss = loss + trainer.beta * agg_loss(per_token_kl, keep, options.loss_agg_mode) * factor
    policy_loss = loss.detach()
    loss = loss / accumulation

    if trainer._entropy_bonus_enabled:
        loss = _entropy_bonus(trainer, loss, entropy, mask, entropy_mask, policy_loss, mode)

    _log_metrics(trainer, mode, mask, entropy, ratio, advantages, per_token_kl)
    return loss


def _entropy_bonus(trainer, loss, entropy, mask, entropy_mask, policy_loss, mode):
    """TRL's entropy bonus (static or adaptive ``entropy_coef``) subtracted from ``loss``, and its controller step."""
    effective = mask if entropy_mask is None else mask * entropy_mask
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    # A token mean over the tokens the loss acts on, whatever the loss_type (TRL's documented objective).
    entropy_loss = agg_loss(entropy, effective.bool(), "token-mean") / accumulation
    if trainer.use_adaptive_entropy:  # the coefficient of the previous optimizer step, for the whole window
        coef = trainer.entropy_coef if trainer._last_world_entropy <= trainer.args.entropy_target else 0.0
    else:
        coef = trainer.entropy_coef
    loss = loss - coef * entropy_loss
    trainer._metrics[mode]["policy_loss"].append(trainer.accelerator.gather(policy_loss).nanmean().item())

    if trainer.use_adaptive_entropy and mode == "train":
        stats = torch.stack([(entropy * effective).sum(), effective.sum().to(entropy.dtype)]).detach()
        window = trainer._entropy_window_stats
        trainer._entropy_window_stats = stats if window is None else window + stats
        if trainer.accelerator.sync_gradients:  # the window's last micro-batch: step the controller
            totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
            world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
            args = trainer.args
            if world_entropy <= args.entropy_target:
                trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
            else:
                trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
            trainer._last_world_entropy = world_entropy
            trainer._entropy_window_stats = None
    if mode == "train" and trainer.accelerator.sync_gradients:
        trainer._metrics[mode]["entropy_coef"].append(trainer.entropy_coef)
    return loss


def _log_metrics(trainer, mode, mask, entropy, ratio, advantages, per_token_kl) -> None:
    """The metrics TRL's ``_compute_loss`` logs for the supported loss types, from the head's per-token values."""
    metrics = trainer._metrics[mode]
    mask = mask.to(entropy.dtype)

    def global_masked_mean(x: torch.Tensor) -> float:
        local = torch.stack([(x * mask).sum(), mask.sum()])
        totals = trainer.accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def gathered_row_means(x: torch.Tensor) -> torch.Tensor:
        return trainer.accelerator.gather((x * mask).sum(-1) / mask.sum(-1))  # NaN for an empty row, as TRL

    if per_token_kl is not None:
        metrics["kl"].append(global_masked_mean(per_token_kl.detach()))
    metrics["entropy"].append(global_masked_mean(entropy.detach()))
    ratio = ratio.detach()  # TRL clamps it at delta first: no change here, where delta > 1 + epsilon_high
    low = ((ratio < 1 - trainer.epsilon_low) & (advantages < 0)).to(mask.dtype)
    high = ((ratio > 1 + trainer.epsilon_high) & (advantages > 0)).to(mask.dtype)
    metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
    metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
    metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
    metrics["clip_ratio/low_min"].append(nanmin(gathered_row_means(low)).item())
    metrics["clip_ratio/high_max"].append(nanmax(gathered_row_means(high)).item())


__all__ = [
    "LOSS_AGG_MODES",
    "check_fused_model",
    "compute_fused_loss",
    "fused_loss_options",
    "install_hidden_state_forward",
    "prepare_fused_loss",
]
