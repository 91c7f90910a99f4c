"""torch.distributed: 2 gloo ranks, each with half the data, equal one process with all of it.

Each spawned rank uses one thread (oversubscribed OpenMP threads spin) and seeds the
global RNG before building its model.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

F = nn.functional


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    return model, x, y


def _shard(x, y, rank):
    # Unequal shards with partial batches: rank 0 holds 17 samples, rank 1 holds 13.
    lo, hi = (0, 17) if rank == 0 else (17, 30)
    xs, ys = x[lo:hi], y[lo:hi]
    return [(xs[i : i + 5], ys[i : i + 5]) for i in range(0, len(xs), 5)]


def compute(model, data, what):
    """The quantities compared between 1 and 2 processes."""
    import flatness

    out = {}
    obj = flatness.Objective(model, F.cross_entropy, data)
    out["loss"], out["grad"] = obj.loss_and_grad()
    v = torch.linspace(-1, 1, obj.n, dtype=torch.float64)
    out["hvp"] = obj.hvp(v)
    for curvature in ("ggn", "fisher", "empirical_fisher"):
        out[curvature] = flatness.curvature_operator(model, F.cross_entropy, data, curvature=curvature) @ v
    if "spectra" in what:
        out["topk"] = flatness.hessian_topk(model, F.cross_entropy, data, k=3, tol=1e-8).eigenvalues
        out["trace"] = torch.as_tensor(
            flatness.hessian_trace(model, F.cross_entropy, data, n_hvp=12, seed=3).estimate
        )
    if "sharpness" in what:
        out["sharpness"] = torch.as_tensor(
            flatness.sharpness(model, F.cross_entropy, data, epsilon=1e-2).value
        )
    if "landscape" in what:
        c = torch.linspace(-0.5, 0.5, 5)
        out["landscape"] = torch.as_tensor(
            flatness.landscape_2d(model, F.cross_entropy, data, alphas=c, betas=c[:3], seed=2).loss
        )
    return out


def _errors(rank):
    """What each rank raises when the ranks disagree (both must raise, none may hang)."""
    import flatness

    model, x, y = _problem()
    out = {}
    data = _shard(x, y, rank) if rank == 0 else []
    try:
        flatness.Objective(model, F.cross_entropy, data).loss()
    except ValueError as err:
        out["empty"] = str(err)
    if rank == 1:
        model = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    try:
        flatness.Objective(model, F.cross_entropy, _shard(x, y, rank))
    except ValueError as err:
        out["size"] = str(err)
    return out


def _worker(rank, port, tmp, what):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if what == ("errors",):
            result = _errors(rank)
        elif what == ("sampler",):
            result = compute(*_sampler_problem())
        else:
            model, x, y = _problem()
            result = compute(model, _shard(x, y, rank), what)
            if "ddp" in what:
                ddp = nn.parallel.DistributedDataParallel(model)
                result["ddp_hvp"] = flatness_hvp(ddp, _shard(x, y, rank))
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _sampler_problem(shuffle: bool = True):
    """37 samples through a DistributedSampler: on 2 ranks it pads one duplicate sample."""
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    model, x, y = _problem()
    g = torch.Generator().manual_seed(2)
    x = torch.cat([x, torch.randn(7, 5, generator=g, dtype=torch.float64)])
    y = torch.cat([y, torch.randint(0, 3, (7,), generator=g)])
    ds = TensorDataset(x, y)
    if dist.is_initialized():
        loader = DataLoader(ds, batch_size=5, sampler=DistributedSampler(ds, shuffle=shuffle, seed=1))
    else:
        loader = DataLoader(ds, batch_size=5)
    return model, loader, ("core",)


def flatness_hvp(model, data):
    import flatness

    obj = flatness.Objective(model, F.cross_entropy, data)
    return obj.hvp(torch.linspace(-1, 1, obj.n, dtype=torch.float64))


def _run(tmp_path, what):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), what), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    what = ("core", "spectra", "sharpness", "landscape", "ddp")
    ranks = _run(tmp_path, what)
    model, x, y = _problem()
    single = compute(model, [(x[i : i + 5], y[i : i + 5]) for i in range(0, 30, 5)], what)
    single["ddp_hvp"] = single["hvp"]
    for r in ranks:
        assert set(r) == set(single)
        for key, value in single.items():
            # Same numbers up to the order of floating-point reduction.
            assert torch.allclose(r[key].double(), value.double(), rtol=1e-9, atol=1e-12), key


@pytest.mark.slow
def test_ranks_that_disagree_raise_on_every_rank(tmp_path):
    ranks = _run(tmp_path, ("errors",))
    for r in ranks:
        assert "no batches on 1 rank" in r["empty"]
        assert "ranks disagree on the number of parameters" in r["size"]


@pytest.mark.slow
def test_distributed_sampler_padding_is_not_counted_twice(tmp_path):
    # 37 samples on 2 ranks: DistributedSampler pads rank 1 with a copy of one sample; the
    # docs' example must still equal one process holding all the data (was 0.34 % off).
    ranks = _run(tmp_path, ("sampler",))
    single = compute(*_sampler_problem())
    for r in ranks:
        for key, value in single.items():
            assert torch.allclose(r[key], value, rtol=1e-9, atol=1e-12), key
