"""Each trainer key is declared once (help, bounds, resumability); help, validation and resume rules derive from it."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

import sfpo_train.trainer.config as config_lib
from sfpo_kernels.loss_options import GRPOLossOptions, LossOptionError
from sfpo_train.sfpo import RESUMABLE_CHANGES
from sfpo_train.trainer.key_help import KEY_HELP
from sfpo_train.trainer.keys import check_key
from sfpo_train.trainer.schema import KEYS, LOSS_OPTION_KEYS, RESUMABLE_KEYS


def test_every_key_has_help_and_is_a_config_key():
    assert list(KEYS) == config_lib.config_keys()
    assert set(KEY_HELP) == set(KEYS)
    for name, text in KEY_HELP.items():
        assert text.strip(), f"{name} has no help text"


def test_the_declared_defaults_are_the_configs():
    cfg = OmegaConf.structured(config_lib.TrainerConfig)
    for name, k in KEYS.items():
        value = OmegaConf.select(cfg, name)
        if not isinstance(value, (int, float, str, bool, type(None))):
            value = OmegaConf.to_container(value)
        assert value == k.default, name
        assert check_key(k, k.default) is None, f"{name}'s default breaks its own rules"


def test_the_resumable_set_is_derived_from_the_declarations():
    declared = {name for name, k in KEYS.items() if k.resumable}
    assert set(RESUMABLE_KEYS) == declared
    assert {config_lib.SFPO_KEY_PREFIX + name for name in RESUMABLE_CHANGES} <= declared
    assert "trainer.total_training_steps" in declared and "actor_rollout_ref.actor.optim.lr" not in declared
    from sfpo_train.trainer import loop

    assert loop.RESUMABLE_KEYS == RESUMABLE_KEYS == config_lib.RESUMABLE_KEYS


def test_every_loss_option_has_one_key_whose_help_is_the_options():
    assert set(LOSS_OPTION_KEYS) == set(GRPOLossOptions.names())
    for option, name in LOSS_OPTION_KEYS.items():
        assert KEYS[name].loss_option == option
        # the option's help leads, in the command line's words (null for Python's None)
        assert KEY_HELP[name].startswith(GRPOLossOptions.help()[option].replace("None", "null")), name


def _rejected(overrides: list[str], message: str):
    cfg = config_lib.load_config("default", overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.validate(cfg)


@pytest.mark.parametrize(
    "name",
    [
        "actor_rollout_ref.actor.optim.lr",
        "actor_rollout_ref.actor.optim.weight_decay",
        "actor_rollout_ref.actor.optim.eps",
        "actor_rollout_ref.rollout.val_kwargs.temperature",
        "actor_rollout_ref.rollout.temperature",
        "actor_rollout_ref.actor.entropy_coeff",
        "actor_rollout_ref.actor.kl_loss_coef",
        "actor_rollout_ref.rollout.kv_cache_memory_gb",
    ],
)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_non_finite_number_is_rejected_with_its_key(name, value):
    cfg = config_lib.load_config("default", [f"{name}={value}"])
    with pytest.raises(ValueError, match=re.escape(name) + r".* got -?(inf|nan)") as info:
        config_lib.validate(cfg)
    assert "finite" in str(info.value) or "must be" in str(info.value)


def test_every_float_key_rejects_inf_unless_declared_otherwise():
    for name, k in KEYS.items():
        if not k.numeric or k.type is int or name.startswith(config_lib.SFPO_KEY_PREFIX):
            continue
        message = check_key(k, float("inf"))
        assert (message is None) == (not k.finite), name
        if message is not None:
            assert message.startswith(name) and "inf" in message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "actor_rollout_ref.actor.clip_ratio_low=1.5",
            "actor_rollout_ref.actor.clip_ratio_low must be in [0, 1), got 1.5",
        ),
        ("actor_rollout_ref.actor.clip_ratio_c=0.5", "actor_rollout_ref.actor.clip_ratio_c must be > 1 (dual clip)"),
        ("actor_rollout_ref.actor.kl_loss_type=k9", "actor_rollout_ref.actor.kl_loss_type='k9' is not supported"),
        ("actor_rollout_ref.actor.loss_agg_mode=mean", "actor_rollout_ref.actor.loss_agg_mode='mean' is not supported"),
        ("actor_rollout_ref.rollout.temperature=0", "actor_rollout_ref.rollout.temperature must be > 0, got 0.0"),
    ],
)
def test_a_loss_option_error_names_its_trainer_key(override, message):
    _rejected([override], message)


def test_the_loss_option_error_is_mapped_through_its_option_not_its_text(monkeypatch):
    """The key comes from the error's ``.option``: a message that does not start with the option's name still works."""

    class Rejecting(GRPOLossOptions):
        def __post_init__(self):
            raise LossOptionError("clip_ratio_high", self.clip_ratio_high, "no option name at the start here")

    monkeypatch.setattr(config_lib, "GRPOLossOptions", Rejecting)
    cfg = config_lib.load_config("default", ["actor_rollout_ref.actor.clip_ratio_high=0.3"])
    with pytest.raises(ValueError, match=r"^actor_rollout_ref\.actor\.clip_ratio_high=0\.3: no option name") as info:
        config_lib.loss_options(cfg)
    assert not isinstance(info.value, LossOptionError)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("actor_rollout_ref.actor.optim.betas=[0.9,1.5]", "actor_rollout_ref.actor.optim.betas must be two numbers"),
        # values of another type than the rule reads: named like any bad value, not a TypeError
        ("actor_rollout_ref.actor.optim.betas=[x,0.9]", "actor_rollout_ref.actor.optim.betas must be two numbers"),
        ("actor_rollout_ref.actor.optim.betas=[0.9,null]", "actor_rollout_ref.actor.optim.betas must be two numbers"),
        ("actor_rollout_ref.actor.optim.betas=[0.9,nan]", "actor_rollout_ref.actor.optim.betas must be two numbers"),
        (
            "actor_rollout_ref.actor.optim.min_lr_ratio=2",
            "actor_rollout_ref.actor.optim.min_lr_ratio must be in [0, 1]",
        ),
        ("actor_rollout_ref.rollout.top_p=0", "actor_rollout_ref.rollout.top_p must be in (0, 1], got 0.0"),
        ("actor_rollout_ref.rollout.kv_cache_memory_gb=0", "kv_cache_memory_gb must be null or > 0, got 0.0"),
        ("algorithm.filter_groups.metric=f1", "algorithm.filter_groups.metric must be one of acc, score, got 'f1'"),
        ("actor_rollout_ref.rollout.val_kwargs.n=2", "val_kwargs.n must be 1 (one response per test prompt), got 2"),
        ("trainer.experiment_name=a/b", "trainer.experiment_name must be a plain directory name"),
    ],
)
def test_a_bad_value_is_named_with_its_key_and_value(override, message):
    _rejected([override], message)
