"""Whether a causal LM's head can be fused into the loss, and its parts: ``lm_head(base_model(...)[0])``.

``actor_rollout_ref.model.fused_lm_head`` runs the base model for its last
hidden state and hands it, with the head's weight and bias, to
:func:`sfpo_kernels.linear_grpo_loss` / :func:`sfpo_kernels.linear_logprob_entropy`
instead of taking ``model(...).logits``. That is the model's own forward only
when the logits are exactly ``head(hidden)`` for a plain ``nn.Linear`` head:
models that soft-cap or scale their logits (Gemma-2/3's
``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
``logits_scaling``) cannot be fused and say so.
"""

from __future__ import annotations

import torch

# transformers config entries that change the logits after the head (value None / 1 means "off")
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def unfusable_reason(model) -> str | None:
    """Why ``model``'s logits are not ``lm_head(base_model(...).last_hidden_state)``, or None when they are."""
    name = type(model).__name__
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"{name}'s output embedding is {type(head).__name__}, not a plain torch.nn.Linear"
    prefix = getattr(model, "base_model_prefix", "")
    if not isinstance(getattr(model, prefix, None), torch.nn.Module):
        return f"{name} has no base model at .{prefix or '<base_model_prefix>'}"
    config = getattr(model, "config", None)
    for key, off in LOGIT_TRANSFORMS.items():
        value = getattr(config, key, off)
        if value is not None and value != off:
            return f"{name} transforms its logits after the head ({key}={value!r})"
    return None


def use_fused_head(setting, model, device: torch.device) -> bool:
    """``fused_lm_head`` resolved: ``auto`` is on for CUDA when the head can be fused; ``true`` on a head that
    cannot is a ``ValueError`` saying why."""
    reason = unfusable_reason(model)
    if setting == "auto":
        return device.type == "cuda" and reason is None
    if setting is True and reason is not None:
        raise ValueError(f"actor_rollout_ref.model.fused_lm_head=true cannot fuse this model's head: {reason}")
    return bool(setting)


def base_model(model) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix)
