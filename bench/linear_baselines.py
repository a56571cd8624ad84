"""What the fused LM head + GRPO loss is measured against: verl's FusedLinearForPPO and Liger's fused-linear GRPO.

- :func:`verl_fused_linear_loss`: verl 0.9.1's ``FusedLinearForPPO`` (chunks of
  512 tokens, fp32 logits per chunk, every token of the batch) for the
  log-probs and entropy, then the same O(N) policy-loss math as every row
  (:func:`sfpo_kernels.grpo_math.grpo_loss_from_log_probs`).
- :func:`liger_fused_linear_loss`: Liger-Kernel's ``LigerFusedLinearGRPOLoss``
  (chunked over the batch rows, no entropy term, no dual clip); None where
  ``liger_kernel`` is not importable or its signature is not the 0.5+ one.
- :class:`LargestTensor`: the largest tensor any op returns while active, the
  CPU's stand-in for peak memory (``torch.cuda`` tracks the real peak on a GPU).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from sfpo_kernels.grpo_math import grpo_loss_from_log_probs
from sfpo_kernels.loss_options import GRPOLossOptions, resolve_options

# The tests' dispatch probe, one definition for both (the repository root is on sys.path under pytest and
# for scripts run as ``python -m bench....`` from it).
from tests.helpers.alloc_probe import LargestAllocation as LargestTensor


def largest_tensor(fn: Callable[[], object]) -> dict[str, object]:
    with LargestTensor() as probe:
        fn()
    return {"largest_tensor_bytes": probe.largest, "largest_tensor_mib": round(probe.largest / 2**20, 2)}


# --------------------------------------------------------------------------- verl


def verl_fused_linear_fn() -> Callable | None:
    try:
        from verl.utils.experimental.torch_functional import FusedLinearForPPO
    except ImportError:
        return None
    return FusedLinearForPPO(chunk_size=512, impl_backend="torch")


def verl_fused_linear_loss(
    fused_linear,
    hidden,
    weight,
    labels,
    old_log_probs,
    advantages,
    response_mask,
    *,
    ref_log_probs=None,
    options: GRPOLossOptions | None = None,
    **option_overrides,
) -> torch.Tensor:
    """verl's chunked head (all tokens; no bias) then the shared policy-loss math: the scalar loss.

    Options as ``sfpo_kernels.linear_grpo_loss`` takes them.
    """
    options = resolve_options(options, option_overrides, "verl_fused_linear_loss")
    log_probs, entropy = fused_linear(hidden, weight, labels, temperature=options.temperature)
    loss, _ = grpo_loss_from_log_probs(
        log_probs, entropy, old_log_probs, advantages, response_mask, ref_log_probs=ref_log_probs, options=options
    )
    return loss


# --------------------------------------------------------------------------- Liger


LIGER_FORWARD = ("_input", "lin_weight", "selected_token_ids", "attention_mask", "advantages")


@functools.cache
def liger_loss_class() -> type | None:
    """``LigerFusedLinearGRPOLoss`` when importable with the forward ``(_input, lin_weight, selected_token_ids,
    attention_mask, advantages, ...)`` of liger-kernel 0.5+, else None."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None
    params = list(inspect.signature(LigerFusedLinearGRPOLoss.forward).parameters)[1:]
    return LigerFusedLinearGRPOLoss if params[: len(LIGER_FORWARD)] == list(LIGER_FORWARD) else None


def liger_fused_linear_loss(
    hidden,
    weight,
    labels,
    old_log_probs,
    seq_advantages,
    response_mask,
    *,
    temperature,
    clip_ratio_low,
    clip_ratio_high,
    chunk_size=1,
) -> Callable[[], torch.Tensor]:
    """A call of Liger's fused-linear GRPO loss (no KL: ``beta=0``, no reference model); ``hidden`` ``[B, T, H]``."""
    cls = liger_loss_class()
    wanted = {
        "beta": 0.0,
        "compiled": False,
        "use_ref_model": False,
        "chunk_size": chunk_size,
        "epsilon_low": clip_ratio_low,
        "epsilon_high": clip_ratio_high,
        "temperature": temperature,
        "loss_type": "bnpo",
    }  # bnpo: the token mean over the batch, as token-mean
    params = inspect.signature(cls.__init__).parameters
    module = cls(**{k: v for k, v in wanted.items() if k in params})
    mask = response_mask.to(torch.int64)

    def call() -> torch.Tensor:
        out = module(hidden, weight, labels, mask, seq_advantages, old_per_token_logps=old_log_probs)
        return out[0] if isinstance(out, tuple) else out

    return call
