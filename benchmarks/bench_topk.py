"""λ₁ to tol 1e-3: products and wall time of hessian_topk against PyHessian, one batch.

For each problem, in one process and interleaved rounds (the machine may be shared):

- ``flatness``: ``hessian_topk(k=1, tol=1e-3)`` — Lanczos that checks its residual estimate after
  every product and confirms the true residual ‖Hv − λv‖ ≤ 1e-3·|λ| before returning; with one
  batch the gradient graph is kept across products (``graph_reused``);
- ``flatness (no reuse)``: the same with ``reuse_graph=False`` (a forward and two backward passes
  per product);
- ``PyHessian``: ``pyhessian.hessian(model, criterion, data=batch).eigenvalues(top_n=1,
  tol=...)`` (power iteration that stops when λ changes by < tol relatively; the graph is kept),
  if the package is installed, else the same power iteration inline; at tol 1e-3 and at tighter
  tolerances (``--pyhessian-tols``), to compare at equal eigenvalue accuracy.

Every round draws one start vector v0 (seeded by the round) for all flatness runs, and reports the
Krylov minimum: the first step at which the top Ritz pair of the Krylov space of that v0 passes
the same residual test (plain Lanczos with full reorthogonalization, no guard, no restart) — the
fewest products after which any method returning Ritz pairs of that space can stop.

Accuracy: |λ − λ_ref| / λ_ref against λ_ref from ``hessian_topk(tol=1e-9, dtype=float64)``, and
the true relative residual of the returned vector. Usage:
``python benchmarks/bench_topk.py [--rounds 5] [--problems digits,digits-untrained,cnn]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import cnn_problem, digits_problem

from flatness import HessianOperator, hessian_topk
from flatness.algorithms import lanczos_eigsh

try:
    import pyhessian

    pyh = sys.modules["pyhessian.hessian"]  # the module (the package re-exports the class)
except ImportError:  # reproduce its power iteration inline
    pyhessian = None


def pyhessian_top(model, loss_fn, batch, tol):
    """PyHessian's top eigenvalue (and vector, flat) and the products it used."""
    count = [0]
    if pyhessian is not None:
        original = pyh.hessian_vector_product

        def counted(*args):
            count[0] += 1
            return original(*args)

        pyh.hessian_vector_product = counted
        try:
            h = pyh.hessian(model, loss_fn, data=batch, cuda=False)
            vals, vecs = h.eigenvalues(top_n=1, tol=tol)
        finally:
            pyh.hessian_vector_product = original
            model.zero_grad(set_to_none=True)  # PyHessian leaves .grad with a graph behind
        return vals[0], torch.cat([t.reshape(-1) for t in vecs[0]]).detach(), count[0]
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model(batch[0]), batch[1])
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    lam = None
    for _ in range(100):
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        v = [x / (norm + 1e-6) for x in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        count[0] += 1
        new = float(sum((a * b).sum() for a, b in zip(hv, v, strict=True)))
        v = [x.detach() for x in hv]
        if lam is not None and abs(lam - new) / (abs(lam) + 1e-6) < tol:
            lam = new
            break
        lam = new
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    return lam, torch.cat([x.reshape(-1) for x in v]).detach() / norm, count[0]


def krylov_minimum(op: HessianOperator, v0: torch.Tensor, tol: float, max_steps: int = 60) -> int:
    """The first step j at which the top Ritz pair of K_j(H, v0) has residual ≤ tol·|θ|.

    The library's Lanczos with full reorthogonalization, no guard (``min_steps=1``) and no
    restart (a basis of ``max_steps``), its products stored so that the confirmation costs
    nothing: the fewest products after which a method returning Ritz pairs of this space can
    stop under the same test.
    """
    res = lanczos_eigsh(op, k=1, tol=tol, v0=v0, ncv=max_steps, min_steps=1, keep_products=True)
    return res.n_matvec


def rel_residual(op: HessianOperator, lam: float, vec: torch.Tensor) -> float:
    vec = vec.to(op.dtype) / vec.norm()
    return float((op @ vec - lam * vec).norm() / abs(lam))


def fmt(xs: list[float], scale: float = 1.0, digits: int = 3) -> str:
    v = [x * scale for x in xs]
    return f"{statistics.median(v):.{digits}f} [{min(v):.{digits}f}-{max(v):.{digits}f}]"


PROBLEMS = {
    "digits": lambda: digits_problem(),
    "digits-untrained": lambda: digits_problem(train_steps=0),
    "digits-cnn": lambda: digits_problem(arch="cnn"),
    "cnn": lambda: cnn_problem(n=512, batch_size=512),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--problems", default="digits,digits-cnn,digits-untrained,cnn")
    parser.add_argument("--pyhessian-tols", default="1e-3,1e-4,1e-5")
    args = parser.parse_args()
    ptols = [float(t) for t in args.pyhessian_tols.split(",")]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, pyhessian: {pyhessian is not None}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (medians [min-max] over rounds)"
    )
    for name in args.problems.split(","):
        model, loss_fn, data = PROBLEMS[name]()
        batch = data[0]
        n = sum(p.numel() for p in model.parameters())
        ref = float(hessian_topk(model, loss_fn, batch, tol=1e-9, dtype=torch.float64).eigenvalues[0])
        op = HessianOperator(model, loss_fn, batch)
        rows: dict[str, dict[str, list[float]]] = {}
        runs = {"flatness": {}, "flatness (no reuse)": {"reuse_graph": False}}
        krylov = []
        for r in range(args.rounds):
            v0 = torch.randn(n, generator=torch.Generator().manual_seed(r))
            for label, options in runs.items():
                t0 = time.perf_counter()
                res = hessian_topk(model, loss_fn, batch, k=1, tol=args.tol, v0=v0, **options)
                t = time.perf_counter() - t0
                lam, vec = float(res.eigenvalues[0]), res.eigenvectors[0]
                row = rows.setdefault(label, {"time": [], "hvp": [], "err": [], "res": []})
                row["hvp"].append(res.n_matvec)
                row["time"].append(t)
                row["err"].append(abs(lam - ref) / ref)
                row["res"].append(rel_residual(op, lam, vec))
                assert res.graph_reused == (label == "flatness"), (label, res.graph_reused)
            with op.reusing_graph():
                krylov.append(krylov_minimum(op, v0, args.tol))
            for ptol in ptols:
                torch.manual_seed(r)
                t0 = time.perf_counter()
                lam, vec, count = pyhessian_top(model, loss_fn, batch, ptol)
                t = time.perf_counter() - t0
                row = rows.setdefault(
                    f"PyHessian tol={ptol:g}", {"time": [], "hvp": [], "err": [], "res": []}
                )
                row["hvp"].append(count)
                row["time"].append(t)
                row["err"].append(abs(lam - ref) / ref)
                row["res"].append(rel_residual(op, lam, vec))
        print(f"\n{name}: n = {n} parameters, one batch of {len(batch[0])}, λ₁ = {ref:.6g}, tol = {args.tol}")
        print(f"  {'method':24s} {'HVPs':>14s} {'time ms':>22s} {'|λ-λ₁|/λ₁':>30s} {'rel. residual':>30s}")
        print(
            f"  Krylov minimum (same start vectors, top Ritz pair's residual ≤ tol): "
            f"{fmt(krylov, digits=0)} products"
        )
        base = statistics.median(rows[f"PyHessian tol={ptols[0]:g}"]["time"])
        for label, row in rows.items():
            print(
                f"  {label:24s} {fmt(row['hvp'], digits=0):>14s} {fmt(row['time'], 1e3, 1):>22s} "
                f"{fmt(row['err'], digits=6):>30s} {fmt(row['res'], digits=6):>30s}"
                f"   time / PyHessian(tol={ptols[0]:g}) {statistics.median(row['time']) / base:.2f}"
            )


if __name__ == "__main__":
    main()
