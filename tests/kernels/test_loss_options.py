"""The loss options reach every entry point one way: ``options=GRPOLossOptions(...)`` and/or the fields by name.

Both spellings must be the same call (bit for bit, gradients included), an
override on top of ``options`` replaces that field, a keyword that is no option
is a ``TypeError`` as Python raises it, and a bad value a ``LossOptionError``
naming the option. No entry point writes an option's default in its signature:
the defaults live in ``GRPOLossOptions`` only.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch

import sfpo_kernels
from sfpo_kernels import fused_loss, grpo_math, linear_loss, reference
from sfpo_kernels.loss_options import DEFAULT_LOSS_OPTIONS, GRPOLossOptions, LossOptionError
from tests.helpers.devices import kernel_devices

DEVICE = kernel_devices()[0]
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# Every field away from its default, so a field dropped on the way to the math changes the result.
OPTIONS = GRPOLossOptions(
    temperature=0.7,
    clip_ratio_low=0.1,
    clip_ratio_high=0.28,
    clip_ratio_c=2.0,
    kl_coef=0.05,
    kl_type="k3+",
    entropy_coef=0.01,
    loss_agg_mode="seq-mean-token-mean",
)


def _batch(seed: int = 5) -> SimpleNamespace:
    """[2, 5] tokens over V = 11 (H = 6 for the head), a padded tail, both advantage signs."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, 6, generator=g)
    weight = torch.randn(11, 6, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return SimpleNamespace(
        hidden=hidden.to(DEVICE),
        weight=weight.to(DEVICE),
        logits=(hidden @ weight.T * 2.0).to(DEVICE),
        labels=labels.to(DEVICE),
        old_log_probs=(-torch.rand(2, 5, generator=g) * 3.0).to(DEVICE),
        advantages=torch.tensor([[1.0] * 5, [-1.5] * 5]).to(DEVICE),
        response_mask=mask.to(DEVICE),
        ref_log_probs=(-torch.rand(2, 5, generator=g) * 3.0).to(DEVICE),
    )


def _grpo(batch, backend, **kwargs):
    logits = batch.logits.clone().requires_grad_()
    out = sfpo_kernels.grpo_loss(
        logits,
        batch.labels,
        batch.old_log_probs,
        batch.advantages,
        batch.response_mask,
        ref_log_probs=batch.ref_log_probs,
        backend=backend,
        **kwargs,
    )
    out.loss.backward()
    return out, {"logits.grad": logits.grad}


def _linear(batch, backend, **kwargs):
    hidden, weight = batch.hidden.clone().requires_grad_(), batch.weight.clone().requires_grad_()
    out = sfpo_kernels.linear_grpo_loss(
        hidden,
        weight,
        batch.labels,
        batch.old_log_probs,
        batch.advantages,
        batch.response_mask,
        ref_log_probs=batch.ref_log_probs,
        backend=backend,
        **kwargs,
    )
    out.loss.backward()
    return out, {"hidden.grad": hidden.grad, "weight.grad": weight.grad}


def _assert_same(got, want) -> None:
    (out_got, grads_got), (out_want, grads_want) = got, want
    for name in ("loss", "log_probs", "entropy"):
        assert torch.equal(getattr(out_got, name), getattr(out_want, name)), name
    assert out_got.metrics.keys() == out_want.metrics.keys()
    for name, value in out_want.metrics.items():
        assert torch.equal(out_got.metrics[name], value), f"metrics[{name!r}]"
    for name, grad in grads_want.items():
        assert torch.equal(grads_got[name], grad), name


CALLS = [pytest.param(_grpo, id="grpo_loss"), pytest.param(_linear, id="linear_grpo_loss")]
BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", CALLS)
def test_options_object_and_keywords_are_bit_identical(call, backend):
    batch = _batch()
    by_keywords = call(batch, backend, **OPTIONS.as_kwargs())
    by_object = call(batch, backend, options=OPTIONS)
    _assert_same(by_object, by_keywords)
    assert not torch.equal(by_object[0].loss, call(batch, backend)[0].loss)  # the options did change the loss


@pytest.mark.parametrize("call", CALLS)
def test_an_override_replaces_that_field_of_options(call):
    batch = _batch()
    base = dataclasses.replace(OPTIONS, clip_ratio_high=0.2)
    got = call(batch, "torch", options=base, clip_ratio_high=0.28, kl_type="k3+")
    _assert_same(got, call(batch, "torch", options=OPTIONS))


@pytest.mark.parametrize("call", CALLS)
def test_defaults_are_default_loss_options(call):
    batch = _batch()
    _assert_same(call(batch, "torch"), call(batch, "torch", options=DEFAULT_LOSS_OPTIONS))


def _entry_points(batch):
    """Every loss entry point as a call taking option keywords."""
    args = (batch.labels, batch.old_log_probs, batch.advantages, batch.response_mask)
    return {
        "grpo_loss": lambda **kw: sfpo_kernels.grpo_loss(batch.logits, *args, **kw),
        "linear_grpo_loss": lambda **kw: sfpo_kernels.linear_grpo_loss(batch.hidden, batch.weight, *args, **kw),
        "reference.grpo_loss": lambda **kw: reference.grpo_loss(batch.logits, *args, **kw),
        "reference.linear_grpo_loss": lambda **kw: reference.linear_grpo_loss(batch.hidden, batch.weight, *args, **kw),
        "grpo_loss_from_log_probs": lambda **kw: grpo_math.grpo_loss_from_log_probs(
            batch.old_log_probs, torch.zeros_like(batch.old_log_probs), *args[1:], **kw
        ),
    }


ENTRY_POINTS = list(_entry_points(_batch()))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_unknown_keyword_is_a_type_error_naming_it(entry):
    call = _entry_points(_batch())[entry]
    with pytest.raises(TypeError, match=r"\(\) got an unexpected keyword argument 'clip_ratio'"):
        call(clip_ratio=0.2)
    with pytest.raises(TypeError, match="options must be a GRPOLossOptions"):
        call(options=OPTIONS.as_kwargs())


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    "option,value",
    [("clip_ratio_c", 1.0), ("clip_ratio_low", 1.5), ("temperature", 0.0), ("kl_type", "k4"), ("loss_agg_mode", "x")],
)
def test_a_bad_option_is_a_loss_option_error_naming_it(entry, option, value):
    call = _entry_points(_batch())[entry]
    for kwargs in ({option: value}, {"options": OPTIONS, option: value}):
        with pytest.raises(LossOptionError, match=option) as raised:
            call(**kwargs)
        assert (raised.value.option, raised.value.value) == (option, value)
        assert isinstance(raised.value, ValueError)


def test_no_entry_point_writes_an_option_default():
    """The defaults live in GRPOLossOptions only: a new field reaches every entry point without touching them."""
    entry_points = [
        fused_loss.grpo_loss,
        linear_loss.linear_grpo_loss,
        reference.grpo_loss,
        reference.linear_grpo_loss,
        grpo_math.grpo_loss_from_log_probs,
    ]
    for fn in entry_points:
        params = inspect.signature(fn).parameters
        assert not set(params) & set(GRPOLossOptions.names()), fn.__qualname__
        assert "options" in params and params["option_overrides"].kind is inspect.Parameter.VAR_KEYWORD


def test_moved_names_still_import_from_their_old_places():
    for name in ("agg_loss", "kl_penalty", "masked_mean", "policy_loss_terms", "grpo_loss_from_log_probs"):
        assert getattr(reference, name) is getattr(grpo_math, name), name
    for name in ("response_positions", "response_weights", "nonfinite_at"):
        assert getattr(reference, name) is getattr(grpo_math, name), name
    assert reference.KL_TYPES[0] == "kl" and "token-mean" in reference.AGG_MODES
    assert fused_loss.GRPOLossOptions is GRPOLossOptions
