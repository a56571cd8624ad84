"""Tiny real TRL runs on the embedded addition task and model (CPU), for the tests of sfpo_train.trl."""

from __future__ import annotations

import torch

from tests.helpers.optional import import_or_skip


def trl_parts():
    """``(trl, SFPOGRPOTrainer)``; skips the test without TRL (fails under SFPO_REQUIRE=trl)."""
    trl = import_or_skip("trl")
    from sfpo_train.trl import SFPOGRPOTrainer

    return trl, SFPOGRPOTrainer


def grpo_args(output_dir, **overrides):
    """A ``GRPOConfig`` for a few optimizer steps on the CPU: 2 prompts x 4 completions per generation."""
    trl, _ = trl_parts()
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=5,
        max_steps=6,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        bf16=False,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return trl.GRPOConfig(**settings)


def make_trainer(output_dir, *, cls=None, sfpo=None, rows: int = 256, eval_rows: int = 0, fused_head=None, **overrides):
    """A trainer on the shipped model and the first ``rows`` training problems; ``cls`` None: ``SFPOGRPOTrainer``.

    Counts its generations in ``trainer.generations`` (one per ``_generate_and_score_completions``) and
    records the optimizer step each training one happened at in ``trainer.generation_steps`` and its prompts
    in ``trainer.generated_prompts``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfpo_train.trl.task import addition_dataset, addition_reward, model_path

    _, sfpo_trainer = trl_parts()
    cls = sfpo_trainer if cls is None else cls
    extra = {}
    if cls is sfpo_trainer:
        extra["sfpo"] = sfpo
        if fused_head is not None:
            extra["fused_head"] = fused_head
    trainer = cls(
        model=AutoModelForCausalLM.from_pretrained(model_path()),
        reward_funcs=addition_reward,
        args=grpo_args(output_dir, **overrides),
        train_dataset=addition_dataset(limit=rows),
        eval_dataset=addition_dataset("test", limit=eval_rows) if eval_rows else None,
        processing_class=AutoTokenizer.from_pretrained(model_path()),
        **extra,
    )
    trainer.generations = 0
    trainer.generation_steps = []
    trainer.generated_prompts = []
    generate = trainer._generate_and_score_completions

    def counted(batch, *args, **kwargs):
        if trainer.model.training:
            trainer.generations += 1
            trainer.generation_steps.append(trainer.state.global_step)
            trainer.generated_prompts.append([row["prompt"] for row in batch])
        return generate(batch, *args, **kwargs)

    trainer._generate_and_score_completions = counted
    return trainer


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)
