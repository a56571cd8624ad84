"""The vocabulary kernels' row handling: masked rows skipped in the forward, and ``inplace_backward``'s guard.

- A row with ``response_mask`` 0 gets log-prob, entropy (and the saved lse, mu) exactly 0 from the forward
  without being read (the backward already wrote its zero ``dlogits`` without reading it); the torch
  reference gives the same zeros, so both backends agree everywhere.
- ``inplace_backward`` overwrites the logits the op saved with ``dlogits`` and bumps their version
  counter, so a second backward through a retained graph raises instead of reading gradients as logits.

Bit-for-bit comparisons: the kept rows run the same kernel on the same values with or without the mask.
"""

from __future__ import annotations

import pytest
import torch

import sfpo_kernels
from sfpo_kernels import fused_loss
from tests.helpers.bits import assert_bit_equal
from tests.helpers.devices import kernel_devices

DEVICE = kernel_devices()[0]


def make_logits(shape, vocab, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(*shape, vocab, generator=g, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)


def make_labels(shape, vocab, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, vocab, shape, generator=g).to(DEVICE)


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_a_second_backward_after_inplace_backward_raises(inplace):
    """inplace_backward overwrites the saved logits with dlogits and bumps their version counter: a second
    backward through the retained graph must refuse to read gradients as logits (without inplace it runs and
    gives the same gradient)."""
    logits = make_logits((2, 3), 65, torch.float32, seed=31).requires_grad_()
    x = logits * 1.0  # a non-leaf: what the lm_head hands the loss
    labels = make_labels((2, 3), 65, seed=31)
    log_probs, entropy = sfpo_kernels.logprob_entropy(x, labels, 0.7, backend="triton", inplace_backward=inplace)
    loss = log_probs.sum() + 0.5 * entropy.sum()
    version = x._version
    (first,) = torch.autograd.grad(loss, [logits], retain_graph=True)
    assert x._version == version + int(inplace), f"version {x._version}, was {version}"
    if inplace:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(loss, [logits])
    else:
        (second,) = torch.autograd.grad(loss, [logits])
        assert_bit_equal("second backward", second, first)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_masked_rows_are_skipped_in_the_forward(backend):
    """response_mask 0: log-prob, entropy (and the saved lse, mu) are 0 and the row is not read -- a row of NaN
    there changes nothing; kept rows are bit for bit the unmasked call's."""
    shape, vocab = (2, 4), 65
    logits = make_logits(shape, vocab, torch.bfloat16, seed=37)
    labels = make_labels(shape, vocab, seed=37)
    keep = torch.tensor([[True, False, True, False], [False, True, True, True]], device=DEVICE)
    want_lp, want_h = sfpo_kernels.logprob_entropy(logits, labels, 0.7, backend=backend)
    dirty = torch.where(keep.unsqueeze(-1), logits, float("nan"))
    lp, h = sfpo_kernels.logprob_entropy(dirty, labels, 0.7, backend=backend, response_mask=keep)
    for name, got, want in (("log_probs", lp, want_lp), ("entropy", h, want_h)):
        assert bool((got[~keep] == 0).all()), f"{name} at masked rows: {got[~keep]}"
        assert_bit_equal(f"{name} of kept rows", got[keep], want[keep])
    if backend == "triton":
        out = fused_loss.logprob_entropy_fwd(dirty, fused_loss.flat_labels(labels), 0.7, keep.reshape(-1))
        for name, value in zip(("log_probs", "entropy", "lse", "mu"), out):
            assert bool((value[~keep.reshape(-1)] == 0).all()), f"{name} at masked rows: {value}"
