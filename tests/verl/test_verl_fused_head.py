"""The verl fused forward (``fused_kernels``) through the chunked LM head: verl's numbers, one chunk of logits.

``forward_with_sfpo_kernels`` on a tiny real Qwen2 (packed ``[1, N]`` input as
verl's remove-padding path feeds it) against verl 0.9.1's eager math on the
model's own logits (``logprobs_from_logits``, ``entropy_from_logits``): the
log-probs, entropy and the parameter gradients of a random combination of
both. With the chunk budget shrunk to a few rows, a dispatch probe shows no
tensor of the ``[N, V]`` logits' size exists, where verl's eager path makes
several. The end-to-end check through verl's worker (loss, metrics, gradients)
is ``test_verl_plugin.py::test_fused_kernels_match_verls_eager_loss_and_gradients``.
"""

from __future__ import annotations

import pytest
import torch

from sfpo_kernels import linear_loss
from tests.helpers.alloc_probe import LargestAllocation
from tests.helpers.optional import import_or_skip

import_or_skip("verl")

VOCAB, HIDDEN, TOKENS, CHUNK = 512, 16, 64, 4
# fp32: the two paths differ in the order of the head's and the softmax's sums (a few ulp per logit).
TOL = {"atol": 2e-6, "rtol": 1e-5}
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(scope="module")
def model():
    import transformers

    config = transformers.Qwen2Config(
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (1, TOKENS), generator=g)
    position_ids = torch.cat([torch.arange(40), torch.arange(TOKENS - 40)]).unsqueeze(0)  # two packed sequences
    weights = torch.randn(2, 1, TOKENS, generator=g)
    return input_ids, position_ids, weights


def _grads(model, log_probs, entropy, weights):
    return torch.autograd.grad((log_probs * weights[0]).sum() + (entropy * weights[1]).sum(), list(model.parameters()))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_forward_matches_verl_eager_math_with_one_chunk_of_logits(model, backend, monkeypatch):
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    from sfpo_train.verl.fused import forward_with_sfpo_kernels

    monkeypatch.setenv("SFPO_BACKEND", backend)
    input_ids, position_ids, weights = _inputs()
    rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    temperature = 0.8

    with LargestAllocation() as eager_probe:
        logits = model(input_ids=input_ids, position_ids=position_ids).logits / temperature
        eager_lp, eager_h = logprobs_from_logits(logits, rolled), entropy_from_logits(logits)
        eager_grads = _grads(model, eager_lp, eager_h, weights)

    monkeypatch.setattr(linear_loss, "CHUNK_BUDGET_BYTES", CHUNK * VOCAB * (4 + 12))  # CHUNK rows on either path
    with LargestAllocation() as probe:
        out = forward_with_sfpo_kernels(
            model, input_ids=input_ids, position_ids=position_ids, temperature=temperature, shift_labels=rolled
        )
        grads = _grads(model, out.log_probs, out.entropy, weights)
    assert "forward" not in model.lm_head.__dict__, "the head's own forward is back after the call"

    torch.testing.assert_close(out.log_probs, eager_lp, **TOL, msg=lambda m: f"log_probs: {m}")
    torch.testing.assert_close(out.entropy, eager_h, **TOL, msg=lambda m: f"entropy: {m}")
    names = [n for n, _ in model.named_parameters()]
    for name, got, want in zip(names, grads, eager_grads, strict=True):
        assert want.abs().max() > 0, f"{name}: no gradient to compare"
        torch.testing.assert_close(got, want, **TOL, msg=lambda m, n=name: f"grad {n}: {m}")

    all_logits = 4 * TOKENS * VOCAB
    weight_bytes = 4 * VOCAB * HIDDEN  # the head's gradient: the largest tensor that must exist
    assert eager_probe.largest >= all_logits, "the probe sees verl's eager [N, V] logits"
    assert probe.largest <= max(4 * CHUNK * VOCAB * (1 if backend == "triton" else 4), weight_bytes) < all_logits, (
        f"largest tensor {probe.largest} bytes; one chunk of logits is {4 * CHUNK * VOCAB}, all of them {all_logits}"
    )


def test_first_use_check_passes_the_kernels_and_catches_a_faulty_result(model):
    from sfpo_train.verl import fused

    input_ids, position_ids, _ = _inputs()
    rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    temperature = 0.8
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, position_ids=position_ids).last_hidden_state
        right = linear_loss.linear_logprob_entropy(hidden, model.lm_head.weight, rolled, temperature)
        # what a kernel that ignored the temperature would return
        wrong = linear_loss.linear_logprob_entropy(hidden, model.lm_head.weight, rolled, 1.0)
        logits = model.lm_head(hidden)
    assert fused.eager_mismatch(right[0][0], right[1][0], logits[0], rolled[0], temperature) is None
    problem = fused.eager_mismatch(wrong[0][0], wrong[1][0], logits[0], rolled[0], temperature)
    assert problem is not None and "differ at" in problem
    try:
        fused.arm_first_use_check(model, strict=False)
        out = fused.forward_with_sfpo_kernels(
            model, input_ids=input_ids, position_ids=position_ids, temperature=temperature, shift_labels=rolled
        )
        assert getattr(model, fused.CHECK_ATTR) == "passed"
        torch.testing.assert_close(out.log_probs, right[0], **TOL)

        fused.arm_first_use_check(model, strict=False)  # auto: a mismatch warns and falls back to the torch pass
        with pytest.warns(RuntimeWarning, match="falling back"):
            assert not fused._first_use_check(model, hidden, rolled, temperature, *wrong)
        assert getattr(model, fused.CHECK_ATTR) == "fallback"
        out = fused.forward_with_sfpo_kernels(
            model, input_ids=input_ids, position_ids=position_ids, temperature=temperature, shift_labels=rolled
        )
        torch.testing.assert_close(out.log_probs, right[0], **TOL)
        torch.testing.assert_close(out.entropy, right[1], **TOL)

        fused.arm_first_use_check(model, strict=True)  # fused_kernels=true: a mismatch is an error
        with pytest.raises(RuntimeError, match="disagree with verl's eager ones"):
            fused._first_use_check(model, hidden, rolled, temperature, *wrong)
    finally:
        model.__dict__.pop(fused.CHECK_ATTR, None)
