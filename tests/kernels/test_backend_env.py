"""``SFPO_BACKEND`` chooses the code that runs, exactly as the ``backend=`` keyword does, and the keyword wins.

Which backend ran is read from the ops that reach torch's dispatcher
(``tests/helpers/op_probe.py``): the torch backend copies and lerps with
``torch._foreach_copy_`` / ``torch._foreach_lerp_``, the Triton kernels call neither.
The backend tried is the one the tensors' device does not default to: torch for
CUDA tensors, triton (in the interpreter) for CPU tensors.
"""

from __future__ import annotations

import pytest
import torch

import sfpo_kernels
from tests.helpers.op_probe import TORCH_BACKEND_OPS, OpNames, device_and_other_backend


def _stage_two(device: torch.device, backend: str | None) -> tuple[OpNames, list[torch.Tensor]]:
    """Snapshot, move, reposition half-way; the ops that ran and the repositioned tensors."""
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(37, generator=g).to(device), torch.randn(5, 3, generator=g).to(device)]
    with OpNames() as probe:
        snap = sfpo_kernels.snapshot(params, backend=backend)
        for p in params:
            p.add_(1.0)
        sfpo_kernels.reposition_(params, snap, 0.5, backend=backend)
    return probe, params


def _ran_torch_backend(probe: OpNames) -> tuple[bool, bool]:
    return tuple(probe.called(op) for op in TORCH_BACKEND_OPS)


def test_environment_picks_the_backend_like_the_keyword(monkeypatch):
    device, other = device_and_other_backend()
    default_uses_torch = device.type == "cpu"
    monkeypatch.delenv("SFPO_BACKEND", raising=False)
    default, _ = _stage_two(device, None)
    assert _ran_torch_backend(default) == (default_uses_torch, default_uses_torch)
    keyword, expected = _stage_two(device, other)
    assert _ran_torch_backend(keyword) == (not default_uses_torch, not default_uses_torch)

    monkeypatch.setenv("SFPO_BACKEND", other)
    from_env, got = _stage_two(device, None)
    assert _ran_torch_backend(from_env) == _ran_torch_backend(keyword), f"SFPO_BACKEND={other} was not used"
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"tensors[{i}] differ between SFPO_BACKEND={other} and backend={other!r}"

    monkeypatch.setenv("SFPO_BACKEND", other.upper())  # the name is case-insensitive, like the keyword
    upper, _ = _stage_two(device, None)
    assert _ran_torch_backend(upper) == _ran_torch_backend(keyword)


def test_keyword_overrides_the_environment(monkeypatch):
    device, other = device_and_other_backend()
    default = "torch" if device.type == "cpu" else "triton"
    monkeypatch.setenv("SFPO_BACKEND", other)
    probe, _ = _stage_two(device, default)
    assert _ran_torch_backend(probe) == ((default == "torch"),) * 2


def test_environment_backend_that_cannot_run_here_is_refused(monkeypatch):
    """``SFPO_BACKEND=cuda`` on CPU tensors fails with the cuda backend's own message, for every op."""
    params = [torch.randn(6)]
    snap = sfpo_kernels.snapshot(params, backend="torch")
    logits, labels = torch.randn(1, 2, 11), torch.randint(0, 11, (1, 2))
    monkeypatch.setenv("SFPO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        sfpo_kernels.snapshot(params)
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        sfpo_kernels.reposition_(params, snap, 0.5)
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        sfpo_kernels.logprob_entropy(logits, labels)
    monkeypatch.setenv("SFPO_BACKEND", "")  # empty: unset
    sfpo_kernels.reposition_(params, snap, 0.5)
