"""Quality of Keskar's φ at exact minima: the default φ over the exact φ, and its cost.

At a minimum of a convex quadratic f(x + y) = f(x) + ½ yᵀHy the maximum over the box
|y_i| ≤ ε(|x_i| + 1) lies at a corner, so for dimension ≤ 12 the exact φ is a search over all
2ⁿ corners. Problems: 50 random non-diagonal PSD matrices H = BBᵀ/n (B Gaussian n×n,
n uniform in 2..12), x Gaussian, ε = 1e-3, through ``flatness.sharpness`` on a model whose
full-data loss is exactly the quadratic (the library's own path, no shortcut). For each start
(``start="keskar"``, one L-BFGS-B run from the gradient-sign vertex as before; ``start="auto"``,
the new default) it prints the mean, minimum and quartiles of φ / φ_exact over the problems and
over ``--seeds`` seeds each, and the mean number of loss+gradient evaluations (``n_evals``, the
one at x included). A second table repeats it away from the minimum (x ≠ x*, the gradient
matters), where the exact maximum is still at a corner.

A third table runs the held-out families of ``tests/test_keskar_quality.py`` (72 fixed problems,
dimension 3–12, six spectra, three rotations, four kinds of centre; written after the default
start was tuned) for both starts: the mean and worst ratio per spectrum and the evaluations.

Run from the repository root: ``python benchmarks/bench_keskar_quality.py [--problems 50] [--seeds 3]``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import numpy as np
import torch
from torch import nn

from flatness import sharpness

D = torch.float64


class Quadratic(nn.Module):
    """f(θ) = ½ (θ − x*)ᵀ H (θ − x*) for every sample (the loss is the batch mean)."""

    def __init__(self, H: torch.Tensor, x_star: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("H", H)
        self.register_buffer("x_star", x_star)
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.theta - self.x_star
        return (0.5 * d @ self.H @ d).expand(x.shape[0])


def mean_loss(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return out.mean()


DATA = (torch.zeros(2, 1, dtype=D), torch.zeros(2, dtype=D))


def problem(index: int, at_min: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(index)
    n = int(rng.integers(2, 13))
    b = rng.standard_normal((n, n))
    H = torch.tensor(b @ b.T / n, dtype=D)
    x = torch.tensor(rng.standard_normal(n), dtype=D)
    if at_min:
        return H, x, x
    # A gradient comparable to the curvature's pull across the box: both parts matter.
    step = torch.tensor(rng.standard_normal(n), dtype=D) * 1e-3 * rng.uniform(0.0, 2.0)
    return H, x - step, x  # x* = x − step, θ = x


def exact_phi(H: torch.Tensor, x_star: torch.Tensor, theta: torch.Tensor, epsilon: float) -> float:
    e = epsilon * (theta.abs() + 1)
    d = theta - x_star
    f0 = float(0.5 * d @ H @ d)
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=len(e))), dtype=D) * e
    pts = d + corners
    fmax = float((0.5 * torch.einsum("ij,jk,ik->i", pts, H, pts)).max())
    return (fmax - f0) / (1 + f0) * 100


def run(problems: int, seeds: int, at_min: bool, epsilon: float) -> None:
    ratios: dict[str, list[float]] = {"keskar": [], "auto": []}
    evals: dict[str, list[int]] = {"keskar": [], "auto": []}
    for i in range(problems):
        H, x_star, theta = problem(i, at_min)
        exact = exact_phi(H, x_star, theta, epsilon)
        model = Quadratic(H, x_star, theta)
        for start in ratios:
            for seed in range(seeds):
                res = sharpness(model, mean_loss, DATA, epsilon=epsilon, start=start, seed=seed)
                ratios[start].append(res.value / exact)
                evals[start].append(res.n_evals)
    where = "at the minimum" if at_min else "away from the minimum"
    print(f"\n{problems} problems x {seeds} seeds, {where} (epsilon={epsilon}):")
    print(f"{'start':>8} {'mean ratio':>11} {'min':>6} {'q25':>6} {'median':>7} {'mean n_evals':>13}")
    for start, r in ratios.items():
        q = statistics.quantiles(r, n=4)
        print(
            f"{start:>8} {statistics.mean(r):11.4f} {min(r):6.3f} {q[0]:6.3f} {q[1]:7.3f} "
            f"{statistics.mean(evals[start]):13.2f}"
        )
    print(
        f"auto / keskar: ratio {statistics.mean(ratios['auto']) / statistics.mean(ratios['keskar']):.3f}x, "
        f"evaluations {statistics.mean(evals['auto']) / statistics.mean(evals['keskar']):.2f}x"
    )


def run_held_out() -> None:
    """The fixed held-out problems of tests/test_keskar_quality.py, per spectrum."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import test_keskar_quality as held_out

    print(f"\nheld-out families ({len(held_out.CASES)} problems, tests/test_keskar_quality.py):")
    print(f"{'start':>8} {'spectrum':>13} {'mean ratio':>11} {'worst':>6} {'mean n_evals':>13}")
    for start in ("keskar", "auto"):
        rows: dict[str, list[tuple[float, int]]] = {}
        for seed, n, spectrum, rotation, centre in held_out.CASES:
            h, x, epsilon = held_out.held_out_problem(seed, n, spectrum, rotation, centre)
            exact = held_out.exact_phi(h, x, epsilon)
            H, xt = torch.tensor(h, dtype=D), torch.tensor(x, dtype=D)
            res = sharpness(Quadratic(H, xt, xt), mean_loss, DATA, epsilon=epsilon, seed=seed, start=start)
            rows.setdefault(spectrum, []).append((res.value / exact, res.n_evals))
        rows["all"] = [r for v in list(rows.values()) for r in v]
        for spectrum, v in rows.items():
            ratios = [r for r, _ in v]
            print(
                f"{start:>8} {spectrum:>13} {statistics.mean(ratios):11.4f} {min(ratios):6.3f} "
                f"{statistics.mean(e for _, e in v):13.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.problems, args.seeds, True, args.epsilon)
    run(args.problems, args.seeds, False, args.epsilon)
    run_held_out()


if __name__ == "__main__":
    main()
