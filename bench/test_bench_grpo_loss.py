"""``grpo_loss`` and ``logprob_entropy``: the fused vocabulary pass against verl's eager path, torch.compile and Liger.

Rows, each forward + backward ("full") and forward only ("fwd": the forward of a training step,
logits requiring grad, so the memory held for the backward counts):

- ``sfpo_triton``: ``sfpo_kernels.grpo_loss(..., backend="triton")`` (public defaults otherwise);
- ``sfpo_torch``: the same with ``backend="torch"``, the CPU's path (CPU only: on a GPU the loss runs in
  Triton), so that the CPU run has an sfpo row against its baselines too;
- ``verl_eager``: ``loss_baselines.verl_grpo_loss``, fp32 upcast, log-softmax + gather, entropy as
  a second pass, then the same O(N) policy-loss math (only the vocabulary pass differs);
- ``verl_compile``: the same function under ``torch.compile`` (GPU only);
- ``liger``: Liger-Kernel's ``triton_grpo_loss`` when ``liger_kernel`` is importable.

plus the same rows with the KL penalty on (``kl_coef`` 0.001, k3, ``ref_log_probs``; full, the
largest N) and the forward-only ``logprob_entropy`` of the old-policy pass, under ``no_grad``.

Shapes: on a GPU (``SFPO_BENCH_SIZE`` unset or "1.5b") N = 4096, 8192 and 16384 tokens as
``[N / 1024, 1024, 151936]`` bf16 logits (Qwen2.5's vocabulary); with ``SFPO_BENCH_SIZE=tiny``
(the CPU default) N = 64, V = 512 fp32, and N = 16, V = 256 when ``TRITON_INTERPRET=1``.

Byte limit (``bytes_moved`` of every row, so GB/s is the *effective* bandwidth): forward reads
the logits once, ``N V s`` bytes (``s`` the element size); full reads them twice and writes
``dlogits`` once, ``3 N V s``. ``pct_of_copy`` divides that GB/s by the device-to-device copy
bandwidth of a logits-sized copy measured in the same run; ``x_of_limit`` = 100 / pct_of_copy
is the time over the limit's time (target (docs/conventions.md, "Performance targets"): <= 1.3
for full). ``peak_mem_*``: what one call allocates above its inputs (GPU only). Full rows time
the forward, ``loss.backward()`` and ``logits.grad = None`` (the conftest's timed call has no
per-round setup hook; dropping the gradient is a free of a cached block).
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import sfpo_kernels
from bench import loss_baselines
from bench.conftest import Bench, Workload, bench_size, peak_memory
from sfpo_kernels import triton_interpreting
from sfpo_kernels.loss_options import GRPOLossOptions

# verl's defaults (clip 0.2 / 0.2, dual clip 3, low_var_kl, token-mean) with a small entropy bonus; KL_COEF
# replaces kl_coef in the rows with KL.
OPTIONS = GRPOLossOptions(entropy_coef=0.001)
TEMPERATURE = OPTIONS.temperature
KL_COEF = 0.001
LOGIT_STD = 2.0  # about the spread of a trained LM's logits
OLD_NOISE = 0.1  # old_log_probs = log_probs + N(0, 0.1): about 7% of the ratios leave [0.8, 1.2]
REF_NOISE = 0.1
MAX_PAD = 0.25  # each sequence's response fills 75-100% of it: ~12% padding on average


@dataclass(frozen=True)
class LossShapes:
    n_tokens: tuple[int, ...]
    vocab: int
    dtype: torch.dtype
    seq_len: int  # N = batch * seq_len


def loss_shapes(size: str) -> LossShapes:
    """``SFPO_BENCH_SIZE`` "tiny": the CPU shapes (smaller still in the interpreter); otherwise the GPU's."""
    if size == "tiny" and triton_interpreting():
        return LossShapes((16,), 256, torch.float32, 8)
    if size == "tiny":
        return LossShapes((64,), 512, torch.float32, 16)
    return LossShapes((4096, 8192, 16384), 151936, torch.bfloat16, 1024)


SHAPES = loss_shapes(bench_size())
N_PARAMS = [pytest.param(n, id=f"N{n}") for n in SHAPES.n_tokens]
SFPO_BACKENDS = {"sfpo_triton": "triton", "sfpo_torch": "torch"}  # sfpo's rows -> the backend= they call
LOSS_IMPLS = ["sfpo_triton", "sfpo_torch", "verl_eager", "verl_compile", "liger"]
LOGPROB_IMPLS = ["sfpo_triton", "sfpo_torch", "verl_eager", "verl_compile"]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch of ``batch`` sequences of ``seq_len`` response tokens."""

    logits: torch.Tensor  # [B, T, V] leaf (Liger: [B, T + 1, V], its layout)
    labels: torch.Tensor  # [B, T] int64, uniform in [0, V), padding included
    old_log_probs: torch.Tensor  # [B, T] fp32: log p(label) + N(0, OLD_NOISE)
    ref_log_probs: torch.Tensor  # [B, T] fp32: log p(label) + N(0, REF_NOISE)
    advantages: torch.Tensor  # [B, T] fp32: one value per sequence, signs alternating
    seq_advantages: torch.Tensor  # [B] the same values (Liger's layout)
    response_mask: torch.Tensor  # [B, T] int64, 1 on the response, 0 on the trailing padding

    @property
    def tokens(self) -> torch.Tensor:
        """``[B, T, V]``: the logits of the T labelled positions (a view for Liger's layout)."""
        return self.logits[:, : self.labels.shape[1]]


def make_inputs(
    n_tokens: int, device: torch.device, *, requires_grad: bool, liger_layout: bool = False, seed: int = 0
) -> LossInputs:
    """Random inputs of ``SHAPES``; the same values for every implementation (same seed)."""
    vocab, seq_len = SHAPES.vocab, SHAPES.seq_len
    batch = n_tokens // seq_len
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(batch, seq_len + 1 if liger_layout else seq_len, vocab, device=device, dtype=SHAPES.dtype)
    for b in range(batch):  # the labelled positions draw the same numbers in either layout
        logits[b, :seq_len].normal_(0.0, LOGIT_STD, generator=g)
    if liger_layout:
        logits[:, seq_len:].normal_(0.0, LOGIT_STD)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=g, device=device)
    with torch.no_grad():  # one sequence at a time: [T, V] fp32 temporaries, never [N, V]
        log_probs = torch.stack(
            [loss_baselines.verl_logprob_entropy(logits[b, :seq_len], labels[b], TEMPERATURE)[0] for b in range(batch)]
        )
    old = log_probs + OLD_NOISE * torch.randn(log_probs.shape, generator=g, device=device)
    ref = log_probs + REF_NOISE * torch.randn(log_probs.shape, generator=g, device=device)
    signs = torch.tensor([1.0, -1.0], device=device).repeat(batch)[:batch]
    seq_adv = torch.rand(batch, generator=g, device=device).add_(0.1) * signs
    lengths = torch.randint(int(seq_len * (1 - MAX_PAD)), seq_len + 1, (batch,), generator=g, device=device)
    mask = (torch.arange(seq_len, device=device) < lengths[:, None]).long()
    return LossInputs(
        logits.requires_grad_(requires_grad),
        labels,
        old,
        ref,
        seq_adv[:, None].expand(batch, seq_len).contiguous(),
        seq_adv,
        mask,
    )


# --------------------------------------------------------------------------- the rows


def skip_unless_runs(bench: Bench, impl: str) -> None:
    """``pytest.skip`` with the reason where ``impl`` cannot run (sensibly) here."""
    on_gpu = bench.device.type == "cuda"
    if impl == "sfpo_triton":
        bench.skip_unless_runs("triton")
    elif impl == "sfpo_torch" and on_gpu:
        pytest.skip("sfpo's torch backend is the CPU's path; on a GPU the loss runs in Triton (sfpo_triton)")
    elif impl == "verl_compile" and not on_gpu:
        pytest.skip("torch.compile rows run on a GPU only (on the CPU they would time inductor's C++ at toy shapes)")
    elif impl == "liger":
        if loss_baselines.liger_grpo_loss_fn() is None:
            pytest.skip("liger-kernel not installed")
        if not on_gpu and not triton_interpreting():
            pytest.skip("Liger's Triton kernels on the CPU need TRITON_INTERPRET=1 in the environment before the run")
        if triton_interpreting() and bench.size != "tiny":
            pytest.skip(f"the Triton interpreter runs only the tiny shapes (SFPO_BENCH_SIZE={bench.size})")


def loss_fn(impl: str, x: LossInputs, kl: bool) -> Callable[[], torch.Tensor]:
    """A call returning the scalar loss of ``impl`` on ``x``."""
    ref = x.ref_log_probs if kl else None
    kl_coef = KL_COEF if kl else 0.0
    if impl == "liger":
        triton_grpo_loss = loss_baselines.liger_grpo_loss_fn()
        return lambda: loss_baselines.liger_grpo_loss(
            triton_grpo_loss,
            x.logits,
            x.labels,
            x.old_log_probs,
            x.seq_advantages,
            x.response_mask,
            ref_log_probs=ref,
            temperature=TEMPERATURE,
            clip_ratio_low=OPTIONS.clip_ratio_low,
            clip_ratio_high=OPTIONS.clip_ratio_high,
            kl_coef=kl_coef,
        )
    kwargs = dict(ref_log_probs=ref, options=dataclasses.replace(OPTIONS, kl_coef=kl_coef))
    if impl in SFPO_BACKENDS:
        backend = SFPO_BACKENDS[impl]
        return lambda: (
            sfpo_kernels.grpo_loss(
                x.logits, x.labels, x.old_log_probs, x.advantages, x.response_mask, backend=backend, **kwargs
            ).loss
        )
    fn = loss_baselines.verl_grpo_loss if impl == "verl_eager" else loss_baselines.compiled("grpo_loss")
    return lambda: fn(x.logits, x.labels, x.old_log_probs, x.advantages, x.response_mask, **kwargs)[0]


def logprob_fn(impl: str, x: LossInputs) -> Callable[[], object]:
    """The old-policy pass of ``impl``: per-token log-probs and entropy under ``no_grad``."""
    if impl in SFPO_BACKENDS:

        def fn(logits, labels, temperature):
            return sfpo_kernels.logprob_entropy(logits, labels, temperature, backend=SFPO_BACKENDS[impl])
    else:
        fn = loss_baselines.verl_logprob_entropy if impl == "verl_eager" else loss_baselines.compiled("logprob_entropy")

    def call():
        with torch.no_grad():
            return fn(x.logits, x.labels, TEMPERATURE)

    return call


def full_step(loss: Callable[[], torch.Tensor], logits: torch.Tensor) -> Callable[[], None]:
    """Forward, ``backward()`` into ``logits.grad``, then drop the gradient (no accumulation next call)."""

    def call() -> None:
        loss().backward()
        logits.grad = None

    return call


def measure(
    benchmark, bench: Bench, fn: Callable[[], object], x: LossInputs, *, op: str, impl: str, mode: str, kl: bool
) -> None:
    """Time ``fn`` through ``bench.run`` and add the loss rows' fields to ``extra_info``."""
    batch, seq_len = x.labels.shape
    n_tokens, vocab = batch * seq_len, SHAPES.vocab
    limit = (3 if mode == "full" else 1) * n_tokens * vocab * x.logits.element_size()
    work = Workload([x.tokens], bench.device, bench.size)  # the copy probe: one logits-sized copy
    interpreted = impl in ("sfpo_triton", "liger") and triton_interpreting()
    group = f"{op} {mode} N={n_tokens}{' kl' if kl else ''}"  # bench.run names the pytest-benchmark group after op
    bench.run(
        benchmark,
        fn,
        work=work,
        op=group,
        impl=impl,
        backend=SFPO_BACKENDS.get(impl, "baseline"),
        bytes_moved=limit,
        slow=interpreted,
    )
    info = benchmark.extra_info
    info.update(
        op=op,
        mode=mode,
        n_tokens=n_tokens,
        vocab=vocab,
        batch=batch,
        seq_len=seq_len,
        response_tokens=int(x.response_mask.sum()),
        kl=OPTIONS.kl_type if kl else "off",
        byte_limit=limit,
        bytes_counted="byte limit",
        temperature=TEMPERATURE,
    )
    if op == "grpo_loss":
        info.update(entropy_coef=0.0 if impl == "liger" else OPTIONS.entropy_coef, kl_coef=KL_COEF if kl else 0.0)
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    if stats is not None and stats.median > 0:  # the median over the limit's time at the measured copy bandwidth
        info["x_of_limit"] = round(stats.median * info["copy_gbps"] * 1e9 / limit, 3)
    info.update(peak_memory(fn, bench.device))


def out_of_memory(run: Callable[[], None]) -> str | None:
    """Run ``run``; on a CUDA out-of-memory error free what it held and return the error's first line."""
    try:
        run()
    except torch.cuda.OutOfMemoryError as err:
        message = str(err).splitlines()[0]
    else:
        return None
    gc.collect()  # the traceback's frames, and with them the inputs, are gone once the except clause ends
    torch.cuda.empty_cache()
    return message


def bench_loss(benchmark, bench: Bench, *, mode: str, impl: str, n_tokens: int, kl: bool) -> None:
    skip_unless_runs(bench, impl)

    def run() -> None:
        x = make_inputs(n_tokens, bench.device, requires_grad=True, liger_layout=impl == "liger")
        loss = loss_fn(impl, x, kl)
        fn = full_step(loss, x.logits) if mode == "full" else loss
        measure(benchmark, bench, fn, x, op="grpo_loss", impl=impl, mode=mode, kl=kl)

    error = out_of_memory(run)
    if error:
        pytest.skip(f"out of memory at N={n_tokens}, V={SHAPES.vocab} ({impl}, {mode}): {error}")


@pytest.mark.parametrize("n_tokens", N_PARAMS)
@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("mode", ["full", "fwd"])
def test_grpo_loss(benchmark, bench, mode, impl, n_tokens):
    bench_loss(benchmark, bench, mode=mode, impl=impl, n_tokens=n_tokens, kl=False)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_grpo_loss_kl(benchmark, bench, impl):
    bench_loss(benchmark, bench, mode="full", impl=impl, n_tokens=SHAPES.n_tokens[-1], kl=True)


@pytest.mark.parametrize("n_tokens", N_PARAMS)
@pytest.mark.parametrize("impl", LOGPROB_IMPLS)
def test_logprob_entropy(benchmark, bench, impl, n_tokens):
    skip_unless_runs(bench, impl)

    def run() -> None:
        x = make_inputs(n_tokens, bench.device, requires_grad=False)
        measure(benchmark, bench, logprob_fn(impl, x), x, op="logprob_entropy", impl=impl, mode="fwd", kl=False)

    error = out_of_memory(run)
    if error:
        pytest.skip(f"out of memory at N={n_tokens}, V={SHAPES.vocab} ({impl}, fwd): {error}")
