"""One SFPO iteration on a real (tiny, randomly initialised) transformers Qwen2 model.

theta_0 = snapshot(trainable) -> K=3 AdamW steps on a causal-LM loss ->
reposition_(alpha=0.8): every trainable parameter must equal
theta_0 + 0.8 * (theta_K - theta_0); the frozen parameter and the optimizer
state must not move; autograd must know the parameters changed.

Tolerances (one table for the file), against the float64 formula:

    |got - exact| <= ULPS * ulp_dtype(exact) + COMPUTE_EPS * (|theta_0| + |theta_K|)

    ULPS = 1: the result is rounded once to the parameter's dtype, at most half
        an ulp; a whole ulp covers an fp32 result that lands next to a rounding
        boundary of bf16 and is pushed across it by the fp32 error below.
    COMPUTE_EPS = 2 * 2^-23: the lerp runs in fp32 for fp32 and bf16 parameters;
        ``theta_K - theta_0`` and ``1 - alpha`` are each rounded once, so the
        error scales with the operands, not with the (smaller) result.

Against ``sfpo_kernels.reference`` and for everything that must not move, exact.
"""

from __future__ import annotations

import pytest
import torch

import sfpo_kernels
from sfpo_kernels import reference
from tests.helpers.bits import assert_bit_equal

transformers = pytest.importorskip("transformers")

TOLERANCES = {
    torch.float32: {"ulps": 1.0, "compute_eps": 2 * 2.0**-23},
    torch.bfloat16: {"ulps": 1.0, "compute_eps": 2 * 2.0**-23},
}
MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7}
ALPHA = 0.8
INNER_STEPS = 3
VOCAB = 97


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at each element of the float64 tensor ``x``."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def _tiny_qwen2(dtype: torch.dtype) -> torch.nn.Module:
    config = transformers.Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).to(dtype)


def _lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton through the interpreter on the CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sfpo_iteration_on_qwen2(backend, dtype):
    model = _tiny_qwen2(dtype)
    names = {id(p): n for n, p in model.named_parameters()}
    assert model.lm_head.weight is model.model.embed_tokens.weight, "embeddings not tied"
    assert "lm_head.weight" not in names.values(), "a tied weight must appear once in model.parameters()"
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(names) - 1 and all(p.dtype == dtype for p in trainable)

    theta0 = [p.detach().clone() for p in trainable]
    frozen0 = frozen.detach().clone()
    snap = sfpo_kernels.snapshot(trainable, backend=backend)

    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(INNER_STEPS):  # Stage I: the fast trajectory
        _lm_loss(model, tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    theta_k = [p.detach().clone() for p in trainable]
    for p, t0, tk in zip(trainable, theta0, theta_k):
        assert not torch.equal(t0, tk), f"{names[id(p)]} did not move in {INNER_STEPS} AdamW steps"
    state0 = {names[id(p)]: {k: v.clone() for k, v in opt.state[p].items()} for p in trainable}
    assert all({"exp_avg", "exp_avg_sq", "step"} <= s.keys() for s in state0.values())

    stale_loss = _lm_loss(model, tokens)  # its graph saved theta_K
    versions = [p._version for p in trainable]
    frozen_version = frozen._version
    sfpo_kernels.reposition_(trainable, snap, ALPHA, backend=backend)  # Stage II

    expected = [t.clone() for t in theta_k]
    reference.reposition_(expected, theta0, ALPHA)
    tol = TOLERANCES[dtype]
    for p, e, t0, tk in zip(trainable, expected, theta0, theta_k):
        name = names[id(p)]
        assert_bit_equal(f"{name} vs reference", p.detach(), e)
        exact = t0.double() + ALPHA * (tk.double() - t0.double())
        bound = tol["ulps"] * _ulp(exact, dtype) + tol["compute_eps"] * (t0.double().abs() + tk.double().abs())
        err = (p.detach().double() - exact).abs()
        assert bool((err <= bound).all()), f"{name}: error exceeds the bound by {(err - bound).max().item():.3g}"
    assert_bit_equal("lm_head.weight (tied to embed_tokens)", model.lm_head.weight.detach(), expected[0])

    assert_bit_equal(f"frozen {names[id(frozen)]}", frozen.detach(), frozen0)
    assert frozen._version == frozen_version, "the frozen parameter was marked modified"
    for p in trainable:
        for key, before in state0[names[id(p)]].items():
            assert_bit_equal(f"optimizer state {names[id(p)]}.{key}", opt.state[p][key], before)

    for p, v in zip(trainable, versions):
        assert p._version > v, f"{names[id(p)]}: autograd version counter not bumped"
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale_loss.backward()  # autograd refuses gradients of the weights it no longer has

    loss = _lm_loss(model, tokens)  # Stage III runs on the repositioned weights
    assert torch.isfinite(loss)
    loss.backward()
    for p in trainable:
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), f"{names[id(p)]}: no finite gradient"
    assert frozen.grad is None
