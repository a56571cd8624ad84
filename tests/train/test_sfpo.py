"""SFPO.step: the three stages, the entropy trigger, exact resume, and what it must never do.

Tolerances: the closed form is compared in float64 within 1e-12 absolute (the
reposition's lerp rounds once per element, ~1e-16, and K+1 SGD steps add a few
more roundings); everything else is exact (bit-equal or equal floats).
"""

from __future__ import annotations

import copy
import gc
import json
import math

import numpy as np
import pytest
import torch

import sfpo_kernels
from sfpo_train import SFPO, SFPOConfig

CLOSED_FORM_ATOL = 1e-12


# ----------------------------------------------------------------------------- closed form (paper eq. 12)


def _quadratic(dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    a = m @ m.T / dim + torch.eye(dim, dtype=torch.float64)
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    return a, b


@pytest.mark.parametrize("inner_steps", [0, 1, 3])
@pytest.mark.parametrize("alpha", [0.3, 0.8, 1.0])
@pytest.mark.parametrize("slow_correction", [True, False])
def test_step_matches_closed_form_with_sgd(inner_steps, alpha, slow_correction):
    a, b = _quadratic()
    lr = 0.05

    def grad(theta):
        return a @ theta - b

    theta = torch.nn.Parameter(torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    theta0 = theta.detach().clone()
    opt = torch.optim.SGD([theta], lr=lr)

    def update_pass(_batch):
        opt.zero_grad()
        loss = 0.5 * theta @ a @ theta - b @ theta
        loss.backward()
        opt.step()
        return {"entropy": 1.0}

    config = SFPOConfig(inner_steps=inner_steps, alpha=alpha, slow_correction=slow_correction, entropy_control=False)
    SFPO([theta], config).step(update_pass, batch=None)

    # theta_{k+1} = theta_k - lr g(theta_k); theta~ = theta_0 + alpha (theta_K - theta_0); one more step from theta~
    fast = [theta0.clone()]
    for _ in range(inner_steps):
        fast.append(fast[-1] - lr * grad(fast[-1]))
    expected = theta0 - lr * alpha * sum((grad(t) for t in fast[:-1]), torch.zeros(6, dtype=torch.float64))
    if slow_correction:
        expected = expected - lr * grad(expected)
    torch.testing.assert_close(theta.detach(), expected, atol=CLOSED_FORM_ATOL, rtol=0)


# ----------------------------------------------------------------------------- pass counting and stages


class Counter:
    """A real update pass on a real parameter that also records how often it ran."""

    def __init__(self, param, entropies):
        self.param, self.entropies, self.calls = param, list(entropies), 0

    def __call__(self, _batch):
        self.calls += 1
        with torch.no_grad():
            self.param.add_(1.0)
        return {"entropy": self.entropies[0], "pg_loss": float(self.calls)}


SFPO_STAGES = ("snapshot", "fast", "reposition", "slow")


# idle: the stages step() skips entirely, so their timing is exactly 0.0 (no lap was taken). With
# reposition=False the reposition lap is still taken (it is simply empty), so it is not listed there.
@pytest.mark.parametrize(
    "config,calls,final,idle",
    [
        pytest.param(SFPOConfig(inner_steps=3, alpha=0.5, entropy_control=False), 4, 0.5 * 3 + 1, (), id="sfpo"),
        pytest.param(
            SFPOConfig(inner_steps=3, alpha=0.0, entropy_control=False),
            1,
            1.0,
            ("snapshot", "fast", "reposition"),
            id="alpha0-is-grpo",
        ),
        pytest.param(
            SFPOConfig(inner_steps=2, alpha=0.5, slow_correction=False, entropy_control=False),
            2,
            1.0,
            ("slow",),
            id="no-slow-correction",
        ),
        pytest.param(
            SFPOConfig(inner_steps=2, alpha=0.5, reposition=False, entropy_control=False),
            3,
            3.0,
            (),
            id="no-reposition",
        ),
    ],
)
def test_passes_and_stages(config, calls, final, idle):
    p = torch.nn.Parameter(torch.zeros(3))
    update = Counter(p, [2.0])
    sfpo = SFPO([p], config)
    plan = sfpo.planned_passes()
    metrics = sfpo.step(update, batch=None)
    assert update.calls == calls == len(plan)  # the plan the verl worker reads is the passes step() makes
    assert plan == ("fast",) * int(metrics["sfpo/inner_steps_run"]) + ("slow",) * (calls - plan.count("fast"))
    assert torch.equal(p.detach(), torch.full((3,), final))
    assert metrics["sfpo/alpha"] == config.alpha
    assert metrics["sfpo/inner_steps_run"] == (config.inner_steps if config.alpha > 0 else 0)
    assert metrics["pg_loss"] == sum(range(1, calls + 1)) / calls  # averaged over the passes
    assert metrics["sfpo/last/pg_loss"] == calls
    assert sorted(k for k in metrics if k.startswith("timing_s/")) == sorted(f"timing_s/sfpo_{s}" for s in SFPO_STAGES)
    for stage in SFPO_STAGES:
        seconds = metrics[f"timing_s/sfpo_{stage}"]
        assert type(seconds) is float, (stage, type(seconds))  # a plain float: loggable without a sync
        if stage in idle:
            assert seconds == 0.0, f"{stage} did not run but reports {seconds} s"
        else:
            assert math.isfinite(seconds), (stage, seconds)
    one_copy = sfpo_kernels.snapshot([torch.zeros(3)]).nbytes  # 12 bytes, padded to the storage alignment
    assert metrics["sfpo/snapshot_bytes"] == (one_copy if config.alpha > 0 else 0)


def test_the_plan_follows_the_schedule():
    """Once the trigger fires the plan is the slow pass alone; K = 0 without slow correction plans nothing."""
    sfpo = SFPO(
        [torch.nn.Parameter(torch.zeros(1))],
        SFPOConfig(inner_steps=2, alpha=0.5, zscore_window=2, zscore_threshold=0.5),
    )
    assert sfpo.planned_passes() == ("fast", "fast", "slow")
    sfpo.fired_at = sfpo.iteration - 1  # fired at the previous iteration: alpha is 0 from now on
    assert sfpo.alpha == 0.0 and sfpo.planned_passes() == ("slow",)
    empty = SFPO([torch.nn.Parameter(torch.zeros(1))], SFPOConfig(inner_steps=0, slow_correction=False))
    assert empty.planned_passes() == ()


def test_frozen_parameters_untouched_and_module_input():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)

    def update_pass(x):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        return {"entropy": 1.0}

    SFPO(model, SFPOConfig(inner_steps=2, alpha=0.5)).step(update_pass, torch.randn(8, 4))
    assert torch.equal(model[0].weight.detach(), frozen)


def test_exception_in_stage_one_restores_theta0_and_frees_the_snapshot():
    p = torch.nn.Parameter(torch.arange(5.0))
    theta0 = p.detach().clone()
    calls = []

    def failing_pass(_batch):
        calls.append(1)
        with torch.no_grad():
            p.mul_(3.0)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the second fast pass")
        return {"entropy": 1.0}

    sfpo = SFPO([p], SFPOConfig(inner_steps=3))
    with pytest.raises(RuntimeError, match="second fast pass"):
        sfpo.step(failing_pass, None)
    assert torch.equal(p.detach(), theta0), "the model was left half-way through the fast trajectory"
    assert sfpo.iteration == 0
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is sfpo_kernels.Snapshot], "a snapshot outlived step()"


def _assert_untouched(sfpo, p, theta0):
    assert torch.equal(p.detach(), theta0), "the parameters were not restored to theta_0"
    assert (sfpo.iteration, list(sfpo.entropies), sfpo.fired_at) == (0, [], None), "the schedule moved"
    assert math.isnan(sfpo.last_zscore)
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is sfpo_kernels.Snapshot], "a snapshot outlived step()"


class Scripted(Counter):
    """A :class:`Counter` pass (the parameter moves by +1) that returns (or raises) what its script says for the call."""

    def __init__(self, param, script):
        super().__init__(param, [1.0])
        self.script = list(script)

    def __call__(self, batch):
        super().__call__(batch)
        result = self.script[min(self.calls, len(self.script)) - 1]
        if isinstance(result, BaseException):  # a fresh one: a raised instance keeps the step's frame alive
            raise type(result)(*result.args)
        return result


OK = {"entropy": 1.0, "pg_loss": 0.5}


# (script of pass results, calls expected before the failure surfaces, error, pattern); K = 3, so 4 passes.
FAILURES = [
    pytest.param(
        [{"entropy": math.nan}],
        1,
        ValueError,
        r"update_pass\(\)\['entropy'\] must be a finite number",
        id="nan-entropy-first-pass",
    ),
    pytest.param([{"pg_loss": 0.1}], 1, ValueError, "pass entropy= to step", id="missing-entropy"),
    pytest.param(
        [OK, {"entropy": 1.0, "pg_loss": "high"}],
        2,
        ValueError,
        r"update pass 2 of 4 returned pg_loss='high'",
        id="non-numeric-metric",
    ),
    pytest.param(
        [OK, {"pg_loss": torch.ones(3)}], 2, ValueError, r"update pass 2 of 4 returned pg_loss=", id="tensor-metric"
    ),
    pytest.param([OK, OK, ["not", "a", "dict"]], 3, ValueError, "must return a dict", id="not-a-dict"),
    pytest.param(
        [OK, OK, OK, RuntimeError("CUDA out of memory in the slow pass")],
        4,
        RuntimeError,
        "slow pass",
        id="stage-three-raises",
    ),
    pytest.param([OK, OK, OK, KeyboardInterrupt()], 4, KeyboardInterrupt, None, id="stage-three-interrupted"),
    pytest.param(
        [OK, OK, OK, {"entropy": 1.0, "pg_loss": None}],
        4,
        ValueError,
        r"update pass 4 of 4 returned pg_loss",
        id="bad-metric-in-stage-three",
    ),
]


@pytest.mark.parametrize("script,calls,error,pattern", FAILURES)
@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_any_failure_in_a_step_restores_theta0_and_keeps_the_schedule(script, calls, error, pattern, offload):
    p = torch.nn.Parameter(torch.arange(5.0))
    theta0 = p.detach().clone()
    update = Scripted(p, script)
    sfpo = SFPO([p], SFPOConfig(inner_steps=3, alpha=0.5, zscore_window=2, snapshot_offload=offload))
    with pytest.raises(error, match=pattern):
        sfpo.step(update, None)
    assert update.calls == calls, "the failure must surface right after the pass that caused it"
    _assert_untouched(sfpo, p, theta0)


def test_a_retry_after_a_failed_step_applies_the_update_once():
    def run(failing_calls):
        p = torch.nn.Parameter(torch.arange(4.0, dtype=torch.float64))
        opt = torch.optim.SGD([p], lr=0.1)  # stateless: a retry must land exactly where a clean step does
        calls = []

        def update_pass(_batch):
            opt.zero_grad()
            (p * p).sum().backward()
            opt.step()
            calls.append(1)
            if len(calls) in failing_calls:
                raise RuntimeError("transient failure")
            return {"entropy": 1.0}

        sfpo = SFPO([p], SFPOConfig(inner_steps=2, alpha=0.5))
        for _ in failing_calls:
            with pytest.raises(RuntimeError, match="transient"):
                sfpo.step(update_pass, None)
        sfpo.step(update_pass, None)
        return p.detach().clone(), sfpo.state_dict()

    clean = run(())
    for failing in [(3,), (1, 3)]:  # Stage III fails; the first fast pass fails, then the retry's second one
        retried = run(failing)
        assert torch.equal(retried[0], clean[0]) and retried[1] == clean[1], failing


def test_alpha0_failure_is_not_undone_but_the_schedule_is_untouched():
    """Documented: with alpha 0 (plain GRPO) no snapshot is taken, so a failing pass's update stays."""
    p = torch.nn.Parameter(torch.arange(3.0))
    update = Scripted(p, [{"pg_loss": "nan?"}])
    sfpo = SFPO([p], SFPOConfig(alpha=0.0, zscore_window=2))
    with pytest.raises(ValueError, match=r"update pass 1 of 1 returned pg_loss"):
        sfpo.step(update, None)
    assert update.calls == 1 and torch.equal(p.detach(), torch.arange(3.0) + 1)
    assert (sfpo.iteration, list(sfpo.entropies), sfpo.fired_at) == (0, [], None)


def test_non_finite_metrics_other_than_entropy_pass_through():
    """A skipped optimizer step reports grad_norm=inf (verl's rule): a metric, not an error."""
    p = torch.nn.Parameter(torch.zeros(2))
    metrics = SFPO([p], SFPOConfig(inner_steps=1)).step(lambda _b: {"entropy": 1.0, "grad_norm": math.inf}, None)
    assert metrics["grad_norm"] == math.inf and metrics["sfpo/last/grad_norm"] == math.inf


def test_no_snapshot_survives_a_step():
    p = torch.nn.Parameter(torch.zeros(1000))
    SFPO([p], SFPOConfig()).step(Counter(p, [1.0]), None)
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is sfpo_kernels.Snapshot]


# ----------------------------------------------------------------------------- the trigger


def independent_schedule(entropies, *, alpha, window, tau, trigger, decay="hard", decay_steps=0):
    """alpha used at each iteration and the z-scores, written from the paper's Algorithm 1 with numpy."""
    alphas, zs, fired = [], [], None
    for s, _ in enumerate(entropies):
        if fired is None or s <= fired:
            alphas.append(alpha)
        elif decay == "hard":
            alphas.append(0.0)
        else:
            alphas.append(alpha * max(0.0, 1 - (s - fired) / decay_steps))
        buf = np.array(entropies[max(0, s - window + 1) : s + 1], dtype=np.float64)
        if len(buf) < window:
            zs.append(math.nan)
            continue
        z = (buf[-1] - buf.mean()) / (buf.std() + 1e-9)
        zs.append(z)
        hit = {"up": z >= tau, "down": z <= -tau, "abs": abs(z) >= tau}[trigger]
        if fired is None and hit:
            fired = s
    return alphas, zs


SEQUENCES = {
    "flat": [1.0] * 12,
    "declining": [2.0 - 0.1 * i for i in range(12)],
    "spike-up": [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 3.0, 1.0, 1.0, 1.0],
    "spike-down": [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, -1.0, 1.0, 1.0, 1.0],
    "short": [1.0, 5.0],
    "rising": [0.1 * i * i for i in range(12)],
}


@pytest.mark.parametrize("trigger", ["up", "abs", "down"])
@pytest.mark.parametrize("name", list(SEQUENCES))
@pytest.mark.parametrize("decay,decay_steps", [("hard", 0), ("linear", 3)])
def test_trigger_matches_independent_implementation(trigger, name, decay, decay_steps):
    entropies = SEQUENCES[name]
    config = SFPOConfig(
        inner_steps=1,
        alpha=0.8,
        zscore_window=4,
        zscore_threshold=1.2,
        trigger=trigger,
        decay=decay,
        decay_steps=decay_steps,
    )
    p = torch.nn.Parameter(torch.zeros(2))
    sfpo = SFPO([p], config)
    got_alpha, got_z = [], []
    for h in entropies:
        m = sfpo.step(lambda _b: {}, None, entropy=h)
        got_alpha.append(m["sfpo/alpha"])
        got_z.append(m["sfpo/zscore"])
    want_alpha, want_z = independent_schedule(
        entropies, alpha=0.8, window=4, tau=1.2, trigger=trigger, decay=decay, decay_steps=decay_steps
    )
    assert got_alpha == pytest.approx(want_alpha, abs=1e-15)
    np.testing.assert_allclose(got_z, want_z, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_spike_fires_and_next_iteration_is_grpo():
    p = torch.nn.Parameter(torch.zeros(2))
    sfpo = SFPO([p], SFPOConfig(inner_steps=1, zscore_window=4, zscore_threshold=1.0, trigger="up"))
    seen = [sfpo.step(lambda _b: {}, None, entropy=h) for h in (1.0, 1.0, 1.0, 2.0, 1.0)]
    assert [m["sfpo/triggered"] for m in seen] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert [m["sfpo/alpha"] for m in seen] == [0.8, 0.8, 0.8, 0.8, 0.0], "alpha must drop only the iteration after"
    assert seen[-1]["sfpo/inner_steps_run"] == 0


def test_entropy_taken_from_the_first_pass_when_not_given():
    p = torch.nn.Parameter(torch.zeros(1))
    values = iter([5.0, 7.0, 9.0, 11.0])
    sfpo = SFPO([p], SFPOConfig(inner_steps=3, zscore_window=2))
    sfpo.step(lambda _b: {"entropy": torch.tensor(next(values))}, None)
    assert list(sfpo.entropies) == [5.0]


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"inner_steps": -1}, "inner_steps"),
        ({"inner_steps": 1.5}, "inner_steps"),
        ({"alpha": 1.2}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"zscore_window": 1}, "zscore_window"),
        ({"zscore_threshold": 0.0}, "zscore_threshold"),
        ({"trigger": "sideways"}, "trigger"),
        ({"decay": "cosine"}, "decay"),
        ({"decay": "linear", "decay_steps": 0}, "decay_steps"),
        ({"snapshot_offload": "disk"}, "snapshot_offload"),
        ({"backend": "jax"}, "backend"),
        ({"slow_correction": 1}, "slow_correction"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"SFPOConfig\.{field} must be"):
        SFPOConfig(**kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "high", torch.ones(2)])
def test_bad_entropy_is_rejected_before_anything_runs(bad):
    p = torch.nn.Parameter(torch.zeros(2))
    update = Counter(p, [1.0])
    with pytest.raises(ValueError, match="entropy"):
        SFPO([p], SFPOConfig()).step(update, None, entropy=bad)
    assert update.calls == 0 and torch.equal(p.detach(), torch.zeros(2))


def test_missing_entropy_is_an_error_with_entropy_control():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="pass entropy= to step"):
        SFPO([p], SFPOConfig(alpha=0.0)).step(lambda _b: {"pg_loss": 0.0}, None)
    SFPO([p], SFPOConfig(entropy_control=False)).step(lambda _b: {"pg_loss": 0.0}, None)  # no entropy needed


def _state(**changes):
    sfpo = SFPO([torch.nn.Parameter(torch.zeros(2))], SFPOConfig(zscore_window=3))
    for h in (1.0, 2.0, 1.5, 1.2):
        sfpo.step(lambda _b: {}, None, entropy=h)
    state = sfpo.state_dict()
    state.update(changes)
    return state


@pytest.mark.parametrize(
    "changes,pattern",
    [
        ({"iteration": -7}, r"state\['iteration'\] must be a non-negative integer, got -7"),
        ({"iteration": 3.7}, r"state\['iteration'\] must be a non-negative integer, got 3.7"),
        ({"iteration": True}, r"state\['iteration'\]"),
        ({"iteration": "4"}, r"state\['iteration'\]"),
        ({"entropies": "12"}, r"state\['entropies'\] must be a list of finite numbers, got '12'"),
        ({"entropies": 5}, r"state\['entropies'\] must be a list"),
        ({"entropies": [1.0, "x"]}, r"state\['entropies'\]\[1\] must be a finite number, got 'x'"),
        ({"entropies": [1.0, math.nan]}, r"state\['entropies'\]\[1\] must be a finite number, got nan"),
        ({"entropies": [1.0] * 4}, r"state\['entropies'\] holds 4 entries, more than zscore_window=3"),
        ({"version": 999}, r"state\['version'\] is 999.*expected 1"),
        ({"version": None}, r"state\['version'\]"),
        ({"fired_at": 4}, r"state\['fired_at'\] must be None or an integer in \[0, 4\), got 4"),
        ({"fired_at": -1}, r"state\['fired_at'\].*got -1"),
        ({"fired_at": 1.5}, r"state\['fired_at'\].*got 1.5"),
        ({"last_zscore": "big"}, r"state\['last_zscore'\] must be a float or NaN, got 'big'"),
        ({"last_zscore": 10**400}, r"state\['last_zscore'\] must be a float or NaN"),
        ({"entropies": [10**400]}, r"state\['entropies'\]\[0\] must be a finite number"),
        ({"config": None}, r"state\['config'\] must be a dict"),
        ({"config": {"zscore_window": 4}}, r"zscore_window: saved 4 vs now 3"),
    ],
)
def test_load_state_dict_validates_everything_before_applying(changes, pattern):
    target = SFPO([torch.nn.Parameter(torch.zeros(2))], SFPOConfig(zscore_window=3))
    target.step(lambda _b: {}, None, entropy=0.25)
    before = target.state_dict()
    with pytest.raises(ValueError, match=pattern):
        target.load_state_dict(_state(**changes))
    after = target.state_dict()
    assert after.keys() == before.keys()
    assert all(
        after[k] == before[k] or (k == "last_zscore" and math.isnan(after[k]) and math.isnan(before[k])) for k in before
    ), "a rejected state was half-applied"


@pytest.mark.parametrize("bad", [None, [1, 2], "state"], ids=["none", "list", "str"])
def test_load_state_dict_rejects_non_mappings(bad):
    with pytest.raises(ValueError, match="not an SFPO state_dict"):
        SFPO([torch.nn.Parameter(torch.zeros(2))]).load_state_dict(bad)


def test_load_state_dict_accepts_another_offload_and_backend():
    """Where theta_0 lives and which kernels copy it do not change the schedule: resuming on a smaller GPU works."""
    state = _state()
    resumed = SFPO(
        [torch.nn.Parameter(torch.zeros(2))], SFPOConfig(zscore_window=3, snapshot_offload="cpu", backend="torch")
    )
    resumed.load_state_dict(json.loads(json.dumps(state)))  # through JSON, as the verl worker stores it
    got = resumed.state_dict()
    assert {k: v for k, v in got.items() if k != "config"} == {k: v for k, v in state.items() if k != "config"}
    assert got["config"]["snapshot_offload"] == "cpu" and got["config"]["backend"] == "torch"


def test_load_state_dict_rejects_another_config():
    p = torch.nn.Parameter(torch.zeros(2))
    state = SFPO([p], SFPOConfig(alpha=0.8)).state_dict()
    with pytest.raises(ValueError, match=r"alpha: saved 0.8 vs now 0.5"):
        SFPO([p], SFPOConfig(alpha=0.5)).load_state_dict(state)


# ----------------------------------------------------------------------------- exact resume, real model and loss


def _tiny_policy(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=37,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg)


def _rollouts(iteration):
    g = torch.Generator().manual_seed(100 + iteration)
    tokens = torch.randint(0, 37, (4, 9), generator=g)
    mask = torch.ones(4, 8)
    mask[1, 5:] = 0
    advantages = torch.randn(4, 1, generator=g).expand(4, 8).contiguous()
    return {"tokens": tokens, "mask": mask, "advantages": advantages}


def _run(model, opt, sfpo, iterations):
    log = []
    for it in iterations:
        batch = _rollouts(it)
        with torch.no_grad():
            old, _ = sfpo_kernels.logprob_entropy(model(batch["tokens"]).logits[:, :-1], batch["tokens"][:, 1:])

        def update_pass(b, old=old):
            opt.zero_grad()
            out = sfpo_kernels.grpo_loss(
                model(b["tokens"]).logits[:, :-1],
                b["tokens"][:, 1:],
                old,
                b["advantages"],
                b["mask"],
                clip_ratio_high=0.28,
            )
            out.loss.backward()
            opt.step()
            return {k: float(v) for k, v in out.metrics.items()}

        log.append(sfpo.step(update_pass, batch))
    return log


def test_resume_from_state_dict_is_bit_exact():
    config = SFPOConfig(inner_steps=2, alpha=0.8, zscore_window=2, zscore_threshold=0.5, trigger="abs")

    def fresh():
        model = _tiny_policy()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, SFPO(model, config)

    model, opt, sfpo = fresh()
    straight = _run(model, opt, sfpo, range(5))
    assert any(m["sfpo/triggered"] for m in straight), "pick settings under which the trigger fires mid-run"

    model_b, opt_b, sfpo_b = fresh()
    _run(model_b, opt_b, sfpo_b, range(2))
    saved = copy.deepcopy({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "sfpo": sfpo_b.state_dict()})
    model_c, opt_c, sfpo_c = fresh()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    sfpo_c.load_state_dict(saved["sfpo"])
    resumed = _run(model_c, opt_c, sfpo_c, range(2, 5))

    for name, p in model.named_parameters():
        assert torch.equal(p, dict(model_c.named_parameters())[name]), f"{name} differs after resume"
    for a, b in zip(straight[2:], resumed):
        assert a["sfpo/alpha"] == b["sfpo/alpha"] and a["pg_loss"] == b["pg_loss"]
