"""FSDP2 (fully_shard, DTensor parameters): 2 gloo ranks against the unsharded model in one process.

Each rank uses one thread, seeds the global RNG before building its model, and receives the
unsharded model's state_dict, so both sides hold the same parameters. Ranks hold unequal data
shards (17 and 13 samples in batches of 5: 4 and 3 batches), so the rank with fewer batches
must take part in the other's extra FSDP step.
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
N_SAMPLES = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Net(nn.Module):
    """An MLP with a BatchNorm (buffers) and rows that do not split evenly over 2 ranks."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 7)
        self.bn = nn.BatchNorm1d(7)
        self.l2 = nn.Linear(7, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.bn(self.l1(x))))


def make_model(dtype=torch.float64):
    torch.manual_seed(0)
    model = Net().to(dtype)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def make_data(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (N_SAMPLES,), generator=g)
    return x, y


def batches(x, y):
    return [(x[i : i + 5], y[i : i + 5]) for i in range(0, len(x), 5)]


def shard(x, y, rank):
    lo, hi = (0, 17) if rank == 0 else (17, N_SAMPLES)
    return batches(x[lo:hi], y[lo:hi])


def shard_model(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.l1, mesh=mesh)
    fully_shard(model.l2, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_state(model):
    """Everything a call must leave as it was: local shards, their grads, buffers, modes."""
    out = {}
    for n, p in model.named_parameters():
        out[n] = p.to_local().detach().clone()
        out[n + ".grad"] = None if p.grad is None else p.grad.to_local().detach().clone()
    for n, b in model.named_buffers():
        out[n] = b.detach().clone()
    out["modes"] = [m.training for m in model.modules()]
    out["rng"] = torch.get_rng_state()
    return out


def same_state(a, b):
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is None or y is None or not (torch.equal(x, y) and x.dtype == y.dtype):
                return False
        elif x != y:
            return False
    return True


def _core(rank, state_dict):
    from flatness import Objective as ShardedObjective
    from flatness.objective._fsdp import ShardedVectorSpace

    model = make_model()
    model.load_state_dict(state_dict)
    model = shard_model(model, 2)
    x, y = make_data()
    data = shard(x, y, rank)
    out = {}
    # A user's gradients already present (from a backward in eval mode) must survive.
    model.eval()
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()
    before = local_state(model)
    for train in (False, True):
        obj = ShardedObjective(model, F.cross_entropy, data, train=train)
        key = "train_" if train else ""
        out["ranges"] = obj.space.ranges
        out["n"] = obj.n
        out[key + "loss"] = obj.loss()
        out[key + "loss_g"], out[key + "grad"] = obj.loss_and_grad()
        gen = torch.Generator().manual_seed(5)
        v = obj.space.randn(gen, 1)[0]
        out[key + "v"] = v
        out[key + "hvp"] = obj.hvp(v)
        theta = obj.theta0 + 0.1 * obj.space.randn(gen, 1)[0]
        out[key + "theta"] = theta
        out[key + "loss_at"] = obj.loss(theta)
        out[key + "grad_at"] = obj.grad(theta)
        out[key + "hvp_at"] = obj.hvp(v, theta)
        dirs = obj.space.randn(torch.Generator().manual_seed(6), 2)
        out[key + "dirs"] = dirs
        coords = torch.tensor([[0.0, 0.0], [0.5, -0.2], [-1.0, 0.3]], dtype=torch.float64)
        out[key + "many"] = obj.evaluate_many(coords, directions=dirs)[0]
        out[key + "n_passes"] = obj.n_passes
    out["untouched"] = same_state(before, local_state(model))
    # Random draws: each rank's entries of the vectors a single process draws.
    space = obj.space
    out["randn"] = space.randn(torch.Generator().manual_seed(3), 3)
    out["signs"] = space.rademacher(torch.Generator().manual_seed(3), 2)
    out["dot"] = space.dot(out["randn"][0], out["randn"][1])
    out["coeffs"] = space.coeffs(out["randn"], out["randn"][2])
    # A loss that raises mid-pass on both ranks: every shard, grad and buffer restored.
    calls = {"n": 0}

    def failing(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return F.cross_entropy(outputs, targets)

    bad = ShardedObjective(model, failing, data, train=True)
    try:
        bad.hvp(torch.ones(bad.n_local, dtype=torch.float64))
    except RuntimeError as err:
        out["raised"] = str(err)
    out["untouched_after_error"] = same_state(before, local_state(model))
    del ShardedVectorSpace
    return out


def _sharded(state_dict, dtype=torch.float64):
    model = make_model(dtype)
    model.load_state_dict(state_dict)
    return shard_model(model, 2)


def _model_level(rank, state_dicts):
    import flatness
    from flatness import Objective as ShardedObjective

    x, y = make_data()
    data = shard(x, y, rank)
    model = _sharded(state_dicts["a"])
    model.eval()
    before = local_state(model)
    out = {}
    fd = {"hvp_mode": "finite_difference"}
    top = flatness.hessian_topk(model, F.cross_entropy, data, k=5, tol=1e-8, **fd)
    out["top_vals"], out["top_vecs"], out["top_conv"] = top.eigenvalues, top.eigenvectors, top.converged
    out["top_shapes"] = top.shapes
    out["top_dicts"] = top.eigenvector_dicts()
    out["trace"] = flatness.hessian_trace(model, F.cross_entropy, data, n_hvp=12, seed=3).estimate
    dens = flatness.hessian_density(model, F.cross_entropy, data, n_runs=2, n_steps=6, seed=4)
    out["nodes"], out["weights"] = dens.nodes, dens.weights
    sharp = flatness.sharpness(model, F.cross_entropy, data, epsilon=1e-2, subspace=4, max_iter=3, seed=5)
    out["sharp"], out["sharp_loss"] = sharp.value, sharp.loss
    obj = ShardedObjective(model, F.cross_entropy, data)
    from flatness.sharpness.keskar import _space_subspace as _sharded_subspace

    out["sharp_A"] = _sharded_subspace(4, obj, torch.Generator().manual_seed(5))[0].T  # (p, n_local)
    out["avg"] = flatness.average_sharpness(model, F.cross_entropy, data, rho=0.05, n_samples=3, seed=6).value
    c = torch.linspace(-0.5, 0.5, 3)
    land = flatness.landscape_2d(model, F.cross_entropy, data, alphas=c, betas=c[:2], seed=2)
    out["land"] = land.loss
    out["land_dirs"] = torch.stack([obj.flatten(d) for d in land.directions])
    line = flatness.landscape_1d(
        model, F.cross_entropy, data, alphas=c, normalization="layer", ignore_1d=False, seed=8
    )
    out["line"], out["line_dir"] = line.loss, obj.flatten(line.directions[0])
    model_b = _sharded(state_dicts["b"])
    out["interp"] = flatness.interpolate(model, model_b, F.cross_entropy, data, alphas=c).loss
    errors = {}
    for key, call in {
        "ggn": lambda: flatness.hessian_topk(model, F.cross_entropy, data, curvature="ggn"),
        "full_space": lambda: flatness.sharpness(model, F.cross_entropy, data),
        "adaptive": lambda: flatness.adaptive_sharpness(model, F.cross_entropy, data, rho=0.1),
        "reverse": lambda: flatness.hessian_topk(model, F.cross_entropy, data, hvp_mode="reverse"),
    }.items():
        try:
            call()
        except ValueError as err:
            errors[key] = str(err)
    out["errors"] = errors
    blocks = flatness.hessian_topk(model, F.cross_entropy, data, k=1, blocks="module", tol=1e-9)
    out["blocks_top"] = {name: float(res.eigenvalues[0]) for name, res in blocks.items()}
    op = flatness.HessianOperator(model, F.cross_entropy, data)
    out["op_v"] = obj.space.randn(torch.Generator().manual_seed(9))
    out["op_mv"] = op @ out["op_v"]
    out["untouched"] = same_state(before, local_state(model))
    # float32: the finite-difference eigenvalues within 1e-3 of the exact ones.
    m32 = _sharded({k: v.float() for k, v in state_dicts["a"].items()}, torch.float32)
    data32 = [(xb.float(), yb) for xb, yb in data]
    out["top32"] = flatness.hessian_topk(m32, F.cross_entropy, data32, k=5, tol=1e-4).eigenvalues
    out["ranges"] = obj.space.ranges
    out["n"] = obj.n
    return out


class Noisy:
    """A shard's batches with an augmentation seeded from OS entropy: no two passes are the same."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(7), "little"))
        for xb, yb in self.batches:
            yield xb + 0.1 * torch.randn(xb.shape, generator=gen, dtype=xb.dtype), yb


class Replayable:
    """The same batches every pass, from a custom iterable (checked by fingerprints, unlike a list)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


class Failing:
    """A loader whose second batch fails on rank 1 (a worker's I/O error, say)."""

    def __init__(self, batches, rank):
        self.batches, self.rank = batches, rank

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == 1 and self.rank == 1:
                raise OSError("disk read failed")
            yield batch


def _outcome(call):
    """("ok", value) or (error type name, message)."""
    try:
        value = call()
    except Exception as err:
        return type(err).__name__, str(err)
    return "ok", value


def _replay_calls(model, model_b, data):
    """Every model-level function of a sharded model, each making several passes over ``data``."""
    import flatness
    from flatness import Objective as ShardedObjective

    c = torch.linspace(-0.5, 0.5, 3)
    ce = F.cross_entropy

    def twice():
        obj = ShardedObjective(model, ce, data)
        return [float(obj.loss()), float(obj.loss())]

    return {
        "loss": twice,
        "trace": lambda: flatness.hessian_trace(model, ce, data, n_hvp=4, seed=3).estimate,
        "topk": lambda: flatness.hessian_topk(model, ce, data, k=2, max_hvp=30).eigenvalues,
        "density": lambda: flatness.hessian_density(model, ce, data, n_runs=1, n_steps=4).nodes,
        "sharp_sub": lambda: flatness.sharpness(model, ce, data, epsilon=1e-2, subspace=5, max_iter=2).value,
        "sharp_full": lambda: flatness.sharpness(model, ce, data, epsilon=1e-2, max_iter=2).value,
        "avg": lambda: flatness.average_sharpness(model, ce, data, rho=0.05, n_samples=3, seed=6).value,
        "adaptive": lambda: flatness.adaptive_sharpness(model, ce, data, rho=0.1).value,
        "line": lambda: flatness.landscape_1d(model, ce, data, alphas=c, points_per_pass=1).loss,
        "plane": lambda: (
            flatness.landscape_2d(model, ce, data, alphas=c, betas=c[:2], points_per_pass=2).loss
        ),
        "interp": lambda: flatness.interpolate(model, model_b, ce, data, alphas=c, points_per_pass=1).loss,
    }


def _replay(rank, state_dicts):
    """Passes that differ: on both ranks, then on rank 1 only (rank 0's data replays)."""
    import flatness

    x, y = make_data()
    model = _sharded(state_dicts["a"])
    model_b = _sharded(state_dicts["b"])
    model.eval()
    before = local_state(model)
    out = {}
    both = Noisy(shard(x, y, rank))
    one = Noisy(shard(x, y, rank)) if rank == 1 else Replayable(shard(x, y, rank))
    for case, data in (("both", both), ("one", one)):
        out[case] = {key: _outcome(call) for key, call in _replay_calls(model, model_b, data).items()}
    # A single landscape pass sees each batch once: nothing to compare, a value (as in one process).
    c = torch.linspace(-0.5, 0.5, 3)
    out["single_pass"] = _outcome(lambda: flatness.landscape_1d(model, F.cross_entropy, both, alphas=c).loss)
    # Errors while fetching a batch on one rank: every rank raises (none waits in a collective).
    from flatness import Objective as ShardedObjective

    mine = shard(x, y, rank)
    empty = [*mine[:1], (x[:0], y[:0]), *mine[1:]] if rank == 1 else mine
    out["empty_batch"] = _outcome(lambda: ShardedObjective(model, F.cross_entropy, Replayable(empty)).loss())
    out["loader_error"] = _outcome(
        lambda: ShardedObjective(model, F.cross_entropy, Failing(mine, rank)).loss()
    )
    out["untouched"] = same_state(before, local_state(model))
    return out


def _worker(rank, port, tmp, what, payload):
    from datetime import timedelta

    torch.set_num_threads(1)
    # A rank left waiting in a collective (its peer raised alone) fails after the timeout, not never.
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    try:
        workers = {"core": _core, "model_level": _model_level, "replay": _replay, "options": _options}
        result = (what if callable(what) else workers[what])(rank, payload)
        torch.save(result, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, what, payload):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), what, payload), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def gather(ranks, key):
    """The full vector from the ranks' local vectors and ranges."""
    n = ranks[0]["n"]
    full = torch.full((n,) if ranks[0][key].ndim == 1 else (ranks[0][key].shape[0], n), float("nan"))
    full = full.double()
    for r in ranks:
        pos = 0
        for a, b in r["ranges"]:
            full[..., a:b] = r[key][..., pos : pos + b - a]
            pos += b - a
    return full


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_sharded_objective_equals_one_process(tmp_path):
    import flatness
    from flatness.objective._fsdp import ShardedVectorSpace

    model = make_model()
    ranks = run_ranks(tmp_path, "core", model.state_dict())
    x, y = make_data()
    for r in ranks:
        assert r["untouched"] and r["untouched_after_error"]
        assert r["raised"] == "boom"
    # Every rank holds a distinct piece; together all n entries.
    covered = sorted(rng for r in ranks for rng in r["ranges"])
    assert sum(b - a for a, b in covered) == ranks[0]["n"]
    for key in ("randn", "signs", "grad", "v"):
        assert not torch.isnan(gather(ranks, key)).any()
    # Random vectors: the ranks' entries are those of the one-process draw (Philox by entry).
    one = ShardedVectorSpace([(0, ranks[0]["n"])], ranks[0]["n"], dtype=torch.float64)
    assert torch.equal(gather(ranks, "randn"), one.randn(torch.Generator().manual_seed(3), 3))
    assert torch.equal(gather(ranks, "signs"), one.rademacher(torch.Generator().manual_seed(3), 2))
    full = gather(ranks, "randn")
    for r in ranks:
        assert r["dot"] == pytest.approx(float(full[0] @ full[1]), rel=1e-12)
        assert torch.allclose(r["coeffs"], full @ full[2], rtol=1e-12)
    for train in (False, True):
        key = "train_" if train else ""
        # The same batches as the ranks' (train-mode BatchNorm uses per-batch statistics).
        obj = flatness.Objective(model, F.cross_entropy, shard(x, y, 0) + shard(x, y, 1), train=train)
        v = gather(ranks, key + "v")
        theta = gather(ranks, key + "theta")
        dirs = gather(ranks, key + "dirs")
        for r in ranks:
            assert float(r[key + "loss"]) == pytest.approx(float(obj.loss()), rel=1e-12)
            assert float(r[key + "loss_g"]) == pytest.approx(float(obj.loss()), rel=1e-12)
            assert float(r[key + "loss_at"]) == pytest.approx(float(obj.loss(theta)), rel=1e-12)
            coords = torch.tensor([[0.0, 0.0], [0.5, -0.2], [-1.0, 0.3]], dtype=torch.float64)
            many = obj.evaluate_many(coords, directions=dirs)[0]
            assert torch.allclose(r[key + "many"], many, rtol=1e-12)
        assert rel(gather(ranks, key + "grad"), obj.grad()) < 1e-12
        assert rel(gather(ranks, key + "grad_at"), obj.grad(theta)) < 1e-12
        # Finite differences against the exact product (float64: ~1e-10).
        assert rel(gather(ranks, key + "hvp"), obj.hvp(v)) < 1e-8
        assert rel(gather(ranks, key + "hvp_at"), obj.hvp(v, theta)) < 1e-8


class _OneProcess:
    """The unsharded model's exact Hessian with the sharded space's random vectors (one range)."""

    def __init__(self, obj):
        from flatness.objective._fsdp import ShardedVectorSpace

        self.obj = obj
        self.shape = (obj.n, obj.n)
        self.dtype, self.device = obj.dtype, obj.device
        self.space = ShardedVectorSpace([(0, obj.n)], obj.n, dtype=obj.dtype)

    def matvec(self, v):
        return self.obj.hvp(v)


@pytest.mark.slow
def test_model_level_functions_on_two_ranks_equal_one_process(tmp_path):
    import flatness
    from flatness.algorithms import slq_density, trace_estimate
    from flatness.sharpness._common import _Evaluator  # noqa: F401  (the same module is used by the ranks)

    model, model_b = _two_models()
    ranks = run_ranks(tmp_path, "model_level", {"a": model.state_dict(), "b": model_b.state_dict()})
    x, y = make_data()
    data = shard(x, y, 0) + shard(x, y, 1)  # the same batches as the two ranks together
    obj = flatness.Objective(model, F.cross_entropy, data)
    one = _OneProcess(obj)
    hess = torch.stack([obj.hvp(e) for e in torch.eye(obj.n, dtype=torch.float64)])
    exact = torch.linalg.eigh((hess + hess.T) / 2)
    r0, r1 = ranks
    for r in ranks:
        assert r["untouched"], "the sharded model was changed"
        assert r["top_conv"]
        # Finite differences on 2 ranks: the top 5 within 1e-6 of the dense oracle in float64,
        # within 1e-3 in float32.
        lam = exact.eigenvalues.flip(0)[:5]
        assert float(((r["top_vals"] - lam).abs() / lam.abs()).max()) < 1e-6
        assert float(((r["top32"].double() - lam).abs() / lam.abs()).max()) < 1e-3
        assert set(r["errors"]) == {"ggn", "full_space", "adaptive", "reverse"}
        assert "fully_shard" in r["errors"]["ggn"] and "pass an int p" in r["errors"]["full_space"]
        for option, key in (("curvature", "ggn"), ("subspace", "full_space"), ("model", "adaptive")):
            assert r["errors"][key].startswith(option + ":"), (key, r["errors"][key])
        assert r["errors"]["reverse"].startswith("hvp_mode:")
        # Per-block spectra of the sharded model: each block's top eigenvalue as in one process.
        single = flatness.hessian_topk(model, F.cross_entropy, data, k=1, blocks="module", tol=1e-10)
        assert set(r["blocks_top"]) == set(single.keys())
        for name, value in r["blocks_top"].items():
            assert value == pytest.approx(float(single[name].eigenvalues[0]), rel=1e-6), name
    # Every rank returns the same numbers.
    for key in ("top_vals", "nodes", "weights", "land", "line", "interp", "top32"):
        assert torch.equal(torch.as_tensor(r0[key]), torch.as_tensor(r1[key])), key
    for key in ("trace", "sharp", "avg"):
        assert r0[key] == r1[key], key
    # HessianOperator on the sharded model: local vectors in and out.
    assert rel(gather(ranks, "op_mv"), obj.hvp(gather(ranks, "op_v"))) < 1e-8
    # Eigenvectors: each rank holds its shards; together the exact eigenvectors (up to sign).
    vecs = gather(ranks, "top_vecs")
    for i in range(5):
        assert abs(float(vecs[i] @ exact.eigenvectors[:, -1 - i])) > 1 - 1e-6
    assert tuple(r0["top_shapes"][0]) == tuple(r0["top_dicts"][0]["l1.weight"].shape) == (4, 5)
    # Trace and density: the same probes in one process (one-range sharded space), exact products.
    trace = trace_estimate(one, method="hutch++", n_matvec=12, seed=3).estimate
    assert r0["trace"] == pytest.approx(trace, rel=1e-7)
    dens = slq_density(one, n_runs=2, n_steps=6, seed=4)
    assert torch.allclose(r0["nodes"], dens.nodes, rtol=1e-6, atol=1e-9)
    assert torch.allclose(r0["weights"], dens.weights, rtol=1e-6, atol=1e-9)
    # Keskar sharpness in the ranks' subspace: the same as one process given that matrix.
    A = gather(ranks, "sharp_A")  # (p, n)
    single = flatness.sharpness(model, F.cross_entropy, data, epsilon=1e-2, subspace=A.T, max_iter=3, seed=5)
    assert r0["sharp_loss"] == pytest.approx(single.loss, rel=1e-12)
    assert r0["sharp"] == pytest.approx(single.value, rel=1e-6)
    # Average sharpness: the same draws (one-range space, same generator) in one process.
    gen = torch.Generator().manual_seed(6)
    c_scale = obj.theta0.abs()
    gains = [
        float(obj.loss(obj.theta0 + 0.05 * c_scale * one.space.randn(gen))) - float(obj.loss())
        for _ in range(3)
    ]
    assert r0["avg"] == pytest.approx(sum(gains) / 3, rel=1e-9)
    # Landscapes along the ranks' directions, and the interpolation, in one process.
    c = torch.linspace(-0.5, 0.5, 3)
    dirs = gather(ranks, "land_dirs")
    land = flatness.landscape_2d(
        model, F.cross_entropy, data, alphas=c, betas=c[:2], directions=[dirs[0], dirs[1]], normalization=None
    )
    assert torch.allclose(torch.as_tensor(r0["land"]), torch.as_tensor(land.loss), rtol=1e-12)
    line = flatness.landscape_1d(
        model, F.cross_entropy, data, alphas=c, direction=gather(ranks, "line_dir"), normalization=None
    )
    assert torch.allclose(torch.as_tensor(r0["line"]), torch.as_tensor(line.loss), rtol=1e-12)
    interp = flatness.interpolate(model, model_b, F.cross_entropy, data, alphas=c)
    assert torch.allclose(torch.as_tensor(r0["interp"]), torch.as_tensor(interp.loss), rtol=1e-12)


def test_sharded_space_in_one_process():
    """The space's draws, orthonormalization and the algorithms on it, without a process group."""
    from flatness.algorithms import hutchpp, lanczos_eigsh
    from flatness.objective._fsdp import ShardedVectorSpace

    n = 37
    whole = ShardedVectorSpace([(0, n)], n, dtype=torch.float64)
    pieces = [(0, 5), (5, 20), (20, 37)]
    for draw in ("randn", "rademacher"):
        full = getattr(whole, draw)(torch.Generator().manual_seed(4), 3)
        for a, b in pieces:  # each "rank" draws only its range: the same entries
            part = ShardedVectorSpace([(a, b)], n, dtype=torch.float64)
            assert torch.equal(getattr(part, draw)(torch.Generator().manual_seed(4), 3), full[:, a:b])
    z = whole.randn(torch.Generator().manual_seed(0), 4000)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    signs = whole.rademacher(torch.Generator().manual_seed(0))
    assert set(signs.tolist()) == {-1.0, 1.0}
    # CholeskyQR2: orthonormal rows spanning the input; zero rows for a rank deficiency.
    rows = whole.randn(torch.Generator().manual_seed(1), 6)
    q = whole.orthonormalize(rows)
    assert torch.allclose(q @ q.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rows @ q.T @ q, rows, atol=1e-10)
    q = whole.orthonormalize(torch.cat([rows[:3], rows[:1] + rows[1:2]]))
    assert torch.allclose((q @ q.T).diagonal().sum(), torch.tensor(3.0, dtype=torch.float64), atol=1e-9)

    class Op:  # a dense symmetric matrix as an operator whose space is the sharded one
        shape = (n, n)
        dtype, device, space = torch.float64, torch.device("cpu"), whole

        def __init__(self, A):
            self.A = A

        def matvec(self, v):
            return self.A @ v

    g = torch.Generator().manual_seed(2)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = B @ B.T / n
    top = lanczos_eigsh(Op(A), k=3, tol=1e-10)
    assert torch.allclose(top.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:3], rtol=1e-9)
    assert hutchpp(Op(A), n_matvec=3 * n).estimate == pytest.approx(float(A.trace()), rel=1e-9)


REPLAY_MESSAGE = "data: pass "  # the start of DataSource's message (one process raises the same)


def _two_models():
    model = make_model()
    torch.manual_seed(1)
    model_b = make_model()
    with torch.no_grad():
        for p in model_b.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, model_b


def test_sharded_passes_that_differ_raise_on_every_rank(tmp_path):
    """Data whose passes differ: the one-process replay ValueError on both ranks, never a number."""
    import flatness

    model, model_b = _two_models()
    ranks = run_ranks(tmp_path, "replay", {"a": model.state_dict(), "b": model_b.state_dict()})
    # One process raises this error for such data (the reference behaviour).
    x, y = make_data()
    with pytest.raises(ValueError, match="differs from the first"):
        flatness.hessian_trace(model, F.cross_entropy, Noisy(batches(x, y)), n_hvp=4)
    unsupported = {"sharp_full", "adaptive"}  # refused on sharded models before any pass
    for rank, r in enumerate(ranks):
        assert r["untouched"], "the sharded model was changed by a call that raised"
        for case in ("both", "one"):
            for key, (kind, message) in r[case].items():
                assert kind == "ValueError", (rank, case, key, kind, message)
                if key in unsupported:
                    assert "fully_shard" in message, (key, message)
                elif case == "both" or rank == 1:
                    # This rank's own passes differ: the full message naming the cause and the fix.
                    assert message.startswith(REPLAY_MESSAGE) and "differs from the first" in message, (
                        rank,
                        case,
                        key,
                        message,
                    )
                    assert "data = list(loader)" in message
                else:
                    # Rank 0 replays; it raises together with rank 1 (no rank left waiting).
                    assert message.startswith(
                        "data: the passes over the data differ on 1 other rank(s), whose error"
                    ), (
                        key,
                        message,
                    )
        kind, value = r["single_pass"]
        assert kind == "ok" and torch.isfinite(torch.as_tensor(value)).all()
        other = "data: fetching a batch, or reading its size, failed on 1 other rank(s)"
        if rank == 1:
            assert r["empty_batch"][0] == "ValueError" and "a batch has 0 samples" in r["empty_batch"][1]
            assert r["loader_error"] == ("OSError", "disk read failed")
        else:
            for key in ("empty_batch", "loader_error"):
                assert r[key][0] == "ValueError" and r[key][1].startswith(other), r[key]
    # The ranks raise the same error at the same pass: "pass N" agrees.
    for key in ranks[0]["both"]:
        assert ranks[0]["both"][key][1].split(" over")[0] == ranks[1]["both"][key][1].split(" over")[0]


# ---------------------------------------------------------------------------- options
def _loader_shard(x, y, rank):
    """A shuffling DataLoader over the rank's shard (17 or 13 samples, batches of 4: 5 and 4)."""
    from torch.utils.data import DataLoader, TensorDataset

    lo, hi = (0, 17) if rank == 0 else (17, N_SAMPLES)
    ds = TensorDataset(x[lo:hi], y[lo:hi])
    if rank == 0:  # the loader's own generator (rewound every pass)
        return DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(11))
    return DataLoader(ds, batch_size=4, shuffle=True)  # the global generator (reseeded every pass)


def _padded_loader(x, y, rank):
    """29 samples over 2 ranks with a shuffling DistributedSampler that pads one repeat."""
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    ds = TensorDataset(x[:29], y[:29])
    sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=4)
    return DataLoader(ds, batch_size=4, sampler=sampler)


def _masked(x, y, rank):
    """Dict batches with a per-sample mask; the loss is the mean over kept samples (token-style)."""
    keep = torch.arange(N_SAMPLES) % 3 != 1
    lo, hi = (0, 17) if rank == 0 else (17, N_SAMPLES)
    x, y, keep = x[lo:hi], y[lo:hi], keep[lo:hi]
    return Replayable(
        [{"x": x[i : i + 5], "y": y[i : i + 5], "keep": keep[i : i + 5]} for i in range(0, hi - lo, 5)]
    )


def masked_loss(model, batch):
    losses = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
    return (losses * batch["keep"]).sum() / batch["keep"].sum()


def masked_size(batch):
    return int(batch["keep"].sum())


def _options(rank, state_dict):
    """Replayable shuffling loaders, batch_size=, reduction='sum', max_batches on 2 ranks."""
    import flatness
    from flatness import Objective as ShardedObjective
    from flatness.sharpness.keskar import _space_subspace as _sharded_subspace

    x, y = make_data()
    model = _sharded(state_dict)
    model.eval()
    before = local_state(model)
    out = {}
    c = torch.linspace(-0.5, 0.5, 3)
    ce = F.cross_entropy
    for case, data in (("shuffle", _loader_shard(x, y, rank)), ("padded", _padded_loader(x, y, rank))):
        r = out[case] = {}
        obj = ShardedObjective(model, ce, data)
        r["loss"] = [float(obj.loss()), float(obj.loss())]  # a second pass: checked against the first
        r["grad"] = obj.grad()
        r["topk"] = flatness.hessian_topk(model, ce, data, k=3, tol=1e-8).eigenvalues
        r["trace"] = flatness.hessian_trace(model, ce, data, n_hvp=12, seed=3).estimate
        sharp = flatness.sharpness(model, ce, data, epsilon=1e-2, subspace=4, max_iter=3, seed=5)
        r["sharp"] = sharp.value
        r["sharp_A"] = _sharded_subspace(4, obj, torch.Generator().manual_seed(5))[0].T
        r["avg"] = flatness.average_sharpness(model, ce, data, rho=0.05, n_samples=3, seed=6).value
        line = flatness.landscape_1d(model, ce, data, alphas=c, points_per_pass=1, seed=8)
        r["line"], r["line_dir"] = line.loss, obj.flatten(line.directions[0])
    # batch_size=: batches weighted by their kept samples, not their rows.
    r = out["masked"] = {}
    obj = ShardedObjective(model, data=_masked(x, y, rank), batch_loss=masked_loss, batch_size=masked_size)
    r["loss"] = float(obj.loss())
    r["grad"] = obj.grad()
    v = obj.space.randn(torch.Generator().manual_seed(5))
    r["v"], r["hvp"] = v, obj.hvp(v)
    # reduction="sum" and max_batches: sums over both ranks' (first) batches.
    for case, opts in (("sum", {"reduction": "sum"}), ("max2", {"max_batches": 2})):
        r = out[case] = {}
        obj = ShardedObjective(model, ce, Replayable(shard(x, y, rank)), **opts)
        r["loss"] = float(obj.loss())
        r["grad"] = obj.grad()
        r["v"], r["hvp"] = v, obj.hvp(v)
    out["untouched"] = same_state(before, local_state(model))
    out["ranges"], out["n"] = obj.space.ranges, obj.n
    return out


def _sub(ranks, case, key):
    return gather([{**r[case], "ranges": r["ranges"], "n": r["n"]} for r in ranks], key)


@pytest.mark.slow
def test_sharded_options_equal_one_process(tmp_path):
    """Replayable shuffling loaders, batch_size=, reduction='sum', max_batches: one process's numbers."""
    import flatness
    from flatness.algorithms import trace_estimate

    model = make_model()
    ranks = run_ranks(tmp_path, "options", model.state_dict())
    x, y = make_data()
    r0, r1 = ranks
    assert r0["untouched"] and r1["untouched"]
    for case, n_samples in (("shuffle", N_SAMPLES), ("padded", 29)):
        # Eval mode: the size-weighted mean does not depend on the batching, so the whole data
        # in one process is the oracle (the padded sampler's repeat must not count twice).
        obj = flatness.Objective(model, F.cross_entropy, (x[:n_samples], y[:n_samples]))
        one = _OneProcess(obj)
        hess = torch.stack([obj.hvp(e) for e in torch.eye(obj.n, dtype=torch.float64)])
        lam = torch.linalg.eigvalsh((hess + hess.T) / 2).flip(0)[:3]
        for r in ranks:
            a, b = r[case]["loss"]
            assert a == b == pytest.approx(float(obj.loss()), rel=1e-12), case
            assert float(((r[case]["topk"] - lam).abs() / lam.abs()).max()) < 1e-6, case
            assert r[case]["trace"] == pytest.approx(
                trace_estimate(one, method="hutch++", n_matvec=12, seed=3).estimate, rel=1e-6
            )
        assert rel(_sub(ranks, case, "grad"), obj.grad()) < 1e-12
        A = _sub(ranks, case, "sharp_A")
        single = flatness.sharpness(
            model,
            F.cross_entropy,
            (x[:n_samples], y[:n_samples]),
            epsilon=1e-2,
            subspace=A.T,
            max_iter=3,
            seed=5,
        )
        assert r0[case]["sharp"] == pytest.approx(single.value, rel=1e-6, abs=1e-9)
        gen = torch.Generator().manual_seed(6)
        gains = [
            float(obj.loss(obj.theta0 + 0.05 * obj.theta0.abs() * one.space.randn(gen))) - float(obj.loss())
            for _ in range(3)
        ]
        assert r0[case]["avg"] == pytest.approx(sum(gains) / 3, rel=1e-9)
        c = torch.linspace(-0.5, 0.5, 3)
        line = flatness.landscape_1d(
            model,
            F.cross_entropy,
            (x[:n_samples], y[:n_samples]),
            alphas=c,
            direction=_sub(ranks, case, "line_dir"),
            normalization=None,
        )
        assert torch.allclose(torch.as_tensor(r0[case]["line"]), torch.as_tensor(line.loss), rtol=1e-12)
    # batch_size=: the mean over kept samples of all the data (independent of the batching).
    keep = torch.arange(N_SAMPLES) % 3 != 1
    obj = flatness.Objective(model, data=(x[keep], y[keep]), loss_fn=F.cross_entropy)
    v = _sub(ranks, "masked", "v")
    assert r0["masked"]["loss"] == pytest.approx(float(obj.loss()), rel=1e-12)
    assert rel(_sub(ranks, "masked", "grad"), obj.grad()) < 1e-12
    assert rel(_sub(ranks, "masked", "hvp"), obj.hvp(v)) < 1e-8
    # reduction="sum" over the ranks' batches; max_batches=2 on each rank.
    both = shard(x, y, 0) + shard(x, y, 1)
    for case, data, opts in (
        ("sum", both, {"reduction": "sum"}),
        ("max2", shard(x, y, 0)[:2] + shard(x, y, 1)[:2], {}),
    ):
        obj = flatness.Objective(model, F.cross_entropy, data, **opts)
        assert r0[case]["loss"] == r1[case]["loss"] == pytest.approx(float(obj.loss()), rel=1e-12), case
        assert rel(_sub(ranks, case, "grad"), obj.grad()) < 1e-12, case
        assert rel(_sub(ranks, case, "hvp"), obj.hvp(v)) < 1e-8, case
