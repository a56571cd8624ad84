"""snapshot / reposition_ on distributed parameters, in a real gloo process group on the CPU.

World size 1: one process, a real ``torch.distributed`` group, real
``DTensor`` / FSDP2 / FSDP1 parameters. What is checked is how sfpo reaches the
memory that holds a rank's values: a DTensor through its local shard, an FSDP1
``FlatParameter`` as the plain 1-D tensor it is; and that FSDP's next forward
sees what reposition_ wrote.

Tolerances (one table for the file):
    values: exact. reposition_ on a shard is compared with
        ``sfpo_kernels.reference.reposition_`` on a copy of the same shard; both
        evaluate the same lerp with one rounding (see test_reposition.py).
    forward: exact. The wrapped model and the plain functional forward run the
        same torch ops on bit-identical weights and inputs in one process.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import sfpo_kernels
from sfpo_kernels import reference
from tests.helpers.bits import assert_bit_equal

TOLERANCES = {"values": 0, "forward": 0}
BACKENDS = ["torch", "triton"]  # triton through the interpreter on the CPU

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="this torch build has no gloo process groups"
)


def _init_default_group() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


@contextlib.contextmanager
def _own_mesh():
    """A one-rank gloo group of our own and its 1-D CPU device mesh, whatever groups the process has.

    The group comes from ``new_group`` with local synchronisation (no other rank takes part), so it
    works the same beside a default group that something else initialised (an earlier test, say):
    that one is neither used nor destroyed. Only without any default group is one made (``new_group``
    needs it), and destroyed again afterwards.
    """
    from torch.distributed.device_mesh import DeviceMesh

    made_default = not dist.is_initialized()
    if made_default:
        _init_default_group()
    group = dist.new_group([dist.get_rank()], backend="gloo", use_local_synchronization=True)
    try:
        mesh = DeviceMesh.from_group(group, "cpu")
        assert mesh.get_group() is group and mesh.size() == 1
        yield mesh
    finally:
        dist.destroy_process_group(group)
        if made_default:
            dist.destroy_process_group()
    assert dist.is_initialized() != made_default, "the default process group was not left as it was found"


@pytest.fixture(scope="module", params=["alone", "beside-a-default-group"])
def mesh(request):
    """Every test runs in both situations, whatever ran before in this process: ``alone`` (a default
    group only if one exists already) and ``beside-a-default-group`` (one made here first, standing
    for a group another test left behind, and destroyed after)."""
    stand_in = request.param == "beside-a-default-group" and not dist.is_initialized()
    if stand_in:
        _init_default_group()
    try:
        with _own_mesh() as mesh:
            yield mesh
    finally:
        if stand_in:
            dist.destroy_process_group()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A copy of the values this rank holds for ``t``."""
    with torch.no_grad():
        return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _expected(theta0: list[torch.Tensor], theta_k: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
    out = [t.clone() for t in theta_k]
    reference.reposition_(out, theta0, alpha)
    return out


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))


def _functional_mlp(x: torch.Tensor, w0, b0, w2, b2) -> torch.Tensor:
    return F.linear(F.relu(F.linear(x, w0, b0)), w2, b2)


def _regression_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)


# ---------------------------------------------------------------- DTensor parameters


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dtensor_parameters_repositioned_through_their_local_shard(mesh, backend, dtype):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (13,), (3, 2, 4), (1,)]  # odd leading dims: the sharded one
    params = [
        nn.Parameter(distribute_tensor(torch.randn(s, generator=g).to(dtype), mesh, [Shard(0)]), requires_grad=True)
        for s in shapes
    ]
    assert all(isinstance(p, DTensor) and p.requires_grad for p in params)
    theta0 = [_local(p) for p in params]
    snap = sfpo_kernels.snapshot(params, backend=backend)
    for i, (v, t0) in enumerate(zip(snap.values(), theta0)):
        assert_bit_equal(f"snapshot value[{i}]", v, t0)

    with torch.no_grad():  # the fast steps, written into the local shards
        for p in params:
            p.to_local().mul_(1.5).add_(torch.randn(p.to_local().shape, generator=g).to(dtype))
    theta_k = [_local(p) for p in params]
    sfpo_kernels.reposition_(params, snap, 0.8, backend=backend)

    for i, (p, e) in enumerate(zip(params, _expected(theta0, theta_k, 0.8))):
        assert isinstance(p, DTensor) and p.placements == (Shard(0),) and p.requires_grad, f"param[{i}] rewrapped"
        assert_bit_equal(f"param[{i}] local shard", _local(p), e)
        assert_bit_equal(f"param[{i}] full tensor", p.full_tensor().detach(), e)  # world size 1: shard == whole

    snap.restore_(params, backend=backend)
    for i, (p, t0) in enumerate(zip(params, theta0)):
        assert_bit_equal(f"param[{i}] restored", _local(p), t0)


def test_reposition_invalidates_graphs_that_saved_a_dtensor_parameter(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    p = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
    snap = sfpo_kernels.snapshot([p], backend="torch")
    loss = (p * p).sum()  # saves p for the backward
    version = p._version
    sfpo_kernels.reposition_([p], snap, 0.5, backend="torch")
    assert p._version > version, "the DTensor parameter's version counter did not move"
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------- FSDP2 (fully_shard)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_step_then_reposition(mesh, backend):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = _mlp()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    assert len(params) == 4 and all(isinstance(p, DTensor) for p in params), [type(p) for p in params]

    theta0 = [_local(p) for p in params]
    snap = sfpo_kernels.snapshot(params, backend=backend)
    opt = torch.optim.AdamW(params, lr=0.05)
    x, y = _regression_batch(seed=1)
    F.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    theta_k = [_local(p) for p in params]
    for i, (t0, tk) in enumerate(zip(theta0, theta_k)):
        assert not torch.equal(t0, tk), f"param[{i}] did not move in the optimizer step"

    sfpo_kernels.reposition_(params, snap, 0.5, backend=backend)
    expected = _expected(theta0, theta_k, 0.5)
    for i, (p, e) in enumerate(zip(params, expected)):
        assert_bit_equal(f"param[{i}] local shard", _local(p), e)

    with torch.no_grad():  # FSDP2 all-gathers from the shards: its forward must see the new values
        got = model(x)
    assert_bit_equal("forward after reposition", got, _functional_mlp(x, *expected))


# ---------------------------------------------------------------- FSDP1 (FlatParameter)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp1_flat_parameter_step_then_reposition(mesh, backend):
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp._flat_param import FlatParameter

    torch.manual_seed(0)
    module = _mlp()
    shapes = [p.shape for p in module.parameters()]
    # One rank cannot shard; FSDP1 would switch FULL_SHARD to NO_SHARD with a
    # warning. NO_SHARD still flattens every parameter into one FlatParameter.
    model = FullyShardedDataParallel(
        module,
        process_group=mesh.get_group(),
        device_id=torch.device("cpu"),
        use_orig_params=False,
        sharding_strategy=ShardingStrategy.NO_SHARD,
    )
    params = list(model.parameters())
    assert len(params) == 1 and isinstance(params[0], FlatParameter), [type(p) for p in params]
    flat = params[0]
    assert flat.dim() == 1 and flat.numel() == sum(s.numel() for s in shapes)

    theta0 = [_local(flat)]
    snap = sfpo_kernels.snapshot(params, backend=backend)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    x, y = _regression_batch(seed=2)
    F.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    theta_k = [_local(flat)]
    assert not torch.equal(theta0[0], theta_k[0]), "the optimizer step did not move the flat parameter"
    version = flat._version

    sfpo_kernels.reposition_(params, snap, 0.5, backend=backend)
    (expected,) = _expected(theta0, theta_k, 0.5)
    assert_bit_equal("flat parameter", flat.detach(), expected)
    assert flat._version > version, "autograd version counter of the flat parameter not bumped"

    with torch.no_grad():  # the module's weights are views into the flat parameter
        got = model(x)
    weights = [w.view(s) for w, s in zip(expected.split([s.numel() for s in shapes]), shapes)]
    assert_bit_equal("forward after reposition", got, _functional_mlp(x, *weights))
