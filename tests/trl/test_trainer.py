"""SFPOGRPOTrainer against TRL's own GRPOTrainer: real TRL, the shipped addition model and task, CPU.

The equalities the trainer promises: alpha = 1 is TRL's ``num_iterations = K + 1``;
alpha = 0 is plain GRPO; alpha in (0, 1) is that run with a reposition written here
with plain torch after every K-th pass; one generation per SFPO iteration; the
trigger switching to one pass per generation; resume from a checkpoint.
"""

from __future__ import annotations

import os

import pytest
import torch

from sfpo_train.sfpo import SFPOConfig
from tests.helpers.trl_setup import make_trainer, max_abs_difference, trl_parts, weights

trl, SFPOGRPOTrainer = trl_parts()


def test_alpha_one_is_trls_num_iterations(tmp_path):
    k = 2
    ours = make_trainer(tmp_path / "sfpo", sfpo=SFPOConfig(inner_steps=k, alpha=1.0), max_steps=6)
    ours.train()
    theirs = make_trainer(tmp_path / "trl", cls=trl.GRPOTrainer, num_iterations=k + 1, max_steps=6)
    theirs.train()
    assert ours.state.global_step == theirs.state.global_step == 6
    assert ours.generations == theirs.generations == 2  # one generation feeds K + 1 passes
    assert max_abs_difference(weights(ours.model), weights(theirs.model)) == 0.0
    assert ours.sfpo.iteration == 2


def test_alpha_zero_is_plain_grpo(tmp_path):
    ours = make_trainer(tmp_path / "sfpo", sfpo=SFPOConfig(inner_steps=3, alpha=0.0), max_steps=4)
    ours.train()
    theirs = make_trainer(tmp_path / "trl", cls=trl.GRPOTrainer, max_steps=4)
    theirs.train()
    assert ours.generations == theirs.generations == 4  # one pass per generation
    assert max_abs_difference(weights(ours.model), weights(theirs.model)) == 0.0
    alphas = [h["sfpo/alpha"] for h in ours.state.log_history if "sfpo/alpha" in h]
    assert alphas == [0.0] * 4


class _Reposition(trl.trainer.grpo_trainer.TrainerCallback):
    """theta <- theta_0 + alpha (theta - theta_0) after every K-th of K + 1 one-step passes (TRL's num_iterations)."""

    def __init__(self, model, k: int, alpha: float):
        self.model, self.k, self.alpha, self.theta0 = model, k, alpha, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % (self.k + 1) == 0:
            self.theta0 = [p.detach().clone() for p in self.model.parameters()]

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % (self.k + 1) == self.k:
            with torch.no_grad():
                for p, p0 in zip(self.model.parameters(), self.theta0, strict=True):
                    p.copy_(p0 + self.alpha * (p - p0))


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_alpha_between_is_num_iterations_with_a_reposition(tmp_path, alpha):
    k = 2
    ours = make_trainer(tmp_path / "sfpo", sfpo=SFPOConfig(inner_steps=k, alpha=alpha), max_steps=6)
    ours.train()
    theirs = make_trainer(tmp_path / "trl", cls=trl.GRPOTrainer, num_iterations=k + 1, max_steps=6)
    theirs.add_callback(_Reposition(theirs.model, k, alpha))
    theirs.train()
    # torch.lerp and theta_0 + alpha * (theta - theta_0) round differently: a few fp32 ulps, carried by Adam
    assert max_abs_difference(weights(ours.model), weights(theirs.model)) < 1e-5
    plain = make_trainer(tmp_path / "plain", cls=trl.GRPOTrainer, num_iterations=k + 1, max_steps=6)
    plain.train()
    assert max_abs_difference(weights(ours.model), weights(plain.model)) > 1e-3  # the reposition did something


def test_trigger_switches_to_one_pass_per_generation(tmp_path):
    # Two entropies in a window of 2 always have |z| = 1 >= 0.5: the trigger fires at iteration 1.
    config = SFPOConfig(inner_steps=1, alpha=0.8, zscore_window=2, zscore_threshold=0.5, trigger="abs")
    trainer = make_trainer(tmp_path, sfpo=config, max_steps=8)
    trainer.train()
    assert trainer.sfpo.fired_at == 1
    # iterations 0 and 1: two passes of one generation each (4 steps); then one pass per generation.
    # TRL pushes weights to vLLM only at a generation: once per iteration, after its slow pass.
    assert trainer.generations == 2 + 4
    assert trainer.generation_steps == [0, 2, 4, 5, 6, 7]
    assert trainer.sfpo.iteration == 6
    logged = [(h["step"], h["sfpo/alpha"], h["sfpo/triggered"]) for h in trainer.state.log_history if "sfpo/alpha" in h]
    assert logged == [(2, 0.8, 0.0), (4, 0.8, 1.0), (5, 0.0, 1.0), (6, 0.0, 1.0), (7, 0.0, 1.0), (8, 0.0, 1.0)]


def test_linear_decay_lowers_alpha_each_iteration(tmp_path):
    config = SFPOConfig(
        inner_steps=1, alpha=0.8, zscore_window=2, zscore_threshold=0.5, trigger="abs", decay="linear", decay_steps=2
    )
    trainer = make_trainer(tmp_path, sfpo=config, max_steps=8)
    trainer.train()
    alphas = [h["sfpo/alpha"] for h in trainer.state.log_history if "sfpo/alpha" in h]
    assert alphas[:4] == pytest.approx([0.8, 0.8, 0.4, 0.0])


def test_old_log_prob_entropy_is_the_first_pass_entropy_at_theta0(tmp_path):
    # With one optimizer step per pass, the first pass runs at theta_0: TRL's logged entropy of that step
    # and the old-log-prob forward's (what the trigger reads) are the same token mean.
    trainer = make_trainer(tmp_path, sfpo=SFPOConfig(inner_steps=2, alpha=0.8), max_steps=3)
    trainer.train()
    first, _, last = (h for h in trainer.state.log_history if "entropy" in h)
    assert last["sfpo/entropy"] == pytest.approx(first["entropy"], rel=1e-5)
    assert trainer.sfpo.entropies[0] == pytest.approx(first["entropy"], rel=1e-5)


def test_resume_continues_exactly_and_saves_whole_iterations(tmp_path):
    config = SFPOConfig(inner_steps=2, alpha=0.8)
    whole = make_trainer(tmp_path / "whole", sfpo=config, max_steps=9, save_strategy="steps", save_steps=2)
    whole.train()
    # saves asked for at steps 2, 4, 8 wait for the end of their iteration (3 steps each)
    saved = sorted(int(d.split("-")[1]) for d in os.listdir(tmp_path / "whole") if d.startswith("checkpoint-"))
    assert saved == [3, 6, 9]
    resumed = make_trainer(tmp_path / "resumed", sfpo=config, max_steps=9)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-3"))
    assert resumed.state.global_step == 9
    assert resumed.sfpo.state_dict() == whole.sfpo.state_dict()
    assert max_abs_difference(weights(resumed.model), weights(whole.model)) == 0.0


def test_resume_refuses_a_checkpoint_without_sfpo_state(tmp_path):
    plain = make_trainer(tmp_path / "plain", cls=trl.GRPOTrainer, max_steps=1, save_strategy="steps", save_steps=1)
    plain.train()
    trainer = make_trainer(tmp_path / "sfpo", sfpo=SFPOConfig(), max_steps=2)
    with pytest.raises(ValueError, match="sfpo_state.pt"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-1"))


def test_stopping_between_passes_keeps_the_weights_warns_and_still_saves(tmp_path):
    trainer = make_trainer(
        tmp_path, sfpo=SFPOConfig(inner_steps=2, alpha=0.8), max_steps=4, save_strategy="steps", save_steps=4
    )
    with pytest.warns(UserWarning, match="after 1 of the 3 passes"):
        trainer.train()
    assert trainer.sfpo.iteration == 1  # the unfinished iteration is not counted
    assert trainer._iteration is None
    state = torch.load(tmp_path / "checkpoint-4" / "sfpo_state.pt", weights_only=True)
    assert state["sfpo"]["iteration"] == 1


@pytest.mark.parametrize(
    ("overrides", "sfpo", "message"),
    [
        ({"num_iterations": 3}, SFPOConfig(), "num_iterations=3: with sfpo set it must stay 1"),
        (
            {"gradient_accumulation_steps": 2, "steps_per_generation": 3, "per_device_train_batch_size": 4},
            SFPOConfig(),
            "steps_per_generation=3 must be a multiple of gradient_accumulation_steps=2",
        ),
    ],
)
def test_settings_sfpo_cannot_run_are_refused_before_the_model_loads(tmp_path, overrides, sfpo, message):
    from tests.helpers.trl_setup import grpo_args

    with pytest.raises(ValueError, match=message):
        SFPOGRPOTrainer(model="not-loaded", args=grpo_args(tmp_path, **overrides), sfpo=sfpo)


def test_sfpo_must_be_an_sfpo_config(tmp_path):
    with pytest.raises(ValueError, match="sfpo must be an SFPOConfig or None, got dict"):
        SFPOGRPOTrainer(model="not-loaded", sfpo={"alpha": 0.5})


class _FailAt(trl.trainer.grpo_trainer.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("stopped between two passes")


def test_a_failure_between_passes_puts_theta0_back(tmp_path):
    trainer = make_trainer(tmp_path, sfpo=SFPOConfig(inner_steps=2, alpha=0.8), max_steps=6)
    trainer.add_callback(_FailAt(4))  # the first pass of iteration 1
    finished_first = {}

    class Remember(trl.trainer.grpo_trainer.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                finished_first.update(weights(trainer.model))

    trainer.add_callback(Remember())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert max_abs_difference(weights(trainer.model), finished_first) == 0.0
    assert trainer.sfpo.iteration == 1


def test_fused_head_under_sfpo_trains_like_trls_loss(tmp_path):
    config = SFPOConfig(inner_steps=2, alpha=0.8)
    fused = make_trainer(tmp_path / "fused", sfpo=config, fused_head=True, max_steps=6)
    fused.train()
    plain = make_trainer(tmp_path / "plain", sfpo=config, max_steps=6)
    plain.train()
    assert fused.generations == plain.generations == 2
    # the same rule on two implementations of one loss: fp32 rounding apart, carried through 6 Adam steps
    assert max_abs_difference(weights(fused.model), weights(plain.model)) < 1e-4
    assert list(fused.sfpo.entropies) == pytest.approx(list(plain.sfpo.entropies), rel=1e-4)


def test_fused_head_refuses_a_loss_it_cannot_reproduce_before_the_model_loads(tmp_path):
    from tests.helpers.trl_setup import grpo_args

    with pytest.raises(ValueError, match="loss_type"):
        SFPOGRPOTrainer(model="not-loaded", args=grpo_args(tmp_path, loss_type="sapo"), fused_head=True)


def test_evaluations_and_saves_asked_between_passes_wait_for_the_iteration(tmp_path):
    trainer = make_trainer(
        tmp_path,
        sfpo=SFPOConfig(inner_steps=2, alpha=0.8),
        eval_rows=8,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=8,
        save_strategy="best",
        metric_for_best_model="eval_reward",
    )
    trainer.train()
    evaluated = [h["step"] for h in trainer.state.log_history if "eval_reward" in h]
    assert evaluated == [3, 6]  # never the fast trajectory's weights
    saved = sorted(int(d.split("-")[1]) for d in os.listdir(tmp_path) if d.startswith("checkpoint-"))
    assert set(saved) <= {3, 6} and saved


def test_resume_after_a_stop_inside_a_pass_takes_the_next_batches(tmp_path):
    # steps_per_generation 2, one optimizer step per micro-step: a pass is 2 steps, an iteration (K = 1) 4.
    settings = dict(sfpo=SFPOConfig(inner_steps=1, alpha=0.8), steps_per_generation=2)
    whole = make_trainer(tmp_path / "whole", max_steps=11, **settings)
    whole.train()
    stopped = make_trainer(tmp_path / "stopped", max_steps=3, save_strategy="steps", save_steps=3, **settings)
    with pytest.warns(UserWarning, match="training stopped after 1 of the 2 passes"):
        stopped.train()
    resumed = make_trainer(tmp_path / "resumed", max_steps=11, **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / "checkpoint-3"))
    assert whole.generation_steps == [0, 4, 8]
    assert resumed.generated_prompts == whole.generated_prompts[1:]


@pytest.mark.parametrize(
    ("overrides", "config", "message"),
    [
        ({}, SFPOConfig(inner_steps=0, slow_correction=False), "makes no update pass"),
    ],
)
def test_configurations_that_cannot_run_an_iteration_are_refused(tmp_path, overrides, config, message):
    from tests.helpers.trl_setup import grpo_args

    with pytest.raises(ValueError, match=message):
        SFPOGRPOTrainer(model="not-loaded", args=grpo_args(tmp_path, **overrides), sfpo=config)
