"""SFPO at the edges the main tests leave open: found by mutation testing (docs/mutation.md).

Each test here fails for a change of ``sfpo_train/sfpo.py`` that every test of
``test_sfpo.py`` survived: the configured backend dropped on the way to the kernels,
optimizer-style parameter groups, a tensor entropy, metrics that are not numbers,
the boundaries of ``load_state_dict`` and of the schedule.
"""

from __future__ import annotations

import math

import pytest
import torch

from sfpo_train import SFPO, SFPOConfig
from sfpo_train.sfpo import STATE_VERSION, scheduled_alpha
from tests.helpers.op_probe import TORCH_BACKEND_OPS, OpNames, device_and_other_backend


def _add_one(params):
    """An update pass that moves every parameter by +1 and reports an entropy."""

    def update_pass(_batch):
        with torch.no_grad():
            for p in params:
                p.add_(1.0)
        return {"entropy": 0.5}

    return update_pass


# ----------------------------------------------------------------------------- the configured backend


def test_config_backend_runs_the_snapshot_reposition_and_restore():
    """``SFPOConfig.backend`` reaches every kernel call of a step: the non-default backend's ops are what run."""
    device, other = device_and_other_backend()
    torch_ops_expected = other == "torch"
    p = torch.nn.Parameter(torch.arange(37, dtype=torch.float32, device=device))
    sfpo = SFPO([p], SFPOConfig(inner_steps=1, alpha=0.5, slow_correction=False, backend=other))
    with OpNames() as probe:
        sfpo.step(_add_one([p]), None)
    assert probe.called(TORCH_BACKEND_OPS[1]) == torch_ops_expected, f"the reposition ignored backend={other!r}"
    assert probe.called(TORCH_BACKEND_OPS[0]) == torch_ops_expected, f"the snapshot ignored backend={other!r}"
    torch.testing.assert_close(p.detach().cpu(), torch.arange(37, dtype=torch.float32) + 0.5, rtol=0, atol=0)

    def failing(_batch):
        with torch.no_grad():
            p.add_(1.0)
        raise RuntimeError("pass failed")

    theta_0 = p.detach().clone()
    with OpNames() as probe, pytest.raises(RuntimeError, match="pass failed"):
        sfpo.step(failing, None)
    assert probe.called(TORCH_BACKEND_OPS[0]) == torch_ops_expected, f"the restore ignored backend={other!r}"
    assert torch.equal(p.detach(), theta_0)


def test_config_backend_that_cannot_run_is_refused_before_any_pass():
    p = torch.nn.Parameter(torch.zeros(3))
    calls = []
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        SFPO([p], SFPOConfig(backend="cuda")).step(lambda b: calls.append(b), None, entropy=1.0)
    assert calls == []


# ----------------------------------------------------------------------------- what step() accepts


def test_optimizer_parameter_groups_are_repositioned():
    """``SFPO(optimizer.param_groups)``: every group's parameters, frozen ones excepted."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b, frozen], "lr": 0.5}], lr=1.0)
    sfpo = SFPO(opt.param_groups, SFPOConfig(inner_steps=2, alpha=0.25, slow_correction=False))
    sfpo.step(_add_one([a, b, frozen]), None)
    assert torch.equal(a.detach(), torch.full((2,), 0.5))  # 0 + 0.25 * (2 - 0)
    assert torch.equal(b.detach(), torch.full((3,), 0.5))
    assert torch.equal(frozen.detach(), torch.full((1,), 2.0))  # not SFPO's: it keeps theta_K


def test_a_one_element_tensor_entropy_is_recorded():
    p = torch.nn.Parameter(torch.zeros(2))
    metrics = SFPO([p], SFPOConfig(alpha=0.0)).step(lambda _b: {}, None, entropy=torch.tensor([0.375]))
    assert metrics["sfpo/entropy"] == 0.375


@pytest.mark.parametrize(
    "metrics,pattern",
    [
        pytest.param({"pg_loss": "1.5"}, r"returned pg_loss='1.5'; a metric must be a number", id="numeric-string"),
        pytest.param({"pg_loss": torch.ones(2)}, r"returned pg_loss=tensor\(\[1., 1.\]\)", id="two-element-tensor"),
        pytest.param({3: 1.0}, r"update pass 1 of 1 returned a metric named 3; names must be strings", id="int-name"),
        pytest.param([1.0], r"must return a dict of metrics \(or None\), got list from update pass 1 of 1", id="list"),
    ],
)
def test_metrics_that_are_not_named_numbers_are_refused(metrics, pattern):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=pattern):
        SFPO([p], SFPOConfig(alpha=0.0)).step(lambda _b: metrics, None, entropy=1.0)


@pytest.mark.parametrize(
    "args,pattern",
    [
        pytest.param((torch.zeros(3),), r"nn.Module or a list of parameters, got a single tensor", id="one-tensor"),
        pytest.param(
            ([torch.zeros(3), 1.5],), r"params_or_module\[1\] must be a tensor or a parameter group, got float"
        ),
        pytest.param(([torch.zeros(3)], {"alpha": 0.5}), r"config must be an SFPOConfig, got dict", id="dict-config"),
    ],
)
def test_constructor_says_what_it_got(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        SFPO(*args)


# ----------------------------------------------------------------------------- schedule boundaries


def test_the_iteration_that_fires_keeps_its_alpha():
    cfg = SFPOConfig(alpha=0.6, decay="linear", decay_steps=1)  # one iteration of decay is allowed
    assert scheduled_alpha(cfg, iteration=4, fired_at=4) == 0.6
    assert scheduled_alpha(cfg, iteration=5, fired_at=4) == 0.0
    assert scheduled_alpha(SFPOConfig(alpha=0.6, decay="hard"), iteration=4, fired_at=4) == 0.6


# ----------------------------------------------------------------------------- load_state_dict boundaries


def test_a_fresh_state_loads():
    p = torch.nn.Parameter(torch.zeros(2))
    fresh = SFPO([p]).state_dict()
    assert fresh["iteration"] == 0 and math.isnan(fresh["last_zscore"])
    target = SFPO([p])
    target.load_state_dict(fresh)
    assert target.iteration == 0 and math.isnan(target.last_zscore) and list(target.entropies) == []


def test_an_old_state_with_only_version_and_iteration_loads_with_defaults():
    target = SFPO([torch.nn.Parameter(torch.zeros(2))])  # a state without config: the default config
    target.step(lambda _b: {}, None, entropy=1.0)
    target.load_state_dict({"version": STATE_VERSION, "iteration": 5})
    assert (target.iteration, list(target.entropies), target.fired_at) == (5, [], None)
    assert math.isnan(target.last_zscore)


def test_fired_at_zero_and_a_nan_zscore_load():
    target = SFPO([torch.nn.Parameter(torch.zeros(2))])
    target.load_state_dict(
        {"version": STATE_VERSION, "iteration": 1, "entropies": [0.5], "fired_at": 0, "last_zscore": math.nan}
    )
    assert target.fired_at == 0 and target.alpha == 0.0 and math.isnan(target.last_zscore)
    with pytest.raises(ValueError, match=r"state\['last_zscore'\] must be a float or NaN, got inf"):
        target.load_state_dict({"version": STATE_VERSION, "iteration": 1, "last_zscore": math.inf})


def test_a_state_of_another_config_lists_every_difference():
    p = torch.nn.Parameter(torch.zeros(2))
    state = SFPO([p], SFPOConfig(alpha=0.5, inner_steps=2)).state_dict()
    with pytest.raises(ValueError, match=r"\(alpha: saved 0.5 vs now 0.8, inner_steps: saved 2 vs now 3\)$"):
        SFPO([p], SFPOConfig()).load_state_dict(state)
