"""SFPO in TRL: one training iteration of TRL's trainers against ``sfpo train``'s, and TRL's loss against sfpo's fused head.

``test_trl_step[arm]``: one iteration (generation, reward, old log-probs where a generation feeds
several passes, the update passes, the ``Trainer``'s own per-step work) of each arm of
``bench/trl_arms.py`` -- TRL GRPO (with TRL's default activation checkpointing and without it), TRL
with ``num_iterations=K+1``, ``SFPOGRPOTrainer`` (K=3, alpha 0.8), GRPO and SFPO again with sfpo's
fused head, and ``sfpo train``'s GRPO and SFPO --
on the shipped addition model and task with the same batch and optimizer settings, all in one
process. Rounds are interleaved (one iteration of every arm per round, the order rotated by one
each round), each iteration timed in CPU time of the process (``time.process_time``: what a busy
shared machine disturbs least); the row's pytest-benchmark statistics are those CPU times of the
measured rounds (the warm-up rounds are left out). ``extra_info`` holds the medians, min and max,
and for the SFPO arms SFPO's own work (``sfpo_own_*``: ``bench/trl_arms.py`` says what it counts),
the snapshot and reposition times the trainer logs; for ``sfpo train`` its profiler's stage times.

``test_trl_loss[impl]``: TRL's loss (``GRPOTrainer.compute_loss``, TRL 1.16's chunked LM head: tiles
of 4096 tokens x 32768 vocabulary columns; on the CPU it scores every position and folds each tile
with fp32 torch temporaries, on a GPU only the completion tokens, in Triton) against sfpo's fused head (``SFPOGRPOTrainer(fused_head=
True)``), each the loss and its backward on the same micro-batch of a one-layer Qwen2 (hidden 64)
whose vocabulary makes the logits dominate: CPU time interleaved as above, and the peak of the CPU
allocator during one call (``bench/cpu_memory.py``) with the largest single tensor.

Scales (``SFPO_BENCH_TRL``): ``small`` (default, CI-sized: 4 prompts x 4 responses, 3 rounds; loss
N = 512 tokens, V = 4096) and ``full`` (the embedded default's 16 prompts x 8 responses, 15 rounds;
loss N = 4096, V = 32768, the shape of the targets). ``bench/summary.py`` sets the rows against the
targets (SFPO's own work < 2% of a TRL iteration; the fused head no slower than TRL's loss and >= 8x
less peak memory at N = 4096, V = 32768; ``sfpo train``'s GRPO step <= 0.8x TRL's) and says by how
much each is met or missed. Runs on the CPU whatever the machine has; skips without TRL.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import pytest
import torch

from tests.helpers.optional import import_or_skip

import_or_skip("trl")

from bench.cpu_memory import cpu_allocator_peak  # noqa: E402
from bench.linear_baselines import largest_tensor  # noqa: E402
from bench.provenance import package_versions  # noqa: E402
from bench.trl_arms import ARMS, SFPO_ALPHA, SFPO_K, bench_scale, build_arm, fused_head_missing, run_interleaved  # noqa: E402

SCALE, SHAPE = bench_scale()
LOSS_IMPLS = ("trl", "sfpo_fused")
LOSS_MODEL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2
)
LOSS_PROMPT = 8  # prompt tokens per row (only the completion tokens reach the head)
OLD_NOISE = 0.1  # old log-probs = log-probs + N(0, 0.1): some ratios clip


@dataclass
class Runs:
    """Each arm's (or loss impl's) measured rounds, or the reason it did not run, and the conditions."""

    results: dict = field(default_factory=dict)
    conditions: dict = field(default_factory=dict)


class _Skipped(str):
    """A reason an arm did not run (a missing part, not a failure)."""


def _conditions() -> dict:
    versions = package_versions()
    return {
        "versions": {k: versions.get(k) for k in ("python", "torch", "transformers", "trl")},
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def _poisoned() -> None:
    if os.environ.get("SFPO_POISON_ALLOCATIONS") == "1":
        pytest.skip("run bench/ in a pytest process of its own (tests/conftest.py poisons allocations)")


class _ReplayClock:
    """A timer for pytest-benchmark that reads back durations measured elsewhere: two calls per round."""

    __name__ = "time.process_time (interleaved rounds)"

    def __init__(self, seconds: list[float]):
        self._seconds, self._calls, self._now = list(seconds), 0, 0.0

    def __call__(self) -> float:
        if self._calls % 2:  # a round's end
            self._now += self._seconds[self._calls // 2]
        self._calls += 1
        return self._now


def record_cpu_times(benchmark, seconds: list[float]) -> None:
    """Make ``seconds`` (CPU times of the interleaved rounds) the row's pytest-benchmark statistics.

    pytest-benchmark times the calls it makes itself; these rounds ran interleaved with the other
    arms before, so its timer is replaced for this row by one that reads them back.
    """
    benchmark._timer = _ReplayClock(seconds)
    benchmark.pedantic(lambda: None, rounds=len(seconds), warmup_rounds=0, iterations=1)
    stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        assert stats.data == pytest.approx(seconds), "pytest-benchmark no longer reads its timer as this expects"


def _spread(values: list[float], scale: float = 1.0, digits: int = 3) -> dict:
    med, lo, hi = statistics.median(values), min(values), max(values)
    return {"median": round(med * scale, digits), "min": round(lo * scale, digits), "max": round(hi * scale, digits)}


# --------------------------------------------------------------------------- one training iteration


@pytest.fixture(scope="module")
def step_runs(tmp_path_factory) -> Runs:
    _poisoned()
    root = str(tmp_path_factory.mktemp("bench_trl"))
    runs = Runs()
    arms = {}
    for name, spec in ARMS.items():
        missing = fused_head_missing() if spec.head == "sfpo_fused" else None
        if missing:
            runs.results[name] = _Skipped(missing)
            continue
        try:
            arms[name] = build_arm(name, root, SHAPE)
        except Exception as e:  # this arm's row reports it; the others run
            runs.results[name] = e
    before = _conditions()
    try:
        runs.results.update(run_interleaved(arms, SHAPE.rounds, SHAPE.warmup))
    finally:
        for arm in arms.values():
            arm.close()
    runs.conditions = {**before, "load_avg_1m_end": round(os.getloadavg()[0], 2)}
    return runs


@pytest.mark.parametrize("arm", list(ARMS))
def test_trl_step(benchmark, step_runs, arm):
    outcome = step_runs.results[arm]
    if isinstance(outcome, _Skipped):
        pytest.skip(str(outcome))
    if isinstance(outcome, BaseException):
        raise outcome
    spec = ARMS[arm]
    cpu = [r["cpu_s"] for r in outcome]
    benchmark.group = f"trl_step {SCALE}"
    record_cpu_times(benchmark, cpu)
    info = benchmark.extra_info
    info.update(step_runs.conditions)
    info.update(
        op="trl_step",
        scale=SCALE,
        arm=arm,
        trainer=spec.trainer,
        method=spec.method,
        head=spec.head,
        activation_checkpointing=spec.checkpointing,
        model="the shipped addition model (Qwen2, hidden 128, 2 layers, vocab 16)",
        prompts=SHAPE.prompts,
        responses_per_prompt=SHAPE.n,
        response_length=SHAPE.response_length,
        inner_steps=SFPO_K if spec.method != "grpo" else 0,
        alpha=SFPO_ALPHA if spec.method == "sfpo" else None,
        rounds=len(cpu),
        warmup_rounds=SHAPE.warmup,
        clock="process_time",
        **{f"cpu_ms_{k}": v for k, v in _spread(cpu, 1e3).items()},
    )
    if spec.method == "sfpo":
        assert all(r["sfpo/inner_steps_run"] == SFPO_K for r in outcome), "an SFPO iteration ran fewer than K passes"
    if spec.trainer == "trl" and spec.method == "sfpo":
        own = [r["sfpo_own_cpu_s"] for r in outcome]
        info.update({f"sfpo_own_ms_{k}": v for k, v in _spread(own, 1e3, 4).items()})
        share = [o / c for o, c in zip(own, cpu, strict=True)]
        info.update({f"sfpo_own_share_{k}": v for k, v in _spread(share, 1.0, 5).items()})
        for key in ("timing_s/sfpo_snapshot", "timing_s/sfpo_reposition"):
            info[f"{key}_median"] = statistics.median(r[key] for r in outcome)
    if spec.trainer == "sfpo train":
        for key in outcome[0]:
            if key.startswith("timing_s/"):
                info[f"{key}_median"] = statistics.median(r[key] for r in outcome)


# --------------------------------------------------------------------------- the loss where the logits dominate


def _loss_model(vocab: int, max_positions: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)  # the same weights for every impl
    config = Qwen2Config(
        **LOSS_MODEL,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return Qwen2ForCausalLM(config)


def _loss_trainer(impl: str, output_dir: str):
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from bench.trl_arms import grpo_config
    from sfpo_train.trl import SFPOGRPOTrainer
    from sfpo_train.trl.task import addition_dataset, addition_reward, model_path

    rows, completion = SHAPE.loss_rows, SHAPE.loss_completion
    args = grpo_config(
        output_dir,
        SHAPE,
        per_device_train_batch_size=rows,
        num_generations=2,
        max_completion_length=completion,
    )
    common = dict(
        model=_loss_model(SHAPE.loss_vocab, LOSS_PROMPT + completion + 8),
        reward_funcs=addition_reward,
        args=args,
        train_dataset=addition_dataset(limit=rows),
        processing_class=AutoTokenizer.from_pretrained(model_path()),
    )
    trainer = GRPOTrainer(**common) if impl == "trl" else SFPOGRPOTrainer(**common, fused_head=True)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # train() sets it before its loop
    return trainer


def _loss_inputs(trainer) -> dict:
    """One micro-batch as TRL's ``_prepare_inputs`` hands it over: ids, masks (0-25% trailing padding), advantages
    (one per row, alternating signs) and old log-probs near the current ones."""
    rows, completion, vocab = SHAPE.loss_rows, SHAPE.loss_completion, SHAPE.loss_vocab
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(2, vocab, (rows, LOSS_PROMPT), generator=g)
    completion_ids = torch.randint(2, vocab, (rows, completion), generator=g)
    lengths = torch.randint(int(0.75 * completion), completion + 1, (rows,), generator=g)
    completion_mask = (torch.arange(completion) < lengths[:, None]).int()
    signs = torch.tensor([1.0, -1.0]).repeat(rows)[:rows]
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids, dtype=torch.int),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": (torch.rand(rows, generator=g) + 0.1) * signs,
    }
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, completion)
    inputs["old_per_token_logps"] = logps + OLD_NOISE * torch.randn(logps.shape, generator=g)
    return inputs


def _loss_call(trainer, inputs):
    """One loss + backward through ``trainer`` (its gradients dropped after)."""

    def call() -> None:
        trainer.compute_loss(trainer.model, inputs).backward()
        trainer.model.zero_grad(set_to_none=True)

    return call


@pytest.fixture(scope="module")
def loss_runs(tmp_path_factory) -> Runs:
    _poisoned()
    root = str(tmp_path_factory.mktemp("bench_trl_loss"))
    runs = Runs()
    calls = {}
    inputs = None  # TRL's trainer makes them (with its old log-probs); every impl gets the same
    for impl in LOSS_IMPLS:
        missing = fused_head_missing() if impl == "sfpo_fused" else None
        if missing:
            runs.results[impl] = _Skipped(missing)
            continue
        try:
            trainer = _loss_trainer(impl, os.path.join(root, impl))
            inputs = _loss_inputs(trainer) if inputs is None else inputs
            calls[impl] = _loss_call(trainer, inputs)
            calls[impl]()  # warm-up
        except Exception as e:  # this impl's row reports it; the other runs
            runs.results[impl] = e
            calls.pop(impl, None)
    runs.conditions = _conditions()
    times: dict[str, list[float]] = {impl: [] for impl in calls}
    order = list(calls)
    for r in range(SHAPE.loss_rounds):
        for impl in order[r % len(order) :] + order[: r % len(order)]:
            start = time.process_time()
            calls[impl]()
            times[impl].append(time.process_time() - start)
    for impl, call in calls.items():
        runs.results[impl] = {
            "cpu_s": times[impl],
            "response_tokens": int(inputs["completion_mask"].sum()),
            **cpu_allocator_peak(call),
            **largest_tensor(call),
        }
    runs.conditions["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return runs


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_trl_loss(benchmark, loss_runs, impl):
    outcome = loss_runs.results[impl]
    if isinstance(outcome, _Skipped):
        pytest.skip(str(outcome))
    if isinstance(outcome, BaseException):
        raise outcome
    benchmark.group = f"trl_loss {SCALE}"
    record_cpu_times(benchmark, outcome["cpu_s"])
    info = benchmark.extra_info
    info.update(loss_runs.conditions)
    info.update({k: v for k, v in outcome.items() if k != "cpu_s"})
    info.update(
        op="trl_loss",
        scale=SCALE,
        impl=impl,
        mode="full",
        n_tokens=SHAPE.loss_tokens,
        vocab=SHAPE.loss_vocab,
        hidden=LOSS_MODEL["hidden_size"],
        dtype="float32",
        rows=SHAPE.loss_rows,
        rounds=len(outcome["cpu_s"]),
        clock="process_time",
        **{f"cpu_ms_{k}": v for k, v in _spread(outcome["cpu_s"], 1e3).items()},
    )
