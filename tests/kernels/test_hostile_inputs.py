"""The kernels' entry points on inputs a careless or unusual caller hands them.

- a complex per-token tensor (mask, advantages, log-probs): refused, not silently
  made real;
- a micro-batch with no response token at all (``T = 0``): every aggregation mode
  gives the loss 0, ``seq-mean-token-sum-norm`` included;
- tensors whose storage was freed (``t.untyped_storage().resize_(0)``, as FSDP does
  with a parameter between uses): ``snapshot``, ``reposition_`` and
  ``Snapshot.restore_`` refuse them before anything is written.
"""

from __future__ import annotations

import pytest
import torch

import sfpo_kernels
from sfpo_kernels import reference
from sfpo_kernels.loss_options import AGG_MODES

B, T, V, H = 2, 3, 7, 4
COMPLEX = torch.complex64


def _loss_inputs(t: int = T):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, t, V, generator=g)
    hidden = torch.randn(B, t, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (B, t), generator=g)
    old = torch.randn(B, t, generator=g) - 2.0
    adv = torch.randn(B, t, generator=g)
    mask = torch.ones(B, t)
    return logits, hidden, weight, labels, old, adv, mask


def _losses(inputs, **overrides):
    """Every GRPO loss entry point on ``inputs``: name -> a function of (old, adv, mask, ref)."""
    logits, hidden, weight, labels, *_ = inputs
    return {
        "grpo_loss": lambda o, a, m, r: sfpo_kernels.grpo_loss(logits, labels, o, a, m, ref_log_probs=r, **overrides),
        "linear_grpo_loss": lambda o, a, m, r: sfpo_kernels.linear_grpo_loss(
            hidden, weight, labels, o, a, m, ref_log_probs=r, **overrides
        ),
        "reference.grpo_loss": lambda o, a, m, r: reference.grpo_loss(
            logits, labels, o, a, m, ref_log_probs=r, **overrides
        ),
        "reference.linear_grpo_loss": lambda o, a, m, r: reference.linear_grpo_loss(
            hidden, weight, labels, o, a, m, ref_log_probs=r, **overrides
        ),
    }


# ----------------------------------------------------------------------------- complex per-token tensors


@pytest.mark.parametrize("entry", list(_losses(_loss_inputs())))
@pytest.mark.parametrize("complex_arg", ["response_mask", "advantages", "old_log_probs", "ref_log_probs"])
def test_complex_per_token_tensor_is_refused(entry, complex_arg):
    inputs = _loss_inputs()
    old, adv, mask = inputs[4:]
    args = {"old_log_probs": old, "advantages": adv, "response_mask": mask, "ref_log_probs": old.clone()}
    args[complex_arg] = args[complex_arg].to(COMPLEX)
    loss = _losses(inputs, kl_coef=0.1)[entry]
    with pytest.raises(ValueError, match=rf"{complex_arg} .*complex64"):
        loss(args["old_log_probs"], args["advantages"], args["response_mask"], args["ref_log_probs"])


@pytest.mark.parametrize(
    "entry",
    [
        lambda x, m: sfpo_kernels.logprob_entropy(x[0], x[3], response_mask=m),
        lambda x, m: sfpo_kernels.linear_logprob_entropy(x[1], x[2], x[3], response_mask=m),
        lambda x, m: reference.logprob_entropy(x[0], x[3], response_mask=m),
        lambda x, m: reference.linear_logprob_entropy(x[1], x[2], x[3], response_mask=m),
    ],
    ids=["logprob_entropy", "linear_logprob_entropy", "reference.logprob_entropy", "reference.linear_logprob_entropy"],
)
def test_complex_response_mask_of_logprob_entropy_is_refused(entry):
    inputs = _loss_inputs()
    with pytest.raises(ValueError, match=r"response_mask .*complex64"):
        entry(inputs, inputs[6].to(COMPLEX))


# ----------------------------------------------------------------------------- no response token at all


@pytest.mark.parametrize("entry", list(_losses(_loss_inputs())))
@pytest.mark.parametrize("mode", AGG_MODES)
def test_empty_batch_loss_is_zero_in_every_mode(entry, mode):
    """T = 0: nothing to learn from, so the loss is 0, never NaN (verl: 0 / 0)."""
    inputs = _loss_inputs(t=0)
    old, adv, mask = inputs[4:]
    loss = _losses(inputs, loss_agg_mode=mode, kl_coef=0.1, entropy_coef=0.01)[entry](old, adv, mask, old.clone())[0]
    assert loss.item() == 0.0
