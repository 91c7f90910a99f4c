"""HVPs and wall time to the top-k Hessian eigenpairs of the benchmark CNN at tol 1e-3.

flatness (thick-restart Lanczos) vs scipy eigsh (ARPACK, on HessianOperator.to_scipy()) vs
power iteration with deflation (PyHessian, Yao et al. 2020, arXiv 1912.07145), the latter run
twice: with PyHessian's stopping rule (relative eigenvalue change < tol) and until the true
residual ‖Hv − λv‖ ≤ tol·|λ| (equal accuracy to the others). Accuracy of every output is checked
by its true residuals. Usage: ``python benchmarks/bench_spectrum.py [n_samples]`` (default 512
samples of cnn_problem() to fit 2 CPU cores; same model).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import cnn_problem
from scipy.sparse.linalg import eigsh

from flatness import HessianOperator, hessian_topk


def power_deflation(op: HessianOperator, k: int, tol: float, rule: str, max_iter: int = 300, seed: int = 0):
    """PyHessian's power iteration with deflation against the found eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    vecs: list[torch.Tensor] = []
    vals: list[float] = []
    n = op.shape[0]
    for _ in range(k):
        v = torch.randn(n, generator=g, dtype=op.dtype).to(op.device)
        lam_prev = None
        for _ in range(max_iter):
            for u in vecs:
                v = v - (u @ v) * u
            v = v / v.norm()
            hv = op.matvec(v)
            for u in vecs:  # deflate: (H − Σ λ u uᵀ) v restricted to the complement
                hv = hv - (u @ hv) * u
            lam = float(v @ hv)
            if rule == "pyhessian":
                done = lam_prev is not None and abs(lam - lam_prev) / (abs(lam_prev) + 1e-6) < tol
            else:
                done = float((hv - lam * v).norm()) <= tol * abs(lam)
            lam_prev = lam
            v = hv
            if done:
                break
        v = v / v.norm()
        vecs.append(v)
        vals.append(lam)
    return np.array(vals), torch.stack(vecs)


def true_residuals(op: HessianOperator, vals, vecs) -> np.ndarray:
    return np.array(
        [
            float((op.matvec(v.to(op.device)) - float(lam) * v.to(op.device)).norm() / abs(float(lam)))
            for lam, v in zip(vals, vecs, strict=True)
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("samples", type=int, nargs="?", default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    n_samples = args.samples
    model, loss_fn, data = cnn_problem(n=n_samples, device=args.device)
    tol = 1e-3
    print(f"cnn_problem(n={n_samples}, device={args.device}), tol={tol}")
    print(f"{'method':28s} {'k':>3s} {'HVPs':>6s} {'time s':>8s} {'max rel residual':>17s}")
    for k in (1, 10):
        t0 = time.perf_counter()
        res = hessian_topk(model, loss_fn, data, k=k, tol=tol)
        t_ours = time.perf_counter() - t0
        op = HessianOperator(model, loss_fn, data)
        r_ours = true_residuals(op, res.eigenvalues, res.eigenvectors)
        print(f"{'flatness lanczos':28s} {k:3d} {res.n_matvec:6d} {t_ours:8.1f} {r_ours.max():17.2e}")

        op = HessianOperator(model, loss_fn, data)
        t0 = time.perf_counter()
        w, U = eigsh(op.to_scipy(), k=k, which="LA", tol=tol)
        t_e = time.perf_counter() - t0
        n_e = op.n_matvec
        r_e = true_residuals(op, w, torch.from_numpy(U.T.copy()).to(op.dtype))
        print(f"{'scipy eigsh (ARPACK)':28s} {k:3d} {n_e:6d} {t_e:8.1f} {r_e.max():17.2e}")

        for rule in ("pyhessian", "residual"):
            op = HessianOperator(model, loss_fn, data)
            t0 = time.perf_counter()
            vals, vecs = power_deflation(op, k, tol, rule)
            t_p = time.perf_counter() - t0
            n_p = op.n_matvec
            r_p = true_residuals(op, vals, vecs)
            name = f"power+deflation ({rule})"
            print(f"{name:28s} {k:3d} {n_p:6d} {t_p:8.1f} {r_p.max():17.2e}")
        top = np.sort(w)[::-1]
        print(
            f"  eigenvalues agree (flatness vs eigsh): max rel diff "
            f"{np.max(np.abs(res.eigenvalues.cpu().numpy() - top) / np.abs(top)):.1e}"
        )


if __name__ == "__main__":
    main()
