"""Warm-started λ₁: crossings found, and HVPs per record warm vs cold (Monitor, issues 15 and 19).

Part 1, crossings (``lanczos_eigsh``, the solver behind ``hessian_topk`` and ``Monitor``): λ₁ = 1,
λ₂ = 0.95 and a bulk, with the warm start v0 = λ₂'s eigenvector (the previous record's top
eigenvector has become the second: a crossing) or v0 = λ₁'s eigenvector moved by 0.05 in a
random direction (no crossing). Spectra: a uniform bulk in [0, 0.9] (n = 300 and 2,000) and
classifier-like ones (9 outliers uniform in [0.1, 0.9], a bulk exponential with mean 0.01).
Diagonal matrices: Lanczos and the Gaussian parts of the starts are invariant under rotations,
so a diagonal H is as good as any with the same spectrum. Counted: starts returning λ₂ (wrong
by more than tol) and products, for cold starts, the warm start (v0 + 0.3 · a standard Gaussian
vector, default basis: ``v0_mix=0.3``) and the warm start before issue 19 (v0 + 0.1 · a random
*unit* vector, basis 8: ``v0_mix=0.1/√n``, ``ncv=8``).

Part 2, an edge-of-stability run: full-batch gradient descent with step size η on a tanh MLP
(64-32-32-10, MSE on one-hot targets, 500 of scikit-learn's digits), where λ₁ rises to 2/η and
hovers there (Cohen et al. 2021, arXiv 2103.00065). Every ``every`` steps monitors record λ₁ of
the same model at the same tolerance: cold starts (hessian_topk's defaults), warm starts (the
Monitor's default) and the warm start before issue 19. Prints HVPs per record and the largest
disagreement of the warm λ₁ with the cold one.

Usage: ``python benchmarks/bench_monitor_warmstart.py [--trials 200] [--steps 400] [--every 10]
[--lr 0.2] [--skip-run] [--skip-crossings]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from torch import nn

from flatness import Monitor
from flatness.algorithms import lanczos_eigsh


def spectrum(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(10_000 + seed)
    if kind == "uniform":
        return np.concatenate([[1.0, 0.95], rng.uniform(0.0, 0.9, n - 2)])
    return np.concatenate([[1.0, 0.95], rng.uniform(0.1, 0.9, 9), rng.exponential(0.01, n - 11)])


def crossing_trials(
    kind: str, n: int, trials: int, tol: float, variant: str, crossing: bool
) -> tuple[int, float]:
    """(starts returning a wrong λ₁, mean products) over ``trials`` spectra and starts."""
    wrong, products = 0, []
    for t in range(trials):
        d = torch.tensor(spectrum(kind, n, t))
        g = torch.Generator().manual_seed(t)
        u = torch.zeros(n, dtype=torch.float64)
        if crossing:
            u[1] = 1.0  # the previous top eigenvector is now λ₂'s
        else:
            u[0] = 1.0
            drift = torch.randn(n, generator=g, dtype=torch.float64)
            u += 0.05 * drift / drift.norm()
        options: dict = {"tol": tol, "seed": 1 + t}
        if variant == "warm":
            options["v0"] = u
        elif variant == "warm before #19":
            options.update(v0=u, v0_mix=0.1 / math.sqrt(n), ncv=8)
        res = lanczos_eigsh(lambda v, d=d: d * v, n, 1, **options)
        products.append(res.n_matvec)
        wrong += abs(float(res.eigenvalues[0]) - 1.0) > tol
    return wrong, statistics.mean(products)


def crossings(trials: int, tol: float) -> dict:
    print(f"crossings: lambda_1 = 1, lambda_2 = 0.95, tol {tol:g}, {trials} spectra and starts each")
    print(
        f"{'spectrum':<22}{'start':<18}{'crossing: wrong':>16}{'HVPs':>7}{'no crossing: wrong':>20}{'HVPs':>7}"
    )
    out = {}
    for kind, n in [("uniform", 300), ("uniform", 2000), ("classifier", 300), ("classifier", 2000)]:
        for variant in ("cold", "warm", "warm before #19"):
            w, p = crossing_trials(kind, n, trials, tol, variant, crossing=True)
            wn, pn = crossing_trials(kind, n, trials, tol, variant, crossing=False)
            name = f"{kind}, n = {n}"
            print(
                f"{name:<22}{variant:<18}{w:>10}/{trials:<5}{p:7.1f}{wn:>14}/{trials:<5}{pn:7.1f}", flush=True
            )
            out[(kind, n, variant)] = (w, p, wn, pn)
    return out


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).sum(1).mean()


def edge_of_stability(args: argparse.Namespace) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[: args.n] / 16.0, dtype=torch.float32)
    y = nn.functional.one_hot(torch.tensor(digits.target[: args.n]), 10).float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    old = {"ncv": 8, "v0_mix": 0.1 / math.sqrt(n_params)}

    variants = {}
    for tol in args.tol:
        top = {"tol": tol}
        variants[(tol, "cold")] = Monitor(
            mse, (x, y), every=args.every, measures=["top_eigenvalue"], options={"top_eigenvalue": top},
            warm_start=False, learning_rate=args.lr,
        )  # fmt: skip
        variants[(tol, "warm (Monitor default)")] = Monitor(
            mse, (x, y), every=args.every, measures=["top_eigenvalue"], options={"top_eigenvalue": top}
        )  # fmt: skip
        variants[(tol, "warm before #19")] = Monitor(
            mse, (x, y), every=args.every, measures=["top_eigenvalue"], options={"top_eigenvalue": {**top, **old}}
        )  # fmt: skip
    hvps: dict[tuple, list[int]] = {key: [] for key in variants}
    seconds: dict[tuple, float] = dict.fromkeys(variants, 0.0)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        for key, monitor in variants.items():
            row = monitor.step(model)
            if row is not None:
                hvps[key].append(monitor.last_results["top_eigenvalue"].n_matvec)
                seconds[key] += row["time_s"]
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()

    print(
        f"\nedge of stability: GD, eta = {args.lr} (2/eta = {2 / args.lr:.2f}), {n_params} parameters, "
        f"{args.n} samples, {args.steps} steps, a record every {args.every} steps "
        f"({time.perf_counter() - t0:.0f} s in all)"
    )
    first = variants[(args.tol[0], "cold")].records
    lams = [r["top_eigenvalue"] for r in first]
    print("lambda_1 over the run: " + " ".join(f"{v:.2f}" for v in lams[:: max(1, len(lams) // 15)]))
    out = {}
    print(f"\n{'tol':>6}  {'start':<24}{'HVPs/record':>12}{'median':>8}{'s/record':>10}{'cold/this':>10}")
    for tol in args.tol:
        base = statistics.mean(hvps[(tol, "cold")][1:])
        cold = variants[(tol, "cold")].records
        for name in ("cold", "warm (Monitor default)", "warm before #19"):
            counts = hvps[(tol, name)][1:]  # the first record is a cold start for every variant
            mean = statistics.mean(counts)
            per = seconds[(tol, name)] / len(hvps[(tol, name)])
            print(
                f"{tol:6.0e}  {name:<24}{mean:12.1f}{statistics.median(counts):8.1f}{per:10.3f}{base / mean:10.2f}"
            )
            out[(tol, name)] = mean
            if name != "cold":
                worst = max(
                    abs(w["top_eigenvalue"] - c["top_eigenvalue"]) / abs(c["top_eigenvalue"])
                    for w, c in zip(variants[(tol, name)].records, cold, strict=True)
                )
                print(f"{'':6}  {'':<24}largest |warm - cold| / cold lambda_1: {worst:.1e}")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--tol", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--skip-run", action="store_true", help="only the crossings (part 1)")
    ap.add_argument("--skip-crossings", action="store_true", help="only the training run (part 2)")
    args = ap.parse_args(argv)
    out = {} if args.skip_crossings else {"crossings": crossings(args.trials, args.tol[0])}
    if not args.skip_run:
        out["run"] = edge_of_stability(args)
    return out


if __name__ == "__main__":
    main()
