"""actor_rollout_ref.model.fused_lm_head: the fused head gives the trainer the same numbers as the model's logits.

On the tiny Qwen2 (tied embeddings: the head's gradient accumulates into the
shared embedding), one collected batch goes through the old-log-prob pass and
one update pass with the head fused and with ``model(...).logits``, from the
same weights and optimizer state: log-probs, entropy, every update metric
(losses, clip fractions, KL, grad norm) and the gradients of the last
mini-batch agree to fp32 tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch

import sfpo_train.trainer.config as config_lib
from sfpo_train.trainer import Trainer
from sfpo_train.trainer.lm_head import unfusable_reason, use_fused_head
from tests.helpers.tiny_setup import tiny_overrides, write_data, write_tiny_model
from tests.helpers.trainer_parts import actor_with

# fp32 throughout: the two paths differ by the order of the head's sums (chunked matmul, fused softmax),
# a few ulp of each logit; through a 1-layer model's backward that stays within 1e-5 relative.
RTOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused_head")
    return write_tiny_model(str(root / "model")), write_data(str(root))


def make_trainer(tiny, tmp_path, *overrides):
    model_dir, data = tiny
    cfg = config_lib.load_config(
        "smoke",
        [
            *tiny_overrides(model_dir, data),
            f"trainer.default_local_dir={tmp_path}",
            "trainer.progress_bar=false",
            "trainer.val_before_train=false",
            *overrides,
        ],
        "grpo",
    )
    return Trainer.create(cfg)


def close(name, got, want, scale=None):
    scale = want.abs().max() if scale is None else scale
    err = float((got - want).abs().max())
    assert err <= RTOL * float(scale) + 1e-30, f"{name}: max error {err:.3g}, scale {float(scale):.3g}"


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param([], id="grpo-token-mean"),
        pytest.param(
            [
                "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
                "actor_rollout_ref.actor.entropy_coeff=0.01",
                "actor_rollout_ref.actor.use_kl_loss=true",
                "actor_rollout_ref.rollout.temperature=0.8",
            ],
            id="seq-mean-entropy-kl-temperature",
        ),
    ],
)
def test_fused_head_matches_model_logits_over_one_step(tiny, tmp_path, settings):
    trainer = make_trainer(tiny, tmp_path, "actor_rollout_ref.model.fused_lm_head=false", *settings)
    assert not trainer.actor.fused_head
    assert trainer.model.get_output_embeddings().weight is trainer.model.get_input_embeddings().weight, "tied"
    fused = actor_with(trainer, "actor_rollout_ref.model.fused_lm_head=true")
    assert fused.fused_head
    batch, _, _ = trainer.collector.collect()
    mask = batch.response_mask.bool()
    micro = 3  # several micro-batches, the last one short
    batch.old_log_probs, _ = trainer.actor.log_probs(trainer.model, batch, micro)
    batch.ref_log_probs = batch.old_log_probs - 0.1 * batch.response_mask
    # Advantages of both signs (a random tiny model's rewards are often all equal, which would give none).
    signs = torch.randn(len(batch.scores), 1, generator=torch.Generator().manual_seed(3))
    batch.advantages = (signs * batch.response_mask).float()
    start_weights = copy.deepcopy(trainer.model.state_dict())
    start_optim = copy.deepcopy(trainer.optimizer.state_dict())

    results = {}
    for name, actor in (("logits", trainer.actor), ("fused", fused)):
        trainer.model.load_state_dict(start_weights)
        trainer.optimizer.load_state_dict(start_optim)
        log_probs, entropy = actor.log_probs(trainer.model, batch, micro)
        metrics = actor.update_pass(batch).metrics
        grads = {k: p.grad.detach().clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
        results[name] = (log_probs, entropy, metrics, grads)

    (lp0, h0, m0, g0), (lp1, h1, m1, g1) = results["logits"], results["fused"]
    close("log_probs", lp1[mask], lp0[mask])
    close("entropy", h1[mask], h0[mask])
    assert bool((lp1[~mask] == 0).all()), "padding positions never went through the head"
    assert m0.keys() == m1.keys()
    for key in m0:
        close(
            f"metric {key}", torch.tensor(m1[key]), torch.tensor(m0[key]), max(abs(m0[key]), 1.0)
        )  # O(1): log-prob units
    assert g0.keys() == g1.keys() and len(g0) > 0
    assert any(bool(g.abs().sum() > 0) for g in g0.values()), "the update pass must produce gradients"
    for key in g0:
        close(f"grad {key}", g1[key], g0[key], max(float(g0[key].abs().max()), 1e-30))


def test_unfusable_head_is_an_error_with_true_and_off_with_auto():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=30.0,
    )
    model = Gemma2ForCausalLM(config)
    assert "final_logit_softcapping=30.0" in unfusable_reason(model)
    with pytest.raises(ValueError, match=r"fused_lm_head=true cannot fuse .*final_logit_softcapping"):
        use_fused_head(True, model, torch.device("cpu"))
    assert not use_fused_head("auto", model, torch.device("cuda"))
    config.final_logit_softcapping = None
    plain = Gemma2ForCausalLM(config)
    assert unfusable_reason(plain) is None
    assert use_fused_head("auto", plain, torch.device("cuda")) and not use_fused_head(
        "auto", plain, torch.device("cpu")
    )
    assert use_fused_head(True, plain, torch.device("cpu")) and not use_fused_head(False, plain, torch.device("cuda"))


@pytest.mark.parametrize("value", ["maybe", "1", "0"])
def test_bad_fused_lm_head_value_names_the_key(tiny, value):
    model_dir, data = tiny
    cfg = config_lib.load_config(
        "smoke", [*tiny_overrides(model_dir, data), f"actor_rollout_ref.model.fused_lm_head={value}"], "grpo"
    )
    with pytest.raises(ValueError, match=r"actor_rollout_ref.model.fused_lm_head must be auto, true or false"):
        config_lib.validate(cfg)
