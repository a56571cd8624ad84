"""sfpo's fused head as TRL's GRPO loss (``sfpo_train.trl.fused_loss``) against ``trl.GRPOTrainer._compute_loss``.

Real TRL on the embedded addition model (Qwen2, hidden 128, vocabulary 16,
tied embeddings): a real ``GRPOTrainer`` generates and scores a batch
(``_generate_and_score_completions``, with old log-probs from
``num_iterations=2``), the weights are then perturbed so the ratio is not 1 and
clipping fires, and both losses run on the same inputs: the loss, every
parameter's gradient and every metric TRL logs must agree.

Tolerance (fp32): each side computes a completion token's log-prob and entropy
as an fp32 dot product over H = 128 terms followed by a log-sum-exp over V = 16
terms, in a different order, so each carries a relative rounding difference of
at most about (H + V) eps; the loss, each gradient entry and each metric are
the same weighted sums of such terms on both sides. Hence ``TOL = (H + V) *
eps_fp32`` (1.7e-5) relative to the largest magnitude of the compared tensor.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers.optional import import_or_skip

trl = import_or_skip("trl")

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from sfpo_kernels import triton_interpreting
from sfpo_train.tasks import default_paths
from sfpo_train.trl.fused_loss import (
    LOSS_AGG_MODES,
    compute_fused_loss,
    fused_loss_options,
    prepare_fused_loss,
)

HIDDEN, VOCAB = 128, 16  # the embedded model's
TOL = (HIDDEN + VOCAB) * torch.finfo(torch.float32).eps
# 123+456 has a 3-digit answer (4 tokens with EOS), 987+876 a 4-digit one: at max_completion_length=4 the
# second prompt's completions are cut, so mask_truncated_completions leaves some rows without any token.
PROMPTS = ["123+456=", "987+876="]
MODEL = default_paths()["model"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


def length_reward(completions, **kwargs):
    """Distinct rewards within each group, so every advantage is non-zero."""
    return [float(len(c)) + 0.1 * i for i, c in enumerate(completions)]


def make_trainer(tmp_path, tokenizer, model=MODEL, peft_config=None, trainer_class=None, **config):
    settings = dict(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        num_iterations=2,
        gradient_accumulation_steps=2,
        temperature=0.7,
        epsilon=0.05,
    )
    settings.update(config)
    return (trainer_class or trl.GRPOTrainer)(
        model=model,
        reward_funcs=length_reward,
        args=trl.GRPOConfig(**settings),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),  # two generation batches of 16 rows
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def generated_inputs(trainer, noise: float = 0.05) -> dict:
    """One micro-batch as TRL builds it, then the trainable weights moved off the rollout's (ratio != 1)."""
    inputs = trainer._generate_and_score_completions([{"prompt": PROMPTS[i // 4]} for i in range(8)])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * noise)
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # as the train loop
    return inputs


CONTROLLER = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")


def run_loss(trainer, inputs, loss_fn, mode: str):
    """``(loss, {param: grad}, {metric: values}, controller state after)`` of one call from the same start."""
    trainer.model.train(mode == "train")
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics[mode].clear()
    loss = loss_fn(trainer, trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: list(v) for k, v in trainer._metrics[mode].items()}
    return loss.detach(), grads, metrics, {k: getattr(trainer, k) for k in CONTROLLER}


def trl_loss(trainer, model, inputs):
    return trainer._compute_loss(model, inputs)


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (got - want).abs().max().item() if want.numel() else 0.0
    assert diff <= tol * max(scale, 1e-6), f"{name}: max |fused - trl| = {diff:.3g}, scale {scale:.3g}"


def assert_same_metrics(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, values in want.items():
        assert len(got[key]) == len(values), key
        for g, w in zip(got[key], values):
            assert (math.isnan(g) and math.isnan(w)) or abs(g - w) <= TOL * max(abs(w), 1e-6), (key, g, w)


def compare(trainer, inputs, mode: str = "train", fused_fn=compute_fused_loss):
    """Fused first (TRL's forward must still work after the fused head patched it), then TRL, from one state."""
    start = {k: getattr(trainer, k) for k in CONTROLLER}
    head_calls = []
    hook = trainer.model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    try:
        fused = run_loss(trainer, inputs, fused_fn, mode)
        assert not head_calls, "the fused loss ran the LM head module (materialised logits)"
    finally:
        hook.remove()
    for key, value in start.items():
        setattr(trainer, key, value)
    want = run_loss(trainer, inputs, trl_loss, mode)
    assert_close("loss", fused[0], want[0])
    assert fused[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        assert_close(name, fused[1][name], grad)
    assert_same_metrics(fused[2], want[2])
    assert fused[3]["entropy_coef"] == pytest.approx(want[3]["entropy_coef"], rel=TOL)
    assert fused[3]["_last_world_entropy"] == pytest.approx(want[3]["_last_world_entropy"], rel=TOL)
    return want


def fused_in_chunks_of_three(trainer, model, inputs):
    return compute_fused_loss(trainer, model, inputs, chunk_size=3)  # the head over several chunks of tokens


CASES = {
    "grpo-truncated-delta": dict(
        loss_type="grpo", mask_truncated_completions=True, max_completion_length=4, delta=1.5, epsilon_high=0.1
    ),
    "bnpo-kl-tool-mask": dict(loss_type="bnpo", beta=0.1),
    "dr_grpo-entropy-bonus-quantile": dict(loss_type="dr_grpo", top_entropy_quantile=0.5, entropy_coef=0.01),
    "dapo-kl-entropy-opsm-vllm-ratio": dict(
        loss_type="dapo",
        beta=0.05,
        entropy_coef=0.02,
        top_entropy_quantile=0.3,
        off_policy_mask_threshold=0.01,
        steps_per_generation=4,
    ),
    "luspo-adaptive-entropy": dict(
        loss_type="luspo",
        use_adaptive_entropy=True,
        entropy_coef=0.05,
        entropy_target=10.0,
        beta=0.1,
        use_bias_correction_kl=False,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_loss_matches_trl(case, tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, **CASES[case])
    prepare_fused_loss(trainer)
    inputs = generated_inputs(trainer)
    assert "old_per_token_logps" in inputs
    if case.startswith("bnpo"):  # tool-call tokens are outside the loss: completion_mask * tool_mask
        inputs["tool_mask"] = torch.ones_like(inputs["completion_mask"])
        inputs["tool_mask"][::3, 1] = 0
    if case.startswith("dapo"):  # vLLM's importance-sampling ratio, as TRL puts it in the inputs
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        inputs["importance_sampling_ratio"] = torch.linspace(0.5, 1.5, inputs["completion_ids"].numel()).view_as(
            inputs["completion_ids"]
        )
    if case.startswith("grpo"):
        rows_with_tokens = inputs["completion_mask"].any(-1)
        assert 0 < int(rows_with_tokens.sum()) < len(rows_with_tokens), "want both empty and non-empty rows"
    metrics = compare(trainer, inputs, fused_fn=fused_in_chunks_of_three)[2]
    assert metrics["clip_ratio/region_mean"][0] > 0, "the perturbation should make clipping fire"
    if trainer.beta:
        assert metrics["kl"][0] > 0
    if case.startswith("luspo"):  # the first window applied no bonus (no entropy measured yet), then stepped
        step = trainer.args.entropy_coef_delta
        assert trainer.entropy_coef == pytest.approx(0.05 + step)
        compare(trainer, inputs)  # the next window applies the stepped coefficient (entropy below target)
        assert trainer.entropy_coef == pytest.approx(0.05 + 2 * step)


@pytest.mark.skipif(not triton_interpreting(), reason="the Triton kernels on CPU tensors need TRITON_INTERPRET=1")
def test_fused_loss_matches_trl_on_the_triton_kernels(tmp_path, tokenizer):
    """The head's vocabulary pass in sfpo's Triton kernels (interpreted on the CPU), entropy gradient included."""
    trainer = make_trainer(tmp_path, tokenizer, loss_type="dr_grpo", beta=0.1, entropy_coef=0.01)
    prepare_fused_loss(trainer)

    def fused_on_triton(trainer, model, inputs):
        return compute_fused_loss(trainer, model, inputs, backend="triton", chunk_size=5)

    compare(trainer, generated_inputs(trainer), fused_fn=fused_on_triton)


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
def test_fused_loss_matches_trl_on_policy_in_eval(loss_type, tmp_path, tokenizer):
    """No old log-probs (one pass per generation: the ratio is 1) and eval mode's normalisers (no accumulation)."""
    trainer = make_trainer(tmp_path, tokenizer, num_iterations=1, loss_type=loss_type, entropy_coef=0.01)
    prepare_fused_loss(trainer)
    inputs = generated_inputs(trainer)
    assert "old_per_token_logps" not in inputs
    metrics = compare(trainer, inputs, mode="eval")[2]
    assert metrics["clip_ratio/region_mean"] == [0.0]


def test_fused_loss_matches_trl_under_bf16_autocast_with_an_fp32_head(tmp_path, tokenizer):
    """``cast_lm_head_to_fp32``: the backbone runs the same bf16 ops on both sides and the head in fp32 outside
    autocast, so the loss and the gradient reaching the head's input (the final norm's output) agree to the
    fp32 tolerance. (The backbone's bf16 backward then rounds that gradient's fp32-level differences to bf16
    steps, so the parameters' gradients are not compared here.)"""
    trainer = make_trainer(tmp_path, tokenizer, bf16=True, cast_lm_head_to_fp32=True, loss_type="bnpo", beta=0.1)
    prepare_fused_loss(trainer)
    inputs = generated_inputs(trainer)
    results = {}
    for name, loss_fn in (("fused", compute_fused_loss), ("trl", trl_loss)):
        grads = []

        def capture(module, args, out, grads=grads):
            out.register_hook(grads.append)  # returns None: the forward's output stays as it is

        hook = trainer.model.model.norm.register_forward_hook(capture)
        try:
            loss = run_loss(trainer, inputs, loss_fn, "train")[0]
        finally:
            hook.remove()
        results[name] = loss, grads[0]
    assert_close("loss", results["fused"][0], results["trl"][0])
    assert_close("d loss / d hidden", results["fused"][1], results["trl"][1])


def test_fused_loss_under_bf16_autocast_is_as_close_to_fp32_as_trl(tmp_path, tokenizer):
    """TRL's default bf16 autocast: both sides round the backbone's and the head's matmuls to bf16, not alike;
    the fused head's gradient is no further from the fp32 gradient than TRL's own (within 1.5x of its error)."""
    trainer = make_trainer(tmp_path / "bf16", tokenizer, bf16=True)
    prepare_fused_loss(trainer)
    inputs = generated_inputs(trainer)
    fused = run_loss(trainer, inputs, compute_fused_loss, "train")
    trl_bf16 = run_loss(trainer, inputs, trl_loss, "train")
    fp32 = make_trainer(tmp_path / "fp32", tokenizer)
    fp32.model.load_state_dict(trainer.model.state_dict())
    fp32.current_gradient_accumulation_steps = trainer.current_gradient_accumulation_steps
    exact = run_loss(fp32, inputs, trl_loss, "train")

    def flat(grads):
        return torch.cat([g.flatten().double() for g in grads.values()])

    reference = flat(exact[1])
    fused_err = (flat(fused[1]) - reference).norm()
    trl_err = (flat(trl_bf16[1]) - reference).norm()
    assert trl_err > 0, "bf16 autocast should change TRL's gradient"
    assert fused_err <= 1.5 * trl_err, (fused_err.item(), trl_err.item())
    assert abs(fused[0] - exact[0]) <= 1.5 * abs(trl_bf16[0] - exact[0]) + TOL * abs(exact[0])


def test_fused_loss_matches_trl_with_lora(tmp_path, tokenizer):
    peft = import_or_skip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    trainer = make_trainer(tmp_path, tokenizer, peft_config=config, beta=0.1)  # reference: adapters disabled
    prepare_fused_loss(trainer)
    inputs = generated_inputs(trainer, noise=0.3)
    grads = compare(trainer, inputs)[1]
    assert grads and all("lora_" in name for name in grads)
    # generation still runs through the patched forward
    assert trainer._generate_and_score_completions([{"prompt": PROMPTS[0]}] * 4)["completion_ids"].shape[0] == 4


# --------------------------------------------------------------------------- the settings


def config(**kwargs):
    return trl.GRPOConfig(output_dir="unused", report_to=[], use_cpu=True, **kwargs)


def test_options_map_trl_settings():
    o = fused_loss_options(config(loss_type="grpo", epsilon=0.1, epsilon_high=0.3, delta=2.0, temperature=0.5))
    assert (o.clip_ratio_low, o.clip_ratio_high, o.clip_ratio_c, o.temperature) == (0.1, 0.3, 2.0, 0.5)
    assert (o.loss_agg_mode, o.kl_coef, o.entropy_coef) == ("seq-mean-token-mean", 0.0, 0.0)
    o = fused_loss_options(config(loss_type="dapo", epsilon=0.2))
    assert (o.clip_ratio_high, o.clip_ratio_c, o.loss_agg_mode) == (0.2, None, "token-sum")
    assert set(LOSS_AGG_MODES) == {"grpo", "bnpo", "dr_grpo", "dapo", "luspo"}


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (dict(loss_type="sapo"), "loss_type='sapo'"),
        (dict(loss_type="cispo"), "loss_type='cispo'"),
        (dict(loss_type="vespo"), "loss_type='vespo'"),
        (dict(importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
        (dict(epsilon=1.0), "epsilon=1.0"),
        (dict(epsilon=-0.1), "epsilon=-0.1"),
        (dict(epsilon_high=-0.5), "epsilon_high=-0.5"),
        (dict(delta=1.1, epsilon_high=0.2), "delta=1.1"),
        (dict(temperature=0.0), "temperature=0.0"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_options_refuse_what_the_fused_loss_cannot_reproduce(settings, named):
    with pytest.raises(ValueError, match=f"GRPOConfig.{named}".replace(".", r"\.").replace("(", r"\(")):
        fused_loss_options(config(**settings))


@pytest.mark.parametrize(
    ("key", "value"), [("final_logit_softcapping", 30.0), ("logit_scale", 0.5), ("lm_head_multiplier", 2.0)]
)
def test_prepare_refuses_a_model_that_transforms_its_logits(key, value, tmp_path, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    setattr(model.config, key, value)
    trainer = make_trainer(tmp_path, tokenizer, model=model)
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        prepare_fused_loss(trainer)


def test_compute_refuses_multimodal_inputs(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, num_iterations=1, gradient_accumulation_steps=1)
    inputs = generated_inputs(trainer)
    inputs["pixel_values"] = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="pixel_values"):
        compute_fused_loss(trainer, trainer.model, inputs)


def test_prepare_refuses_prompt_learning_peft(tmp_path, tokenizer):
    peft = import_or_skip("peft")
    config = peft.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    trainer = make_trainer(tmp_path, tokenizer, peft_config=config)
    with pytest.raises(ValueError, match="prompt-learning PEFT"):
        prepare_fused_loss(trainer)


# --------------------------------------------------------------------------- inside trainer.train()


class FusedHeadGRPOTrainer(trl.GRPOTrainer):
    """The drop-in as a trainer uses it: checked at construction, then the loss of every micro-batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        prepare_fused_loss(self)

    def _compute_loss(self, model, inputs):
        return compute_fused_loss(self, model, inputs)


def test_training_with_the_fused_loss_matches_trl(tmp_path, tokenizer):
    """Two optimizer steps of ``trainer.train()`` (accumulation windows, TRL's loop, gradient checkpointing,
    logging) from one generation: plain SGD moves each weight by the learning rate times its summed gradients,
    so the weights agree as the gradients do, relative to how far each parameter moved (plus each step's fp32
    rounding of the weight itself); the logged metrics agree as in the single-call tests."""
    settings = dict(optim="sgd", learning_rate=0.05, max_steps=2, logging_steps=1, save_strategy="no")
    settings.update(beta=0.05, entropy_coef=0.01, top_entropy_quantile=0.5)
    start = AutoModelForCausalLM.from_pretrained(MODEL).state_dict()
    runs = {}
    for cls in (trl.GRPOTrainer, FusedHeadGRPOTrainer):
        trainer = make_trainer(tmp_path / cls.__name__, tokenizer, trainer_class=cls, **settings)
        trainer.train()
        runs[cls] = trainer
    want, got = runs[trl.GRPOTrainer], runs[FusedHeadGRPOTrainer]
    assert got.state.global_step == want.state.global_step == 2
    moved = 0.0
    for (name, w), g in zip(want.model.state_dict().items(), got.model.state_dict().values()):
        step = (w - start[name]).abs().max().item()
        moved = max(moved, step)
        rounding = 2 * 2 * torch.finfo(torch.float32).eps * w.abs().max().item()  # each step rounds w, both sides
        assert (g - w).abs().max().item() <= TOL * step + rounding, name
    assert moved > 0
    logged = ("loss", "entropy", "kl", "policy_loss", "clip_ratio/region_mean", "clip_ratio/low_mean")
    assert len(got.state.log_history) == len(want.state.log_history)
    for g, w in zip(got.state.log_history, want.state.log_history):
        assert_same_metrics({k: [g[k]] for k in logged if k in w}, {k: [w[k]] for k in logged if k in w})
