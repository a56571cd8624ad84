"""SFPO.step's promise when a pass fails after changing the parameters' memory, not just their values.

A pass may cast the model (``model.half()``), give a parameter a tensor of another
shape (``p.data = ...``) or free its storage (FSDP-style) and then raise. The step
must still put theta_0 back -- values, dtypes and shapes -- and the error that
propagates must be the pass's own, with what the restore had to do attached.
"""

from __future__ import annotations

import pytest
import torch

from sfpo_train import SFPO, SFPOConfig


class PassFailed(RuntimeError):
    pass


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _theta(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_theta(model: torch.nn.Module, theta0: list[torch.Tensor]) -> None:
    for i, (p, want) in enumerate(zip(model.parameters(), theta0)):
        assert p.dtype == want.dtype, f"parameter {i} has dtype {p.dtype}, theta_0 {want.dtype}"
        assert p.shape == want.shape, f"parameter {i} has shape {tuple(p.shape)}, theta_0 {tuple(want.shape)}"
        assert torch.equal(p.detach(), want), f"parameter {i} is not theta_0"


def _step_failing_after(change, *, inner_steps: int = 2, fail_on: int = 2) -> tuple[torch.nn.Module, list, PassFailed]:
    """A step whose pass ``fail_on`` moves the parameters, applies ``change(model)``, then raises."""
    model = _model()
    theta0 = _theta(model)
    sfpo = SFPO(model, SFPOConfig(inner_steps=inner_steps, alpha=0.5))
    calls = []

    def update_pass(_batch):
        calls.append(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        if len(calls) == fail_on:
            change(model)
            raise PassFailed("the pass failed")
        return {"entropy": 0.5}

    with pytest.raises(PassFailed, match="the pass failed") as info:
        sfpo.step(update_pass, None, entropy=0.5)
    assert sfpo.iteration == 0
    return model, theta0, info.value


def test_a_pass_that_halves_the_model_and_raises_leaves_theta0_and_its_own_error():
    model, theta0, error = _step_failing_after(lambda m: m.half())
    _assert_theta(model, theta0)
    assert any("p.data" in note for note in getattr(error, "__notes__", ())), "the restore did not say what it did"


def test_a_pass_that_gives_a_parameter_another_shape_and_raises_leaves_theta0_and_its_own_error():
    def reshape(m):
        m[0].weight.data = torch.zeros(5, 5)

    model, theta0, _ = _step_failing_after(reshape)
    _assert_theta(model, theta0)


def test_a_pass_that_frees_a_parameter_and_raises_leaves_theta0_in_the_same_tensor():
    """FSDP-style ``untyped_storage().resize_(0)``: the storage is allocated again and filled, not replaced."""

    def free(m):
        m[1].weight.untyped_storage().resize_(0)

    kept = []
    model, theta0, _ = _step_failing_after(lambda m: (kept.append(m[1].weight.untyped_storage()), free(m)))
    _assert_theta(model, theta0)
    assert model[1].weight.untyped_storage().data_ptr() == kept[0].data_ptr()


def test_a_failure_in_the_slow_pass_after_a_cast_restores_too():
    model, theta0, _ = _step_failing_after(lambda m: m.to(torch.float64), inner_steps=1, fail_on=2)
    _assert_theta(model, theta0)


def test_a_plain_failure_adds_no_note():
    model, theta0, error = _step_failing_after(lambda m: None)
    _assert_theta(model, theta0)
    assert not getattr(error, "__notes__", None)
