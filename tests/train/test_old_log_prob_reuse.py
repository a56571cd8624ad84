"""On-policy old log-probs (``actor.old_log_prob_from_update=auto``): the first update pass's forward replaces
the separate old-log-prob pass, with the same result up to fp32 rounding, and only when that is exact.

The on-policy setups use one mini-batch of 16 responses split into micro-batches of 4 (gradient
accumulation: later micro-batches run after earlier backwards) while the separate pass runs in
micro-batches of 8, so the two paths do not even share GEMM shapes: agreement is to fp32 rounding,
not bit for bit. Tolerances: log-probs and entropies are O(1) sums over a 16-token vocabulary of
a 1-layer model's fp32 logits, a few ulps apart (rtol 1e-5, atol 1e-6); the pass's metrics are means
of those (same tolerance); the parameters after one iteration are Adam steps of lr 1e-3 whose
direction is m / (sqrt(v) + eps): a gradient element that rounding moves by ~1e-7 relative moves
its step by less than 1e-6 * lr, except elements with |g| near eps (none here: checked by the
tight atol of 1e-8, below one thousandth of a step).
"""

from __future__ import annotations

import pytest
import torch

import sfpo_train.trainer.config as config_lib
from sfpo_train.trainer import Trainer
from tests.helpers.tiny_setup import tiny_overrides, write_data, write_tiny_model

TOL = {"rtol": 1e-5, "atol": 1e-6}
ON_POLICY = (
    "data.train_batch_size=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.actor.optim.lr=1e-3",
    "trainer.val_before_train=false",
    "actor_rollout_ref.actor.sfpo.zscore_window=2",
)
PASS_METRICS = ("actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl", "actor/grad_norm")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    reward = root / "parity.py"  # rewards that differ within a group (the random model solves nothing): A != 0
    reward.write_text(
        "import zlib\n"
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return float(zlib.crc32(solution_str.encode()) % 2)\n"
    )
    return tiny_overrides(write_tiny_model(str(root / "model")), write_data(str(root))) + [
        "trainer.device=cpu",
        f"custom_reward_function.path={reward}",
    ]


def _trainer(paths, tmp_path, name: str, *overrides: str) -> Trainer:
    cfg = config_lib.load_config(
        "smoke",
        [
            *paths,
            f"trainer.default_local_dir={tmp_path}",
            "trainer.progress_bar=false",
            f"trainer.experiment_name={name}",
            *overrides,
        ],
    )
    return Trainer.create(cfg)


def _one_iteration(trainer: Trainer) -> tuple[dict, list[dict], torch.Tensor, torch.Tensor, dict]:
    """``(iteration metrics, each pass's metrics, old log-probs, response mask, parameters)`` of one train_step."""
    passes, seen = [], {}
    update_pass = trainer.actor.update_pass

    def recording_pass(batch, **kwargs):  # our own method, called as is; the recorder only keeps what it returned
        result = update_pass(batch, **kwargs)
        passes.append(result.metrics)
        if "old" not in seen:  # the first pass: the old log-probs it was given, or the ones it supplied
            assert (batch.old_log_probs is None) == (result.old_log_probs is not None)
            old = batch.old_log_probs if result.old_log_probs is None else result.old_log_probs
            seen["old"], seen["mask"] = old.clone(), batch.response_mask.bool()
        return result

    trainer.actor.update_pass = recording_pass
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    metrics = trainer.train_step()
    params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    assert all(not torch.equal(start[k], params[k]) for k in params)  # every parameter took a step
    return metrics, passes, seen["old"], seen["mask"], params


@pytest.mark.parametrize(("algo", "head"), [("grpo", "logits"), ("sfpo", "logits"), ("sfpo", "fused")])
def test_reuse_equals_the_separate_pass(paths, tmp_path, algo, head):
    enable = (
        f"actor_rollout_ref.actor.sfpo.enable={algo == 'sfpo'}",
        f"actor_rollout_ref.model.fused_lm_head={head == 'fused'}",
    )
    separate = _one_iteration(
        _trainer(
            paths, tmp_path, "separate", *ON_POLICY, *enable, "actor_rollout_ref.actor.old_log_prob_from_update=false"
        )
    )
    reused_trainer = _trainer(paths, tmp_path, "reused", *ON_POLICY, *enable)
    reused = _one_iteration(reused_trainer)
    (m_sep, p_sep, old_sep, mask, w_sep), (m_re, p_re, old_re, mask_re, w_re) = separate, reused
    assert (m_sep["actor/old_log_prob_from_update"], m_re["actor/old_log_prob_from_update"]) == (0.0, 1.0)
    assert len(p_re) == len(p_sep) == (4 if algo == "sfpo" else 1)  # K=3 fast + slow, or the one GRPO pass
    assert torch.equal(mask, mask_re) and mask.any() and not mask.all()  # same rollouts, some padding
    torch.testing.assert_close(old_re[mask], old_sep[mask], **TOL, msg="old log-probs")
    for key in PASS_METRICS:
        torch.testing.assert_close(p_re[0][key], p_sep[0][key], **TOL, msg=f"first pass {key}")
    assert p_re[0]["actor/grad_norm"] > 0
    # every pass reports its own entropy; at theta_0 the first pass's is the old-log-prob pass's
    torch.testing.assert_close(p_re[0]["entropy"], m_sep["actor/entropy"], **TOL, msg="first pass entropy")
    torch.testing.assert_close(m_re["actor/entropy"], m_sep["actor/entropy"], **TOL, msg="actor/entropy")
    assert "entropy" not in m_re
    assert m_re["timing_s/old_log_prob"] == 0.0 < m_sep["timing_s/old_log_prob"]
    assert len(reused_trainer.sfpo.entropies) == 1  # the trigger's window got this iteration's entropy
    torch.testing.assert_close(reused_trainer.sfpo.entropies[0], m_sep["actor/entropy"], **TOL, msg="trigger entropy")
    for name in w_sep:
        torch.testing.assert_close(w_re[name], w_sep[name], rtol=0, atol=1e-8, msg=f"parameter {name}")


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(("actor_rollout_ref.actor.ppo_epochs=2",), id="two-epochs"),
        pytest.param(("actor_rollout_ref.actor.ppo_mini_batch_size=2",), id="two-mini-batches"),
        pytest.param(("actor_rollout_ref.model.override_config={attention_dropout: 0.1}",), id="dropout"),
        pytest.param(("actor_rollout_ref.actor.old_log_prob_from_update=false",), id="switched-off"),
    ],
)
def test_off_policy_never_reuses(paths, tmp_path, overrides):
    trainer = _trainer(paths, tmp_path, "off", *ON_POLICY, *overrides)
    metrics, _, _, _, _ = _one_iteration(trainer)
    assert metrics["actor/old_log_prob_from_update"] == 0.0
    assert metrics["timing_s/old_log_prob"] > 0.0
    assert metrics["actor/entropy"] is not None  # from the separate pass, which ran


def test_reuse_decision_needs_a_planned_pass(paths, tmp_path):
    actor = _trainer(paths, tmp_path, "plan", *ON_POLICY).actor
    assert actor.old_log_probs_from_update(16, ("fast", "slow"))
    assert not actor.old_log_probs_from_update(16, ())  # K = 0 without slow correction: no pass to supply them
    assert not actor.old_log_probs_from_update(17, ("slow",))  # more responses than one mini-batch


def test_an_off_policy_pass_without_old_log_probs_is_refused(paths, tmp_path):
    trainer = _trainer(paths, tmp_path, "refuse", *ON_POLICY, "actor_rollout_ref.actor.ppo_epochs=2")
    batch, _, _ = trainer.collector.collect()
    batch.advantages = torch.zeros(batch.responses.shape)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match="ppo_epochs=2"):
        trainer.actor.update_pass(batch, supply_old_log_probs=True)
    with pytest.raises(ValueError, match="supply_old_log_probs=True"):  # never supplied unasked
        trainer.actor.update_pass(batch)
    assert batch.old_log_probs is None
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_bad_value_is_named(paths, tmp_path):
    with pytest.raises(ValueError, match="actor_rollout_ref.actor.old_log_prob_from_update must be auto or false"):
        _trainer(paths, tmp_path, "bad", "actor_rollout_ref.actor.old_log_prob_from_update=always")
