"""``SFPOConfig.trigger_entropy``: which entropy the trigger records, in the rule and through ``sfpo train``.

The rule is driven by an update pass whose metrics say which pass it was (pass j
reports entropy ``10 + j``), so the recorded entropy names its source exactly.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import sfpo_train.trainer.config as config_lib
from sfpo_train import SFPO, SFPOConfig
from sfpo_train.trainer import Trainer
from tests.helpers.tiny_setup import tiny_overrides, write_data, write_tiny_model
from tests.helpers.trainer_parts import actor_with


def _counting_pass(param: torch.nn.Parameter, report_entropy: bool = True):
    calls = []

    def update_pass(_batch):
        calls.append(None)
        with torch.no_grad():
            param.add_(1.0)
        return {"entropy": 10.0 + len(calls)} if report_entropy else {}

    return update_pass, calls


@pytest.mark.parametrize(
    "source,given,expected",
    [
        ("old_log_prob", 3.5, 3.5),  # the caller's old-log-prob entropy
        ("old_log_prob", None, 11.0),  # none given: the first pass's (at theta_0, as the old-log-prob pass)
        ("last_pass", None, 14.0),  # K = 3 fast passes + the slow one: pass 4
    ],
)
def test_trigger_records_the_configured_entropy(source, given, expected):
    param = torch.nn.Parameter(torch.zeros(3))
    sfpo = SFPO([param], SFPOConfig(inner_steps=3, alpha=0.5, zscore_window=2, trigger_entropy=source))
    update_pass, calls = _counting_pass(param)
    metrics = sfpo.step(update_pass, None, entropy=given)
    assert len(calls) == 4
    assert list(sfpo.entropies) == [expected] and metrics["sfpo/entropy"] == expected


def test_last_pass_after_the_trigger_is_the_only_pass():
    param = torch.nn.Parameter(torch.zeros(1))
    sfpo = SFPO([param], SFPOConfig(inner_steps=2, alpha=0.0, trigger_entropy="last_pass"))  # plain GRPO
    update_pass, calls = _counting_pass(param)
    sfpo.step(update_pass, None)
    assert len(calls) == 1 and list(sfpo.entropies) == [11.0]


def test_bad_trigger_entropy_settings_are_value_errors():
    with pytest.raises(ValueError, match="trigger_entropy"):
        SFPOConfig(trigger_entropy="slow")
    param = torch.nn.Parameter(torch.zeros(2))
    sfpo = SFPO([param], SFPOConfig(inner_steps=1, trigger_entropy="last_pass"))
    update_pass, _ = _counting_pass(param)
    with pytest.raises(ValueError, match="entropy="):
        sfpo.step(update_pass, None, entropy=1.0)
    assert torch.equal(param, torch.zeros(2)) and sfpo.iteration == 0
    silent, calls = _counting_pass(param, report_entropy=False)
    with pytest.raises(ValueError, match="last update pass"):
        sfpo.step(silent, None)
    assert len(calls) == 2 and torch.equal(param, torch.zeros(2))  # both passes ran, then undone: theta_0 again
    assert sfpo.iteration == 0 and not sfpo.entropies


def test_sfpo_train_feeds_the_last_pass_entropy_to_the_trigger(tmp_path):
    tiny = tiny_overrides(write_tiny_model(str(tmp_path / "model")), write_data(str(tmp_path)))
    rows = {}
    for source in ("old_log_prob", "last_pass"):
        cfg = config_lib.load_config(
            "smoke",
            tiny
            + [
                f"actor_rollout_ref.actor.sfpo.trigger_entropy={source}",
                f"trainer.default_local_dir={tmp_path}",
                f"trainer.experiment_name={source}",
                "trainer.progress_bar=false",
            ],
        )
        trainer = Trainer.create(cfg, preset="smoke")
        assert trainer.sfpo.config.trigger_entropy == source
        trainer.fit()
        with open(os.path.join(trainer.run_dir, "metrics.jsonl")) as f:
            rows[source] = [json.loads(line) for line in f][1:]
        assert math.isclose(trainer.sfpo.entropies[-1], rows[source][-1]["sfpo/entropy"])
    for row in rows["old_log_prob"]:
        assert row["sfpo/entropy"] == row["actor/entropy"]
    for row in rows["last_pass"]:
        assert row["sfpo/entropy"] == row["sfpo/last/entropy"] != row["actor/entropy"]
        assert math.isfinite(row["actor/update_entropy"])


def test_the_update_pass_entropy_is_the_loss_agg_mode_aggregate_whatever_the_micro_batch(tmp_path):
    from sfpo_kernels import reference

    tiny = tiny_overrides(write_tiny_model(str(tmp_path / "model")), write_data(str(tmp_path)))
    cfg = config_lib.load_config(
        "smoke",
        tiny
        + [
            f"trainer.default_local_dir={tmp_path}",
            "trainer.progress_bar=false",
            "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum",
            "actor_rollout_ref.actor.optim.lr=0",
            "trainer.experiment_name=agg",
            "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        ],
    )
    trainer = Trainer.create(cfg, preset="smoke")
    batch, _, _ = trainer.collector.collect()
    batch.old_log_probs, entropy = trainer.actor.log_probs(trainer.model, batch, 16)
    batch.advantages = torch.zeros_like(batch.old_log_probs)
    want = float(reference.agg_loss(entropy, batch.response_mask.float(), "seq-mean-token-sum"))
    got = {}
    for micro in (16, 4, 1):  # lr 0: every pass sees the same weights; an actor per micro-batch size
        actor = actor_with(trainer, f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}")
        got[micro] = actor.update_pass(batch).metrics["entropy"]
    for micro, value in got.items():
        assert math.isclose(value, want, rel_tol=1e-5), (micro, value, want)
