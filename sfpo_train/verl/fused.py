"""sfpo's kernels inside verl's actor: the log-prob path and a registered policy loss.

verl's FSDP engine computes per-token log-probs and entropy in one of two ways:
eager (``logits -> fp32 log_softmax -> gather``, plus a second pass for the
entropy) or, with ``model.use_fused_kernels=True``, through a patched
``forward`` of the HF model that returns ``log_probs`` and ``entropy``
directly. We take the second door: :func:`install_logprob_forward` replaces
the forward verl installed (its dense text-model one) with
:func:`forward_with_sfpo_kernels`, which runs the base model and hands its
last hidden state and the LM head's weight (and bias) to
``sfpo_kernels.linear_logprob_entropy``: the head runs chunk by chunk, each
chunk's logits go through one Triton pass over the vocabulary forward and one
backward (dlogits written in place), so no more than one chunk of logits ever
exists -- never more than verl's own ``FusedLinearForPPO`` holds (512 rows of
fp32 logits; ours: the rows that fit 256 MiB in the compute dtype). The same
forward serves the old-log-prob pass, the reference pass and training.

What is patched, and only with ``fused_kernels`` on (:func:`sfpo_train.verl.config.resolve_fused_kernels`):

- the ``forward`` of the HF model class on which verl itself patched its dense
  fused forward (``Qwen2ForCausalLM.forward``, say), in the actor worker's process,
  once its models are built (``SFPOActorRolloutRefWorker.init_model`` calls
  :func:`install_logprob_forward`): verl offers no hook to choose that forward,
  and replacing verl's replacement is the only way in. It changes the class for
  every instance in that process (actor and reference model alike), and only
  where verl had already patched it;
- during each such forward, the LM head's *instance* ``forward`` for one call
  (:func:`call_as_forward`), so that FSDP's hooks gather the head's weight; put
  back right after.

Nothing else of verl's or transformers' code is changed; the lookup of verl's
forward and the class assignment are in
:func:`sfpo_train.verl.verl_internals.replace_dense_fused_forward`.

The per-token policy-gradient math runs in :func:`compute_policy_loss_sfpo`,
registered with verl as the policy loss ``"sfpo_vanilla"``: our
``policy_loss_terms`` (GRPO's clipped ratio with dual clip, verl's
conventions), aggregated with verl's own ``agg_loss`` so the global-batch
normalisation across micro-batches and data-parallel ranks is verl's.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from verl.trainer.ppo.core_algos import agg_loss

import sfpo_kernels
from sfpo_kernels import grpo_math
from sfpo_kernels.loss_options import DEFAULT_LOSS_OPTIONS
from sfpo_train.verl import verl_internals

POLICY_LOSS_NAME = "sfpo_vanilla"
logger = logging.getLogger(__name__)


@verl_internals.register_policy_loss(POLICY_LOSS_NAME)
def compute_policy_loss_sfpo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's ``vanilla`` policy loss computed by ``sfpo_kernels.grpo_math.policy_loss_terms``.

    All tensors ``[B, T]`` (padded responses). Per token, with
    ``r = exp(clamp(logp - old, -20, 20))``: ``max(-A r, -A clip(r, 1-low, 1+high))``,
    and for ``A < 0`` at most ``-A clip_ratio_c``; times ``rollout_is_weights`` when
    given; aggregated by verl's ``agg_loss`` with ``config.global_batch_info``.
    Returns ``(pg_loss, metrics)`` with verl's metric names.
    """
    if config is None:
        raise ValueError("compute_policy_loss_sfpo needs the actor config (config=None)")
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    clip_c = config.get("clip_ratio_c", DEFAULT_LOSS_OPTIONS.clip_ratio_c)
    pg_losses, terms = grpo_math.policy_loss_terms(
        log_prob, old_log_prob.to(log_prob.dtype), advantages.to(log_prob.dtype), response_mask, low, high, clip_c
    )
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(
        loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **config.global_batch_info
    )
    # verl logs python floats per micro-batch; one sync for all three.
    values = torch.stack([terms["pg_clipfrac"], terms["ppo_kl"], terms["pg_clipfrac_lower"]]).tolist()
    return pg_loss, dict(zip(("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"), values))


def forward_with_sfpo_kernels(
    self,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values=None,
    inputs_embeds: torch.FloatTensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    cache_position: torch.LongTensor | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    temperature: float = 1.0,
    shift_labels: torch.LongTensor | None = None,
    **kwargs,
) -> Any:
    """HF causal-LM forward returning ``log_probs`` and ``entropy`` ``[1, N]`` (or ``[B, T]``) instead of logits.

    Labels: ``shift_labels`` when verl passes them (already rolled over the
    packed sequence), else ``labels`` or ``input_ids`` rolled left by one, as
    verl's own fused forwards do. ``log_probs[t] = log softmax(z_t / T)[y_t]``,
    ``entropy[t] = H(softmax(z_t / T))``, ``z = lm_head(hidden)``, by
    ``sfpo_kernels.linear_logprob_entropy`` (the logits exist one chunk at a time).
    """
    forward_base_model, causal_lm_output = verl_internals.dense_forward_parts()
    if return_dict is False:
        raise ValueError("forward_with_sfpo_kernels returns a CausalLMOutputForPPO; return_dict=False is not supported")
    outputs = forward_base_model(
        self,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        cache_position=cache_position,
    )
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("forward_with_sfpo_kernels needs input_ids, labels or shift_labels")
    hidden, temperature = outputs[0], float(temperature)
    backend = "torch" if getattr(self, CHECK_ATTR, None) == "fallback" else None
    log_probs, entropy = call_as_forward(self.lm_head, _linear_logprob_entropy, hidden, rolled, temperature, backend)
    if backend is None and not _first_use_check(self, hidden, rolled, temperature, log_probs, entropy):
        log_probs, entropy = call_as_forward(
            self.lm_head, _linear_logprob_entropy, hidden, rolled, temperature, "torch"
        )
    return causal_lm_output(
        log_probs=log_probs,
        entropy=entropy,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )


def _linear_logprob_entropy(hidden, weight, labels, temperature, backend, bias=None):
    return sfpo_kernels.linear_logprob_entropy(hidden, weight, labels, temperature, bias=bias, backend=backend)


def call_as_forward(head: torch.nn.Module, fn, hidden: torch.Tensor, *args):
    """``fn(hidden, head.weight, *args, bias=head.bias)``, run as ``head``'s own forward.

    verl's FSDP2 wraps an untied ``lm_head`` on its own: outside its forward its
    weight is a sharded DTensor. Called through ``head(...)``, the hooks FSDP
    put on it run as for ``head(hidden)``: the parameters are gathered before,
    freed after, gathered again for the backward, and their gradient is
    reduce-scattered. Without a wrapper this is just the call.
    """
    own = head.__dict__.get("forward")

    def forward(h, *a):
        return fn(h, head.weight, *a, bias=head.bias)

    head.forward = forward
    try:
        return head(hidden, *args)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def install_logprob_forward(module: torch.nn.Module) -> type:
    """Replace verl's fused forward on ``module``'s HF class with :func:`forward_with_sfpo_kernels` (a class patch).

    verl patches the class (``model.__class__.forward``) before FSDP wraps the
    model in a generated subclass, so the class to patch is the one in the MRO
    whose ``forward`` is verl's dense fused forward. Returns that class.
    Raises ``ValueError`` when verl did not install one (``use_fused_kernels``
    off, or a model with its own forward such as the vision-language ones).
    """
    return verl_internals.replace_dense_fused_forward(module, forward_with_sfpo_kernels)


# --------------------------------------------------------------------------- first-use check

CHECK_ATTR = "_sfpo_fused_check"  # on the HF model instance: None (trusted), "auto", "strict", "passed", "fallback"
CHECK_ROWS = 256  # tokens compared, once: their eager logits are at most 256 x V fp32 (155 MiB at V = 151936)
# |fused - eager| <= atol + rtol |eager|. fp32 logits: both sides are fp32 reductions of the same logits,
# a few ulps apart. 16-bit logits: the chunked head may round a logit one bf16 ulp (2^-8 relative) away from
# the full matmul, which moves a log-prob by up to ~2^-7 |z|; a real fault (a wrong row, label or
# temperature, a miscompiled kernel) is off by O(1).
CHECK_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 2e-2), torch.float16: (2e-2, 1e-2)}


def arm_first_use_check(module: torch.nn.Module, strict: bool) -> None:
    """The next fused forward of ``module`` compares itself with verl's eager log-probs and entropy.

    ``strict`` (``fused_kernels=true``): a mismatch raises. Otherwise
    (``auto``): it warns and this module falls back to the same chunked head
    with the vocabulary pass in plain torch for the rest of the run.
    """
    setattr(module, CHECK_ATTR, "strict" if strict else "auto")


def eager_mismatch(log_probs, entropy, logits, labels, temperature: float) -> str | None:
    """What differs between the fused ``(log_probs, entropy) [n]`` and verl's eager numbers on ``logits [n, V]``.

    verl's eager path: ``logits / T``, then ``logprobs_from_logits`` and
    ``entropy_from_logits`` (verl.utils.torch_functional). Rows whose label is
    outside the vocabulary (padding) are not compared. ``None`` when they agree
    within :data:`CHECK_TOLERANCES` of the logits' dtype.
    """
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    scaled = logits.float() / temperature
    valid = (labels >= 0) & (labels < logits.shape[-1])
    want_lp = logprobs_from_logits(scaled, torch.where(valid, labels, 0), inplace_backward=False)
    want_h = entropy_from_logits(scaled)
    atol, rtol = CHECK_TOLERANCES.get(logits.dtype, CHECK_TOLERANCES[torch.float32])
    for name, got, want in (("log_probs", log_probs, want_lp), ("entropy", entropy, want_h)):
        got, want = got.float()[valid], want.float()[valid]
        err = (got - want).abs() - rtol * want.abs()
        if got.numel() and not bool((err <= atol).all()):  # NaN fails too
            worst = int(torch.nan_to_num(err, nan=float("inf")).argmax())
            return (
                f"{name} differ at {int((~(err <= atol)).sum())} of {got.numel()} tokens (worst: fused "
                f"{float(got[worst]):.6g} vs eager {float(want[worst]):.6g}; tolerance {atol:g} + {rtol:g}|eager|)"
            )
    return None


def _first_use_check(model, hidden, labels, temperature, log_probs, entropy) -> bool:
    """Run the armed check on the first :data:`CHECK_ROWS` tokens; True when the fused values stand."""
    mode = getattr(model, CHECK_ATTR, None)
    if mode not in ("auto", "strict"):
        return mode != "fallback"
    flat_h = hidden.reshape(-1, hidden.shape[-1])[:CHECK_ROWS]
    flat_y = labels.reshape(-1)[:CHECK_ROWS]
    with torch.no_grad():
        logits = model.lm_head(flat_h.detach())  # as verl's eager path makes them (FSDP gathers the head)
        problem = eager_mismatch(
            log_probs.reshape(-1)[:CHECK_ROWS].detach(),
            entropy.reshape(-1)[:CHECK_ROWS].detach(),
            logits,
            flat_y,
            temperature,
        )
    if problem is None:
        setattr(model, CHECK_ATTR, "passed")
        logger.info("fused_kernels: the first fused forward matches verl's eager log-probs and entropy")
        return True
    if mode == "strict":
        raise RuntimeError(f"fused_kernels=true: the fused log-probs disagree with verl's eager ones: {problem}")
    setattr(model, CHECK_ATTR, "fallback")
    warnings.warn(
        f"fused_kernels=auto: the fused Triton pass disagrees with verl's eager numbers ({problem}); "
        "falling back to the chunked head with the vocabulary pass in torch for this run",
        RuntimeWarning,
        stacklevel=2,
    )
    return False
