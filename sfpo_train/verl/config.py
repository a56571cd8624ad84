"""SFPO's verl config keys: read, validate, normalise, and take out of verl's way.

Two spellings are accepted under ``actor_rollout_ref.actor``:

- ours, a block ``sfpo.{enable, <every field of sfpo_train.SFPOConfig>,
  fused_kernels}`` (defaults and help in ``conf/sfpo_trainer.yaml``, which
  :func:`render_yaml` writes from :func:`sfpo_train.sfpo.settings_schema`);
- the paper authors' flat keys, added with ``+`` in their scripts:
  ``use_sfpo`` -> enable, ``sfpo_inner_steps`` -> inner_steps,
  ``sfpo_step_size`` -> alpha, ``zscore_w`` -> zscore_window,
  ``zscore_threshold`` -> zscore_threshold.

verl builds ``ActorConfig(**actor)`` and rejects keys it does not know, so
:func:`normalize_sfpo_config` moves every SFPO key out of
``actor_rollout_ref.actor`` into one canonical block ``actor_rollout_ref.sfpo``
(a sibling that verl never instantiates). The driver calls it once, before verl
validates the config (:func:`sfpo_train.verl.main.prepare_config`); the workers
read the block it wrote with :func:`normalized_settings`. It is idempotent, so a
hand-built config may go through it again.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from sfpo_train.sfpo import SFPOConfig, settings_schema

# authors' flat key -> our key
AUTHOR_KEYS = {
    "use_sfpo": "enable",
    "sfpo_inner_steps": "inner_steps",
    "sfpo_step_size": "alpha",
    "zscore_w": "zscore_window",
    "zscore_threshold": "zscore_threshold",
}
# The block's keys: enable and every SFPOConfig field (the rule's schema), then the verl-only fused_kernels.
SCHEMA = settings_schema(enable_default=False)
FUSED_KERNELS_HELP = (
    "sfpo_kernels.linear_logprob_entropy (the LM head fused in, one chunk of logits at a time) for "
    "the actor's log-probs and the sfpo_vanilla policy loss: auto (on for CUDA runs with SFPO on; "
    "the first forward is checked against verl's eager numbers and falls back to torch on a "
    "mismatch), true (checked too: a mismatch is an error), false"
)
_OWN_KEYS = ("enable", "fused_kernels")
_CONFIG_KEYS = tuple(s.name for s in SCHEMA if s.name != "enable")
_FLOAT_KEYS = tuple(s.name for s in SCHEMA if s.type is float)


@dataclass(frozen=True)
class VerlSFPOSettings:
    """Everything the verl integration reads from the config.

    Attributes:
        enable: wrap verl's actor update in :class:`sfpo_train.SFPO`.
        sfpo: the update rule's hyperparameters.
        fused_kernels: "auto" (on for CUDA runs with SFPO on), True or False: compute the
            actor's log-probs and entropy with ``sfpo_kernels.logprob_entropy`` and the
            policy loss with the ``"sfpo_vanilla"`` policy loss (GRPO's clipped loss).
    """

    enable: bool = False
    sfpo: SFPOConfig = SFPOConfig()  # noqa: RUF009 (frozen: one shared default is safe)
    fused_kernels: bool | str = "auto"

    def to_dict(self) -> dict:
        return {"enable": self.enable, **asdict(self.sfpo), "fused_kernels": self.fused_kernels}


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


def settings_from_dict(block: dict, where: str = "actor_rollout_ref.sfpo") -> VerlSFPOSettings:
    """Validate a plain dict of our keys into :class:`VerlSFPOSettings` (unknown keys are errors)."""
    unknown = sorted(set(block) - set(_OWN_KEYS) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; known: {', '.join(_OWN_KEYS + _CONFIG_KEYS)}")
    enable = _as_bool(f"{where}.enable", block.get("enable", False))
    fused = block.get("fused_kernels", "auto")
    if isinstance(fused, str) and fused.lower() in ("true", "false"):
        fused = fused.lower() == "true"
    if not (fused == "auto" or isinstance(fused, bool)):
        raise ValueError(f"{where}.fused_kernels must be auto, true or false, got {fused!r}")
    kwargs = {k: block[k] for k in _CONFIG_KEYS if k in block and block[k] is not None}  # null: the default
    # YAML and the command line give ints for float fields (alpha=1); SFPOConfig wants numbers either way.
    for name in _FLOAT_KEYS:
        if name in kwargs and isinstance(kwargs[name], int) and not isinstance(kwargs[name], bool):
            kwargs[name] = float(kwargs[name])
    return VerlSFPOSettings(enable=enable, sfpo=SFPOConfig(**kwargs), fused_kernels=fused)


def normalize_sfpo_config(actor_rollout_ref: DictConfig) -> VerlSFPOSettings:
    """Move the SFPO keys of ``actor_rollout_ref.actor`` into ``actor_rollout_ref.sfpo``; return the settings.

    Precedence: an already normalised ``actor_rollout_ref.sfpo`` block, then
    ``actor.sfpo.*``, then the authors' keys. A later source may replace a value
    that is still the default (our YAML block always carries the defaults); two
    non-default values that differ are a ``ValueError`` naming both keys.
    """
    defaults = VerlSFPOSettings().to_dict()
    block: dict = {}
    origin: dict = {}

    def merge(key, value, name):
        if key in block and block[key] != value and block[key] != defaults.get(key) and value != defaults.get(key):
            raise ValueError(f"{origin[key]}={block[key]!r} and {name}={value!r} disagree; set one of them")
        if key not in block or block[key] == defaults.get(key):
            block[key], origin[key] = value, name

    existing = actor_rollout_ref.get("sfpo")
    for key, value in (OmegaConf.to_container(existing, resolve=True) if existing is not None else {}).items():
        merge(key, value, f"actor_rollout_ref.sfpo.{key}")
    actor = actor_rollout_ref.get("actor")
    if actor is not None:
        nested = actor.get("sfpo")
        nested = OmegaConf.to_container(nested, resolve=True) if nested is not None else {}
        if not isinstance(nested, dict):
            raise ValueError(f"actor_rollout_ref.actor.sfpo must be a mapping of SFPO keys, got {nested!r}")
        for key, value in nested.items():
            merge(key, value, f"actor_rollout_ref.actor.sfpo.{key}")
        for theirs, ours in AUTHOR_KEYS.items():
            if theirs in actor:
                merge(ours, actor.get(theirs), f"actor_rollout_ref.actor.{theirs}")
    settings = settings_from_dict(block)
    with open_dict(actor_rollout_ref):
        if actor is not None:
            with open_dict(actor):
                actor.pop("sfpo", None)
                for key in AUTHOR_KEYS:
                    actor.pop(key, None)
                if settings.enable and settings.sfpo.trigger_entropy == "last_pass":
                    actor["calculate_entropy"] = True  # the update passes' entropy (actor/entropy_loss)
        actor_rollout_ref["sfpo"] = settings.to_dict()
    return settings


def normalized_settings(actor_rollout_ref: DictConfig) -> VerlSFPOSettings:
    """The settings in the block :func:`normalize_sfpo_config` wrote (``actor_rollout_ref.sfpo``); SFPO off without one.

    ``ValueError`` when SFPO keys are still under ``actor_rollout_ref.actor``: the
    config did not go through :func:`normalize_sfpo_config` (the entry point's
    driver calls it; call it yourself on a config you build by hand).
    """
    actor = actor_rollout_ref.get("actor")
    left = [] if actor is None else [k for k in ("sfpo", *AUTHOR_KEYS) if k in actor]
    if left:
        raise ValueError(
            f"actor_rollout_ref.actor still holds SFPO keys {left}: pass the config through "
            "sfpo_train.verl.config.normalize_sfpo_config(config.actor_rollout_ref) first"
        )
    block = actor_rollout_ref.get("sfpo")
    return settings_from_dict(OmegaConf.to_container(block, resolve=True) if block is not None else {})


def resolve_fused_kernels(settings: VerlSFPOSettings, device: str) -> bool:
    """Whether the fused kernels run: ``true``/``false`` as set; ``auto``: on for CUDA runs with SFPO on.

    With SFPO off, auto stays off so that the run is verl's own; ``true`` still
    turns the kernels on. The driver and every worker call this on the same
    settings, so they agree; ``auto`` also arms the first-use check against
    verl's eager numbers (:func:`sfpo_train.verl.fused.arm_first_use_check`).
    """
    if settings.fused_kernels == "auto":
        return settings.enable and device == "cuda"
    return settings.fused_kernels is True


# --------------------------------------------------------------------------- conf/sfpo_trainer.yaml

YAML_PATH = Path(__file__).resolve().parent / "conf" / "sfpo_trainer.yaml"
_YAML_HEAD = """\
# verl 0.9.1's ppo_trainer.yaml plus SFPO's keys (python -m sfpo_train.verl.main <verl overrides>).
# Every verl key keeps its meaning; the authors' flat keys (+actor_rollout_ref.actor.use_sfpo=True,
# sfpo_inner_steps, sfpo_step_size, zscore_w, zscore_threshold) are accepted too, added with "+".
# Written by `python -m sfpo_train.verl.config` from sfpo_train.SFPOConfig's fields: edit those, not this file.
hydra:
  searchpath:
    - pkg://verl.trainer.config

defaults:
  - ppo_trainer
  - _self_

actor_rollout_ref:
  actor:
    sfpo:
"""


def render_yaml() -> str:
    """``conf/sfpo_trainer.yaml``: verl's config plus the sfpo block, each key under a comment with its help."""
    lines = [_YAML_HEAD.rstrip("\n")]
    entries = [(s.name, s.default, s.help) for s in SCHEMA] + [("fused_kernels", "auto", FUSED_KERNELS_HELP)]
    for name, default, help_text in entries:
        value = "null" if default is None else json.dumps(default) if isinstance(default, bool) else default
        lines += [f"      # {help_text}", f"      {name}: {value}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m sfpo_train.verl.config: rewrite the YAML after SFPOConfig changed
    YAML_PATH.write_text(render_yaml())
    print(f"wrote {YAML_PATH}", file=sys.stderr)
