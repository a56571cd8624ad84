"""One SFPO iteration (K=3, alpha 0.8) against one GRPO iteration on the same batch, model and optimizer.

Model: a randomly initialised Qwen2 -- tiny on the CPU, Qwen2.5-0.5B-shaped
bf16 on a GPU (``SFPO_BENCH_SIZE=tiny`` forces the tiny one). Each pass is one
GRPO loss over a batch of rollouts through ``sfpo_kernels.grpo_loss`` and an
AdamW step. ``extra_info`` carries the per-stage times of the measured
iterations (``timing_s/sfpo_*``), the snapshot's bytes, peak GPU memory above
the model + optimizer baseline, and how SFPO's extra memory compares with one
copy of the trainable parameters (our target: <= 1, 0 with offload) and with
the two copies the authors' release keeps.
"""

from __future__ import annotations

import os

import pytest
import torch

import sfpo_kernels
from sfpo_train import SFPO, SFPOConfig
from sfpo_train.clock import synchronize

ON_GPU = torch.cuda.is_available() and os.environ.get("SFPO_BENCH_SIZE") != "tiny"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864, vocab 151936.
MODEL = (
    dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
    )
    if ON_GPU
    else dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
    )
)
BATCH, SEQ = (8, 512) if ON_GPU else (4, 16)


def _setup():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**MODEL, max_position_embeddings=max(SEQ + 1, 64), tie_word_embeddings=True)
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    model = Qwen2ForCausalLM(config).to(device=DEVICE, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ + 1), generator=g).to(DEVICE)
    mask = torch.ones(BATCH, SEQ, device=DEVICE)
    advantages = torch.randn(BATCH, 1, generator=g).expand(BATCH, SEQ).contiguous().to(DEVICE)
    with torch.no_grad():
        old, _ = sfpo_kernels.logprob_entropy(model(tokens).logits[:, :-1], tokens[:, 1:])

    def update_pass(_batch):
        opt.zero_grad(set_to_none=True)
        out = sfpo_kernels.grpo_loss(model(tokens).logits[:, :-1], tokens[:, 1:], old, advantages, mask)
        out.loss.backward()
        opt.step()
        return {"entropy": out.metrics["entropy"]}

    update_pass(None)  # optimizer state allocated, kernels compiled: outside the measurement
    return model, update_pass


@pytest.mark.parametrize(
    "algo,config",
    [
        pytest.param("grpo", SFPOConfig(alpha=0.0, entropy_control=False), id="grpo"),
        pytest.param("sfpo", SFPOConfig(inner_steps=3, alpha=0.8, entropy_control=False), id="sfpo-k3"),
        pytest.param(
            "sfpo-offload",
            SFPOConfig(inner_steps=3, alpha=0.8, entropy_control=False, snapshot_offload="cpu"),
            id="sfpo-k3-offload",
        ),
    ],
)
def test_sfpo_step(benchmark, algo, config):
    if config.snapshot_offload == "cpu" and DEVICE.type != "cuda":
        pytest.skip("offload='cpu' moves copies of CUDA tensors; on the CPU it is offload='none'")
    if os.environ.get("SFPO_POISON_ALLOCATIONS") == "1":
        pytest.skip("run bench/ in a pytest process of its own (tests/conftest.py poisons allocations)")
    model, update_pass = _setup()
    sfpo = SFPO(model, config)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    stages: list[dict] = []
    peak_extra = []

    def one_iteration():
        if DEVICE.type == "cuda":
            synchronize(DEVICE)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        metrics = sfpo.step(update_pass, None)
        if DEVICE.type == "cuda":
            synchronize(DEVICE)
            peak_extra.append(torch.cuda.max_memory_allocated() - base)
        stages.append(metrics)

    rounds = 3 if ON_GPU else 5
    benchmark.pedantic(one_iteration, rounds=rounds, warmup_rounds=1, iterations=1)

    info = benchmark.extra_info
    info.update(
        op="sfpo_step",
        algo=algo,
        device=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        model="qwen2.5-0.5b-shaped bf16" if ON_GPU else "tiny qwen2 fp32",
        batch=BATCH,
        seq=SEQ,
        param_bytes=param_bytes,
        inner_steps=config.inner_steps,
        alpha=config.alpha,
        offload=config.snapshot_offload,
    )
    measured = stages[-rounds:]
    for key in ("timing_s/sfpo_snapshot", "timing_s/sfpo_fast", "timing_s/sfpo_reposition", "timing_s/sfpo_slow"):
        info[key] = sum(m[key] for m in measured) / len(measured)
    update_time = info["timing_s/sfpo_fast"] + info["timing_s/sfpo_slow"]
    info["snapshot_bytes"] = measured[-1]["sfpo/snapshot_bytes"]
    info["stage2_share_of_update"] = (info["timing_s/sfpo_snapshot"] + info["timing_s/sfpo_reposition"]) / update_time
    if peak_extra:
        info["peak_extra_bytes"] = max(peak_extra[-rounds:])
    # What SFPO itself keeps between the passes: its snapshot on the device (0 when offloaded).
    on_device = 0 if config.snapshot_offload == "cpu" else info["snapshot_bytes"]
    info["extra_copies_of_params"] = on_device / param_bytes
    info["extra_memory_vs_authors_two_copies"] = on_device / (2 * param_bytes)
