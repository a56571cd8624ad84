"""The standalone trainer's configuration, in verl's key names and meanings.

A verl user writes the same overrides they already know
(``data.train_batch_size=16 actor_rollout_ref.rollout.n=8
actor_rollout_ref.actor.optim.lr=3e-5 trainer.total_training_steps=300``):
the tree below mirrors verl 0.9.1's ``ppo_trainer.yaml`` for every key this
trainer uses, plus ``actor_rollout_ref.actor.sfpo.*`` for SFPO. Keys are typed
(omegaconf structured configs): an unknown key or a value of the wrong type is
an error before any work, and :func:`validate` checks what types cannot (batch
sizes that do not divide, missing paths, out-of-range values).

Sizes follow verl: ``data.train_batch_size`` and ``ppo_mini_batch_size`` count
prompts; each prompt has ``rollout.n`` responses; the micro-batch sizes
(``*_micro_batch_size_per_gpu``) count responses.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, make_dataclass
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from sfpo_kernels._backend import BACKENDS, resolve_backend
from sfpo_kernels.fused_loss import GRPOLossOptions
from sfpo_train.sfpo import RESUMABLE_CHANGES, SFPOConfig, settings_schema

ADV_ESTIMATORS = ("grpo",)
ROLLOUT_NAMES = ("hf", "vllm")
LR_SCHEDULERS = ("constant", "cosine")
MODEL_DTYPES = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
OLD_LOG_PROB_MODES = ("auto", "false")  # actor.old_log_prob_from_update (omegaconf spells false as 'False')
LOSS_BACKENDS = tuple(b for b in BACKENDS if b != "cuda")  # csrc/ has the multi-tensor kernels, no fused loss
SFPO_KEY_PREFIX = "actor_rollout_ref.actor.sfpo."
# The keys a resumed run may change (with --resume overrides); every other key must equal the checkpoint's:
# its length and bookkeeping, and the SFPO settings that are not schedule (SFPO.load_state_dict accepts a
# change of them, e.g. offloading the snapshot to resume on a smaller GPU).
RESUMABLE_KEYS = (
    "trainer.total_training_steps",
    "trainer.save_freq",
    "trainer.test_freq",
    "trainer.progress_bar",
    "actor_rollout_ref.model.fused_lm_head",  # the same math either way, to fp32 rounding
    *(SFPO_KEY_PREFIX + name for name in RESUMABLE_CHANGES),
)
# The fields of the loss options and of SFPOConfig, as the keys that set them (their errors name the key).
LOSS_OPTION_KEYS = {
    "temperature": "actor_rollout_ref.rollout.temperature",
    "clip_ratio_low": "actor_rollout_ref.actor.clip_ratio_low",
    "clip_ratio_high": "actor_rollout_ref.actor.clip_ratio_high",
    "clip_ratio_c": "actor_rollout_ref.actor.clip_ratio_c",
    "kl_coef": "actor_rollout_ref.actor.kl_loss_coef",
    "kl_type": "actor_rollout_ref.actor.kl_loss_type",
    "entropy_coef": "actor_rollout_ref.actor.entropy_coeff",
    "loss_agg_mode": "actor_rollout_ref.actor.loss_agg_mode",
}


# --------------------------------------------------------------------------- the tree (verl's names)


@dataclass
class DataConfig:
    train_files: str | None = None  # None: the embedded default task's files
    val_files: str | None = None
    prompt_key: str = "prompt"
    reward_fn_key: str = "data_source"
    train_batch_size: int = 16
    val_batch_size: int = 256  # prompts per generate call during validation
    val_max_samples: int = -1  # -1: the whole validation set
    max_prompt_length: int = 16
    max_response_length: int = 5
    shuffle: bool = True
    seed: int = 1


@dataclass
class ModelConfig:
    path: str | None = None  # None: the embedded default model
    dtype: str = "fp32"  # parameters and compute dtype: fp32 | bf16 | fp16
    # verl's override_config: keys applied to the transformers config. With
    # random_init they shape a fresh model (e.g. Qwen2.5-0.5B's sizes).
    override_config: dict = field(default_factory=dict)
    random_init: bool = False
    attn_implementation: str = "sdpa"
    # auto | true | false: the LM head fused into the loss and log-prob passes (sfpo_kernels.linear_*),
    # no [tokens, vocab] logits; auto: on for CUDA, off on CPU (see trainer/key_help.py).
    fused_lm_head: Any = "auto"


@dataclass
class OptimConfig:
    lr: float = 3e-5
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_warmup_steps: int = -1  # <= 0: use lr_warmup_steps_ratio (verl)
    lr_warmup_steps_ratio: float = 0.0
    lr_scheduler_type: str = "constant"  # constant | cosine (after the warm-up)
    min_lr_ratio: float = 0.0
    clip_grad: float = 1.0  # max grad norm per optimizer step (verl: actor.grad_clip)


def _sfpo_keys_dataclass() -> type:
    """``actor_rollout_ref.actor.sfpo.*``: :func:`sfpo_train.sfpo.settings_schema`, ``enable`` defaulting to true."""
    entries = [(s.name, s.type, field(default=s.default)) for s in settings_schema(enable_default=True)]
    keys = make_dataclass("SFPOKeys", entries)
    keys.__doc__ = "``actor_rollout_ref.actor.sfpo.*``: the fields of :class:`sfpo_train.SFPOConfig` plus ``enable``."
    keys.__module__ = (
        __name__  # make_dataclass would say "types" (its module= needs Python 3.12): pickling finds it here
    )
    return keys


SFPOKeys = _sfpo_keys_dataclass()


@dataclass
class ActorConfig:
    ppo_mini_batch_size: int = 16
    ppo_micro_batch_size_per_gpu: int = 128
    ppo_epochs: int = 1
    shuffle: bool = False
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: float | None = 3.0  # dual clip; null: off
    loss_agg_mode: str = "token-mean"
    entropy_coeff: float = 0.0
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.001
    kl_loss_type: str = "low_var_kl"
    kernel_backend: str | None = None  # sfpo_kernels backend for the loss: triton | torch | None (default)
    old_log_prob_from_update: str = "auto"  # auto: the first update pass supplies the old log-probs when on-policy
    optim: OptimConfig = field(default_factory=OptimConfig)
    sfpo: SFPOKeys = field(default_factory=SFPOKeys)


@dataclass
class ValKwargs:
    do_sample: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1


@dataclass
class RolloutConfig:
    name: str = "hf"  # hf (transformers generate) | vllm
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    do_sample: bool = True
    log_prob_micro_batch_size_per_gpu: int = 128
    gpu_memory_utilization: float = 0.5  # vllm on a GPU
    kv_cache_memory_gb: float | None = None  # vllm: the KV cache in GiB (null: see trainer/key_help.py)
    val_kwargs: ValKwargs = field(default_factory=ValKwargs)


@dataclass
class RefConfig:
    log_prob_micro_batch_size_per_gpu: int = 128


@dataclass
class ActorRolloutRefConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ref: RefConfig = field(default_factory=RefConfig)


@dataclass
class FilterGroupsConfig:
    """DAPO's dynamic sampling: drop groups whose rewards are all equal and refill the batch."""

    enable: bool = False
    metric: str = "acc"  # acc | score (the same number for rule rewards)
    max_num_gen_batches: int = 10  # <= 0: no limit


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "grpo"
    norm_adv_by_std_in_grpo: bool = True  # False: Dr. GRPO
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)


@dataclass
class CustomRewardFunctionConfig:
    path: str | None = None  # a .py file defining compute_score(data_source, solution_str, ground_truth, extra_info)
    name: str = "compute_score"


@dataclass
class TrainerSection:
    project_name: str = "sfpo"
    experiment_name: str | None = None  # None: "<preset>-[sfpo-]<algorithm>-<time>"
    default_local_dir: str = "runs"
    total_training_steps: int = 300
    test_freq: int = 50  # validate every N steps (and at the end); <= 0: only at the end
    save_freq: int = 100  # checkpoint every N steps and at the end; <= 0: never
    val_before_train: bool = True
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1
    progress_bar: bool = True


@dataclass
class TrainerConfig:
    data: DataConfig = field(default_factory=DataConfig)
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    custom_reward_function: CustomRewardFunctionConfig = field(default_factory=CustomRewardFunctionConfig)
    trainer: TrainerSection = field(default_factory=TrainerSection)


# --------------------------------------------------------------------------- presets and algorithms

# Each preset is a list of overrides applied before the user's.
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: SFPO on the shipped addition model, a few minutes on 2 CPU cores.
    # tau = 3: with 16 x 8 responses of <= 5 tokens the per-iteration entropy is noisy, and at the
    # contract's tau = 1 the trigger fires by noise at its first check (iteration 31, measured).
    "default": {"actor_rollout_ref.actor.sfpo.zscore_threshold": 3.0},
    # A few seconds end to end: CI and quick checks of an install.
    "smoke": {
        "data.train_batch_size": 4,
        "actor_rollout_ref.rollout.n": 4,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 2,
        "data.val_max_samples": 32,
        "trainer.total_training_steps": 3,
        "trainer.test_freq": -1,
        "trainer.save_freq": -1,
        "actor_rollout_ref.actor.sfpo.zscore_window": 2,
    },
    # Qwen2.5-0.5B's shapes (random weights, the addition tokenizer's ids over the
    # full 151936 vocabulary), bf16 on a GPU: per-stage cost at a real model size.
    "qwen2.5-0.5b": {
        "trainer.device": "cuda",
        "actor_rollout_ref.model.dtype": "bf16",
        "actor_rollout_ref.model.random_init": True,
        "actor_rollout_ref.model.override_config": {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "max_position_embeddings": 32768,
            "tie_word_embeddings": True,
        },
        "data.train_batch_size": 64,
        "actor_rollout_ref.actor.ppo_mini_batch_size": 16,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 64,
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": 128,
        "actor_rollout_ref.actor.optim.lr": 1e-6,
        "trainer.total_training_steps": 20,
        "trainer.test_freq": -1,
        "trainer.save_freq": -1,
        "trainer.val_before_train": False,
    },
}

# verl's recipes for the three algorithms, as overrides (applied after the preset).
ALGORITHMS: dict[str, dict[str, Any]] = {
    "grpo": {},
    # Dr. GRPO: no std in the advantage, token sums normalised by a constant length.
    "drgrpo": {
        "algorithm.norm_adv_by_std_in_grpo": False,
        "actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-sum-norm",
    },
    # DAPO: clip-higher, token-mean, dynamic sampling.
    "dapo": {
        "actor_rollout_ref.actor.clip_ratio_low": 0.2,
        "actor_rollout_ref.actor.clip_ratio_high": 0.28,
        "actor_rollout_ref.actor.loss_agg_mode": "token-mean",
        "algorithm.filter_groups.enable": True,
    },
}


def algorithm_of(lookup) -> str:
    """The :data:`ALGORITHMS` recipe a config holds (``lookup(dotted key)`` gives its values): the first
    other than grpo whose every setting it has, else ``grpo``."""
    for name, recipe in ALGORITHMS.items():
        if recipe and all(lookup(key) == value for key, value in recipe.items()):
            return name
    return "grpo"


def _leaf_keys(node, prefix: str = "") -> list[str]:
    out = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig) and name != "actor_rollout_ref.model.override_config":
            out.extend(_leaf_keys(value, name + "."))
        else:
            out.append(name)
    return out


def config_keys() -> list[str]:
    """Every settable key, dotted."""
    return _leaf_keys(OmegaConf.structured(TrainerConfig))


def apply_overrides(cfg: DictConfig, items: dict[str, Any] | list[str], source: str) -> DictConfig:
    """``cfg`` with ``items`` merged (a dict, or ``key=value`` strings); errors name ``source`` and the key."""
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            if "=" not in item:
                raise ValueError(
                    f"{source}: override {item!r} must look like key=value (e.g. data.train_batch_size=32)"
                )
            key, value = item.split("=", 1)
            if value.startswith("{"):  # hydra writes {a:1,b:2}; YAML needs a space after each colon
                value = re.sub(r"([\w.]+):(?=\S)", r"\1: ", value)
            pairs.append((key.lstrip("+"), value))  # hydra's '+' (add a key) is accepted for known keys
    keys = set(config_keys())
    for key, value in pairs:
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; `sfpo train --help-config` lists every key"
            raise ValueError(f"{source}: unknown config key {key!r}{hint}")
        try:
            parsed = (
                OmegaConf.from_dotlist([f"{key}={value}"])
                if isinstance(value, str)
                else OmegaConf.create(_nest(key, value))
            )
            cfg = OmegaConf.merge(cfg, parsed)
        except (ConfigKeyError, OmegaConfBaseException) as e:
            first = str(e).splitlines()[0]
            raise ValueError(f"{source}: bad value for {key}: {value!r} ({first})") from None
    return cfg


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(preset: str = "default", overrides: list[str] | None = None, algorithm: str = "grpo") -> DictConfig:
    """The config for ``preset`` + ``algorithm``'s recipe + ``overrides`` (``key=value`` strings, verl's names)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    cfg = OmegaConf.structured(TrainerConfig)
    cfg = apply_overrides(cfg, PRESETS[preset], f"preset {preset!r}")
    cfg = apply_overrides(cfg, ALGORITHMS[algorithm], f"algorithm {algorithm!r}")
    cfg = apply_overrides(cfg, list(overrides or []), "command line")
    return cfg


def config_from_yaml(path: str) -> DictConfig:
    """A run's saved ``config.yaml`` checked against the current schema."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror})") from None
    return parse_config(text, path)


def parse_config(text: str, source: str) -> DictConfig:
    """The YAML ``text`` of a resolved config (``source`` names it in errors) merged onto the schema."""
    cfg = OmegaConf.structured(TrainerConfig)
    try:
        loaded = OmegaConf.create(text)
        if not isinstance(loaded, DictConfig):
            raise ValueError(f"a mapping of config sections, got {type(loaded).__name__}")
        return OmegaConf.merge(cfg, loaded)
    except (OmegaConfBaseException, ValueError) as e:  # yaml's errors are ValueErrors too
        raise ValueError(f"{source} is not a config this trainer can read: {str(e).splitlines()[0]}") from None


def config_diff(a: DictConfig, b: DictConfig) -> dict[str, tuple[Any, Any]]:
    """``key: (value in a, value in b)`` for every key whose values differ."""
    out = {}
    for key in config_keys():
        va, vb = (_plain(OmegaConf.select(c, key)) for c in (a, b))
        if va != vb:
            out[key] = (va, vb)
    return out


def _plain(value):
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def validate(cfg: DictConfig) -> None:
    """Checks types cannot express; raises ``ValueError`` naming the key and the value."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{key} must be {what}, got {OmegaConf.select(cfg, key)!r}")

    data, arr, actor, rollout = (
        cfg.data,
        cfg.actor_rollout_ref,
        cfg.actor_rollout_ref.actor,
        cfg.actor_rollout_ref.rollout,
    )
    for key in (
        "data.train_batch_size",
        "data.val_batch_size",
        "data.max_prompt_length",
        "data.max_response_length",
        "actor_rollout_ref.rollout.n",
        "actor_rollout_ref.actor.ppo_mini_batch_size",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
        "actor_rollout_ref.actor.ppo_epochs",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu",
        "trainer.total_training_steps",
    ):
        need(OmegaConf.select(cfg, key) >= 1, key, ">= 1")
    need(
        actor.ppo_mini_batch_size <= data.train_batch_size,
        "actor_rollout_ref.actor.ppo_mini_batch_size",
        f"<= data.train_batch_size ({data.train_batch_size})",
    )
    need(
        data.train_batch_size % actor.ppo_mini_batch_size == 0,
        "actor_rollout_ref.actor.ppo_mini_batch_size",
        f"a divisor of data.train_batch_size ({data.train_batch_size})",
    )
    mini_responses = actor.ppo_mini_batch_size * rollout.n
    need(
        mini_responses % min(actor.ppo_micro_batch_size_per_gpu, mini_responses) == 0,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
        f"a divisor of ppo_mini_batch_size * rollout.n ({mini_responses} responses)",
    )
    need(arr.model.dtype in MODEL_DTYPES, "actor_rollout_ref.model.dtype", f"one of {', '.join(MODEL_DTYPES)}")
    need(rollout.name in ROLLOUT_NAMES, "actor_rollout_ref.rollout.name", f"one of {', '.join(ROLLOUT_NAMES)}")
    need(rollout.temperature > 0, "actor_rollout_ref.rollout.temperature", "> 0 (it divides the logits)")
    need(0 < rollout.top_p <= 1, "actor_rollout_ref.rollout.top_p", "in (0, 1]")
    need(rollout.val_kwargs.n == 1, "actor_rollout_ref.rollout.val_kwargs.n", "1 (one response per test prompt)")
    for prefix, sampling in (
        ("actor_rollout_ref.rollout", rollout),
        ("actor_rollout_ref.rollout.val_kwargs", rollout.val_kwargs),
    ):
        need(0 < sampling.top_p <= 1, f"{prefix}.top_p", "in (0, 1]")
    need(rollout.val_kwargs.temperature >= 0, "actor_rollout_ref.rollout.val_kwargs.temperature", ">= 0")
    fused = arr.model.fused_lm_head
    need(isinstance(fused, bool) or fused == "auto", "actor_rollout_ref.model.fused_lm_head", "auto, true or false")
    need(
        arr.model.attn_implementation in ATTN_IMPLEMENTATIONS,
        "actor_rollout_ref.model.attn_implementation",
        f"one of {', '.join(ATTN_IMPLEMENTATIONS)}",
    )
    name = cfg.trainer.experiment_name
    need(
        name is None or (name.strip() not in ("", ".", "..") and "/" not in name and os.sep not in name),
        "trainer.experiment_name",
        "a plain directory name (no path separators, not empty, '.' or '..')",
    )
    need(bool(cfg.custom_reward_function.name), "custom_reward_function.name", "the name of a function")
    need(0 < rollout.gpu_memory_utilization <= 1, "actor_rollout_ref.rollout.gpu_memory_utilization", "in (0, 1]")
    need(
        rollout.kv_cache_memory_gb is None or rollout.kv_cache_memory_gb > 0,
        "actor_rollout_ref.rollout.kv_cache_memory_gb",
        "null or > 0",
    )
    need(
        cfg.algorithm.adv_estimator in ADV_ESTIMATORS, "algorithm.adv_estimator", f"one of {', '.join(ADV_ESTIMATORS)}"
    )
    need(cfg.algorithm.filter_groups.metric in ("acc", "score"), "algorithm.filter_groups.metric", "acc or score")
    need(
        not cfg.algorithm.filter_groups.enable or rollout.n >= 2,
        "actor_rollout_ref.rollout.n",
        ">= 2 with algorithm.filter_groups.enable (a group of one always has equal rewards)",
    )
    optim = actor.optim
    need(optim.lr >= 0, "actor_rollout_ref.actor.optim.lr", ">= 0")
    need(
        len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
        "actor_rollout_ref.actor.optim.betas",
        "two numbers in [0, 1)",
    )
    need(
        optim.lr_scheduler_type in LR_SCHEDULERS,
        "actor_rollout_ref.actor.optim.lr_scheduler_type",
        f"one of {', '.join(LR_SCHEDULERS)}",
    )
    need(0 <= optim.lr_warmup_steps_ratio <= 1, "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio", "in [0, 1]")
    need(0 <= optim.min_lr_ratio <= 1, "actor_rollout_ref.actor.optim.min_lr_ratio", "in [0, 1]")
    need(optim.clip_grad > 0, "actor_rollout_ref.actor.optim.clip_grad", "> 0")
    need(optim.weight_decay >= 0, "actor_rollout_ref.actor.optim.weight_decay", ">= 0")
    need(optim.eps > 0, "actor_rollout_ref.actor.optim.eps", "> 0")
    need(cfg.trainer.device in DEVICES, "trainer.device", f"one of {', '.join(DEVICES)}")
    need(not actor.use_kl_loss or actor.kl_loss_coef >= 0, "actor_rollout_ref.actor.kl_loss_coef", ">= 0")
    for key in ("data.train_files", "data.val_files", "actor_rollout_ref.model.path", "custom_reward_function.path"):
        value = OmegaConf.select(cfg, key)
        need(value is None or os.path.exists(value), key, "an existing path")
    need(
        actor.kernel_backend is None or actor.kernel_backend in LOSS_BACKENDS,
        "actor_rollout_ref.actor.kernel_backend",
        f"null or one of {', '.join(LOSS_BACKENDS)} (the cuda backend has no fused loss)",
    )
    need(
        str(actor.old_log_prob_from_update).lower() in OLD_LOG_PROB_MODES,
        "actor_rollout_ref.actor.old_log_prob_from_update",
        "auto or false",
    )
    # The loss and the SFPO rule validate their own arguments; build them now so a bad value fails before any work,
    # named by the key that set it.
    try:
        loss_options(cfg)
    except ValueError as e:
        field_name = str(e).split("=")[0].split(" ")[0]
        if field_name not in LOSS_OPTION_KEYS:
            raise
        raise ValueError(LOSS_OPTION_KEYS[field_name] + str(e)[len(field_name) :]) from None
    try:
        sfpo_config(cfg)
    except ValueError as e:
        raise ValueError(re.sub(r"\bSFPOConfig\.", SFPO_KEY_PREFIX, str(e))) from None
    device = cfg.trainer.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    for key in ("actor_rollout_ref.actor.kernel_backend", "actor_rollout_ref.actor.sfpo.backend"):
        backend = OmegaConf.select(cfg, key)
        if backend is not None:
            try:
                resolve_backend(backend, torch.device(device))
            except ValueError as e:
                raise ValueError(
                    f"{key}={backend!r} cannot run with trainer.device={cfg.trainer.device} ({device}): {e}"
                ) from None


# --------------------------------------------------------------------------- config -> the parts it builds


def loss_options(cfg: DictConfig) -> GRPOLossOptions:
    """The loss's options, each read from its key in :data:`LOSS_OPTION_KEYS` (no KL term without use_kl_loss)."""
    values = {name: OmegaConf.select(cfg, key) for name, key in LOSS_OPTION_KEYS.items()}
    if not cfg.actor_rollout_ref.actor.use_kl_loss:
        values["kl_coef"] = 0.0
    return GRPOLossOptions(**values)


def sfpo_config(cfg: DictConfig) -> SFPOConfig:
    """SFPO's settings; with ``sfpo.enable=false`` the same rule with alpha 0 (plain GRPO)."""
    keys = dict(OmegaConf.to_container(cfg.actor_rollout_ref.actor.sfpo))
    enable = keys.pop("enable")
    if not enable:
        keys.update(alpha=0.0, entropy_control=False)
    return SFPOConfig(**keys)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
