"""``linear_grpo_loss``: the LM head fused in, against the materialised head, verl's and Liger's fused-linear losses.

Rows, each forward + backward ("full": hidden, weight gradients) and forward only ("fwd": with
the graph kept for the backward, so what a training step holds counts):

- ``sfpo_fused``: ``sfpo_kernels.linear_grpo_loss`` with the default chunk (the memory budget);
- ``sfpo_fused_c256``: the same with 256-row chunks (on the CPU the default budget holds every
  row of these shapes in one chunk; this row shows the memory of real chunking);
- ``materialised``: ``logits = hidden @ W^T`` then ``sfpo_kernels.grpo_loss`` (our fused vocabulary
  pass on the full ``[N, V]`` logits): the ratios in the summary are this row's over each row's;
- ``verl_fused_linear``: verl's ``FusedLinearForPPO`` (512-token chunks, fp32, every token) then
  the same O(N) loss math;
- ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` when importable (no entropy term).

Every row computes the same loss (Liger: without its entropy term and dual clip) on the same
inputs: ``[B, T, H]`` hidden states, an LM head ``[V, H]``, ~12% padding at the end of each sequence.

Shapes: GPU: N = 4096 and 16384 tokens (sequences of 1024), H = 1536, V = 151936, bf16 (Qwen2.5-1.5B's
head). CPU (``SFPO_BENCH_SIZE=tiny``, the default there): N = 1024 (sequences of 128), H = 64,
V = 4096, fp32; the Triton interpreter is not used (the CPU rows run the torch path).

Memory: ``peak_mem_*`` (GPU) is what one call allocates above its inputs; ``largest_tensor_*``
(both devices) the largest single tensor one call creates, the [N, V] logits for the materialised
row. Physical limit on the GPU: the head's matmuls, 2 N H V FLOPs each: forward one, full four
(forward, recompute, dh, dW) for the fused rows, three for the materialised one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import sfpo_kernels
from bench import linear_baselines
from bench.conftest import Bench, Workload, bench_size, peak_memory
from sfpo_kernels import reference
from sfpo_kernels.loss_options import GRPOLossOptions

OPTIONS = GRPOLossOptions(entropy_coef=0.001)  # verl's defaults otherwise (no KL: no reference model here)
TEMPERATURE = OPTIONS.temperature
OLD_NOISE = 0.1
MAX_PAD = 0.25


@dataclass(frozen=True)
class LinearShapes:
    n_tokens: tuple[int, ...]
    hidden: int
    vocab: int
    dtype: torch.dtype
    seq_len: int


def linear_shapes(size: str) -> LinearShapes:
    if size == "tiny":
        return LinearShapes((1024,), 64, 4096, torch.float32, 128)
    return LinearShapes((4096, 16384), 1536, 151936, torch.bfloat16, 1024)


SHAPES = linear_shapes(bench_size())
N_PARAMS = [pytest.param(n, id=f"N{n}") for n in SHAPES.n_tokens]
IMPLS = ["sfpo_fused", "sfpo_fused_c256", "materialised", "verl_fused_linear", "liger"]


@dataclass(frozen=True)
class LinearInputs:
    hidden: torch.Tensor  # [B, T, H] leaf
    weight: torch.Tensor  # [V, H] leaf
    labels: torch.Tensor  # [B, T]
    old_log_probs: torch.Tensor  # [B, T] fp32
    advantages: torch.Tensor  # [B, T], one value per sequence
    seq_advantages: torch.Tensor  # [B] (Liger's layout)
    response_mask: torch.Tensor  # [B, T] bool


def make_inputs(n_tokens: int, device: torch.device, seed: int = 0) -> LinearInputs:
    s = SHAPES
    batch = n_tokens // s.seq_len
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(batch, s.seq_len, s.hidden, generator=g, device=device).to(s.dtype)
    weight = (torch.randn(s.vocab, s.hidden, generator=g, device=device) * (2.0 / s.hidden**0.5)).to(s.dtype)
    labels = torch.randint(0, s.vocab, (batch, s.seq_len), generator=g, device=device)
    with torch.no_grad():  # one sequence at a time: never [N, V] fp32
        log_probs = torch.stack(
            [reference.logprob_entropy(hidden[b] @ weight.T, labels[b], TEMPERATURE)[0] for b in range(batch)]
        ).float()
    old = log_probs + OLD_NOISE * torch.randn(log_probs.shape, generator=g, device=device)
    signs = torch.tensor([1.0, -1.0], device=device).repeat(batch)[:batch]
    seq_adv = torch.rand(batch, generator=g, device=device).add_(0.1) * signs
    lengths = torch.randint(int(s.seq_len * (1 - MAX_PAD)), s.seq_len + 1, (batch,), generator=g, device=device)
    mask = torch.arange(s.seq_len, device=device) < lengths[:, None]
    return LinearInputs(
        hidden.requires_grad_(),
        weight.requires_grad_(),
        labels,
        old,
        seq_adv[:, None].expand(batch, s.seq_len).contiguous(),
        seq_adv,
        mask,
    )


def skip_unless_runs(impl: str) -> None:
    if impl == "verl_fused_linear" and linear_baselines.verl_fused_linear_fn() is None:
        pytest.skip("verl not installed")
    if impl == "liger" and linear_baselines.liger_loss_class() is None:
        pytest.skip("liger-kernel (0.5+, LigerFusedLinearGRPOLoss) not installed")


def loss_fn(impl: str, x: LinearInputs) -> Callable[[], torch.Tensor]:
    args = (x.labels, x.old_log_probs, x.advantages, x.response_mask)
    if impl in ("sfpo_fused", "sfpo_fused_c256"):
        chunk = 256 if impl == "sfpo_fused_c256" else None
        return lambda: sfpo_kernels.linear_grpo_loss(x.hidden, x.weight, *args, chunk_size=chunk, options=OPTIONS).loss
    if impl == "materialised":
        return lambda: sfpo_kernels.grpo_loss(x.hidden @ x.weight.T, *args, options=OPTIONS).loss
    if impl == "verl_fused_linear":
        fused = linear_baselines.verl_fused_linear_fn()
        return lambda: linear_baselines.verl_fused_linear_loss(fused, x.hidden, x.weight, *args, options=OPTIONS)
    return linear_baselines.liger_fused_linear_loss(
        x.hidden,
        x.weight,
        x.labels,
        x.old_log_probs,
        x.seq_advantages,
        x.response_mask,
        temperature=TEMPERATURE,
        clip_ratio_low=OPTIONS.clip_ratio_low,
        clip_ratio_high=OPTIONS.clip_ratio_high,
    )


def full_step(loss: Callable[[], torch.Tensor], x: LinearInputs) -> Callable[[], None]:
    def call() -> None:
        loss().backward()
        x.hidden.grad = None
        x.weight.grad = None

    return call


@pytest.mark.parametrize("n_tokens", N_PARAMS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["full", "fwd"])
def test_linear_grpo_loss(benchmark, bench: Bench, mode, impl, n_tokens):
    skip_unless_runs(impl)
    x = make_inputs(n_tokens, bench.device)
    loss = loss_fn(impl, x)
    fn = full_step(loss, x) if mode == "full" else loss
    s = SHAPES
    flops = (
        (4 if mode == "full" and impl != "materialised" else 3 if mode == "full" else 1)
        * 2
        * n_tokens
        * s.hidden
        * s.vocab
    )
    inputs_bytes = (n_tokens + s.vocab) * s.hidden * x.hidden.element_size()
    work = Workload([x.hidden, x.weight], bench.device, bench.size)
    bench.run(
        benchmark,
        fn,
        work=work,
        op=f"linear_grpo_loss {mode} N={n_tokens}",
        impl=impl,
        backend="sfpo" if impl.startswith("sfpo") else "baseline",
        bytes_moved=inputs_bytes,
    )
    info = benchmark.extra_info
    info.update(
        op="linear_grpo_loss",
        mode=mode,
        n_tokens=n_tokens,
        hidden=s.hidden,
        vocab=s.vocab,
        response_tokens=int(x.response_mask.sum()),
        head_flops=flops,
        kl="off",
    )
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None and stats.median > 0:
        info["head_tflops"] = round(flops / stats.median / 1e12, 4)
    info.update(peak_memory(fn, bench.device))
    info.update(linear_baselines.largest_tensor(fn))
