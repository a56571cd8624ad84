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


# ----------------------------------------------------------------------------- freed storage


def _backends() -> list:
    """The backends that run here: torch everywhere, triton on CUDA or in Triton's CPU interpreter."""
    triton_runs = torch.cuda.is_available() or sfpo_kernels.triton_interpreting()
    return ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_runs, reason="no Triton here"))]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 5), (7,), (2, 2, 2)]
    return [torch.randn(s, generator=g).to(_device()) for s in shapes]


def _free(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(0)


def _shrink(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(t.nbytes // 2)


def _view_past_a_shrunk_storage(params: list[torch.Tensor]) -> None:
    """params[1] becomes the tail half of a buffer whose storage is then cut to its head."""
    base = torch.zeros(2 * params[1].numel(), device=params[1].device)
    params[1] = base[params[1].numel() :]
    base.untyped_storage().resize_(params[1].numel() * base.element_size())


FREEINGS = {
    "freed": lambda ps: _free(ps[1]),
    "shrunk": lambda ps: _shrink(ps[1]),
    "offset view past its storage": _view_past_a_shrunk_storage,
}


@pytest.mark.parametrize("how", list(FREEINGS))
@pytest.mark.parametrize("backend", _backends())
def test_snapshot_refuses_a_tensor_without_its_memory(backend, how):
    params = _params()
    FREEINGS[how](params)
    with pytest.raises(ValueError, match=r"tensors\[1\] .*storage holds \d+ bytes"):
        sfpo_kernels.snapshot(params, backend=backend)


@pytest.mark.parametrize("how", list(FREEINGS))
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("call", ["reposition_", "restore_"])
def test_reposition_and_restore_refuse_a_tensor_without_its_memory_and_write_nothing(backend, how, call):
    """Freed after the snapshot (between Stage I's passes): refused, and the other tensors stay as they are."""
    params = _params()
    snap = sfpo_kernels.snapshot(params, backend=backend)
    sfpo_kernels.reposition_(params, snap, 0.5, backend=backend)  # the validated list is cached; freeing must miss it
    for p in params:
        p.add_(1.0)
    FREEINGS[how](params)
    before = [p.clone() if p.untyped_storage().nbytes() >= p.nbytes else None for p in params]
    with pytest.raises(ValueError, match=r"tensors\[1\] .*storage holds \d+ bytes"):
        if call == "reposition_":
            sfpo_kernels.reposition_(params, snap, 0.25, backend=backend)
        else:
            snap.restore_(params, backend=backend)
    for i in (0, 2):
        assert torch.equal(params[i], before[i]), f"tensors[{i}] was written"


@pytest.mark.parametrize("backend", _backends())
def test_a_freed_tensor_allocated_again_is_accepted(backend):
    """FSDP's cycle: free, allocate again, fill; then the kernels run as on any tensor."""
    params = _params()
    snap = sfpo_kernels.snapshot(params, backend=backend)
    want = [p.clone() for p in params]
    _free(params[1])
    params[1].untyped_storage().resize_(params[1].nbytes)
    params[1].fill_(3.0)
    snap.restore_(params, backend=backend)
    for p, w in zip(params, want):
        assert torch.equal(p, w)
