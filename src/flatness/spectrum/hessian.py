"""Model-level spectra: top-k eigenpairs, trace and spectral density of a curvature matrix.

Each function binds ``(model, loss_fn, data)`` into the exact full-data objective
(:class:`flatness.Objective`), builds the curvature operator named by ``curvature=`` (the
Hessian by default; the GGN, the Fisher or the empirical Fisher, see :mod:`flatness.operators`)
and runs :func:`flatness.topk`, :func:`flatness.trace` or :func:`flatness.density` on it (see
:mod:`flatness.spectrum.core`), on the model's device. With ``blocks=`` the same is done for each
parameter block's diagonal block, in one call (:func:`flatness.by_block`). To run several
analyses on one matrix, build the operator once and call those functions directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from flatness._utils.progress import ProgressArg
from flatness._utils.validate import check_choice
from flatness.algorithms.lanczos import Which
from flatness.objective import check_options
from flatness.objective._guard import model_guard
from flatness.operators import CurvatureOperator, build_operator, curvatures, split_options
from flatness.spectrum.core import (
    BlockSpectra,
    CurvatureDensity,
    CurvatureTopK,
    CurvatureTrace,
    by_block,
    check_topk,
    check_trace,
    density,
    parameter_blocks,
    topk,
    trace,
)

__all__ = [
    "BlockSpectra",
    "HessianDensity",
    "HessianTopK",
    "HessianTrace",
    "hessian_density",
    "hessian_topk",
    "hessian_trace",
    "parameter_blocks",
]

Curvature = Literal["hessian", "ggn", "fisher", "empirical_fisher"]
Blocks = Literal["module", "parameter"] | Mapping[str, Any] | None

# The former names of the results (deprecated, removed in the next release): the same classes.
HessianTopK = CurvatureTopK
HessianTrace = CurvatureTrace
HessianDensity = CurvatureDensity


def _per_block(
    op: CurvatureOperator, blocks: Blocks, analysis: Callable[..., Any], **kwargs: Any
) -> BlockSpectra:
    return by_block(op, blocks, analysis, **kwargs)


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
    v0: Any = None,
    v0_mix: float = 0.3,
    curvature: Curvature = "hessian",
    blocks: Blocks = None,
    basis_device: torch.device | str | None = None,
    keep_products: bool | Literal["auto"] = "auto",
    min_steps: int | None = None,
    progress: ProgressArg = False,
    **options: Any,
) -> CurvatureTopK | BlockSpectra:
    """The k largest / smallest / largest-magnitude eigenpairs of the loss Hessian (or GGN, Fisher).

    .. math:: A\\, v_i = \\lambda_i v_i,\\qquad
        \\|A v_i - \\lambda_i v_i\\| \\le \\mathrm{tol}\\cdot\\max(|\\lambda_i|, \\mathrm{tiny})

    with A = ∇²L(θ) (default) or the curvature matrix named by ``curvature``. Thick-restart
    Lanczos with full reorthogonalization (Lanczos 1950; Wu & Simon 2000), see
    :func:`flatness.lanczos_eigsh`: it checks convergence after every product and stops once
    the k residuals are confirmed (after at least min(ncv, 11) products for k = 1, ncv for
    k > 1); replaces the power iteration with deflation of PyHessian (Yao et al. 2020, arXiv 1912.07145). With one batch
    (or a few), the gradient graph is kept across products (``reuse_graph``, see
    :meth:`flatness.Objective.reusing_graph`). Like every single-vector Krylov method (ARPACK
    included), an exactly repeated eigenvalue may be returned fewer times than its multiplicity.

    Memory beyond the model, in vectors of n numbers (m = ``ncv``: max(2k + 1, 20), or
    max(2k + 1, 10) when the basis would take more than 256 MiB): at most
    m + 1 for the basis (j + 1 when it stops after j products) and k for the result, on
    ``basis_device``; m more with ``keep_products``; and one product's working memory (about
    4 for an MLP, plus activations), or the kept graphs. See the "large models" page of the docs.

    Args:
        model: the network (any ``nn.Module``; see :class:`flatness.Objective`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean loss (``None`` with ``batch_loss``).
        data: a DataLoader, a list of batches or one batch.
        k: how many eigenpairs, 1 ≤ k < n.
        which: ``"largest"``, ``"smallest"`` (algebraic) or ``"magnitude"``.
        tol: relative residual tolerance (> 0).
        max_hvp: product budget (default 100·m); ``converged=False`` if it runs out.
        ncv: Lanczos basis size m (k < m ≤ n; default as above).
        seed: seed of the starting vector.
        v0: a starting vector instead (flat, or a dict like ``named_parameters()``), e.g. the
            previous eigenvector when λ₁ is tracked during training; ``v0_mix`` times a seeded
            standard Gaussian vector is added to the unit v0.
        v0_mix: weight of that random part (default 0.3; 0 starts from v0 exactly): every
            eigendirection starts with weight ≈ ``v0_mix`` against v0's 1, so a new top
            eigenvector orthogonal to v0 (an eigenvalue crossing) is still found (see
            :func:`flatness.lanczos_eigsh` and the "monitor" page of the docs for measured rates).
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``
            (see :mod:`flatness.operators`; the Fisher takes ``mc_samples``, ``likelihood``,
            ``mc_seed`` among the options).
        blocks: ``None``, or per-block spectra: ``"module"`` (one block per layer),
            ``"parameter"``, or ``{block name: [parameter names]}``; then a :class:`BlockSpectra`
            of one :class:`CurvatureTopK` per block (a block with at most ``ncv`` parameters is
            solved densely, exactly, with one product per parameter).
        basis_device: where the Lanczos basis and the eigenvectors live (default: the model's
            device); ``"cpu"`` keeps them in host memory while the model is on a GPU.
        keep_products: store the products A V to confirm residuals without extra products
            (``True``, ``False``, or ``"auto"``: when they take ≤ 256 MiB).
        min_steps: products before any pair may be accepted (default min(ncv, 11) for k = 1,
            ncv for k > 1); raise it (e.g. to 20) for top eigenvalues only a few ``tol`` apart,
            or for a warm ``v0`` with a smaller ``v0_mix`` or ``ncv`` (see :func:`flatness.algorithms.lanczos.default_min_steps`).
        progress: ``True``, a callable ``(step, total, info)``, or False.
        **options: forwarded to :class:`flatness.Objective` (params, reduction, dtype, train,
            batch_loss, batch_outputs, max_batches, batch_size, hvp_mode, data_seed,
            reuse_graph).

    Returns:
        :class:`CurvatureTopK` (or :class:`BlockSpectra` with ``blocks``), its ``curvature``
        naming the matrix.

    Raises:
        ValueError, TypeError: naming the argument, for k ∉ [1, n), tol ≤ 0, unknown ``which``
            or ``curvature``, bad ``max_hvp`` / ``ncv`` / ``v0`` / ``blocks`` / ``basis_device`` /
            ``keep_products`` / ``min_steps`` / ``v0_mix`` and the objective's own checks.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> top = flatness.hessian_topk(model, loss_fn, data, k=2)
        >>> [round(v, 3) for v in top.eigenvalues.tolist()], top.converged, top.n_matvec
        ([3.41, 2.85], True, 4)
        >>> A = torch.cat([X, torch.ones(16, 1).double()], 1)
        >>> torch.linalg.eigvalsh(2 * A.T @ A / 16)[-2:].flip(0).round(decimals=3).tolist()  # the exact H
        [3.41, 2.85]
    """
    _check(hessian_topk, curvature, options)
    check_topk(k, which, tol, max_hvp, v0_mix, budget="max_hvp")
    with model_guard(model):
        op = build_operator(model, loss_fn, data, curvature, options)
        kwargs = dict(
            which=which,
            tol=tol,
            max_matvec=max_hvp,
            ncv=ncv,
            seed=seed,
            v0_mix=v0_mix,
            basis_device=basis_device,
            keep_products=keep_products,
            min_steps=min_steps,
            progress=progress,
        )
        if blocks is not None:
            if v0 is not None:
                raise TypeError(
                    "v0: not supported with blocks= (each block starts from its own seeded vector)"
                )
            return _per_block(op, blocks, topk, k=k, **kwargs)
        return topk(op, k, v0=v0, **kwargs)


def hessian_trace(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    n_hvp: int = 100,
    seed: int = 0,
    curvature: Curvature = "hessian",
    blocks: Blocks = None,
    progress: ProgressArg = False,
    **options: Any,
) -> CurvatureTrace | BlockSpectra:
    """tr(A) of the loss Hessian (or GGN, Fisher) by Hutch++ or Hutchinson with Rademacher probes.

    .. math:: \\mathrm{tr}(A) \\approx \\mathrm{tr}(Q^\\top A Q)
        + \\tfrac1l \\sum_i g_i^\\top (I-QQ^\\top) A (I-QQ^\\top) g_i

    Hutch++: Meyer, Musco, Musco & Woodruff 2021, arXiv 2010.09649; Hutchinson 1989;
    PyHessian (Yao et al. 2020, arXiv 1912.07145) uses Hutchinson.

    Args:
        model: the network (any ``nn.Module``; see :class:`flatness.Objective`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean loss (``None`` with ``batch_loss``).
        data: a DataLoader, a list of batches or one batch.
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        n_hvp: the budget of products (≥ 4 for Hutch++, ≥ 2 for Hutchinson), per block with
            ``blocks``.
        seed: seed of the probes.
        curvature: the matrix, as in :func:`hessian_topk`.
        blocks: per-block traces, as in :func:`hessian_topk`.
        progress: opt-in progress reporting.
        **options: forwarded to :class:`flatness.Objective`.

    Returns:
        :class:`CurvatureTrace` (or :class:`BlockSpectra` with ``blocks``).

    Raises:
        ValueError, TypeError: for an unknown method, a bad n_hvp, or the objective's checks;
            :class:`flatness.NonFiniteLossError` when the loss is not finite.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> tr = flatness.hessian_trace(model, loss_fn, data, n_hvp=12)
        >>> round(tr.estimate, 4), tr.n_matvec
        (8.2405, 12)
        >>> A = torch.cat([X, torch.ones(16, 1).double()], 1)
        >>> round((2 * A.T @ A / 16).trace().item(), 4)  # the exact trace
        8.2405
    """
    _check(hessian_trace, curvature, options)
    check_trace(method, n_hvp, budget="n_hvp")
    with model_guard(model):
        op = build_operator(model, loss_fn, data, curvature, options)
        kwargs = dict(method=method, n_matvec=n_hvp, seed=seed, progress=progress)
        return _per_block(op, blocks, trace, **kwargs) if blocks is not None else trace(op, **kwargs)


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
    curvature: Curvature = "hessian",
    blocks: Blocks = None,
    basis_device: torch.device | str | None = None,
    progress: ProgressArg = False,
    **options: Any,
) -> CurvatureDensity | BlockSpectra:
    """The eigenvalue density of the loss Hessian (or GGN, Fisher) by stochastic Lanczos quadrature.

    .. math:: \\phi(t) = \\frac1{n_v}\\sum_{r}\\sum_j \\tau^{(r)}_j g_\\sigma(t - \\lambda^{(r)}_j)

    Ghorbani, Krishnan & Xiao 2019 (arXiv 1901.10159); Lin, Saad & Yang 2016 (arXiv 1308.5467).
    Cost: at most n_runs · n_steps products; memory n_steps + 1 vectors of n numbers on
    ``basis_device`` (one run at a time), plus one product's working memory. With
    ``blocks``, one density per block — the block heterogeneity of Zhang et al. 2024, "Why
    Transformers Need Adam: A Hessian Perspective", arXiv 2402.16788 (plot them side by side
    with :func:`flatness.plot.plot_block_densities`).

    Args:
        model: the network (any ``nn.Module``; see :class:`flatness.Objective`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean loss (``None`` with ``batch_loss``).
        data: a DataLoader, a list of batches or one batch.
        n_runs: random start vectors.
        n_steps: Lanczos steps per run.
        sigma: Gaussian width (default: 1/100 of the span of the nodes).
        grid: points (1-D tensor) or their number over [min node − 5σ, max node + 5σ].
        seed: seed of the start vectors.
        curvature: the matrix, as in :func:`hessian_topk`.
        blocks: per-block densities, as in :func:`hessian_topk`.
        basis_device: where the Lanczos vectors live, as in :func:`hessian_topk`.
        progress: opt-in progress reporting.
        **options: forwarded to :class:`flatness.Objective`.

    Returns:
        :class:`CurvatureDensity` (or :class:`BlockSpectra` with ``blocks``).

    Raises:
        ValueError, TypeError: for bad n_runs, n_steps, sigma, grid, or the objective's checks.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> dens = flatness.hessian_density(model, loss_fn, data, n_runs=2, n_steps=4, grid=100)
        >>> dens.grid.shape, round(torch.trapezoid(dens.density, dens.grid).item(), 3), dens.n_matvec
        (torch.Size([100]), 1.0, 8)
    """
    _check(hessian_density, curvature, options)
    with model_guard(model):
        op = build_operator(model, loss_fn, data, curvature, options)
        kwargs = dict(
            n_runs=n_runs,
            n_steps=n_steps,
            sigma=sigma,
            grid=grid,
            seed=seed,
            basis_device=basis_device,
            progress=progress,
        )
        return _per_block(op, blocks, density, **kwargs) if blocks is not None else density(op, **kwargs)


def _check(fn: Callable[..., Any], curvature: Any, options: dict[str, Any]) -> None:
    check_choice("curvature", curvature, curvatures())
    rest, _own = split_options(curvature, options)
    check_options(fn, rest)
