"""grpo_loss at the edges the main tests leave open: found by mutation testing (docs/mutation.md).

Each test here fails for a change of ``sfpo_kernels/fused_loss.py`` that the tests of
``test_grpo_loss*.py`` survived: the keyword defaults (verl's), whether the backward
writes into the logits, which argument an error names, and the check that the
sequence modes get ``[B, T, V]`` logits.
"""

from __future__ import annotations

import pytest
import torch

import sfpo_kernels

B, T, V = 2, 3, 37  # V not a multiple of any block


def _inputs(seed: int = 0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    old = (torch.randn(B, T, generator=g) - 3.0).to(device)
    adv = torch.randn(B, T, generator=g).to(device)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool, device=device)
    return logits, labels, old, adv, mask


def _triton_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not sfpo_kernels.triton_interpreting():
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    return torch.device("cpu")


def test_defaults_are_verls():
    """temperature 1, clip 0.2 / 0.2, dual clip 3, no KL, no entropy bonus, token-mean: verl 0.9.1's actor defaults."""
    logits, labels, _, _, mask = _inputs()
    # response tokens (0, 0), (0, 1), (1, 0), (1, 1): ratios 1.5 with A > 0 (the high clip binds), 3.5 with A < 0
    # (the dual clip binds), 0.5 with A < 0 (the low clip binds), 1.05 (no clip); old log-probs give those ratios
    mask = mask.clone()
    mask[1, 1] = True
    logp, _ = sfpo_kernels.reference.logprob_entropy(logits, labels, 1.0)
    ratio = torch.tensor([[1.5, 3.5, 1.0], [0.5, 1.05, 1.0]])
    old = logp - ratio.log()
    adv = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 0.5, 0.0]])
    explicit = dict(
        temperature=1.0,
        clip_ratio_low=0.2,
        clip_ratio_high=0.2,
        clip_ratio_c=3.0,
        kl_coef=0.0,
        entropy_coef=0.0,
        loss_agg_mode="token-mean",
        backend="torch",
    )
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    default = sfpo_kernels.grpo_loss(x1, labels, old, adv, mask, backend="torch")
    given = sfpo_kernels.grpo_loss(x2, labels, old, adv, mask, **explicit)
    assert torch.equal(default.loss, given.loss)
    for name in given.metrics:
        assert torch.equal(default.metrics[name], given.metrics[name]), name
    assert float(given.metrics["pg_clipfrac"]) > 0 and float(given.metrics["pg_clipfrac_lower"]) > 0
    for name, other in {
        "temperature": 2.0,
        "clip_ratio_high": 1.2,
        "clip_ratio_c": 4.0,
        "entropy_coef": 1.0,
    }.items():
        changed = sfpo_kernels.grpo_loss(logits, labels, old, adv, mask, **{**explicit, name: other})
        assert not torch.equal(changed.loss, given.loss), f"{name}={other} does not change the loss here"


def test_backward_leaves_the_logits_alone_unless_asked():
    device = _triton_device()
    logits, labels, old, adv, mask = _inputs(device=device)
    for inplace in (None, False, True):  # None: the default
        x = logits.clone().requires_grad_()
        before = x.detach().clone()
        asked = {} if inplace is None else {"inplace_backward": inplace}
        out = sfpo_kernels.grpo_loss(x, labels, old, adv, mask, backend="triton", **asked)
        out.loss.backward()
        grad = x.grad.detach().clone()
        assert torch.count_nonzero(grad) > 0
        if inplace:  # dlogits were written where the logits were
            assert torch.equal(x.detach(), grad), "inplace_backward=True did not write dlogits into the logits"
        else:
            assert torch.equal(x.detach(), before), "the backward overwrote the logits without inplace_backward"


@pytest.mark.parametrize("name", ["old_log_probs", "advantages", "response_mask", "ref_log_probs"])
def test_a_misshaped_argument_is_named(name):
    logits, labels, old, adv, mask = _inputs()
    args = {"old_log_probs": old, "advantages": adv, "response_mask": mask, "ref_log_probs": old.clone()}
    args[name] = args[name][:, :2]
    with pytest.raises(ValueError, match=rf"^{name} must have shape \(2, 3\) \(logits without V\), got \(2, 2\)"):
        sfpo_kernels.grpo_loss(logits, labels, backend="torch", **args)


def test_sequence_modes_refuse_packed_logits_before_any_work():
    logits, labels, old, adv, mask = _inputs()
    packed = [t.reshape(B * T, *t.shape[2:]) for t in (logits, labels, old, adv, mask)]
    with pytest.raises(ValueError, match=r"loss_agg_mode='seq-mean-token-mean' needs \[B, T, V\] logits"):
        sfpo_kernels.grpo_loss(*packed, loss_agg_mode="seq-mean-token-mean", backend="torch")
    sfpo_kernels.grpo_loss(*packed, loss_agg_mode="token-mean", backend="torch")  # the token modes take them
