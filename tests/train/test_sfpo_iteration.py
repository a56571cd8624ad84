"""SFPOIteration: the stages of SFPO.step driven from outside, one pass at a time (how SFPOGRPOTrainer runs them).

A caller driving begin / pass_done / finish must get exactly what SFPO.step gives
(same weights bit for bit, same schedule, same metrics but the timings); misuse is a
clear error; abort leaves theta_0 and the schedule as they were.
"""

from __future__ import annotations

import pytest
import torch

from sfpo_train import SFPO, SFPOConfig


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(8, 4, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)

    def update_pass(_batch):
        opt.zero_grad()
        out = model(x)
        loss = out.square().mean()
        loss.backward()
        opt.step()
        return {"entropy": out.detach().std().item(), "loss": loss.item()}

    return model, update_pass


def _untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("timing_s/")}


@pytest.mark.parametrize(
    "config",
    [
        SFPOConfig(inner_steps=3, alpha=0.8, zscore_window=2, zscore_threshold=0.5, trigger="abs"),
        SFPOConfig(inner_steps=0, alpha=0.5),
        SFPOConfig(inner_steps=2, alpha=0.7, slow_correction=False, trigger_entropy="last_pass"),
        SFPOConfig(inner_steps=2, alpha=0.0),
    ],
)
def test_driving_the_stages_equals_step(config):
    stepped_model, stepped_pass = _setup()
    driven_model, driven_pass = _setup()
    stepped, driven = SFPO(stepped_model, config), SFPO(driven_model, config)
    for _ in range(4):
        plan = stepped.planned_passes()
        expected = stepped.step(stepped_pass, None)
        iteration = driven.begin()
        assert iteration.plan == plan
        while iteration.next_pass is not None:
            iteration.pass_done(driven_pass(None))
        got = iteration.finish()
        assert _untimed(got) == pytest.approx(_untimed(expected), nan_ok=True)
        for a, b in zip(stepped_model.parameters(), driven_model.parameters(), strict=True):
            assert torch.equal(a, b)
    assert driven.state_dict() == stepped.state_dict()


def test_finish_before_the_planned_passes_is_refused_and_abort_restores_theta0():
    model, update_pass = _setup()
    sfpo = SFPO(model, SFPOConfig(inner_steps=2, alpha=0.8))
    theta0 = [p.detach().clone() for p in model.parameters()]
    iteration = sfpo.begin()
    iteration.pass_done(update_pass(None))
    with pytest.raises(RuntimeError, match="after 1 of the 3 planned passes"):
        iteration.finish()
    iteration.abort()
    assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), theta0, strict=True))
    assert sfpo.iteration == 0 and not sfpo.entropies


def test_a_pass_beyond_the_plan_and_a_second_finish_are_refused():
    model, update_pass = _setup()
    sfpo = SFPO(model, SFPOConfig(inner_steps=0, alpha=0.0))
    iteration = sfpo.begin()
    iteration.pass_done(update_pass(None))
    with pytest.raises(RuntimeError, match="after every planned pass"):
        iteration.pass_done(update_pass(None))
    iteration.finish()
    with pytest.raises(RuntimeError, match="already called"):
        iteration.finish()


def test_the_reposition_happens_after_the_last_fast_pass():
    model, update_pass = _setup()
    reference, reference_pass = _setup()  # the same two fast passes without SFPO: theta_K
    sfpo = SFPO(model, SFPOConfig(inner_steps=2, alpha=0.5))
    theta0 = [p.detach().clone() for p in model.parameters()]
    iteration = sfpo.begin()
    iteration.pass_done(update_pass(None))
    reference_pass(None)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(), strict=True))
    iteration.pass_done(update_pass(None))  # the last fast pass: repositioned before the slow one
    reference_pass(None)
    assert iteration.next_pass == "slow"
    for p, p0, pk in zip(model.parameters(), theta0, reference.parameters(), strict=True):
        torch.testing.assert_close(p, p0 + 0.5 * (pk - p0), rtol=0, atol=1e-6)
    iteration.abort()
    assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), theta0, strict=True))


def test_release_keeps_the_weights_and_the_schedule():
    model, update_pass = _setup()
    sfpo = SFPO(model, SFPOConfig(inner_steps=2, alpha=0.5))
    iteration = sfpo.begin()
    iteration.pass_done(update_pass(None))
    after_one = [p.detach().clone() for p in model.parameters()]
    iteration.release()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), after_one, strict=True))
    assert sfpo.iteration == 0
