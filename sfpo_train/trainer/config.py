"""The standalone trainer's configuration, in verl's key names and meanings.

A verl user writes the same overrides they already know
(``data.train_batch_size=16 actor_rollout_ref.rollout.n=8
actor_rollout_ref.actor.optim.lr=3e-5 trainer.total_training_steps=300``):
the tree (:mod:`sfpo_train.trainer.schema`, each key declared once with its help,
bounds and resumability) mirrors verl 0.9.1's ``ppo_trainer.yaml`` for every key
this trainer uses, plus ``actor_rollout_ref.actor.sfpo.*`` for SFPO. Keys are
typed (omegaconf structured configs): an unknown key or a value of the wrong type
is an error before any work, and :func:`validate` checks what types cannot
(batch sizes that do not divide, missing paths, out-of-range or non-finite
values).

Sizes follow verl: ``data.train_batch_size`` and ``ppo_mini_batch_size`` count
prompts; each prompt has ``rollout.n`` responses; the micro-batch sizes
(``*_micro_batch_size_per_gpu``) count responses.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import time
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from sfpo_kernels._backend import resolve_backend
from sfpo_kernels.loss_options import GRPOLossOptions, LossOptionError, option_problem
from sfpo_train.sfpo_config import SFPOConfig
from sfpo_train.trainer.keys import Key, check_key
from sfpo_train.trainer.schema import (  # noqa: F401  (the tree and its constants, re-exported under their old home)
    ADV_ESTIMATORS,
    ATTN_IMPLEMENTATIONS,
    DEVICES,
    KEYS,
    LOSS_BACKENDS,
    LOSS_OPTION_KEYS,
    LR_SCHEDULERS,
    MODEL_DTYPES,
    OLD_LOG_PROB_MODES,
    RESUMABLE_KEYS,
    ROLLOUT_NAMES,
    SFPO_KEY_PREFIX,
    ActorConfig,
    ActorRolloutRefConfig,
    AlgorithmConfig,
    CustomRewardFunctionConfig,
    DataConfig,
    FilterGroupsConfig,
    ModelConfig,
    OptimConfig,
    RefConfig,
    RolloutConfig,
    SFPOKeys,
    TrainerConfig,
    TrainerSection,
    ValKwargs,
)
from sfpo_train.trainer.trackers import check_loggers

RUN_CONFIG_FILE = "config.yaml"  # a run directory's resolved config

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


def config_keys() -> list[str]:
    """Every settable key, dotted (the declarations' order, :data:`KEYS`)."""
    return list(KEYS)


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
            hint = f"; did you mean {' or '.join(close)}?" if close else "; `sfpo train --help` lists every key"
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
    """A run's saved ``config.yaml`` checked against the current schema (a regular file only: a FIFO would hang)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"{path} is not a regular file")
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
    except (OmegaConfBaseException, ValueError, yaml.YAMLError) as e:  # a YAML tag or syntax error is no ValueError
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


def mini_batch_rows(cfg: DictConfig) -> int:
    """Responses per optimizer step: ``ppo_mini_batch_size`` prompts times ``rollout.n`` responses each."""
    return cfg.actor_rollout_ref.actor.ppo_mini_batch_size * cfg.actor_rollout_ref.rollout.n


def micro_batch_rows(cfg: DictConfig) -> int:
    """Responses per forward/backward of the update pass: ``ppo_micro_batch_size_per_gpu``, at most a mini-batch."""
    return min(cfg.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu, mini_batch_rows(cfg))


def validate(cfg: DictConfig) -> None:
    """Every key checked before any work; raises ``ValueError`` naming the full key and its value.

    First each key against its own declaration (:data:`KEYS`: bounds, allowed values, finiteness), in
    the tree's order; then the rules between keys; then the loss options and SFPO's settings are built,
    as training will build them, so their own checks run now (their errors name the key that set them).
    """
    for name, k in KEYS.items():
        message = check_key(k, OmegaConf.select(cfg, name))
        if message is not None:
            raise ValueError(message)

    def need(ok: bool, key: str, what: str, fix: str = "") -> None:
        if not ok:
            raise ValueError(f"{key} must be {what}, got {OmegaConf.select(cfg, key)!r}{fix}")

    data, actor = cfg.data, cfg.actor_rollout_ref.actor
    mini_key = "actor_rollout_ref.actor.ppo_mini_batch_size"
    need(
        actor.ppo_mini_batch_size <= data.train_batch_size,
        mini_key,
        f"<= data.train_batch_size ({data.train_batch_size})",
        f": set {mini_key}={data.train_batch_size} (or a smaller divisor of data.train_batch_size)",
    )
    need(
        data.train_batch_size % actor.ppo_mini_batch_size == 0,
        mini_key,
        f"a divisor of data.train_batch_size ({data.train_batch_size})",
        f": e.g. {mini_key}={_largest_divisor(data.train_batch_size, actor.ppo_mini_batch_size)}",
    )
    mini = mini_batch_rows(cfg)
    micro_key = "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu"
    need(
        mini % micro_batch_rows(cfg) == 0,
        micro_key,
        f"a divisor of {mini_key} * actor_rollout_ref.rollout.n ({mini} responses)",
        f": e.g. {micro_key}={_largest_divisor(mini, micro_batch_rows(cfg))}",
    )
    need(
        not cfg.algorithm.filter_groups.enable or cfg.actor_rollout_ref.rollout.n >= 2,
        "actor_rollout_ref.rollout.n",
        ">= 2 with algorithm.filter_groups.enable (a group of one always has equal rewards)",
    )
    need(
        data.train_files is None or data.val_files is not None,
        "data.val_files",
        "a parquet file of the same task when data.train_files is given (the embedded addition test set "
        "would validate your model on another task)",
    )
    check_loggers(cfg.trainer.logger)  # a backend's package missing: one line now, not a traceback mid-run
    loss_options(cfg)
    try:
        sfpo_config(cfg)
    except ValueError as e:
        raise ValueError(re.sub(r"\bSFPOConfig\.", SFPO_KEY_PREFIX, str(e))) from None
    backend_keys = ("actor_rollout_ref.actor.kernel_backend", "actor_rollout_ref.actor.sfpo.backend")
    if all(OmegaConf.select(cfg, key) is None for key in backend_keys):
        return
    import torch  # only for a named backend: the checks above run before torch is loaded

    device = cfg.trainer.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    for key in backend_keys:
        backend = OmegaConf.select(cfg, key)
        if backend is not None:
            try:
                resolve_backend(backend, torch.device(device))
            except ValueError as e:
                raise ValueError(
                    f"{key}={backend!r} cannot run with trainer.device={cfg.trainer.device} ({device}): {e}"
                ) from None


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is at most ``at_most`` (the value to suggest for a size that must divide n)."""
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def default_experiment_name(cfg: DictConfig, preset: str, when: float | None = None) -> str:
    """The name of a run without ``trainer.experiment_name``: ``<preset>-[sfpo-]<algorithm>-<local time>``.

    E.g. ``default-sfpo-grpo-20261207-101500``; ``when`` is a ``time.time()`` value (default: now).
    """
    algorithm = algorithm_of(lambda key: OmegaConf.select(cfg, key))
    kind = f"sfpo-{algorithm}" if cfg.actor_rollout_ref.actor.sfpo.enable else algorithm
    return f"{preset}-{kind}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}"


def resumed_config(run_dir: str, overrides: list[str] | None = None) -> DictConfig:
    """The config ``--resume run_dir`` continues with: the run's ``config.yaml``, then ``overrides``, validated.

    Only :data:`RESUMABLE_KEYS` may be overridden; a directory without ``config.yaml`` is no run. Reads
    nothing but that file (no checkpoint), so it needs neither torch nor the model.
    """
    path = os.path.join(run_dir, RUN_CONFIG_FILE)
    if not os.path.lexists(path):  # one that is there but no regular file is named by config_from_yaml
        raise ValueError(f"--resume {run_dir!r}: not a run directory (no {RUN_CONFIG_FILE})")
    for item in overrides or []:
        key = item.split("=", 1)[0].lstrip("+")
        if key not in RESUMABLE_KEYS:
            raise ValueError(f"--resume: {key} cannot change in a resumed run (only {', '.join(RESUMABLE_KEYS)})")
    cfg = config_from_yaml(path)
    cfg = apply_overrides(cfg, list(overrides or []), "command line")
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- config -> the parts it builds


def loss_options(cfg: DictConfig) -> GRPOLossOptions:
    """The loss's options, each read from the key declared with its ``loss_option`` (no KL term without use_kl_loss).

    A value the loss rejects is a ``ValueError`` naming the key that set it (found through the error's
    ``.option`` in :data:`LOSS_OPTION_KEYS`).
    """
    values = {option: OmegaConf.select(cfg, name) for option, name in LOSS_OPTION_KEYS.items()}
    if not cfg.actor_rollout_ref.actor.use_kl_loss:
        values["kl_coef"] = 0.0
    try:
        return GRPOLossOptions(**values)
    except LossOptionError as e:
        raise ValueError(loss_option_message(KEYS[LOSS_OPTION_KEYS[e.option]], e)) from None


def loss_option_message(k: Key, error: LossOptionError) -> str:
    """``error`` said of key ``k``: the option's own check run under the key's name (the same words, the full key)."""
    return option_problem(error.option, error.value, k.name) or f"{k.name}={error.value!r}: {error}"


def sfpo_config(cfg: DictConfig) -> SFPOConfig:
    """SFPO's settings; with ``sfpo.enable=false`` the same rule with alpha 0 (plain GRPO)."""
    keys = dict(OmegaConf.to_container(cfg.actor_rollout_ref.actor.sfpo))
    enable = keys.pop("enable")
    if not enable:
        keys.update(alpha=0.0, entropy_control=False)
    return SFPOConfig(**keys)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
