"""The Snapshot's cache of the validated tensor list: every change validation would catch is still caught.

``reposition_`` / ``restore_`` skip validation when the list's layout key (ids, data pointers, shapes,
strides, dtypes, neg bits) equals that of the last list that passed. Each case below changes one of the
tensors after a cached call, the way a user or a framework can (a new object, ``.data =``, ``resize_``,
``set_``, a transposed or aliased buffer, a lazy neg view) and checks that the next call raises
``ValueError`` with nothing written, or, where the new list is valid, that it writes the new memory.
Values are compared bit for bit against ``torch.lerp`` (fp32: the kernels' formula, one rounding).
"""

from __future__ import annotations

import pytest
import torch

import sfpo_kernels
from tests.helpers.bits import assert_bit_equal
from tests.helpers.devices import kernel_devices

DEVICE = kernel_devices()[0]
BACKENDS = ["torch", "triton"]


def _params() -> list[torch.Tensor]:
    """Three fp32 parameters and a plain bf16 buffer (two (device, dtype) groups)."""
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g).to(DEVICE)) for shape in ((3, 3), (5,), (2, 4))]
    return [*params, torch.randn(6, generator=g).to(DEVICE, torch.bfloat16)]


def _stepped(params, snap_values):
    """What a 0.5 reposition must give: lerp(t, snap, 0.5) in fp32, rounded once to the tensor's dtype."""
    return [torch.lerp(p.detach().float(), s.float(), 0.5).to(p.dtype) for p, s in zip(params, snap_values)]


def _cached_snapshot(params, backend):
    snap = sfpo_kernels.snapshot(params, backend=backend)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)  # a Stage I step: value writes bump the version counters, the cache stays valid
    assert snap._check_tensors(params) is snap._check_tensors(list(params)), "the unchanged list must hit the cache"
    return snap


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_writes_keep_the_cache_and_the_result_exact(backend):
    params = _params()
    snap = _cached_snapshot(params, backend)
    want = _stepped(params, [v.clone() for v in snap.values()])
    sfpo_kernels.reposition_(params, snap, 0.5, backend=backend)
    for i, (p, w) in enumerate(zip(params, want)):
        assert_bit_equal(f"param[{i}]", p.detach(), w)


def _replace(params):
    params[1] = torch.nn.Parameter(torch.zeros(6, device=DEVICE))


def _data_new_shape(params):
    params[2].data = torch.zeros(4, 2, device=DEVICE)


def _data_new_dtype(params):
    params[1].data = params[1].data.double()


def _data_reinterpreted(params):
    params[3].data = params[3].data.view(torch.float16)  # same memory and shape, another dtype


def _data_transposed(params):
    params[0].data = params[0].data.t()  # square: same memory and shape, not contiguous


def _data_aliased(params):
    params[2].data = params[0].data.view(-1)[:8].view(2, 4)  # shares params[0]'s memory


def _data_neg_view(params):
    params[1].data = torch._neg_view(params[1].data)  # same memory, lazily negated


def _moved_to_meta(params):
    moved = torch.nn.Parameter(torch.empty(5, device="meta"))
    torch.utils.swap_tensors(params[1], moved)  # the same object now lives on another device


def _resize_in_place(params):
    params[3].resize_(4)  # same object and storage, fewer elements


INVALIDATIONS = [
    pytest.param(_replace, "shape", id="replaced-other-shape"),
    pytest.param(_data_new_shape, "shape", id="data-new-shape"),
    pytest.param(_data_new_dtype, "dtype", id="data-new-dtype"),
    pytest.param(_data_reinterpreted, "dtype", id="data-same-memory-other-dtype"),
    pytest.param(_data_transposed, "contiguous", id="data-transposed"),
    pytest.param(_data_aliased, "share memory", id="data-aliases-another"),
    pytest.param(_data_neg_view, "neg bit", id="data-neg-view"),
    pytest.param(_moved_to_meta, "on meta", id="moved-to-meta"),
    pytest.param(_resize_in_place, "shape", id="resize-in-place"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change, message", INVALIDATIONS)
def test_a_changed_tensor_is_caught_and_nothing_is_written(backend, change, message):
    params = _params()
    snap = _cached_snapshot(params, backend)
    change(params)
    before = [p.detach().resolve_neg().clone() if p.device.type != "meta" else None for p in params]
    for call in (
        lambda: sfpo_kernels.reposition_(params, snap, 0.5, backend=backend),
        lambda: snap.restore_(params, backend=backend),
    ):
        with pytest.raises(ValueError, match=message):
            call()
        for i, (p, b) in enumerate(zip(params, before)):
            if b is not None:
                assert_bit_equal(f"param[{i}] after the refused call", p.detach().resolve_neg(), b)


def _replace_same_signature(params):
    params[1] = torch.nn.Parameter(torch.full((5,), 2.0, device=DEVICE))


def _data_new_memory(params):
    params[0].data = params[0].data.clone() * 3.0  # same shape and dtype, other memory (storage changed)


def _set_new_storage(params):
    with torch.no_grad():
        params[2].set_(torch.full((2, 4), -1.0, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_replace_same_signature, id="replaced-same-signature"),
        pytest.param(_data_new_memory, id="data-new-memory"),
        pytest.param(_set_new_storage, id="set-new-storage"),
    ],
)
def test_a_valid_new_tensor_is_revalidated_and_written(backend, change):
    """A list that is still valid but holds other memory: the call must write the new tensors, not the cached."""
    params = _params()
    snap = _cached_snapshot(params, backend)
    change(params)
    want = _stepped(params, [v.clone() for v in snap.values()])
    sfpo_kernels.reposition_(params, snap, 0.5, backend=backend)
    for i, (p, w) in enumerate(zip(params, want)):
        assert_bit_equal(f"param[{i}]", p.detach(), w)
    assert snap._check_tensors(params) is snap._check_tensors(params), "the new list is cached in turn"


def test_release_drops_the_cached_references():
    params = _params()
    snap = _cached_snapshot(params, "torch")
    snap.release()
    assert snap._validated is None
    with pytest.raises(ValueError, match="released"):
        sfpo_kernels.reposition_(params, snap, 0.5, backend="torch")
