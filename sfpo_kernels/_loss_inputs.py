"""The argument checks the GRPO loss entry points share, on logits ``[..., V]`` or hidden states ``[..., H]``.

:func:`sfpo_kernels.grpo_loss` and :func:`sfpo_kernels.linear_grpo_loss` check
their own main input (dtype, strides, the LM head) and then call these: every
per-token tensor is real (not complex), shaped like that input without its last
dimension and on its device, ``kl_coef`` needs reference log-probs, the ``seq-*`` modes need
``[B, T, ...]`` sequences, and the labels at response positions lie in ``[0, V)``.
Each failure is a ``ValueError`` naming the argument, before any kernel runs.
"""

from __future__ import annotations

import torch

from sfpo_kernels.grpo_math import check_real, response_positions
from sfpo_kernels.loss_options import GRPOLossOptions


def shape_of(t) -> object:
    """``t``'s shape as a tuple, or its type's name when it is not a tensor (for error messages)."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_like(name: str, t, x: torch.Tensor, x_name: str, dim: str) -> None:
    """``t`` is a real tensor shaped like ``x`` (called ``x_name``) without its last dimension ``dim``, on its
    device."""
    if not isinstance(t, torch.Tensor) or t.shape != x.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(x.shape[:-1])} ({x_name} without {dim}), got {shape_of(t)}")
    check_real(name, t)
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} on {x.device}")


def check_label_tensor(labels, x: torch.Tensor, x_name: str, dim: str) -> None:
    """``labels``: an integer tensor shaped like ``x`` without ``dim``, on its device."""
    if not isinstance(labels, torch.Tensor) or labels.shape != x.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(x.shape[:-1])} ({x_name} without {dim}), got {shape_of(labels)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != x.device:
        raise ValueError(f"labels are on {labels.device} but {x_name} on {x.device}")


def check_loss_inputs(
    x: torch.Tensor,
    x_name: str,
    dim: str,
    old_log_probs,
    advantages,
    response_mask,
    ref_log_probs,
    options: GRPOLossOptions,
) -> None:
    """The per-token tensors against ``x`` (see :func:`check_like`), then what ``options`` asks of them."""
    named = {"old_log_probs": old_log_probs, "advantages": advantages, "response_mask": response_mask}
    if ref_log_probs is not None:
        named["ref_log_probs"] = ref_log_probs
    for name, t in named.items():
        check_like(name, t, x, x_name, dim)
    if options.kl_coef != 0.0 and ref_log_probs is None:
        raise ValueError(f"kl_coef={options.kl_coef!r} needs ref_log_probs")
    if options.loss_agg_mode.startswith("seq-") and x.dim() != 3:
        raise ValueError(
            f"loss_agg_mode={options.loss_agg_mode!r} needs [B, T, {dim}] {x_name} (sequences), "
            f"got packed {tuple(x.shape)}"
        )


def response_labels(
    labels: torch.Tensor, response_mask: torch.Tensor, vocab: int, check: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels as int64, response positions)``; with ``check``, a label outside ``[0, vocab)`` at a response
    position raises ``ValueError`` (one device-to-host sync)."""
    labels = labels.to(torch.int64)
    keep = response_positions(response_mask)
    if check:
        bad = keep & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"labels{list(index)} = {int(labels[index])} at a response position is outside [0, {vocab})"
            )
    return labels, keep
