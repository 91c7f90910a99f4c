"""Every option on a 2-rank FSDP2 model: it works (one process's number) or a ValueError names it.

The contract of issue 20: one :class:`flatness.Objective` (and every model-level function on it)
for local and ``fully_shard`` models. Each case below runs one call on a small float64 MLP
(l1 5→3, BatchNorm, l2 3→3: 36 parameters, rows split 2 + 1 over the ranks) sharded over 2 gloo
CPU ranks, each holding its own data shard (17 and 13 samples of ``test_fsdp.py``'s data, in
batches of 7: 3 and 2 steps), and compares it with the same call in one process on the
unsharded model and all the ranks' batches. A case PASSES when

- both ranks return the one-process value to the stated tolerance (or, for quantities drawn
  from random vectors, which a sharded space may draw differently for the same seed, a
  property that holds for any draw: a Rayleigh-quotient bound, the exact loss at the centre,
  finiteness), or
- for an option (not for a plain call), both ranks raise a ``ValueError`` whose message names
  the option (``option:``, ``option=`` or quoted; a call passing several options may name any
  of them, e.g. ``subspace`` for ``sharpness(subspace=None, start="keskar")``).

Anything else FAILS with the outcome: another exception (its type, message and the flatness line
that raised it), a wrong number, ranks that disagree, a hang (gloo's timeout, then the spawn's
deadline), or a call that changed the model (its local shards, ``.grad``, buffers, train/eval
modes or the global RNG state differ after the call, whether it returned or raised).

Vectors are *rank-local* (this rank's shards of θ's parameters, concatenated in θ's order, as
``ShardedObjective`` has them); a result of full length (all n entries, equal on both ranks) is
accepted too. Dicts may hold local shards, DTensors or full tensors.

One spawn runs every selected case (spawning costs seconds); each is reported by its own test
id: ``pytest tests/test_fsdp_options.py -k "topk.which.smallest"`` runs that case alone.
Tolerances (relative, norm-wise): 1e-10 for losses, gradients, landscapes and directions (no
Hessian product involved); 1e-6 for products, traces, sharpness values and the Monitor's
columns; eigenvalues within 1e-6·‖A‖₂ of the dense oracle (Lanczos at tol=1e-6, 1e-3·‖A‖₂ for
``tol=1e-3``), eigenvectors |⟨v, u⟩| > 1 − 1e-6; the ``dtype=torch.float32`` case 1e-5 (loss),
1e-4 (gradient), 1e-3 (products: finite differences in float32).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import test_fsdp as fs  # the data, its shards and the free-port helper

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable"),
    pytest.mark.slow,  # one spawn of all cases: about 2-3 minutes on 2 CPU cores
]

F = nn.functional
WORLD = 2
DEADLINE_S = 900  # the whole spawn
HANG_S = 60  # a collective waiting this long is a hang


# ---------------------------------------------------------------------------- model and data
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 3)
        self.bn = nn.BatchNorm1d(3)
        self.l2 = nn.Linear(3, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.bn(self.l1(x))))


def make_model(seed=0):
    torch.manual_seed(seed)
    model = Tiny().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.3, 0.3)
    return model.eval()


def perturbed(model, seed, scale=0.3):
    other = make_model()
    other.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        other.bn.running_mean.add_(0.1)
    return other


def sharded(state):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    model.load_state_dict(state)
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model.l1, mesh=mesh)
    fully_shard(model.l2, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model.eval()


SHAPES = {n: tuple(p.shape) for n, p in make_model().named_parameters()}
NAMES = list(SHAPES)
LAST = ["l2.weight", "l2.bias"]  # the params= selection


def n_of(names=None):
    return sum(math.prod(SHAPES[k]) for k in names or NAMES)


def rows(name, rank):
    """The rows [a, b) of parameter ``name`` that ``rank`` holds (torch.chunk's split, as FSDP2's)."""
    d0 = SHAPES[name][0]
    c = -(-d0 // WORLD)
    return min(c * rank, d0), min(c * (rank + 1), d0)


def ranges(rank, names=None):
    """The global flat ranges of θ (restricted to ``names``) that ``rank`` holds, in order."""
    out, offset = [], 0
    for k in names or NAMES:
        per_row = math.prod(SHAPES[k][1:])
        a, b = rows(k, rank)
        if b > a:
            out.append((offset + a * per_row, offset + b * per_row))
        offset += math.prod(SHAPES[k])
    return out


def local(full, rank, names=None):
    """This rank's entries of full vector(s) (last dim n)."""
    return torch.cat([full[..., a:b] for a, b in ranges(rank, names)], dim=-1)


def gather(pieces, names=None):
    """The full vector(s) from the two ranks' local (or already full) vectors."""
    n = n_of(names)
    pieces = [torch.as_tensor(p).double() for p in pieces]
    if pieces[0].shape[-1] == n:  # full vectors: both ranks must agree
        assert torch.allclose(pieces[0], pieces[1], rtol=1e-12, atol=0), "ranks return different full vectors"
        return pieces[0]
    full = torch.full((*pieces[0].shape[:-1], n), float("nan"), dtype=torch.float64)
    for rank, piece in enumerate(pieces):
        want = sum(b - a for a, b in ranges(rank, names))
        assert piece.shape[-1] == want, (
            f"rank {rank}: a vector of {piece.shape[-1]} entries; expected {want} or {n}"
        )
        pos = 0
        for a, b in ranges(rank, names):
            full[..., a:b] = piece[..., pos : pos + b - a]
            pos += b - a
    return full


def gather_dict(pieces):
    """{name: full tensor} from the ranks' dicts of local shards or full tensors."""
    out = {}
    assert set(pieces[0]) == set(pieces[1]), "ranks return different keys"
    for k in pieces[0]:
        shape = SHAPES.get(k)
        ts = [torch.as_tensor(p[k]).double() for p in pieces]
        if shape is None or tuple(ts[0].shape) == shape:
            out[k] = ts[0]
            continue
        out[k] = torch.cat(ts, dim=0)
        assert tuple(out[k].shape) == shape, (k, tuple(out[k].shape), shape)
    return out


def shard(rank):
    """Rank 0: samples 0-16 in batches of 7, 7, 3; rank 1: 17-29 in 7, 6 (unequal step counts)."""
    x, y = fs.make_data()
    lo, hi = (0, 17) if rank == 0 else (17, fs.N_SAMPLES)
    return [(x[i : min(i + 7, hi)], y[i : min(i + 7, hi)]) for i in range(lo, hi, 7)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def full_vec(seed, names=None, rows_=None):
    g = gen(seed)
    shape = (n_of(names),) if rows_ is None else (rows_, n_of(names))
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def theta_full(model, names=None):
    params = dict(model.named_parameters())
    return torch.cat([params[k].detach().reshape(-1).double() for k in names or NAMES])


# Callables shared by both sides (module level: the spawned ranks import them).
def batch_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def batch_outputs(model, batch):
    return model(batch["x"]), batch["y"]


def batch_size(batch):
    return int(batch[1].numel()) + int((batch[1] == 0).sum())  # not the rows: weights differ


def acc(outputs, targets):
    return (outputs.argmax(-1) == targets).double().mean()


def as_dicts(batches):
    return [{"x": xb, "y": yb} for xb, yb in batches]


class Augmented:
    """The shard's batches with noise from the global RNG (replays only when seeded per pass)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        for xb, yb in self.batches:
            yield xb + 0.01 * torch.randn(xb.shape, dtype=xb.dtype), yb


def is_word(word, message):
    """Whether ``message`` names the option ``word``: ``word:``, ``word=`` or quoted."""
    w = re.escape(word)
    return re.search(rf"(?<![\w.]){w}\s*[:=]|['\"`]{w}['\"`]", message) is not None


# ---------------------------------------------------------------------------- the cases
@dataclass
class Case:
    run: Callable[[Any], Any]  # on each rank: ctx -> value (tensors local)
    expect: Callable[[list[Any], Any], None]  # in the parent: (values per rank, oracle) -> assert
    # The options a ValueError may name to count as a refusal (any one of them; None: must work).
    word: str | tuple[str, ...] | None


CASES: dict[str, Case] = {}


def case(name, run, expect, word=None):
    assert name not in CASES, name
    CASES[name] = Case(run, expect, word)


def f64(x):
    """A float64 tensor (python floats too: torch.tensor(1.5) would be float32)."""
    return x.detach().double() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def close(got, want, rtol, what=""):
    got, want = f64(got), f64(want)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = float((got - want).norm()) / max(float(want.norm()), 1e-300)
    assert err <= rtol, (
        f"{what}: relative error {err:.3g} > {rtol:g} (got {got.flatten()[:4].tolist()}, expected {want.flatten()[:4].tolist()})"
    )


def same_scalar(vals, want, rtol, key=None, what=""):
    for rank, v in enumerate(vals):
        got = v if key is None else v[key]
        close(float(got), float(want), rtol, f"rank {rank} {what or key}")


# ---- the Objective: methods (must work) and constructor options (work or are refused)
def _obj(c, data=None, **opts):
    import flatness

    loss_fn = None if "batch_loss" in opts else F.cross_entropy
    return flatness.Objective(c.model, loss_fn, c.data if data is None else data, **opts)


def _o_obj(O, data=None, **opts):
    import flatness

    loss_fn = None if "batch_loss" in opts else F.cross_entropy
    return flatness.Objective(O.model, loss_fn, O.data if data is None else data, **opts)


def _lgh(names=None, at=False):
    """Run: loss, grad and hvp (at θ₀, or at a point θ₁ with ``at``)."""

    def run(c, obj):
        v = local(full_vec(5, names), c.rank, names)
        if not at:
            return {"loss": obj.loss(), "grad": obj.grad(), "hvp": obj.hvp(v)}
        th = local(theta_full(c.model_full, names) + 0.1 * full_vec(6, names), c.rank, names)
        return {"loss": obj.loss(th), "grad": obj.grad(th), "hvp": obj.hvp(v, th)}

    return run


def _lgh_expect(o_obj, names=None, at=False, tol=(1e-10, 1e-10, 1e-6)):
    def expect(vals, O):
        obj = o_obj(O)
        v = full_vec(5, names)
        th = theta_full(O.model, names) + 0.1 * full_vec(6, names) if at else None
        same_scalar(vals, obj.loss(th), tol[0], "loss")
        close(gather([r["grad"] for r in vals], names), obj.grad(th), tol[1], "grad")
        close(gather([r["hvp"] for r in vals], names), obj.hvp(v, th), tol[2], "hvp")

    return expect


def obj_case(
    name, opts=None, word=None, names=None, data=None, o_data=None, o_opts=None, tol=(1e-10, 1e-10, 1e-6)
):
    """Objective(**opts) on the ranks: loss, grad, hvp against one process's (``o_opts``, ``o_data``)."""
    opts = opts or {}
    o_opts = opts if o_opts is None else o_opts
    run = _lgh(names)
    case(
        name,
        lambda c: run(c, _obj(c, data(c) if data else None, **opts)),
        _lgh_expect(lambda O: _o_obj(O, o_data(O) if o_data else None, **o_opts), names, tol=tol),
        word,
    )


obj_case("objective.loss_grad_hvp")
case(
    "objective.at_theta",
    lambda c: _lgh(at=True)(c, _obj(c)),
    _lgh_expect(lambda O: _o_obj(O), at=True),
)
case(
    "objective.loss_and_grad",
    lambda c: dict(zip(("loss", "grad"), _obj(c).loss_and_grad(), strict=True)),
    lambda vals, O: (
        same_scalar(vals, _o_obj(O).loss(), 1e-10, "loss"),
        close(gather([r["grad"] for r in vals]), _o_obj(O).grad(), 1e-10, "grad"),
    ),
)
COORDS = torch.tensor([[0.0, 0.0], [0.5, -0.2], [-1.0, 0.3]], dtype=torch.float64)


def _many_run(**kw):
    def run(c):
        obj = _obj(c)
        dirs = local(full_vec(7, rows_=2), c.rank)
        opts = dict(kw)
        if "buffers" in opts:
            opts["buffers"] = {"bn.running_mean": opts["buffers"]}
        losses, metrics = obj.evaluate_many(COORDS, directions=dirs, **opts)
        return {"losses": losses, "metrics": metrics}

    return run


def _many_expect(**kw):
    def expect(vals, O):
        opts = dict(kw)
        if "buffers" in opts:
            opts["buffers"] = {"bn.running_mean": opts["buffers"]}
        losses, metrics = _o_obj(O).evaluate_many(COORDS, directions=full_vec(7, rows_=2), **opts)
        for rank, r in enumerate(vals):
            close(r["losses"], losses, 1e-10, f"rank {rank} losses")
            assert set(r["metrics"]) == set(metrics), (rank, set(r["metrics"]))
            for k in metrics:
                close(r["metrics"][k], metrics[k], 1e-10, f"rank {rank} metric {k}")

    return expect


BUFS = torch.linspace(-0.4, 0.4, 9, dtype=torch.float64).reshape(3, 3)
case("objective.evaluate_many.directions", _many_run(), _many_expect())
case("objective.evaluate_many.metrics", _many_run(metrics={"acc": acc}), _many_expect(metrics={"acc": acc}))
case("objective.evaluate_many.buffers", _many_run(buffers=BUFS), _many_expect(buffers=BUFS))
case(
    "objective.evaluate_many.thetas",
    lambda c: _obj(c).evaluate_many(local(theta_full(c.model_full) + 0.1 * full_vec(8, rows_=2), c.rank))[0],
    lambda vals, O: [
        close(
            v,
            _o_obj(O).evaluate_many(theta_full(O.model) + 0.1 * full_vec(8, rows_=2))[0],
            1e-10,
            f"rank {i}",
        )
        for i, v in enumerate(vals)
    ],
)


def _unflatten_run(c):
    obj = _obj(c)
    g = obj.grad()
    d = obj.unflatten(g)
    return {"dict": d, "round_trip": obj.flatten(d), "grad": g}


def _unflatten_expect(vals, O):
    obj = _o_obj(O)
    want = obj.unflatten(obj.grad())
    got = gather_dict([r["dict"] for r in vals])
    assert set(got) == set(want), set(got)
    for k in want:
        close(got[k], want[k], 1e-10, k)
    for rank, r in enumerate(vals):
        assert torch.equal(torch.as_tensor(r["round_trip"]), torch.as_tensor(r["grad"])), (
            f"rank {rank}: flatten(unflatten(g)) != g"
        )


case("objective.unflatten_flatten", _unflatten_run, _unflatten_expect)
case(
    "objective.with_params",
    lambda c: _lgh(LAST)(c, _obj(c).with_params(LAST)),
    _lgh_expect(lambda O: _o_obj(O).with_params(LAST), LAST),
)

# Constructor options.
obj_case("opt.batch_loss", {"batch_loss": batch_loss}, "batch_loss")
obj_case(
    "opt.batch_outputs",
    {"batch_outputs": batch_outputs},
    "batch_outputs",
    data=lambda c: as_dicts(c.data),
    o_data=lambda O: as_dicts(O.data),
)
obj_case("opt.params.names", {"params": LAST}, "params", names=LAST)
case(
    "opt.params.predicate",
    lambda c: _lgh(LAST)(c, _obj(c, params=lambda n, p: n.startswith("l2."))),
    _lgh_expect(lambda O: _o_obj(O, params=lambda n, p: n.startswith("l2.")), LAST),
    "params",
)
obj_case("opt.reduction.sum", {"reduction": "sum"}, "reduction")
obj_case("opt.train", {"train": True}, "train")
obj_case(
    "opt.max_batches",  # the first 2 batches of every rank
    {"max_batches": 2},
    "max_batches",
    o_data=lambda O: O.shards[0][:2] + O.shards[1][:2],
    o_opts={},
)
obj_case("opt.batch_size", {"batch_size": batch_size}, "batch_size")
obj_case("opt.dtype.float64", {"dtype": torch.float64}, "dtype")
obj_case("opt.dtype.float32", {"dtype": torch.float32}, "dtype", tol=(1e-5, 1e-4, 1e-3))
for _mode in ("auto", "forward", "reverse", "finite_difference"):
    obj_case(f"opt.hvp_mode.{_mode}", {"hvp_mode": _mode}, "hvp_mode")
obj_case("opt.data_seed", {"data_seed": 7}, "data_seed")
case(
    "opt.data_seed.augmented_replays",  # random augmentation: every pass sees the same noise
    lambda c: [_obj(c, Augmented(c.data), data_seed=3).loss() for _ in range(2)],
    lambda vals, O: [
        (torch.isfinite(torch.stack(v)).all() and v[0] == v[1]) or pytest.fail(f"rank {i}: {v}")
        for i, v in enumerate(vals)
    ],
    "data_seed",
)


def _reuse_run(mode):
    def run(c):
        obj = _obj(c, reuse_graph=mode)
        v = local(full_vec(5), c.rank)
        with obj.reusing_graph():
            return {"hvp": [obj.hvp(v), obj.hvp(2 * v)]}

    return run


def _reuse_expect(vals, O):
    obj = _o_obj(O)
    v = full_vec(5)
    close(gather([r["hvp"][0] for r in vals]), obj.hvp(v), 1e-6, "hvp")
    close(gather([r["hvp"][1] for r in vals]), obj.hvp(2 * v), 1e-6, "hvp(2v)")


for _reuse in ("auto", True, False):
    case(f"opt.reuse_graph.{_reuse}", _reuse_run(_reuse), _reuse_expect, "reuse_graph")
case(
    "opt.process_group.world",
    lambda c: _lgh()(c, _obj(c, process_group=dist.group.WORLD)),
    _lgh_expect(lambda O: _o_obj(O)),
    "process_group",
)


def _pg_false_expect(vals, O):
    # process_group=False: each rank's own data alone (no collectives over the data).
    for rank, r in enumerate(vals):
        same_scalar(
            [r], _o_obj(O, O.shards[rank]).loss(), 1e-10, "loss", f"rank {rank} loss of its own shard"
        )


case(
    "opt.process_group.false",
    lambda c: {"loss": _obj(c, process_group=False).loss()},
    _pg_false_expect,
    "process_group",
)


# ---- hessian_topk
def _topk_run(**kw):
    def run(c):
        import flatness

        opts = {"k": 1, "tol": 1e-6, **{k: v for k, v in kw.items() if k not in EXPECT_ONLY}}
        loss_fn = None if "batch_loss" in opts else F.cross_entropy
        if opts.get("v0") == "local":
            opts["v0"] = local(full_vec(9), c.rank)
        if opts.get("v0") == "dict":
            opts["v0"] = {k: t[slice(*rows(k, c.rank))] for k, t in _o_unflat(full_vec(9)).items()}
        if opts.get("progress") == "callable":
            seen = []
            opts["progress"] = lambda *a: seen.append(1)
        data = as_dicts(c.data) if "batch_outputs" in opts else c.data
        res = flatness.hessian_topk(c.model, loss_fn, data, **opts)
        if isinstance(res, flatness.BlockSpectra):
            return {"blocks": {k: r.eigenvalues for k, r in res.items()}}
        out = {"vals": res.eigenvalues, "vecs": res.eigenvectors}
        if kw.get("progress") == "callable":
            out["progress_calls"] = len(seen)
        return out

    return run


def _o_unflat(v):
    out, pos = {}, 0
    for k in NAMES:
        m = math.prod(SHAPES[k])
        out[k] = v[pos : pos + m].reshape(SHAPES[k])
        pos += m
    return out


def _eigs(H, which, k):
    lam, U = torch.linalg.eigh((H + H.T) / 2)
    order = {
        "largest": lam.argsort(descending=True),
        "smallest": lam.argsort(),
        "magnitude": lam.abs().argsort(descending=True),
    }[which]
    return lam[order[:k]], U[:, order[:k]].T


def _topk_expect(which="largest", k=1, matrix="hessian", rtol=1e-6, names=None, vectors=False, **_):
    def expect(vals, O):
        H = O.dense(matrix, names)
        lam, U = _eigs(H, which, k)
        scale = float(torch.linalg.eigvalsh(H).abs().max())
        for rank, r in enumerate(vals):
            got = torch.as_tensor(r["vals"]).double()
            assert got.shape == lam.shape, (rank, got)
            err = float((got - lam).abs().max())
            assert err <= rtol * scale, (
                f"rank {rank}: eigenvalues {got.tolist()}, exact {lam.tolist()} (error {err:.3g} > {rtol:g}·{scale:.3g})"
            )
        if "progress_calls" in vals[0]:
            assert all(r["progress_calls"] > 0 for r in vals), "progress callable never called"
        if vectors:
            vecs = gather([r["vecs"] for r in vals], names)
            for i in range(k):
                assert abs(float(vecs[i] @ U[i])) > 1 - 1e-6, (
                    f"eigenvector {i}: |<v, u>| = {abs(float(vecs[i] @ U[i])):.8f}"
                )

    return expect


EXPECT_ONLY = ("rtol", "matrix", "names", "vectors")  # keys of _topk_expect only


def topk_case(name, word=None, expect=None, **kw):
    """A refusal may name any option the call passes (``word`` names one more)."""
    words = tuple(k for k in kw if k not in EXPECT_ONLY) + ((word,) if word else ())
    case(f"topk.{name}", _topk_run(**kw), expect or _topk_expect(**kw), words or None)


topk_case("default", vectors=True)  # k=1, tol=1e-6 unless a case says otherwise
topk_case("k2", k=2, vectors=True)
topk_case("which.largest", "which", which="largest", k=2)
topk_case("which.smallest", "which", which="smallest", k=2, ncv=20)
topk_case("which.magnitude", "which", which="magnitude", k=2)
topk_case("tol.default", "tol", tol=1e-3, rtol=1e-3)
topk_case("max_hvp", "max_hvp", max_hvp=300)
topk_case("ncv", "ncv", ncv=12)
topk_case("seed", "seed", seed=3)
topk_case("v0.flat", "v0", v0="local")
topk_case("v0.dict", "v0", v0="dict")
topk_case("v0_mix", "v0_mix", v0="local", v0_mix=0.0)
topk_case("basis_device", "basis_device", basis_device="cpu")
topk_case("keep_products.true", "keep_products", keep_products=True)
topk_case("keep_products.false", "keep_products", keep_products=False)
topk_case("min_steps", "min_steps", min_steps=15)
topk_case("progress.true", "progress", progress=True)
topk_case("progress.callable", "progress", progress="callable")
for _curv in ("hessian", "ggn", "fisher", "empirical_fisher"):
    topk_case(f"curvature.{_curv}", "curvature", curvature=_curv, matrix=_curv)
for _mode in ("auto", "forward", "reverse", "finite_difference"):
    topk_case(f"hvp_mode.{_mode}", "hvp_mode", hvp_mode=_mode)
for _reuse in ("auto", True, False):
    topk_case(f"reuse_graph.{_reuse}", "reuse_graph", reuse_graph=_reuse)
topk_case("params", "params", params=LAST, names=LAST)
topk_case("batch_loss", "batch_loss", batch_loss=batch_loss)
topk_case("batch_outputs", batch_outputs=batch_outputs)
topk_case("batch_outputs.ggn", "batch_outputs", batch_outputs=batch_outputs, curvature="ggn", matrix="ggn")


def _blocks_expect(blocks):
    def expect(vals, O):
        for rank, r in enumerate(vals):
            got = r["blocks"]
            want = O.block_names(blocks)
            assert list(got) == list(want), f"rank {rank}: blocks {list(got)}, expected {list(want)}"
            for b, names in want.items():
                H = O.dense("hessian", names)
                lam = torch.linalg.eigvalsh((H + H.T) / 2).flip(0)[:1]
                close(got[b], lam, 1e-6, f"rank {rank} block {b}")

    return expect


BLOCK_DICT = {"first": ["l1.weight", "l1.bias"], "last": LAST}
for _bname, _blocks in (("module", "module"), ("parameter", "parameter"), ("dict", BLOCK_DICT)):
    topk_case(f"blocks.{_bname}", "blocks", expect=_blocks_expect(_blocks), blocks=_blocks, k=1)


# ---- hessian_trace
def _trace_run(**kw):
    def run(c):
        import flatness

        opts = {"n_hvp": 6, **kw}
        if opts.get("progress") == "callable":
            opts["progress"] = lambda *a: None
        res = flatness.hessian_trace(c.model, F.cross_entropy, c.data, **opts)
        if isinstance(res, flatness.BlockSpectra):
            return {"blocks": {k: r.estimate for k, r in res.items()}}
        return {"estimate": res.estimate, "std_error": res.std_error}

    return run


def _trace_finite(psd=False):
    def expect(vals, O):
        for rank, r in enumerate(vals):
            est = [float(r["estimate"])] if "estimate" in r else [float(v) for v in r["blocks"].values()]
            assert all(math.isfinite(e) for e in est), (rank, est)
            if psd:
                assert all(e >= -1e-9 for e in est), f"rank {rank}: trace of a PSD matrix {est} < 0"
        if "estimate" in vals[0]:
            assert vals[0]["estimate"] == vals[1]["estimate"], "ranks disagree"

    return expect


N = n_of()
case(
    # n_hvp ≥ 3n: the sketch spans θ (here the 12 parameters of l2), the estimate is the exact trace
    "trace.hutchpp_full_sketch.params",
    _trace_run(n_hvp=3 * n_of(LAST) + 3, params=LAST),
    lambda vals, O: same_scalar(vals, O.dense("hessian", LAST).trace(), 1e-6, "estimate"),
    "params",
)
case("trace.method.hutchinson", _trace_run(method="hutchinson"), _trace_finite(), "method")
case("trace.seed", _trace_run(seed=4), _trace_finite(), "seed")
case("trace.progress", _trace_run(progress="callable"), _trace_finite(), "progress")
for _curv in ("ggn", "fisher", "empirical_fisher"):
    case(f"trace.curvature.{_curv}", _trace_run(curvature=_curv), _trace_finite(psd=True), "curvature")
case("trace.blocks.module", _trace_run(blocks="module"), _trace_finite(), "blocks")
SMALL_BLOCKS = {"b1": ["l1.bias"], "bn": ["bn.weight", "bn.bias"]}  # 3 and 6 parameters
case(
    "trace.blocks.dict_exact",  # n_hvp ≥ 3·(block size) per block: exact traces
    _trace_run(blocks=SMALL_BLOCKS, n_hvp=3 * 6 + 3),
    lambda vals, O: [
        close(
            [float(r["blocks"][k]) for k in SMALL_BLOCKS],
            [float(O.dense("hessian", v).trace()) for v in SMALL_BLOCKS.values()],
            1e-6,
            f"rank {i}",
        )
        for i, r in enumerate(vals)
    ],
    "blocks",
)


# ---- hessian_density
def _density_run(**kw):
    def run(c):
        import flatness

        opts = {"n_runs": 1, "n_steps": 6, **kw}
        if opts.get("progress") == "callable":
            opts["progress"] = lambda *a: None
        res = flatness.hessian_density(c.model, F.cross_entropy, c.data, **opts)
        if isinstance(res, flatness.BlockSpectra):
            return {"blocks": {k: (r.nodes, r.weights) for k, r in res.items()}}
        return {"nodes": res.nodes, "weights": res.weights, "density": res.density}

    return run


def _density_expect(matrix="hessian"):
    def expect(vals, O):
        for rank, r in enumerate(vals):
            items = [(None, (r["nodes"], r["weights"]))] if "nodes" in r else list(r["blocks"].items())
            for b, (nodes, weights) in items:
                names = None if b is None else O.block_names("module")[b]
                lam = torch.linalg.eigvalsh(O.dense(matrix, names))
                pad = 1e-6 * float(lam.abs().max())
                nodes, weights = torch.as_tensor(nodes).double(), torch.as_tensor(weights).double()
                assert torch.isfinite(nodes).all() and torch.isfinite(weights).all(), (rank, b)
                assert (
                    float(nodes.min()) >= float(lam.min()) - pad
                    and float(nodes.max()) <= float(lam.max()) + pad
                ), (
                    f"rank {rank} {b}: Ritz values {nodes.flatten().tolist()} outside the spectrum [{float(lam.min()):.4g}, {float(lam.max()):.4g}]"
                )
                assert float(weights.min()) >= -1e-12, (rank, b)
                sums = weights.reshape(-1, weights.shape[-1]).sum(-1)
                assert torch.allclose(sums, torch.ones_like(sums), atol=1e-8), (
                    f"rank {rank} {b}: weights sum to {sums.tolist()}"
                )

    return expect


case("density.default", _density_run(), _density_expect())
case("density.sigma", _density_run(sigma=0.1), _density_expect(), "sigma")
case("density.grid", _density_run(grid=50), _density_expect(), "grid")
case("density.seed", _density_run(seed=5), _density_expect(), "seed")
case("density.basis_device", _density_run(basis_device="cpu"), _density_expect(), "basis_device")
case("density.progress", _density_run(progress="callable"), _density_expect(), "progress")
for _curv in ("ggn", "fisher", "empirical_fisher"):
    case(f"density.curvature.{_curv}", _density_run(curvature=_curv), _density_expect(_curv), "curvature")
case("density.blocks.module", _density_run(blocks="module"), _density_expect(), "blocks")


# ---- curvature operators
def _op_run(curvature, cls=False, **kw):
    def run(c):
        import flatness

        if cls:
            op = flatness.HessianOperator(c.model, F.cross_entropy, c.data, **kw)
        else:
            op = flatness.curvature_operator(c.model, F.cross_entropy, c.data, curvature=curvature, **kw)
        return {"mv": op @ local(full_vec(5), c.rank)}

    return run


def _op_expect(matrix):
    return lambda vals, O: close(
        gather([r["mv"] for r in vals]), O.dense(matrix) @ full_vec(5), 1e-6, "op @ v"
    )


for _curv in ("hessian", "ggn", "fisher", "empirical_fisher"):
    case(f"operator.curvature_operator.{_curv}", _op_run(_curv), _op_expect(_curv), "curvature")
case("operator.HessianOperator", _op_run("hessian", cls=True), _op_expect("hessian"))
case(
    "operator.fisher.likelihood",  # the exact categorical Fisher (= the GGN of cross-entropy)
    _op_run("fisher", likelihood="categorical"),
    _op_expect("fisher"),
    ("likelihood", "curvature"),
)
case(
    "operator.fisher.mc_samples",  # Monte-Carlo Fisher: random labels, finite products
    _op_run("fisher", mc_samples=2, mc_seed=1),
    lambda vals, O: [
        torch.isfinite(torch.as_tensor(r["mv"])).all() or pytest.fail(str(i)) for i, r in enumerate(vals)
    ],
    ("mc_samples", "mc_seed", "curvature"),
)


# ---- sharpness, adaptive and average sharpness
A_FULL = full_vec(11, rows_=3).T.contiguous()  # (n, p = 3)


def _sharp_run(fn="sharpness", **kw):
    def run(c):
        import flatness

        opts = dict(kw)
        if isinstance(opts.get("subspace"), str):
            opts["subspace"] = local(A_FULL.T, c.rank).T  # this rank's rows of A
        if opts.get("progress") == "callable":
            opts["progress"] = lambda *a: None
        res = getattr(flatness, fn)(c.model, F.cross_entropy, c.data, **opts)
        return {"value": res.value, "loss": res.loss}

    return run


def _sharp_expect(fn="sharpness", **kw):
    def expect(vals, O):
        import flatness

        opts = dict(kw)
        if isinstance(opts.get("subspace"), str):
            opts["subspace"] = A_FULL
        if opts.get("progress") == "callable":
            opts["progress"] = lambda *a: None
        res = getattr(flatness, fn)(O.model, F.cross_entropy, O.data, **opts)
        same_scalar(vals, res.loss, 1e-10, "loss")
        for rank, r in enumerate(vals):
            assert abs(float(r["value"]) - float(res.value)) <= 1e-6 * abs(float(res.value)) + 1e-12, (
                f"rank {rank}: value {float(r['value'])!r}, one process {float(res.value)!r}"
            )

    return expect


def _sharp_property(nonneg=True):
    def expect(vals, O):
        same_scalar(vals, _o_obj(O).loss(), 1e-10, "loss")
        for rank, r in enumerate(vals):
            assert math.isfinite(float(r["value"])), (rank, r)
            if nonneg:
                assert float(r["value"]) >= 0, (rank, float(r["value"]))

    return expect


def sharp_case(name, fn="sharpness", exact=True, nonneg=True, **kw):
    """A refusal may name any option the call passes (e.g. ``subspace`` for a full-space box).

    ``adaptive_sharpness`` is a box maximization over whole vectors as a whole: its refusal names
    ``model`` (the function is not available for a sharded model, whatever the options).
    """
    case(
        f"{fn}.{name}",
        _sharp_run(fn, **kw),
        _sharp_expect(fn, **kw) if exact else _sharp_property(nonneg),
        tuple(kw) + (("model",) if fn == "adaptive_sharpness" else ()),
    )


SH = {"epsilon": 1e-2, "max_iter": 3}
sharp_case("subspace.matrix", subspace="A", **SH)
sharp_case("subspace.int", exact=False, subspace=4, seed=5, **SH)
sharp_case("subspace.none.keskar", subspace=None, start="keskar", **SH)
sharp_case("subspace.none.auto", exact=False, subspace=None, start="auto", **SH)
sharp_case("start.keskar.subspace_int", exact=False, subspace=4, start="keskar", **SH)
sharp_case(
    "options", subspace="A", epsilon=5e-3, max_iter=2, max_evals=8, tol=1e-12, seed=3, progress="callable"
)
AS = {"rho": 0.05, "max_iter": 3}
sharp_case("p2", fn="adaptive_sharpness", exact=False, **AS)
sharp_case("p2.not_adaptive_eta", fn="adaptive_sharpness", exact=False, adaptive=False, eta=0.1, **AS)
sharp_case("pinf.keskar", fn="adaptive_sharpness", p=float("inf"), start="keskar", **AS)
sharp_case(
    "pinf.options",
    fn="adaptive_sharpness",
    exact=False,
    p="inf",
    start="auto",
    max_evals=8,
    tol=1e-12,
    seed=2,
    progress="callable",
    **AS,
)
sharp_case("default", fn="average_sharpness", exact=False, nonneg=False, rho=0.05, n_samples=3, seed=6)
sharp_case(
    "not_adaptive_eta",
    fn="average_sharpness",
    exact=False,
    nonneg=False,
    rho=0.05,
    n_samples=2,
    adaptive=False,
    eta=0.1,
    progress="callable",
)

# ---- landscapes
ALPHAS = torch.linspace(-0.5, 0.5, 3, dtype=torch.float64)


def _land_run(fn, **kw):
    def run(c):
        import flatness

        opts = dict(kw)
        if opts.get("direction") == "flat":
            opts["direction"] = local(full_vec(12), c.rank)
        if opts.get("direction") == "dict":
            opts["direction"] = {k: t[slice(*rows(k, c.rank))] for k, t in _o_unflat(full_vec(12)).items()}
        if opts.get("directions") == "flat":
            opts["directions"] = [local(full_vec(12), c.rank), local(full_vec(13), c.rank)]
        if opts.get("progress") == "callable":
            opts["progress"] = lambda *a: None
        if opts.get("checkpoint"):
            opts["checkpoint"] = str(Path(c.tmp) / f"{fn}{c.rank}.npz")
        args = (c.model, c.model_b) if fn == "interpolate" else (c.model,)
        res = getattr(flatness, fn)(*args, F.cross_entropy, c.data, alphas=ALPHAS, **opts)
        out = {
            "loss": torch.as_tensor(res.loss),
            "metrics": {k: torch.as_tensor(v) for k, v in (res.metrics or {}).items()},
        }
        if opts.get("checkpoint"):
            res2 = getattr(flatness, fn)(
                *args,
                F.cross_entropy,
                c.data,
                alphas=ALPHAS,
                resume_from=opts["checkpoint"],
                **{k: v for k, v in opts.items() if k != "checkpoint"},
            )
            out["resumed"] = torch.as_tensor(res2.loss)
        return out

    return run


def _land_expect(fn, exact=True, **kw):
    def expect(vals, O):
        import flatness

        opts = {k: v for k, v in kw.items() if k not in ("checkpoint", "progress")}
        if opts.get("direction") in ("flat", "dict"):
            opts["direction"] = full_vec(12)
        if opts.get("directions") == "flat":
            opts["directions"] = [full_vec(12), full_vec(13)]
        if not exact:  # a random direction: the centre is the loss, every point finite
            loss0 = float(_o_obj(O).loss())
            for rank, r in enumerate(vals):
                loss = r["loss"].double()
                assert torch.isfinite(loss).all(), (rank, loss)
                centre = loss[1] if loss.ndim == 1 else loss[1, 1]
                close(centre, loss0, 1e-10, f"rank {rank} loss at the centre")
            return
        args = (O.model, O.model_b) if fn == "interpolate" else (O.model,)
        res = getattr(flatness, fn)(*args, F.cross_entropy, O.data, alphas=ALPHAS, **opts)
        for rank, r in enumerate(vals):
            close(r["loss"], torch.as_tensor(res.loss), 1e-10, f"rank {rank} loss")
            for k, v in (res.metrics or {}).items():
                close(r["metrics"][k], torch.as_tensor(v), 1e-10, f"rank {rank} metric {k}")
            if "resumed" in r:
                close(r["resumed"], torch.as_tensor(res.loss), 1e-10, f"rank {rank} resumed")

    return expect


def land_case(fn, name, word=None, exact=True, **kw):
    case(f"{fn}.{name}", _land_run(fn, **kw), _land_expect(fn, exact, **kw), word)


# The option cases use filter normalization of a given direction; None ("as given") has its own.
D1 = {"direction": "flat", "normalization": "filter"}
land_case("landscape_1d", "direction.flat.as_given", "direction", direction="flat", normalization=None)
land_case("landscape_1d", "direction.dict.as_given", "direction", direction="dict", normalization=None)
land_case("landscape_1d", "normalization.filter", "normalization", direction="flat", normalization="filter")
land_case(
    "landscape_1d",
    "normalization.layer.ignore_1d",
    "normalization",
    direction="flat",
    normalization="layer",
    ignore_1d=False,
)
land_case("landscape_1d", "random_direction", "seed", exact=False, seed=8)
land_case("landscape_1d", "metrics", "metrics", metrics={"acc": acc}, **D1)
land_case("landscape_1d", "vectorize.true", "vectorize", vectorize=True, **D1)
land_case("landscape_1d", "vectorize.false", "vectorize", vectorize=False, **D1)
land_case("landscape_1d", "chunk_size", "chunk_size", chunk_size=2, **D1)
land_case("landscape_1d", "points_per_pass", "points_per_pass", points_per_pass=1, **D1)
land_case("landscape_1d", "checkpoint.resume_from", "checkpoint", checkpoint=True, **D1)
land_case("landscape_1d", "progress", "progress", progress="callable", **D1)
land_case("landscape_1d", "train", "train", train=True, **D1)
D2 = {"betas": ALPHAS[:2], "directions": "flat", "normalization": "filter"}
land_case(
    "landscape_2d",
    "directions.flat.as_given",
    "directions",
    betas=ALPHAS[:2],
    directions="flat",
    normalization=None,
)
land_case(
    "landscape_2d",
    "normalization.filter",
    "normalization",
    betas=ALPHAS,
    directions="flat",
    normalization="filter",
)
land_case("landscape_2d", "random_directions", "seed", exact=False, betas=ALPHAS, seed=2)
land_case("landscape_2d", "metrics.points_per_pass", "metrics", metrics={"acc": acc}, points_per_pass=2, **D2)
land_case("interpolate", "default", None)
land_case(
    "interpolate", "checkpoint.resume_from.progress", "checkpoint", checkpoint=True, progress="callable"
)
land_case("interpolate", "interpolate_buffers.false", "interpolate_buffers", interpolate_buffers=False)
land_case(
    "interpolate",
    "metrics.vectorize.false",
    "metrics",
    metrics={"acc": acc},
    vectorize=False,
    points_per_pass=1,
)


# ---- directions
def _rd_run(**kw):
    def run(c):
        import flatness

        return {"dir": flatness.random_direction(c.model, **kw)}

    return run


def _rd_expect(normalization="filter", ignore_1d=True, params=None, **_):
    def expect(vals, O):
        d = gather_dict([r["dir"] for r in vals])
        names = params or NAMES
        assert list(d) == list(names), list(d)
        p = dict(O.model.named_parameters())
        for k in names:
            t, w = d[k], p[k].detach()
            assert torch.isfinite(t).all(), k
            if normalization is None:
                continue
            if t.ndim == 1 and ignore_1d:
                assert not t.any(), f"{k}: a 1-D direction with ignore_1d is not zero"
            elif normalization == "filter" and t.ndim > 1:
                close(t.norm(dim=1), w.norm(dim=1), 1e-8, f"{k}: filter norms")
            else:
                close(t.norm(), w.norm(), 1e-8, f"{k}: norm")

    return expect


for _norm in ("filter", "layer", None):
    case(
        f"random_direction.normalization.{_norm}",
        _rd_run(normalization=_norm),
        _rd_expect(_norm),
        "normalization",
    )
case(
    "random_direction.ignore_1d.seed",
    _rd_run(ignore_1d=False, seed=4),
    _rd_expect(ignore_1d=False),
    "ignore_1d",
)
case("random_direction.params", _rd_run(params=LAST), _rd_expect(params=LAST), "params")


def _eigdir_run(params=None):
    def run(c):
        import flatness

        names = params or NAMES
        return {
            "dirs": flatness.eigen_directions(
                c.model, local(full_vec(14, names, rows_=2), c.rank, names), params=params
            )
        }

    return run


def _eigdir_expect(params=None):
    def expect(vals, O):
        import flatness

        names = params or NAMES
        want = flatness.eigen_directions(O.model, full_vec(14, names, rows_=2), params=params)
        assert len(vals[0]["dirs"]) == len(want) == len(vals[1]["dirs"])
        for i, w in enumerate(want):
            got = gather_dict([vals[0]["dirs"][i], vals[1]["dirs"][i]])
            assert list(got) == list(w), list(got)
            for k in w:
                close(got[k], w[k], 1e-12, f"direction {i} {k}")

    return expect


case("eigen_directions.default", _eigdir_run(), _eigdir_expect())
case("eigen_directions.params", _eigdir_run(LAST), _eigdir_expect(LAST), "params")


def _pca_run(params=None):
    def run(c):
        import flatness

        res = flatness.pca_directions(
            c.model, [m.state_dict() for m in c.checkpoints], n_components=2, params=params
        )
        return {
            "dirs": res.directions,
            "ratio": torch.as_tensor(res.explained_variance_ratio),
            "coords": torch.as_tensor(res.coordinates),
        }

    return run


def _pca_expect(params=None):
    def expect(vals, O):
        import flatness

        want = flatness.pca_directions(
            O.model, [m.state_dict() for m in O.checkpoints], n_components=2, params=params
        )
        for rank, r in enumerate(vals):
            close(
                r["ratio"],
                torch.as_tensor(want.explained_variance_ratio),
                1e-10,
                f"rank {rank} explained variance",
            )
            close(r["coords"], torch.as_tensor(want.coordinates), 1e-10, f"rank {rank} coordinates")
        for i, w in enumerate(want.directions):
            got = gather_dict([vals[0]["dirs"][i], vals[1]["dirs"][i]])
            for k in w:
                close(got[k], w[k], 1e-10, f"direction {i} {k}")

    return expect


# PCA of a trajectory is an SVD over whole checkpoints: refused as a whole for a sharded model,
# naming ``model`` (whatever the options).
case("pca_directions.default", _pca_run(), _pca_expect(), "model")
case("pca_directions.params", _pca_run(LAST), _pca_expect(LAST), ("params", "model"))


# ---- Monitor
def _mon_run(measures, records=1, **kw):
    def run(c):
        import flatness

        mon = flatness.Monitor(F.cross_entropy, c.data, every=1, measures=measures, **kw)
        for _ in range(records):
            mon.measure(c.model)
        return {"rows": [{k: v for k, v in row.items() if k != "time_s"} for row in mon.records]}

    return run


def _mon_expect(measures, records=1, rtol=1e-6, exact=("loss", "grad_norm", "top_eigenvalue"), **kw):
    def expect(vals, O):
        import flatness

        data, kw1 = O.data, dict(kw)
        if "max_batches" in kw1:  # per rank, as in training: the first m batches of every shard
            m = kw1.pop("max_batches")
            data = O.shards[0][:m] + O.shards[1][:m]
        mon = flatness.Monitor(F.cross_entropy, data, every=1, measures=measures, **kw1)
        for _ in range(records):
            mon.measure(O.model)
        for rank, r in enumerate(vals):
            assert len(r["rows"]) == records
            for got, want in zip(r["rows"], mon.records, strict=True):
                assert set(got) == set(want) - {"time_s"}, (rank, set(got))
                for k in got:
                    if k == "step":
                        continue
                    if k in exact or k == "custom":
                        close(
                            float(got[k]),
                            float(want[k]),
                            rtol,
                            f"rank {rank} {k}",
                        )
                    else:
                        assert math.isfinite(float(got[k])), (rank, k, got[k])

    return expect


def mon_case(name, measures, word=None, **kw):
    case(f"monitor.{name}", _mon_run(measures, **kw), _mon_expect(measures, **kw), word)


mon_case("loss_grad_norm_top_eigenvalue", ["loss", "grad_norm", "top_eigenvalue"])  # issue 20's Done-when
mon_case("loss", ["loss"])
mon_case("grad_norm", ["grad_norm"])
mon_case("top_eigenvalue.warm_start", ["top_eigenvalue"], "warm_start", records=2)
mon_case("top_eigenvalue.cold", ["top_eigenvalue"], "warm_start", records=2, warm_start=False)
mon_case("trace", ["trace"], options={"trace": {"n_hvp": 6}})
mon_case("sharpness", ["sharpness"], options={"sharpness": {"subspace": 4, "max_iter": 2}})
mon_case("shared_options", ["loss", "grad_norm"], "max_batches", max_batches=2)
mon_case("learning_rate", ["loss"], "learning_rate", learning_rate=0.1)
mon_case("progress", ["loss", "top_eigenvalue"], "progress", progress=lambda *a: None)


# ---------------------------------------------------------------------------- the ranks
class Ctx:
    def __init__(self, rank, payload, tmp):
        self.rank, self.tmp = rank, tmp
        self.data = shard(rank)
        self.model_full = make_model()
        self.model_full.load_state_dict(payload["a"])
        self.model = sharded(payload["a"])
        self.model_b = sharded(payload["b"])
        self.checkpoints = [sharded(s) for s in payload["checkpoints"]]
        # A forward first (FSDP's lazy initialization), as a trained model has had.
        with torch.no_grad():
            for m in (self.model, self.model_b, *self.checkpoints):
                m(self.data[0][0])
                m.reshard()


def _plain(value):
    """Picklable, detached, rank-local: DTensors as their local shards."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local().detach().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _where(err):
    frames = traceback.extract_tb(err.__traceback__)
    inner = [f for f in frames if "flatness" in f.filename] or frames
    f = inner[-1]
    return f"{Path(f.filename).name}:{f.lineno}"


def _worker(rank, port, tmp, payload):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=HANG_S),
    )
    # Outcomes are agreed on a group of their own, so that a case left waiting on the world group
    # (a hang: its peer raised alone) is reported and the next case starts together.
    sync = dist.new_group(backend="gloo", timeout=timedelta(seconds=2 * HANG_S + 30))
    out = {}
    try:
        c = Ctx(rank, payload, tmp)
        before = fs.local_state(c.model)
        for name in payload["cases"]:
            t0 = time.perf_counter()
            try:
                outcome = ("ok", _plain(CASES[name].run(c)))
            except Exception as err:  # every outcome is recorded and judged
                outcome = (type(err).__name__, f"{err} [{_where(err)}]")
            # Shards, grads, buffers, modes and the global RNG state exactly as before the call.
            after = fs.local_state(c.model)
            touched = not fs.same_state(before, after)
            before = after
            out[name] = (*outcome, time.perf_counter() - t0, touched)
            dist.barrier(group=sync)
            torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
        dist.destroy_process_group()


def run_ranks(tmp, cases):
    model = make_model()
    payload = {
        "a": model.state_dict(),
        "b": perturbed(model, 1).state_dict(),
        "checkpoints": [perturbed(model, s, 0.2 * s).state_dict() for s in (2, 3, 4)],
        "cases": cases,
    }
    ctx = mp.spawn(_worker, args=(fs._free_port(), str(tmp), payload), nprocs=WORLD, join=False)
    end = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=max(1.0, end - time.monotonic())):
            if time.monotonic() > end:
                break
    except mp.ProcessExitedException:  # a rank crashed: the other's outcomes still count
        pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = []
    for r in range(WORLD):
        f = Path(tmp) / f"rank{r}.pt"
        ranks.append(torch.load(f, weights_only=False) if f.exists() else {})
    return ranks


# ---------------------------------------------------------------------------- one process
class Oracle:
    def __init__(self):
        model = make_model()
        self.model = model
        self.model_b = perturbed(model, 1)
        self.checkpoints = [perturbed(model, s, 0.2 * s) for s in (2, 3, 4)]
        self.shards = [shard(0), shard(1)]
        self.data = self.shards[0] + self.shards[1]
        self._dense = {}

    def dense(self, matrix="hessian", names=None):
        """The exact curvature matrix (one process, exact products), restricted to ``names``."""
        import flatness

        if matrix not in self._dense:
            op = flatness.curvature_operator(self.model, F.cross_entropy, self.data, curvature=matrix)
            eye = torch.eye(N, dtype=torch.float64)
            M = torch.stack([op @ e for e in eye]).double()
            self._dense[matrix] = (M + M.T) / 2
        if names is None:
            return self._dense[matrix]
        idx = torch.cat([torch.arange(a, b) for a, b in ranges_of(names)])
        return self._dense[matrix][idx][:, idx]

    def block_names(self, blocks):
        """{block name: parameter names} as one process splits ``blocks``."""
        import flatness

        res = flatness.hessian_trace(self.model, F.cross_entropy, self.data, blocks=blocks, n_hvp=6)
        return {k: list(v) for k, v in res.params.items()}


def ranges_of(names):
    """Global flat ranges of ``names`` in θ (all parameters)."""
    out, offset = [], 0
    for k in NAMES:
        m = math.prod(SHAPES[k])
        if k in names:
            out.append((offset, offset + m))
        offset += m
    return out


# ---------------------------------------------------------------------------- judging
def judge(name, outcomes, oracle):
    """("works" | "refused", detail) or raise AssertionError with the outcome."""
    c = CASES[name]
    if any(o is None for o in outcomes):
        raise AssertionError(
            f"no outcome on rank(s) {[i for i, o in enumerate(outcomes) if o is None]} (hang or crash)"
        )
    touched = [i for i, o in enumerate(outcomes) if len(o) > 3 and o[3]]
    if touched:
        raise AssertionError(
            f"the call changed the model's shards, grads, buffers, modes or RNG state on rank(s) {touched}"
        )
    kinds = [o[0] for o in outcomes]
    if kinds == ["ok", "ok"]:
        c.expect([o[1] for o in outcomes], oracle)
        return "works", ""
    if kinds == ["ValueError", "ValueError"] and c.word is not None:
        words = (c.word,) if isinstance(c.word, str) else c.word
        missing = [o[1] for o in outcomes if not any(is_word(w, o[1]) for w in words)]
        if not missing:
            return "refused", outcomes[0][1]
        raise AssertionError(f"ValueError not naming {c.word!r}: {missing[0]}")
    details = "; ".join(
        f"rank {i}: {o[0]}: {o[1] if o[0] != 'ok' else '(a value)'}" for i, o in enumerate(outcomes)
    )
    if c.word is None and kinds == ["ValueError", "ValueError"]:
        raise AssertionError(f"a plain call refused (it must work): {details}")
    raise AssertionError(details)


def _selected(request):
    names = []
    for item in request.session.items:
        spec = getattr(item, "callspec", None)
        if item.module is not None and item.module.__name__ == __name__ and spec and "name" in spec.params:
            names.append(spec.params["name"])
    return names or list(CASES)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    names = _selected(request)
    ranks = run_ranks(tmp_path_factory.mktemp("ranks"), names)
    return ranks, Oracle()


@pytest.mark.parametrize("name", list(CASES))
def test_option_on_two_fsdp_ranks(name, outcomes):
    ranks, oracle = outcomes
    judge(name, [r.get(name) for r in ranks], oracle)
