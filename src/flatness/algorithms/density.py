"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

For each of n_v random unit vectors v, m Lanczos steps give T_m = S diag(λ) Sᵀ; the Ritz values
λ_j with weights τ_j = S_{1j}² are the m-point Gauss quadrature of the spectral measure
μ_v = Σ_i (vᵀq_i)² δ(t − λ_i(H)), whose mean over v is the eigenvalue density. Smoothing with a
Gaussian g_σ gives

    φ(t) = (1/n_v) Σ_runs Σ_j τ_j g_σ(t − λ_j),

which integrates to 1; Σ τ_j λ_j^p is exact for p ≤ 2m − 1, so (1/n_v) Σ τ λ and Σ τ λ² are
unbiased estimates of tr(H)/n and tr(H²)/n (Rademacher v/√n). Lin, Saad & Yang 2016,
"Approximating spectral densities of large matrices", SIAM Review 58(1), arXiv 1308.5467;
Ghorbani, Krishnan & Xiao 2019, arXiv 1901.10159.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from flatness._utils.progress import Progress, ProgressArg
from flatness._utils.validate import check_positive
from flatness.algorithms._linalg import as_operator, generator
from flatness.algorithms.lanczos import lanczos_tridiagonal, resolve_basis_device
from flatness.results import Result

__all__ = ["DensityResult", "slq_density"]


@dataclasses.dataclass(frozen=True)
class DensityResult(Result):
    """A smoothed eigenvalue density and the quadrature it comes from.

    Attributes:
        grid: (g,) points t where the density is evaluated.
        density: (g,) φ(t); its trapezoidal integral over a grid that covers the nodes ± 5σ is 1.
        nodes: (n_runs, n_steps) Ritz values λ_j of each run (NaN-padded if a run stopped early
            because its Krylov space became invariant).
        weights: (n_runs, n_steps) τ_j / n_runs (0 where padded); they sum to 1.
        n_matvec: operator products used.
        sigma: the Gaussian width used.
        n_runs, n_steps: the options used.

    Examples:
        >>> import torch
        >>> from flatness.algorithms import DensityResult, slq_density
        >>> res = slq_density(torch.eye(5, dtype=torch.float64), n_runs=1, n_steps=3)
        >>> isinstance(res, DensityResult), res.nodes.shape, round(res.weights.sum().item(), 6)
        (True, torch.Size([1, 3]), 1.0)
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    n_matvec: int
    sigma: float
    n_runs: int
    n_steps: int


def slq_density(
    A: Any,
    n: int | None = None,
    *,
    n_runs: int = 10,
    n_steps: int = 80,
    sigma: float | None = None,
    grid: torch.Tensor | int = 1000,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    progress: ProgressArg = False,
) -> DensityResult:
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    .. math::
        \\phi(t) = \\frac1{n_v}\\sum_{r=1}^{n_v}\\sum_{j=1}^{m} \\tau^{(r)}_j
        \\frac{1}{\\sigma\\sqrt{2\\pi}} e^{-(t-\\lambda^{(r)}_j)^2/2\\sigma^2}

    Lin, Saad & Yang 2016 (arXiv 1308.5467); Ghorbani, Krishnan & Xiao 2019 (arXiv 1901.10159).
    Memory: up to n_steps + 1 vectors of n numbers on ``basis_device`` (full
    reorthogonalization; allocated as the run goes, one run at a time).

    Args:
        A: the symmetric operator H (any form :func:`flatness.algorithms.as_operator` takes).
        n: size of H, for a plain ``matvec`` callable.
        n_runs: random start vectors n_v (Rademacher / √n).
        n_steps: Lanczos steps m per run (capped at n); cost n_runs · m matvecs at most.
        sigma: Gaussian width; default (λ_max − λ_min)/100 of the nodes (or 1e-3·max|λ| if 0).
        grid: the points t (a 1-D tensor), or how many points to spread over
            [min λ − 5σ, max λ + 5σ].
        seed: seed of the local generator.
        device: of the vectors (default: the operator's; CPU, float64 for callables).
        dtype: as ``device``.
        basis_device: where the Lanczos vectors live (default: ``device``), e.g. ``"cpu"``.
        progress: opt-in progress reporting.

    Returns:
        :class:`DensityResult` with grid, density, nodes, weights, n_matvec.

    Raises:
        ValueError, TypeError: for non-positive n_runs / n_steps / sigma, or a bad grid.

    Examples:
        >>> import torch
        >>> from flatness.algorithms import slq_density
        >>> H = torch.diag(torch.linspace(-1.0, 1.0, 40, dtype=torch.float64))
        >>> res = slq_density(H, n_runs=2, n_steps=10, grid=200)
        >>> res.density.shape, round(torch.trapezoid(res.density, res.grid).item(), 3), res.n_matvec
        (torch.Size([200]), 1.0, 20)
    """
    op = as_operator(A, n, device=device, dtype=dtype)
    n = op.n
    check_positive("n_runs", n_runs, integer=True)
    check_positive("n_steps", n_steps, integer=True)
    check_positive("sigma", sigma, allow_none=True)
    if isinstance(grid, int) and not isinstance(grid, bool):
        if grid < 2:
            raise ValueError(f"grid: got {grid} points; expected ≥ 2 (or a 1-D tensor of points)")
    elif not (isinstance(grid, torch.Tensor) and grid.ndim == 1 and grid.numel() >= 2):
        raise TypeError(f"grid: expected an int ≥ 2 or a 1-D tensor of ≥ 2 points, got {grid!r:.60}")
    steps = min(n_steps, n)
    bdev = resolve_basis_device(basis_device, op.space)
    gen = generator(seed)
    nodes = torch.full((n_runs, steps), math.nan, dtype=torch.float64)
    weights = torch.zeros(n_runs, steps, dtype=torch.float64)
    used = 0
    bar = Progress(progress, total=n_runs, desc="slq")
    try:
        for r in range(n_runs):
            v = op.space.rademacher(gen) / math.sqrt(n)
            alpha, beta, mv = lanczos_tridiagonal(op, v, steps, basis_device=bdev)
            used += mv
            T = torch.diag(alpha)
            if len(beta):
                T += torch.diag(beta, 1) + torch.diag(beta, -1)
            theta, S = torch.linalg.eigh(T)
            nodes[r, : len(theta)] = theta
            weights[r, : len(theta)] = S[0] ** 2 / n_runs
            bar.update(1)
    finally:
        bar.close()
    found = nodes[torch.isfinite(nodes)]
    lo, hi = float(found.min()), float(found.max())
    if sigma is None:
        sigma = (hi - lo) / 100 or 1e-3 * max(abs(lo), abs(hi), 1e-12)
    if isinstance(grid, torch.Tensor):
        t = grid.detach().double().cpu()
    else:
        t = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid, dtype=torch.float64)
    ok = weights > 0
    lam, tau = nodes[ok], weights[ok]
    g = torch.exp(-0.5 * ((t[:, None] - lam[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = g @ tau
    return DensityResult(t, density, nodes, weights, used, float(sigma), n_runs, steps)
