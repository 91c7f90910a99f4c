"""flatness._utils.compat: each wrapper of a private torch / scipy API against the behaviour it wraps."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy
import threadpoolctl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flatness._utils import compat

F = nn.functional


# --------------------------------------------------------------------------- BLAS threads
def _blas_threads() -> list[int]:
    return [
        int(pool["num_threads"]) for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"
    ]


@pytest.fixture
def two_blas_threads():
    """Every loaded BLAS at 2 threads (so that a limit to 1 has something to change)."""
    importlib.import_module("scipy.linalg")  # loads SciPy's BLAS next to NumPy's

    if not _blas_threads():
        pytest.skip("threadpoolctl finds no BLAS here")
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        if set(_blas_threads()) != {2}:
            pytest.skip(f"this BLAS cannot run 2 threads here: {_blas_threads()}")
        yield


def test_single_threaded_blas_limits_and_restores(two_blas_threads):
    with compat.single_threaded_blas():
        assert set(_blas_threads()) == {1}
    assert set(_blas_threads()) == {2}
    with pytest.raises(RuntimeError, match="inside"), compat.single_threaded_blas():
        assert set(_blas_threads()) == {1}
        raise RuntimeError("inside")
    assert set(_blas_threads()) == {2}


def test_maximizers_run_with_single_threaded_blas(two_blas_threads):
    from flatness.algorithms import maximize_ball, maximize_box

    seen = []
    H = np.diag([1.0, -2.0, 3.0])

    def f(x):
        seen.append(tuple(_blas_threads()))
        return 0.5 * x @ H @ x, H @ x

    half = np.full(3, 0.5)
    maximize_box(f, -half, half, x0=np.zeros(3) + 0.1, max_iter=5)
    maximize_ball(f, radius=1.0, x0=np.ones(3), max_iter=5)
    assert seen and all(set(t) == {1} for t in seen)
    assert set(_blas_threads()) == {2}


# --------------------------------------------------------------------------- reparametrize
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.l2 = nn.Linear(6, 2)

    def forward(self, x):
        return self.l2(torch.tanh(self.bn(self.l1(x))))


def _net():
    torch.manual_seed(0)
    model = _Net().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    return model


def test_reparametrize_swaps_and_restores_like_functional_call():
    model = _net()
    x = torch.randn(5, 4, dtype=torch.float64)
    originals = {k: v for k, v in [*model.named_parameters(), *model.named_buffers()]}
    values = {k: v.detach().clone() for k, v in originals.items()}
    torch.manual_seed(1)
    state = {
        k: (v + 0.1 * torch.randn_like(v)).requires_grad_(originals[k].requires_grad)
        for k, v in values.items()
        if v.is_floating_point()
    }
    partial = {k: v for k, v in state.items() if k.startswith("l1.")}
    for swap in (state, partial):
        with compat.reparametrize(model, swap):
            assert model.l1.weight is swap["l1.weight"]
            assert (model.l2.weight is swap.get("l2.weight")) == ("l2.weight" in swap)
            assert model.bn.running_mean is swap.get("bn.running_mean", originals["bn.running_mean"])
            out = model(x)
        expected = torch.func.functional_call(model, swap, (x,), tie_weights=False, strict=False)
        assert torch.equal(out, expected)
        assert not torch.equal(out, model(x))
    # A backward through the block reaches the swapped-in tensors, not the module's.
    with compat.reparametrize(model, state):
        model(x).square().sum().backward()
    assert state["l1.weight"].grad is not None and model.l1.weight.grad is None
    # Restored, also after a raise inside the block.
    with pytest.raises(ValueError, match="inside"), compat.reparametrize(model, state):
        raise ValueError("inside")
    for k, v in [*model.named_parameters(), *model.named_buffers()]:
        assert v is originals[k] and torch.equal(v, values[k]), k


def test_reparametrize_without_the_private_api_raises(monkeypatch):
    monkeypatch.setattr(compat, "_reparametrize_module", None)
    with pytest.raises(RuntimeError, match="_reparametrize_module"), compat.reparametrize(_net(), {}):
        pass


# --------------------------------------------------------------------------- pytrees
def test_tree_flatten_unflatten_round_trip_and_vmap_in_dims():
    x, y, w = torch.randn(4, 3), torch.arange(4), torch.tensor(2.0)
    batch = {"inputs": (x, [w, y]), "mask": None}
    leaves, spec = compat.tree_flatten(batch)
    assert len(leaves) == 4 and leaves[0] is x and leaves[1] is w and leaves[2] is y
    again = compat.tree_unflatten(leaves, spec)
    assert again["inputs"][0] is x and again["inputs"][1][1] is y and again["mask"] is None
    # The structure is the one torch.func.vmap matches in_dims against.
    dims = compat.tree_unflatten([0 if t is not None and t.ndim else None for t in leaves], spec)
    out = torch.func.vmap(
        lambda b: b["inputs"][0].sum() * b["inputs"][1][0] + b["inputs"][1][1], in_dims=(dims,)
    )(batch)
    assert torch.equal(out, x.sum(1) * w + y)


# --------------------------------------------------------------------------- is_conv
CONVS = [
    nn.Conv1d(2, 3, 3),
    nn.Conv2d(2, 3, 3),
    nn.Conv3d(2, 3, 3),
    nn.ConvTranspose1d(2, 3, 3),
    nn.ConvTranspose2d(2, 3, 3),
    nn.ConvTranspose3d(2, 3, 3),
    nn.LazyConv2d(3, 3),
]
NOT_CONVS = [nn.Linear(2, 3), nn.BatchNorm2d(3), nn.Sequential(nn.Conv2d(2, 3, 3)), nn.Identity()]


@pytest.mark.parametrize("fallback", [False, True])
def test_is_conv(monkeypatch, fallback):
    assert isinstance(nn.modules.conv._ConvNd, type)  # the private class it wraps exists here
    if fallback:  # a torch without the private base class: the public classes
        monkeypatch.delattr(nn.modules.conv, "_ConvNd")
    assert [compat.is_conv(m) for m in CONVS] == [True] * len(CONVS)
    assert [compat.is_conv(m) for m in NOT_CONVS] == [False] * len(NOT_CONVS)


# --------------------------------------------------------------------------- L-BFGS-B kernel
def test_lbfgsb_kernel_on_this_scipy():
    kernel = compat.lbfgsb_kernel()
    if tuple(int(p) for p in scipy.__version__.split(".")[:2]) >= (1, 15):
        assert kernel is not None, f"scipy {scipy.__version__}: the kernel's interface was not recognized"
    if kernel is None:
        pytest.skip(f"scipy {scipy.__version__} has another L-BFGS-B kernel; minimize() is used")
    setulb, status_messages, task_messages = kernel
    from scipy.optimize import _lbfgsb
    from scipy.optimize._lbfgsb_py import status_messages as sm
    from scipy.optimize._lbfgsb_py import task_messages as tm

    assert setulb is _lbfgsb.setulb and status_messages is sm and task_messages is tm


def test_lbfgsb_kernel_with_another_interface_is_none(monkeypatch):
    from scipy.optimize import _lbfgsb

    def setulb(m, x, l, u):
        """setulb(m, x, l, u) -> None"""

    monkeypatch.setattr(_lbfgsb, "setulb", setulb)
    compat.lbfgsb_kernel.cache_clear()
    try:
        assert compat.lbfgsb_kernel() is None
    finally:
        monkeypatch.undo()
        compat.lbfgsb_kernel.cache_clear()


def test_maximize_box_through_the_kernel_equals_scipy_minimize():
    from scipy.optimize import Bounds, minimize

    from flatness.algorithms import maximize as _maximize

    if _maximize._LBFGSB is None:
        pytest.skip("this scipy's kernel is not driven directly")
    rng = np.random.default_rng(3)
    a = rng.standard_normal((15, 15))
    H, b = a @ a.T / 15 - 0.5 * np.eye(15), rng.standard_normal(15)
    lower, upper = -rng.uniform(0.1, 1.0, 15), rng.uniform(0.1, 1.0, 15)
    x0 = rng.uniform(-0.05, 0.05, 15)

    def f(x):
        return float(0.5 * x @ H @ x + b @ x), H @ x + b

    ours = _maximize.maximize_box(f, lower, upper, x0=x0, max_iter=30)
    ref = minimize(
        lambda x: tuple(-v for v in f(x)),
        x0,
        jac=True,
        method="L-BFGS-B",
        bounds=Bounds(lower, upper),
        options={"maxiter": 30, "ftol": 1e-12, "gtol": 1e-10, "maxcor": 10},
    )
    np.testing.assert_array_equal(ours.x, ref.x)
    assert ours.fun == -ref.fun and ours.nit == ref.nit and ours.status == ref.status
    assert ours.message == ref.message


# --------------------------------------------------------------------------- FSDP2
def test_fsdp_functions_need_an_fsdp_module():
    with pytest.raises(RuntimeError, match="_get_fsdp_state"):
        compat.fsdp_state_param_groups(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="_get_fsdp_state"):
        compat.fsdp_mp_policy(nn.Linear(2, 2))


def _fsdp_worker(_index: int, world: int) -> None:
    """In a fresh process: FSDP2 on a fake process group (no communication) of ``world`` ranks."""
    import torch.distributed.tensor._utils as dtensor_utils
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from flatness._utils.compat import (
        _chunk_first_row,
        fsdp_mp_policy,
        fsdp_state_param_groups,
        shard_first_row,
    )

    torch.set_num_threads(1)
    # fully_shard as rank 1 only: FSDP2 caches its mesh, so a process that re-joins a group as
    # another rank would see the first rank's mesh coordinate in its DTensors.
    rank = 1
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        # Rows 10, 10, 3, 3, 5, 5: uneven over 4 ranks (rank 1 holds rows 3-5, 1, 2-3).
        model = nn.Sequential(nn.Linear(5, 10), nn.Linear(10, 3), nn.Linear(3, 5))
        full = {k: v.detach().clone() for k, v in model.named_parameters()}
        fully_shard(model[0], mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        fully_shard(model, mesh=mesh)  # the root shards model[1] and model[2]
        own = {
            model[0]: list(model[0].parameters()),
            model: [*model[1].parameters(), *model[2].parameters()],
        }
        for m, expected in own.items():
            groups = fsdp_state_param_groups(m)
            sharded = [fp.sharded_param for g in groups for fp in g.fsdp_params]
            assert [id(p) for p in sharded] == [id(p) for p in expected], rank
        assert fsdp_mp_policy(model[0]).param_dtype == torch.bfloat16
        assert fsdp_mp_policy(model).param_dtype is None
        for fallback in (False, True):
            saved = dtensor_utils.compute_local_shape_and_global_offset
            if fallback:  # a torch without the private function: torch.chunk's split
                del dtensor_utils.compute_local_shape_and_global_offset
            try:
                for name, p in model.named_parameters():
                    local = p.to_local()
                    first = shard_first_row(p, world, rank)
                    rows = full[name].shape[0]
                    assert first == _chunk_first_row(rows, world, rank), (name, rank, fallback)
                    assert torch.equal(local, full[name][first : first + local.shape[0]]), (name, rank)
                    assert first + local.shape[0] <= rows
            finally:
                dtensor_utils.compute_local_shape_and_global_offset = saved
    finally:
        dist.destroy_process_group()
    # The fallback's split equals DTensor's for every row count, on every rank.
    from torch.distributed.tensor import Shard

    for rank in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            mesh = init_device_mesh("cpu", (world,))
            assert mesh.get_coordinate() == [rank] or tuple(mesh.get_coordinate()) == (rank,)
            for rows in range(0, 14):
                _, offset = dtensor_utils.compute_local_shape_and_global_offset((rows, 2), mesh, (Shard(0),))
                assert int(offset[0]) == _chunk_first_row(rows, world, rank), (rows, rank)
        finally:
            dist.destroy_process_group()


@pytest.mark.skipif(
    not dist.is_available()
    or importlib.util.find_spec("torch.testing._internal.distributed.fake_pg") is None,
    reason="needs torch.distributed and its fake process group",
)
def test_fsdp_param_groups_mp_policy_and_shard_rows():
    """On a fake 4-rank process group (one process): each rank's shard is the rows it names."""
    mp.spawn(_fsdp_worker, args=(4,), nprocs=1, join=True)


# --------------------------------------------------------------------------- the rule itself
_THIRD_PARTY = ("torch", "scipy", "numpy", "threadpoolctl")
_FSDP_PRIVATE = {"_get_fsdp_state", "_fsdp_param_groups", "_fsdp_param_group", "_mp_policy"}
# Files the model-layer rewrite (issue 20) switches to flatness._utils.compat: remove each
# from this list as it is switched; the list must end empty.
_NOT_YET_SWITCHED: set[str] = set()


def _private(name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


def _private_uses(source: str) -> list[str]:
    """Imports of private names of torch / scipy / numpy, attribute chains through them, FSDP2's."""
    import ast

    tree = ast.parse(source)
    roots, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in _THIRD_PARTY:
                    roots.add((a.asname or a.name).split(".")[0])
                    if _private(a.name):
                        found.append(a.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in _THIRD_PARTY:
                for a in node.names:
                    roots.add(a.asname or a.name)
                    if _private(f"{node.module}.{a.name}"):
                        found.append(f"{node.module}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in roots and _private(".".join(chain)):
                found.append(".".join([base.id, *reversed(chain)]))
            elif node.attr in _FSDP_PRIVATE:
                found.append(node.attr)
        elif isinstance(node, ast.Constant) and node.value in _FSDP_PRIVATE:
            found.append(node.value)
    return found


def test_private_third_party_apis_only_in_compat():
    import pathlib

    root = pathlib.Path(compat.__file__).parents[1]
    assert _private_uses("from torch.nn.modules.conv import _ConvNd\nimport torch\ntorch._C\n") == [
        "torch.nn.modules.conv._ConvNd",
        "torch._C",
    ]
    assert _private_uses("from torch import nn\nm.x = nn.modules.conv._ConvNd\ns._mp_policy\n") == [
        "nn.modules.conv._ConvNd",
        "_mp_policy",
    ]
    assert _private_uses(pathlib.Path(compat.__file__).read_text())  # the scanner sees compat's
    for rel in sorted(_NOT_YET_SWITCHED):  # remove a file from the list once it is switched
        assert _private_uses((root / rel).read_text()), f"{rel} is switched: remove it from the list"
    offenders = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel != "_utils/compat.py" and rel not in _NOT_YET_SWITCHED:
            uses = _private_uses(path.read_text())
            if uses:
                offenders[rel] = uses
    assert not offenders, f"use flatness._utils.compat for private torch/scipy APIs: {offenders}"
