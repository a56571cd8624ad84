"""grpo_loss's argument checks: every bad argument is a ValueError naming it, before any kernel runs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import sfpo_kernels
from sfpo_kernels import reference
from tests.helpers.devices import kernel_devices

DEVICE = kernel_devices()[0]
# The interpreter evaluates masked-off lanes too; numpy warns about their 0 * -inf, which the kernel discards.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _batch() -> SimpleNamespace:
    """A valid [2, 3] batch over a vocabulary of 7 (its values do not matter: every call here must be rejected)."""
    g = torch.Generator().manual_seed(71)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    return SimpleNamespace(
        logits=torch.randn(2, 3, 7, generator=g).to(DEVICE).requires_grad_(),
        labels=labels.to(DEVICE),
        old_log_probs=-torch.rand(2, 3, generator=g).to(DEVICE),
        advantages=torch.randn(2, 3, generator=g).to(DEVICE),
        response_mask=torch.ones(2, 3, dtype=torch.bool, device=DEVICE),
        ref_log_probs=-torch.rand(2, 3, generator=g).to(DEVICE),
    )


def _call(**overrides):
    batch = _batch()
    kwargs = dict(
        logits=batch.logits,
        labels=batch.labels,
        old_log_probs=batch.old_log_probs,
        advantages=batch.advantages,
        response_mask=batch.response_mask,
        backend="triton",
    )
    kwargs.update(overrides)
    args = [kwargs.pop(k) for k in ("logits", "labels", "old_log_probs", "advantages", "response_mask")]
    return sfpo_kernels.grpo_loss(*args, **kwargs)


def _packed(**overrides):
    batch = _batch()
    flat = dict(
        logits=batch.logits.reshape(6, 7),
        labels=batch.labels.reshape(6),
        old_log_probs=batch.old_log_probs.reshape(6),
        advantages=batch.advantages.reshape(6),
        response_mask=batch.response_mask.reshape(6),
    )
    return _call(**flat, **overrides)


NAN, INF = float("nan"), float("inf")


def _zeros(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


SIDE = _zeros(2, 4)
INVALID = [
    pytest.param(lambda: _call(clip_ratio_c=1.0), "clip_ratio_c", id="clip_ratio_c-1"),
    pytest.param(lambda: _call(clip_ratio_c=0.5), "clip_ratio_c", id="clip_ratio_c-0.5"),
    pytest.param(lambda: _call(clip_ratio_c=NAN), "clip_ratio_c", id="clip_ratio_c-nan"),
    pytest.param(lambda: _call(clip_ratio_c=True), "clip_ratio_c", id="clip_ratio_c-bool"),
    pytest.param(lambda: _call(clip_ratio_low=-0.1), "clip_ratio_low", id="clip_ratio_low-negative"),
    pytest.param(lambda: _call(clip_ratio_low=1.0), "clip_ratio_low", id="clip_ratio_low-1"),
    pytest.param(lambda: _call(clip_ratio_low=NAN), "clip_ratio_low", id="clip_ratio_low-nan"),
    pytest.param(lambda: _call(clip_ratio_high=-0.1), "clip_ratio_high", id="clip_ratio_high-negative"),
    pytest.param(lambda: _call(clip_ratio_high=INF), "clip_ratio_high", id="clip_ratio_high-inf"),
    pytest.param(lambda: _call(temperature=0.0), "temperature", id="temperature-0"),
    pytest.param(lambda: _call(temperature=NAN), "temperature", id="temperature-nan"),
    pytest.param(lambda: _call(temperature=True), "temperature", id="temperature-bool"),
    pytest.param(lambda: _call(kl_coef=NAN, ref_log_probs=_batch().ref_log_probs), "kl_coef", id="kl_coef-nan"),
    pytest.param(lambda: _call(kl_coef=True, ref_log_probs=_batch().ref_log_probs), "kl_coef", id="kl_coef-bool"),
    pytest.param(lambda: _call(entropy_coef=INF), "entropy_coef", id="entropy_coef-inf"),
    pytest.param(lambda: _call(entropy_coef=False), "entropy_coef", id="entropy_coef-bool"),
    pytest.param(
        lambda: _call(kl_type="k4"), r"kl_type='k4'.*kl, k1, abs, mse, k2, low_var_kl, k3", id="kl_type-unknown"
    ),
    pytest.param(lambda: _call(kl_type="full"), r"kl_type.*low_var_kl", id="kl_type-full"),
    pytest.param(lambda: _call(kl_type="k3++"), r"kl_type.*low_var_kl", id="kl_type-double-plus"),
    pytest.param(lambda: _call(kl_type=None), r"kl_type", id="kl_type-none"),
    pytest.param(
        lambda: _call(loss_agg_mode="seq-sum"),
        r"loss_agg_mode='seq-sum'.*token-mean, token-sum, seq-mean-token-sum, seq-mean-token-mean, "
        r"seq-mean-token-sum-norm",
        id="loss_agg_mode-unknown",
    ),
    pytest.param(lambda: _call(kl_coef=0.1), "ref_log_probs", id="kl_coef-without-ref"),
    pytest.param(lambda: _call(labels=_zeros(2, 4, dtype=torch.int64)), "labels", id="labels-shape"),
    pytest.param(lambda: _call(labels=_zeros(2, 3)), "labels", id="labels-float"),
    pytest.param(lambda: _call(old_log_probs=SIDE), "old_log_probs", id="old_log_probs-shape"),
    pytest.param(lambda: _call(old_log_probs=_zeros(6)), "old_log_probs", id="old_log_probs-flat"),
    pytest.param(lambda: _call(old_log_probs=[[0.0] * 3] * 2), "old_log_probs", id="old_log_probs-list"),
    pytest.param(lambda: _call(advantages=SIDE), "advantages", id="advantages-shape"),
    pytest.param(lambda: _call(advantages=_zeros(2)), "advantages", id="advantages-per-sequence"),
    pytest.param(lambda: _call(response_mask=SIDE.bool()), "response_mask", id="response_mask-shape"),
    pytest.param(lambda: _call(ref_log_probs=SIDE), "ref_log_probs", id="ref_log_probs-shape"),
    pytest.param(lambda: _call(logits=_zeros(2, 3, 7, dtype=torch.float64)), "logits", id="logits-fp64"),
    pytest.param(lambda: _call(logits=_zeros(2, 3, 14)[..., ::2]), "logits", id="logits-vocab-strided"),
    pytest.param(lambda: _call(backend="tritonx"), "backend", id="backend-unknown"),
    *(
        pytest.param(lambda mode=mode: _packed(loss_agg_mode=mode), "loss_agg_mode", id=f"packed-{mode}")
        for mode in reference.AGG_MODES
        if mode.startswith("seq-")
    ),
]


@pytest.mark.parametrize("call,match", INVALID)
def test_invalid_arguments_raise_value_error_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_packed_token_modes_are_accepted():
    for mode in ("token-mean", "token-sum"):
        assert math.isfinite(_packed(loss_agg_mode=mode).loss.item())


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32], ids=str)
def test_every_integer_label_dtype_is_accepted_as_int64(backend, label_dtype):
    """Any integer labels, both backends, the int64 result bit for bit (torch's gather once raised for uint8)."""
    batch = _batch()
    args = (batch.old_log_probs, batch.advantages, batch.response_mask)
    want = sfpo_kernels.grpo_loss(batch.logits, batch.labels, *args, backend=backend)
    got = sfpo_kernels.grpo_loss(batch.logits, batch.labels.to(label_dtype), *args, backend=backend)
    for name in ("loss", "log_probs", "entropy"):
        assert torch.equal(getattr(got, name), getattr(want, name)), f"{name} with {label_dtype} labels"
