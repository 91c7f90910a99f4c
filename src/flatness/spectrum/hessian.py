"""Model-level Hessian spectra: top-k eigenpairs, trace and spectral density of ∇²L(θ).

Each function binds ``(model, loss_fn, data)`` into the exact full-data objective
(:class:`flatness.Objective`, SPEC §0) and runs a numerical routine of
:mod:`flatness.spectrum` on its Hessian-vector product, on the model's device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from flatness._guard import model_guard
from flatness._progress import ProgressArg
from flatness.objective import Objective, check_options, check_positive
from flatness.operator import HessianOperator
from flatness.results import Result
from flatness.spectrum.density import slq_density
from flatness.spectrum.lanczos import Which, check_which, lanczos_eigsh
from flatness.spectrum.trace import METHODS, trace_estimate

__all__ = [
    "HessianDensity",
    "HessianTopK",
    "HessianTrace",
    "hessian_density",
    "hessian_topk",
    "hessian_trace",
]


@dataclasses.dataclass(frozen=True)
class HessianTopK(Result):
    """The k extreme eigenpairs of the loss Hessian, with their certificates.

    Attributes:
        eigenvalues: (k,) sorted by ``which``.
        eigenvectors: (k, n) unit rows in θ's flat order (see :meth:`eigenvector_dicts`).
        residuals: (k,) true residuals ‖H v − λ v‖.
        n_hvp: Hessian-vector products used (one full data pass each).
        converged: every pair met ``residual ≤ tol · max(|λ|, tiny)``.
        n_restarts: thick restarts of the Lanczos basis.
        which, k, tol, ncv: options used.
        names, shapes: θ's parameter names and shapes.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    n_hvp: int
    converged: bool
    n_restarts: int
    which: str
    k: int
    tol: float
    ncv: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def eigenvector_dicts(self) -> list[dict[str, torch.Tensor]]:
        """The eigenvectors as parameter-shaped dicts keyed like ``model.named_parameters()``."""
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        out = []
        for vec in self.eigenvectors:
            pieces = torch.split(vec, sizes)
            out.append({n: p.view(s) for n, p, s in zip(self.names, pieces, self.shapes, strict=True)})
        return out


@dataclasses.dataclass(frozen=True)
class HessianTrace(Result):
    """An estimate of tr(∇²L(θ)) with its standard error.

    Attributes:
        estimate, std_error: the estimate and its standard error.
        n_hvp: Hessian-vector products used.
        method: ``"hutch++"`` or ``"hutchinson"``; n_probes, sketch_size: its split of n_hvp.
    """

    estimate: float
    std_error: float
    n_hvp: int
    method: str
    n_probes: int
    sketch_size: int


@dataclasses.dataclass(frozen=True)
class HessianDensity(Result):
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature.

    Attributes:
        grid, density: φ(t) on the grid (integrates to 1 over a covering grid).
        nodes, weights: (n_runs, n_steps) Ritz values and quadrature weights (sum 1).
        n_hvp: Hessian-vector products used.
        sigma, n_runs, n_steps: options used.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    n_hvp: int
    sigma: float
    n_runs: int
    n_steps: int


def _operator(model: nn.Module, loss_fn: Any, data: Any, options: dict[str, Any]) -> HessianOperator:
    return HessianOperator.from_objective(Objective(model, loss_fn, data, **options))


def hessian_topk(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    k: int = 1,
    *,
    which: Which = "largest",
    tol: float = 1e-3,
    max_hvp: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
    progress: ProgressArg = False,
    **options: Any,
) -> HessianTopK:
    """The k largest / smallest / largest-magnitude eigenpairs of the loss Hessian.

    .. math:: \\nabla^2 L(\\theta)\\, v_i = \\lambda_i v_i,\\qquad
        \\|\\nabla^2 L\\, v_i - \\lambda_i v_i\\| \\le \\mathrm{tol}\\cdot\\max(|\\lambda_i|, \\mathrm{tiny})

    Thick-restart Lanczos with full reorthogonalization (Lanczos 1950; Wu & Simon 2000), see
    :func:`flatness.spectrum.lanczos_eigsh`; replaces the power iteration with deflation of
    PyHessian (Yao et al. 2020, arXiv 1912.07145). Memory: (2m + 1) vectors of n numbers,
    m = ``ncv`` = max(2k + 1, 20). Like every single-vector Krylov method (ARPACK included), an
    exactly repeated eigenvalue may be returned fewer times than its multiplicity.

    Args:
        model, loss_fn, data: the objective (SPEC §0).
        k: how many eigenpairs, 1 ≤ k < n.
        which: ``"largest"``, ``"smallest"`` (algebraic) or ``"magnitude"``.
        tol: relative residual tolerance (> 0).
        max_hvp: HVP budget (default 100·m); ``converged=False`` if it runs out.
        ncv: Lanczos basis size m (k < m ≤ n).
        seed: seed of the starting vector.
        progress: ``True``, a callable ``(step, total, info)``, or False.
        **options: forwarded to :class:`flatness.Objective` (params, reduction, dtype, train,
            batch_loss, max_batches, batch_size, hvp_mode, data_seed).

    Returns:
        :class:`HessianTopK`.

    Raises:
        ValueError, TypeError: naming the argument, for k ∉ [1, n), tol ≤ 0, unknown ``which``,
            bad ``max_hvp`` / ``ncv`` and the objective's own checks.
    """
    check_options(hessian_topk, options)
    check_which(which)
    check_positive("tol", tol)
    check_positive("max_hvp", max_hvp, integer=True, allow_none=True)
    with model_guard(model):
        op = _operator(model, loss_fn, data, options)
        obj = op.objective
        res = lanczos_eigsh(
            op.matvec,
            obj.n,
            k,
            which=which,
            tol=tol,
            ncv=ncv,
            max_matvec=max_hvp,
            seed=seed,
            device=obj.device,
            dtype=obj.dtype,
            progress=progress,
        )
        return HessianTopK(
            eigenvalues=res.eigenvalues,
            eigenvectors=res.eigenvectors,
            residuals=res.residuals,
            n_hvp=res.n_matvec,
            converged=res.converged,
            n_restarts=res.n_restarts,
            which=which,
            k=k,
            tol=float(tol),
            ncv=res.ncv,
            names=tuple(obj.names),
            shapes=tuple(tuple(s) for s in obj.shapes),
        )


def hessian_trace(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    n_hvp: int = 100,
    seed: int = 0,
    progress: ProgressArg = False,
    **options: Any,
) -> HessianTrace:
    """tr(∇²L(θ)) by Hutch++ or Hutchinson with Rademacher probes.

    .. math:: \\mathrm{tr}(H) \\approx \\mathrm{tr}(Q^\\top H Q)
        + \\tfrac1l \\sum_i g_i^\\top (I-QQ^\\top) H (I-QQ^\\top) g_i

    Hutch++: Meyer, Musco, Musco & Woodruff 2021, arXiv 2010.09649; Hutchinson 1989;
    PyHessian (Yao et al. 2020, arXiv 1912.07145) uses Hutchinson.

    Args:
        model, loss_fn, data: the objective (SPEC §0).
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        n_hvp: the budget of HVPs (≥ 4 for Hutch++, ≥ 2 for Hutchinson).
        seed: seed of the probes.
        progress: opt-in progress reporting.
        **options: forwarded to :class:`flatness.Objective`.

    Returns:
        :class:`HessianTrace`.

    Raises:
        ValueError, TypeError: for an unknown method, a bad n_hvp, or the objective's checks.
    """
    check_options(hessian_trace, options)
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; expected one of {METHODS}")
    check_positive("n_hvp", n_hvp, integer=True)
    with model_guard(model):
        op = _operator(model, loss_fn, data, options)
        obj = op.objective
        try:
            res = trace_estimate(
                op.matvec,
                obj.n,
                method=method,
                n_matvec=n_hvp,
                seed=seed,
                device=obj.device,
                dtype=obj.dtype,
                progress=progress,
            )
        except ValueError as e:
            raise ValueError(str(e).replace("n_matvec", "n_hvp")) from None
        return HessianTrace(res.estimate, res.std_error, res.n_matvec, method, res.n_probes, res.sketch_size)


def hessian_density(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    n_runs: int = 10,
    n_steps: int = 80,
    sigma: float | None = None,
    grid: torch.Tensor | int = 1000,
    seed: int = 0,
    progress: ProgressArg = False,
    **options: Any,
) -> HessianDensity:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature.

    .. math:: \\phi(t) = \\frac1{n_v}\\sum_{r}\\sum_j \\tau^{(r)}_j g_\\sigma(t - \\lambda^{(r)}_j)

    Ghorbani, Krishnan & Xiao 2019 (arXiv 1901.10159); Lin, Saad & Yang 2016 (arXiv 1308.5467).
    Cost: at most n_runs · n_steps HVPs; memory n_steps vectors of n numbers.

    Args:
        model, loss_fn, data: the objective (SPEC §0).
        n_runs: random start vectors.
        n_steps: Lanczos steps per run.
        sigma: Gaussian width (default: 1/100 of the span of the nodes).
        grid: points (1-D tensor) or their number over [min node − 5σ, max node + 5σ].
        seed: seed of the start vectors.
        progress: opt-in progress reporting.
        **options: forwarded to :class:`flatness.Objective`.

    Returns:
        :class:`HessianDensity`.

    Raises:
        ValueError, TypeError: for bad n_runs, n_steps, sigma, grid, or the objective's checks.
    """
    check_options(hessian_density, options)
    with model_guard(model):
        op = _operator(model, loss_fn, data, options)
        obj = op.objective
        res = slq_density(
            op.matvec,
            obj.n,
            n_runs=n_runs,
            n_steps=n_steps,
            sigma=sigma,
            grid=grid,
            seed=seed,
            device=obj.device,
            dtype=obj.dtype,
            progress=progress,
        )
        return HessianDensity(
            res.grid, res.density, res.nodes, res.weights, res.n_matvec, res.sigma, res.n_runs, res.n_steps
        )
