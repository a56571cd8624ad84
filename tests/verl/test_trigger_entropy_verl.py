"""``trigger_entropy`` through the verl plugin: real verl 0.9.1 workers on CPU, a tiny random Qwen2.

``old_log_prob`` records the entropy the trainer hands over (verl's ``actor/entropy``);
``last_pass`` records the mean of the last update pass's ``actor/entropy_loss`` values,
which the plugin makes verl compute (``actor.calculate_entropy``).
"""

from __future__ import annotations

import math

import pytest

from tests.helpers.optional import import_or_skip

import_or_skip("verl")

from tests.helpers import verl_scenarios as vs


def test_last_pass_entropy_reaches_the_trigger(model_dir):
    from sfpo_train.verl.config import normalize_sfpo_config

    keys = ["actor_rollout_ref.actor.sfpo.enable=true", "actor_rollout_ref.actor.sfpo.trigger_entropy=last_pass"]
    config = vs.compose(model_dir, keys)
    arr = config.actor_rollout_ref.copy()
    assert normalize_sfpo_config(arr).sfpo.trigger_entropy == "last_pass"
    assert arr.actor.calculate_entropy is True  # verl computes the update passes' entropy
    worker = vs.make_worker(config)
    metrics = vs.metrics_of(worker.update_actor(vs.make_batch(1)))  # sfpo_entropy there too: not used
    per_mini_batch = metrics["actor/entropy_loss"]
    assert len(per_mini_batch) == 8  # 4 passes x 2 mini-batches
    last = sum(per_mini_batch[-2:]) / 2
    assert 0 < last <= math.log(vs.VOCAB)  # an entropy of the tiny model's softmax, not a rescaled sum
    assert worker.actor.sfpo.entropies[-1] == pytest.approx(last, rel=1e-12)
    assert metrics["sfpo/entropy"] == [pytest.approx(last, rel=1e-12)]
    assert last != pytest.approx(vs.ITERATION_ENTROPY)


def test_old_log_prob_entropy_is_the_handed_over_one(model_dir):
    worker = vs.make_worker(vs.compose(model_dir, ["actor_rollout_ref.actor.sfpo.enable=true"]))
    assert worker.actor.sfpo.config.trigger_entropy == "old_log_prob"
    metrics = vs.metrics_of(worker.update_actor(vs.make_batch(1)))
    assert metrics["sfpo/entropy"] == [vs.ITERATION_ENTROPY]


def test_unknown_trigger_entropy_is_a_value_error(model_dir):
    from sfpo_train.verl.config import normalize_sfpo_config

    config = vs.compose(model_dir, ["actor_rollout_ref.actor.sfpo.trigger_entropy=slow"])
    with pytest.raises(ValueError, match="trigger_entropy"):
        normalize_sfpo_config(config.actor_rollout_ref.copy())
