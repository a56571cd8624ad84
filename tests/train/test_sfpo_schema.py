"""SFPO's one schema (sfpo_train.SFPOConfig's fields) reaches every place its keys appear; no verl needed.

The standalone trainer's ``actor_rollout_ref.actor.sfpo.*`` keys, their ``--help``
text, the verl plugin's accepted keys and ``conf/sfpo_trainer.yaml`` are all
derived from the dataclass fields; these tests fail when one of them drifts.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import sfpo_train.trainer.config as trainer_config
from sfpo_train import SFPOConfig
from sfpo_train.trainer.key_help import KEY_HELP
from sfpo_train.verl import config as verl_config

FIELDS = [f.name for f in dataclasses.fields(SFPOConfig)]
VERL_DOC = Path(__file__).resolve().parents[2] / "docs" / "verl.md"  # the verl key table (moved out of the README)


def test_the_shipped_yaml_is_the_rendered_schema():
    assert verl_config.YAML_PATH.read_text() == verl_config.render_yaml(), (
        "conf/sfpo_trainer.yaml is out of date: run `python -m sfpo_train.verl.config`"
    )
    block = OmegaConf.to_container(OmegaConf.create(verl_config.render_yaml()).actor_rollout_ref.actor.sfpo)
    assert block == verl_config.VerlSFPOSettings().to_dict()
    assert list(block) == ["enable", *FIELDS, "fused_kernels"]


def test_every_field_is_a_trainer_key_with_its_help():
    keys = trainer_config.config_keys()
    for f in dataclasses.fields(SFPOConfig):
        key = f"actor_rollout_ref.actor.sfpo.{f.name}"
        assert key in keys, key
        assert KEY_HELP[key] == f.metadata["help"]
        assert OmegaConf.select(OmegaConf.structured(trainer_config.TrainerConfig), key) == f.default


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_settable_through_the_verl_keys(name):
    """A non-default value of each field, set in the sfpo block, arrives in the SFPOConfig the worker builds."""
    f = next(f for f in dataclasses.fields(SFPOConfig) if f.name == name)
    if f.metadata.get("choices"):
        value = next(c for c in f.metadata["choices"] if c != f.default)
    elif isinstance(f.default, bool):
        value = not f.default
    elif isinstance(f.default, int):
        value = f.default + 2
    else:
        value = f.default / 2
    extra = {"decay_steps": 3} if (name, value) == ("decay", "linear") else {}
    arr = OmegaConf.create({"actor": {"sfpo": {"enable": True, name: value, **extra}}})
    settings = verl_config.normalize_sfpo_config(arr)
    assert getattr(settings.sfpo, name) == value
    assert arr.sfpo[name] == value and "sfpo" not in arr.actor


def test_unknown_verl_key_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown keys.*slow_correction"):
        verl_config.settings_from_dict({"enable": True, "slow_corection": False})


def test_the_trainer_config_with_the_derived_keys_pickles():
    cfg = trainer_config.load_config("default", ["actor_rollout_ref.actor.sfpo.slow_correction=false"])
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg and again.actor_rollout_ref.actor.sfpo.slow_correction is False


def test_the_verl_doc_key_table_names_every_key():
    text = VERL_DOC.read_text()
    table = text[text.index("### Config keys (`actor_rollout_ref.actor.sfpo.*`)") :]
    table = table[: table.index("\n\n", table.index("| key |"))]
    named = set(
        re.findall(r"`(\w+)`", "\n".join(line.split("|")[1] for line in table.splitlines() if line.startswith("| `")))
    )
    assert named == {"enable", *FIELDS, "fused_kernels"}
