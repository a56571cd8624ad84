"""The trainer's config tree in verl's key names, each key declared once (:func:`~sfpo_train.trainer.keys.key`).

A field's declaration is its default, its help text (``sfpo train --help``), the
rules its value must meet, and whether a resumed run may change it. SFPO's keys
(``actor_rollout_ref.actor.sfpo.*``) are :class:`sfpo_train.SFPOConfig`'s fields:
their help is that class's, their checks its ``__post_init__``.
:data:`KEYS` is the table every other part reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from sfpo_kernels._backend import BACKENDS
from sfpo_kernels.loss_options import is_finite_real
from sfpo_train.sfpo_config import RESUMABLE_CHANGES, settings_schema
from sfpo_train.trainer.keys import (
    Key,
    Rule,
    at_least,
    in_range,
    key,
    key_table,
    loss_key,
    non_negative,
    nullable,
    one_of,
    positive,
)
from sfpo_train.trainer.trackers import LOGGERS, known_loggers

ADV_ESTIMATORS = ("grpo",)
ROLLOUT_NAMES = ("hf", "vllm")
LR_SCHEDULERS = ("constant", "cosine")
MODEL_DTYPES = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
OLD_LOG_PROB_MODES = ("auto", "false")  # actor.old_log_prob_from_update (omegaconf spells false as 'False')
LOSS_BACKENDS = tuple(b for b in BACKENDS if b != "cuda")  # csrc/ has the multi-tensor kernels, no fused loss
SFPO_KEY_PREFIX = "actor_rollout_ref.actor.sfpo."

EXISTING_PATH = Rule(lambda v: v is None or os.path.exists(v), "an existing path")
PLAIN_NAME = Rule(
    lambda v: v is None or (v.strip() not in ("", ".", "..") and "/" not in v and os.sep not in v),
    "a plain directory name (no path separators, not empty, '.' or '..')",
)
AT_LEAST_1 = at_least(1)
TOP_P = in_range(0, 1, low_open=True)


@dataclass
class DataConfig:
    train_files: str | None = key(
        None, "training prompts, a parquet file in verl's layout (default: the embedded addition task)", EXISTING_PATH
    )
    val_files: str | None = key(
        None, "validation prompts, same layout (default: the embedded task's 500 test problems)", EXISTING_PATH
    )
    prompt_key: str = key("prompt", "column holding the prompt (chat messages or a string)")
    reward_fn_key: str = key("data_source", "column routing the reward function (verl: data_source)")
    train_batch_size: int = key(16, "prompts per iteration", AT_LEAST_1)
    val_batch_size: int = key(256, "prompts per generate call during validation", AT_LEAST_1)
    val_max_samples: int = key(-1, "validate on the first N prompts only (-1: all)")
    max_prompt_length: int = key(16, "longest prompt in tokens; a longer one is an error before training", AT_LEAST_1)
    max_response_length: int = key(5, "tokens generated per response at most", AT_LEAST_1)
    shuffle: bool = key(True, "a new permutation of the training prompts every epoch")
    seed: int = key(1, "seed of the data order")


@dataclass
class ModelConfig:
    path: str | None = key(
        None, "a local transformers causal LM directory (default: the embedded model)", EXISTING_PATH
    )
    dtype: str = key("fp32", "compute dtype (autocast; parameters stay fp32)", one_of(*MODEL_DTYPES))
    # verl's override_config: with random_init they shape a fresh model (e.g. Qwen2.5-0.5B's sizes).
    override_config: dict = key(  # noqa: RUF009 (key() is a dataclass field)
        {}, "transformers config entries to override, e.g. {num_hidden_layers: 4}"
    )
    random_init: bool = key(False, "start from random weights (model.path gives config and tokenizer)")
    attn_implementation: str = key("sdpa", "transformers attention", one_of(*ATTN_IMPLEMENTATIONS))
    fused_lm_head: Any = key(  # noqa: RUF009 (key() is a dataclass field)
        "auto",
        "run the base model and fuse the LM head into the loss and log-prob passes (no [tokens, vocab] logits, "
        "response tokens only); auto: on for CUDA, where the logits are the memory peak; off on CPU, where the "
        "models are small (the embedded one has 16 tokens: its logits are smaller than its hidden states) and "
        "runs stay bit-identical to the model's-logits path; true on a model whose head cannot be fused (not a "
        "plain Linear, soft-capped or scaled logits) is an error",
        Rule(lambda v: isinstance(v, bool) or v == "auto", "auto, true or false", ("auto", True, False)),
        resumable=True,  # the same math either way, to fp32 rounding
    )


@dataclass
class OptimConfig:
    lr: float = key(3e-5, "AdamW learning rate (actor/lr logs the rate each iteration used)", non_negative())
    weight_decay: float = key(0.01, "AdamW weight decay", non_negative())
    betas: list = key(  # noqa: RUF009 (key() is a dataclass field)
        [0.9, 0.999],
        "AdamW betas, e.g. [0.9,0.999]",
        Rule(lambda v: len(v) == 2 and all(is_finite_real(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    )
    eps: float = key(1e-8, "AdamW epsilon", positive())
    lr_warmup_steps: int = key(-1, "linear warm-up iterations, lr from 0 (<= 0: use lr_warmup_steps_ratio)")
    lr_warmup_steps_ratio: float = key(0.0, "warm-up as a fraction of total_training_steps", in_range(0, 1))
    lr_scheduler_type: str = key("constant", "the schedule after the warm-up", one_of(*LR_SCHEDULERS))
    min_lr_ratio: float = key(0.0, "cosine floor as a fraction of lr", in_range(0, 1))
    clip_grad: float = key(
        1.0, "max gradient norm per optimizer step (verl: actor.grad_clip; inf: no clipping)", positive(), finite=False
    )


def _sfpo_keys_dataclass() -> type:
    """``actor_rollout_ref.actor.sfpo.*``: :func:`sfpo_train.sfpo.settings_schema`, ``enable`` defaulting to true.

    Each field's declaration is the SFPOConfig field's: its help text, no rules of its own (SFPOConfig
    checks its values), resumable where SFPO's state accepts a change (``RESUMABLE_CHANGES``).
    """
    entries = [
        (s.name, s.type, key(s.default, s.help, resumable=s.name in RESUMABLE_CHANGES))
        for s in settings_schema(enable_default=True)
    ]
    keys = make_dataclass("SFPOKeys", entries)
    keys.__doc__ = "``actor_rollout_ref.actor.sfpo.*``: the fields of :class:`sfpo_train.SFPOConfig` plus ``enable``."
    keys.__module__ = (
        __name__  # make_dataclass would say "types" (its module= needs Python 3.12): pickling finds it here
    )
    return keys


SFPOKeys = _sfpo_keys_dataclass()


@dataclass
class ActorConfig:
    ppo_mini_batch_size: int = key(16, "prompts per optimizer step (must divide data.train_batch_size)", AT_LEAST_1)
    ppo_micro_batch_size_per_gpu: int = key(128, "responses per forward/backward (gradient accumulation)", AT_LEAST_1)
    ppo_epochs: int = key(1, "passes over the batch per update pass", AT_LEAST_1)
    shuffle: bool = key(False, "shuffle responses before splitting into mini-batches")
    clip_ratio_low: float = loss_key("clip_ratio_low")
    clip_ratio_high: float = loss_key("clip_ratio_high")
    clip_ratio_c: float | None = loss_key("clip_ratio_c")
    loss_agg_mode: str = loss_key("loss_agg_mode", "seq-mean-token-sum-norm is Dr. GRPO's")
    entropy_coeff: float = loss_key("entropy_coef")
    use_kl_loss: bool = key(False, "add a KL penalty to a frozen reference (the starting model)")
    kl_loss_coef: float = loss_key("kl_coef", "0 in the loss without use_kl_loss", non_negative(), default=0.001)
    kl_loss_type: str = loss_key("kl_type", "k1 = kl, k2 = mse, k3 = low_var_kl")
    kernel_backend: str | None = key(
        None,
        "loss kernels (null: triton on GPU, torch on CPU; the cuda backend has no fused loss)",
        one_of(*LOSS_BACKENDS, nullable=True),
    )
    old_log_prob_from_update: str = key(
        "auto",
        "auto: when on-policy (ppo_epochs=1, one mini-batch, no dropout) the first update pass's forward gives "
        "the old log-probs and entropy, no separate pass | false: always the separate pass",
        Rule(lambda v: str(v).lower() in OLD_LOG_PROB_MODES, "auto or false", OLD_LOG_PROB_MODES),
    )
    optim: OptimConfig = field(default_factory=OptimConfig)
    sfpo: SFPOKeys = field(default_factory=SFPOKeys)


@dataclass
class ValKwargs:
    do_sample: bool = key(False, "sample during validation (false: greedy)")
    temperature: float = key(0.0, "validation temperature (with do_sample)", non_negative())
    top_p: float = key(1.0, "validation top-p (with do_sample)", TOP_P)
    top_k: int = key(-1, "validation top-k (with do_sample; -1: off)")
    n: int = key(1, "responses per validation prompt", Rule(lambda v: v == 1, "1 (one response per test prompt)"))


@dataclass
class RolloutConfig:
    name: str = key("hf", "rollout engine: hf (transformers generate), vllm (optional extra)", one_of(*ROLLOUT_NAMES))
    n: int = key(8, "responses per prompt (the GRPO group size)", AT_LEAST_1)
    temperature: float = loss_key("temperature", "also the sampling temperature of the rollouts")
    top_p: float = key(1.0, "nucleus sampling", TOP_P)
    top_k: int = key(-1, "top-k sampling (-1: off)")
    do_sample: bool = key(True, "sample (false: greedy)")
    log_prob_micro_batch_size_per_gpu: int = key(128, "responses per forward of the old-log-prob pass", AT_LEAST_1)
    gpu_memory_utilization: float = key(
        0.5, "vLLM's share of GPU memory (its KV cache on a GPU)", in_range(0, 1, low_open=True)
    )
    kv_cache_memory_gb: float | None = key(
        None,
        "vLLM's KV cache in GiB (null: gpu_memory_utilization on a GPU, twice one generation batch at full "
        "length on the CPU, in [64 MiB, a quarter of the free RAM])",
        nullable(positive()),
    )
    val_kwargs: ValKwargs = field(default_factory=ValKwargs)


@dataclass
class RefConfig:
    log_prob_micro_batch_size_per_gpu: int = key(128, "responses per forward of the reference pass", AT_LEAST_1)


@dataclass
class ActorRolloutRefConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ref: RefConfig = field(default_factory=RefConfig)


@dataclass
class FilterGroupsConfig:
    """DAPO's dynamic sampling: drop groups whose rewards are all equal and refill the batch."""

    enable: bool = key(False, "DAPO dynamic sampling: drop groups with equal rewards, refill the batch")
    metric: str = key(
        "acc",
        "what must differ within a group: score, or acc (a reward dict's 'acc' entry, else the score)",
        one_of("acc", "score"),
    )
    max_num_gen_batches: int = key(10, "give up after this many generation batches (<= 0: never)")


@dataclass
class AlgorithmConfig:
    adv_estimator: str = key("grpo", "advantage estimator", one_of(*ADV_ESTIMATORS))
    norm_adv_by_std_in_grpo: bool = key(True, "divide by the group's std (false: Dr. GRPO)")
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)


@dataclass
class CustomRewardFunctionConfig:
    path: str | None = key(
        None,
        "a .py file with compute_score(data_source, solution_str, ground_truth, extra_info); it is imported, so "
        "its code runs as the user running sfpo train (as in verl): only give a file you trust",
        EXISTING_PATH,
    )
    name: str = key("compute_score", "the function's name in that file", Rule(bool, "the name of a function"))


@dataclass
class TrainerSection:
    project_name: str = key("sfpo", "project name (recorded in the run's config)")
    experiment_name: str | None = key(
        None,
        "run name; the run lives in default_local_dir/experiment_name (default: preset-[sfpo-]algorithm-time)",
        PLAIN_NAME,
    )
    default_local_dir: str = key("runs", "where runs are written")
    total_training_steps: int = key(300, "RL iterations", AT_LEAST_1, resumable=True)
    test_freq: int = key(50, "validate every N iterations and at the end (<= 0: only at the end)", resumable=True)
    save_freq: int = key(100, "checkpoint every N iterations and at the end (<= 0: never)", resumable=True)
    val_before_train: bool = key(True, "validate the starting model first")
    device: str = key("auto", "where the run computes (auto: cuda when torch sees a GPU)", one_of(*DEVICES))
    seed: int = key(1, "seed of sampling and initialisation")
    progress_bar: bool = key(True, "show the progress bar", resumable=True)
    logger: Any = key(  # noqa: RUF009 (key() is a dataclass field)
        ["console"],
        "where metrics go besides metrics.jsonl/.csv (always written), verl's backends: console (a line per step, "
        "step:N - key:value - ...), tensorboard (in $TENSORBOARD_DIR, else tensorboard_log/<project_name>/"
        "<experiment_name>; the tensorboard extra), wandb (a W&B run; WANDB_MODE=offline needs no network; the "
        "wandb extra), file (verl's, $VERL_FILE_LOGGER_PATH, else $VERL_FILE_LOGGER_ROOT/<project_name>/"
        "<experiment_name>.jsonl); e.g. [console,tensorboard], [] for none",
        Rule(
            known_loggers,
            f"a list of {', '.join(LOGGERS)} (each once; verl's other loggers are not written here), "
            "e.g. [console,tensorboard]",
        ),
        resumable=True,  # where the metrics go, not what the run computes
    )


@dataclass
class TrainerConfig:
    data: DataConfig = field(default_factory=DataConfig)
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    custom_reward_function: CustomRewardFunctionConfig = field(default_factory=CustomRewardFunctionConfig)
    trainer: TrainerSection = field(default_factory=TrainerSection)


KEYS: dict[str, Key] = key_table(TrainerConfig)
"""Every settable key, dotted, with its declaration, in the tree's order."""
# The keys a resumed run may change (with --resume overrides); every other key must equal the checkpoint's.
RESUMABLE_KEYS: tuple[str, ...] = tuple(name for name, k in KEYS.items() if k.resumable)
# The loss options' fields, as the keys that set them (a loss option's error names its key).
LOSS_OPTION_KEYS: dict[str, str] = {k.loss_option: name for name, k in KEYS.items() if k.loss_option is not None}
