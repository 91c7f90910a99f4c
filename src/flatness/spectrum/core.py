"""Spectra of a built curvature operator: top-k eigenpairs, trace, density, per-block analyses.

Build the operator once (``flatness.curvature_operator(model, loss_fn, data, curvature=...)`` or
a class of :mod:`flatness.operators`), then run any analysis on it::

    op = flatness.curvature_operator(model, loss_fn, data, curvature="ggn")
    top = flatness.topk(op, k=5)           # CurvatureTopK, top.curvature == "ggn"
    tr = flatness.trace(op, n_matvec=90)   # CurvatureTrace
    op.n_matvec                            # the products of both

Each function runs an algorithm of :mod:`flatness.algorithms` on the operator inside
``op.reusing_graph()`` (the Hessian keeps its gradient graphs across the products) and returns
a result that names its matrix (``curvature``) and the parameters its vectors live on.
:func:`by_block` runs one of them on each diagonal block ``op.block(params)``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from flatness._utils.progress import ProgressArg
from flatness._utils.validate import check_choice, check_positive
from flatness.algorithms.density import DensityResult, slq_density
from flatness.algorithms.lanczos import (
    LanczosResult,
    Which,
    _order,
    check_v0_mix,
    check_which,
    default_ncv,
    lanczos_eigsh,
)
from flatness.algorithms.trace import METHODS, TraceResult, trace_estimate
from flatness.objective._guard import model_guard
from flatness.operators import CurvatureOperator
from flatness.results import MatvecCount, Result

__all__ = [
    "BlockSpectra",
    "CurvatureDensity",
    "CurvatureTopK",
    "CurvatureTrace",
    "by_block",
    "density",
    "parameter_blocks",
    "topk",
    "trace",
]

Blocks = Literal["module", "parameter"] | Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class CurvatureTopK(LanczosResult, MatvecCount):
    """The k extreme eigenpairs of a curvature matrix, certified (formerly ``HessianTopK``).

    The fields of :class:`flatness.algorithms.LanczosResult` (eigenvalues, eigenvectors (k, n) in
    θ's flat order, true residuals, ``n_matvec``, converged, ...), plus:

    Attributes:
        names, shapes: θ's parameter names and shapes (see :meth:`eigenvector_dicts`).
        curvature: the matrix: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        graph_reused: whether the products reused kept gradient graphs (one backward pass per
            batch instead of a full pass; see :meth:`flatness.Objective.reusing_graph`).

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> data = [(torch.randn(16, 3).double(), torch.randn(16, 1).double())]
        >>> op = flatness.curvature_operator(model, torch.nn.functional.mse_loss, data, curvature="ggn")
        >>> res = flatness.topk(op, k=1)
        >>> type(res).__name__, res.curvature, res.eigenvector_dicts()[0]["weight"].shape
        ('CurvatureTopK', 'ggn', torch.Size([1, 3]))
    """

    names: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    curvature: str = "hessian"
    graph_reused: bool = False

    def eigenvector_dicts(self) -> list[dict[str, torch.Tensor]]:
        """The eigenvectors as parameter-shaped dicts keyed like ``model.named_parameters()``."""
        from flatness.objective._params import ParamLayout

        layout = ParamLayout(self.names, self.shapes)
        return [layout.unflatten(vec) for vec in self.eigenvectors]


@dataclasses.dataclass(frozen=True)
class CurvatureTrace(TraceResult, MatvecCount):
    """An estimate of tr(A) for a curvature matrix A (formerly ``HessianTrace``).

    The fields of :class:`flatness.algorithms.TraceResult` (estimate, std_error, ``n_matvec``,
    method, n_probes, sketch_size), plus ``curvature`` and ``graph_reused`` (as in
    :class:`CurvatureTopK`).

    Examples:
        >>> import torch, flatness
        >>> model = torch.nn.Linear(3, 1).double()
        >>> data = [(torch.eye(3).double(), torch.zeros(3, 1).double())]
        >>> op = flatness.HessianOperator(model, torch.nn.functional.mse_loss, data)
        >>> res = flatness.trace(op, n_matvec=12)  # exact: Hutch++ with n_matvec >= 3 n
        >>> round(res.estimate, 6), res.curvature  # tr(2 AᵀA / N), A = [I | 1]: (2·3 + 2·3) / 3
        (4.0, 'hessian')
    """

    curvature: str = "hessian"
    graph_reused: bool = False


@dataclasses.dataclass(frozen=True)
class CurvatureDensity(DensityResult, MatvecCount):
    """The eigenvalue density of a curvature matrix by SLQ (formerly ``HessianDensity``).

    The fields of :class:`flatness.algorithms.DensityResult` (grid, density, nodes, weights,
    ``n_matvec``, sigma, n_runs, n_steps), plus ``curvature`` and ``graph_reused`` (as in
    :class:`CurvatureTopK`).

    Examples:
        >>> import torch, flatness
        >>> model = torch.nn.Linear(3, 1).double()
        >>> data = [(torch.eye(3).double(), torch.zeros(3, 1).double())]
        >>> op = flatness.HessianOperator(model, torch.nn.functional.mse_loss, data)
        >>> res = flatness.density(op, n_runs=2, n_steps=4)
        >>> res.curvature, round(float(res.weights.sum()), 6)  # quadrature weights: a probability
        ('hessian', 1.0)
    """

    curvature: str = "hessian"
    graph_reused: bool = False


@dataclasses.dataclass(frozen=True)
class BlockSpectra(Result, MatvecCount, Mapping):  # type: ignore[misc]
    """One result per parameter block (the diagonal blocks of the curvature matrix).

    A read-only mapping block name → result (``spectra["fc1"]``, ``.items()``, ``.keys()``,
    ``in``, ``len``), in the model's parameter order.

    Attributes:
        blocks: ``{block name: result}`` in the model's parameter order; each result is a
            :class:`CurvatureTopK`, :class:`CurvatureTrace` or :class:`CurvatureDensity` of
            that block (or what the analysis given to :func:`by_block` returns).
        params: ``{block name: the parameter names in it}``.
        n_matvec: products used over all blocks (``n_hvp`` before; a deprecated alias).

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> spectra = flatness.hessian_trace(model, loss_fn, data, n_hvp=12, blocks="parameter")
        >>> list(spectra), spectra.params["bias"]
        (['weight', 'bias'], ('bias',))
        >>> round(spectra["bias"].estimate, 6)  # d²L/db² = 2 for the mean squared error
        2.0
    """

    blocks: dict[str, Any]
    params: dict[str, tuple[str, ...]]
    n_matvec: int

    def __getitem__(self, name: str) -> Any:
        return self.blocks[name]

    def __iter__(self) -> Any:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)


def parameter_blocks(model: nn.Module, names: list[str], blocks: Blocks) -> dict[str, tuple[str, ...]]:
    """Group θ's parameter ``names`` into blocks.

    ``"module"``: one block per module that owns parameters directly (a layer), named after
    it; ``"parameter"``: one block per parameter tensor; a mapping ``{block: [parameter
    names]}`` as given (each name once, all among ``names``).
    """
    if isinstance(blocks, str):
        check_choice("blocks", blocks, ("module", "parameter"))
        if blocks == "parameter":
            return {n: (n,) for n in names}
        out: dict[str, tuple[str, ...]] = {}
        for n in names:
            owner = n.rpartition(".")[0] or "(model)"
            out[owner] = (*out.get(owner, ()), n)
        return out
    if not isinstance(blocks, Mapping):
        raise TypeError(
            "blocks: expected 'module', 'parameter' or a mapping {block name: [parameter names]}, "
            f"got {type(blocks).__name__}"
        )
    seen: set[str] = set()
    out = {}
    for key, members in blocks.items():
        members = (members,) if isinstance(members, str) else tuple(members)
        if not members or not all(isinstance(m, str) for m in members):
            raise ValueError(f"blocks: block {key!r} must list one or more parameter names, got {members!r}")
        unknown = [m for m in members if m not in names]
        if unknown:
            raise ValueError(
                f"blocks: block {key!r} names {unknown[:3]}, which are not among the measured "
                f"parameters (e.g. {names[:4]})"
            )
        twice = [m for m in members if m in seen]
        if twice:
            raise ValueError(f"blocks: parameter {twice[0]!r} is in more than one block")
        seen.update(members)
        out[str(key)] = members
    if not out:
        raise ValueError("blocks: the mapping is empty; give at least one block")
    return out


# ---------------------------------------------------------------------- argument checks
def _check_op(op: Any) -> None:
    if not isinstance(op, CurvatureOperator):
        raise TypeError(
            f"op: expected a curvature operator (flatness.curvature_operator(model, loss_fn, data) or "
            f"flatness.HessianOperator(...)), got {type(op).__name__}; for any other symmetric "
            "operator use flatness.algorithms (lanczos_eigsh, trace_estimate, slq_density)"
        )


def check_topk(
    k: Any, which: Any, tol: Any, max_matvec: Any, v0_mix: Any, *, budget: str = "max_matvec"
) -> None:
    """The checks of :func:`topk`'s arguments (``budget``: the name of ``max_matvec`` to report)."""
    check_which(which)
    check_positive("tol", tol)
    check_positive(budget, max_matvec, integer=True, allow_none=True)
    check_positive("k", k, integer=True)
    check_v0_mix(v0_mix)


def check_trace(method: Any, n_matvec: Any, *, budget: str = "n_matvec") -> None:
    """The checks of :func:`trace`'s arguments (``budget``: the name of ``n_matvec`` to report)."""
    check_choice("method", method, METHODS)
    check_positive(budget, n_matvec, integer=True)
    least = 4 if method == "hutch++" else 2
    if n_matvec < least:
        raise ValueError(
            f"{budget}: got {n_matvec}; {method} needs at least {least} "
            + ("(a sketch and ≥ 2 probes)" if method == "hutch++" else "probes for a standard error")
        )


def _fields(res: Result) -> dict[str, Any]:
    return {f.name: getattr(res, f.name) for f in dataclasses.fields(res)}


def _start(op: CurvatureOperator, v0: Any) -> torch.Tensor | None:
    if v0 is None:
        return None
    if isinstance(v0, Mapping):
        return op.objective.flatten(dict(v0))
    return op.objective.as_vector(v0, "v0")


# ---------------------------------------------------------------------- the analyses
def topk(
    op: CurvatureOperator,
    k: int = 1,
    *,
    which: Which = "largest",
    tol: float = 1e-3,
    max_matvec: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
    v0: Any = None,
    v0_mix: float = 0.3,
    basis_device: torch.device | str | None = None,
    keep_products: bool | Literal["auto"] = "auto",
    min_steps: int | None = None,
    progress: ProgressArg = False,
) -> CurvatureTopK:
    """The k largest / smallest / largest-magnitude eigenpairs of a curvature operator, certified.

    .. math:: A\\, v_i = \\lambda_i v_i,\\qquad
        \\|A v_i - \\lambda_i v_i\\| \\le \\mathrm{tol}\\cdot\\max(|\\lambda_i|, \\mathrm{tiny})

    Thick-restart Lanczos (Lanczos 1950; Wu & Simon 2000) by :func:`flatness.lanczos_eigsh`,
    inside ``op.reusing_graph()``; :func:`flatness.hessian_topk` is this on the operator it
    builds. Cost and memory: see the "spectrum" page of the docs (typically 11–25 products for
    λ₁ at tol 1e-3; ``ncv`` + 1 vectors of n numbers for the basis).

    Examples:
        >>> import torch, flatness
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
        >>> op = flatness.curvature_operator(model, torch.nn.functional.cross_entropy, data, curvature="ggn")
        >>> top = flatness.topk(op, k=2)
        >>> top.curvature, top.eigenvalues.shape, top.converged, op.n_matvec == top.n_matvec
        ('ggn', torch.Size([2]), True, True)

    Args:
        op: a curvature operator (:func:`flatness.curvature_operator`, :class:`flatness.HessianOperator`,
            ...; a block ``op.block(params)`` too).
        k: how many eigenpairs, 1 ≤ k < n.
        which: ``"largest"``, ``"smallest"`` (algebraic) or ``"magnitude"``.
        tol: relative residual tolerance (> 0).
        max_matvec: product budget (default 100·ncv); ``converged=False`` if it runs out.
        ncv: Lanczos basis size (k < ncv ≤ n; default max(2k + 1, 20), or max(2k + 1, 10) when
            the basis would take more than 256 MiB).
        seed: seed of the starting vector.
        v0: a starting vector instead (flat, or a dict like ``named_parameters()``).
        v0_mix: weight of the seeded Gaussian vector added to the unit ``v0`` (0 starts from v0).
        basis_device: where the basis and the eigenvectors live (default: the operator's device).
        keep_products: store the products to confirm residuals without extra products
            (``True``, ``False`` or ``"auto"``: when they take ≤ 256 MiB).
        min_steps: products before any pair may be accepted (see
            :func:`flatness.algorithms.lanczos.default_min_steps`).
        progress: ``True``, a callable ``(step, total, info)``, or False.

    Returns:
        :class:`CurvatureTopK` with ``curvature=op.name``; its ``n_matvec`` products are also
        counted in ``op.n_matvec``.

    Raises:
        TypeError: ``op`` is not a curvature operator.
        ValueError, TypeError: naming the argument, for k ∉ [1, n), tol ≤ 0, unknown ``which``,
            bad ``max_matvec`` / ``ncv`` / ``v0`` / ``basis_device`` / ``keep_products`` /
            ``min_steps`` / ``v0_mix``.
    """
    _check_op(op)
    check_topk(k, which, tol, max_matvec, v0_mix)
    with model_guard(op.objective.model):
        with op.reusing_graph():
            res = lanczos_eigsh(
                op,
                k=k,
                which=which,
                tol=tol,
                ncv=ncv,
                max_matvec=max_matvec,
                v0=_start(op, v0),
                v0_mix=v0_mix,
                seed=seed,
                basis_device=basis_device,
                keep_products=keep_products,
                min_steps=min_steps,
                progress=progress,
            )
        obj = op.objective
        # Eigenvectors are local vectors: this process's part of each parameter.
        shapes = obj.local_shapes
        return CurvatureTopK(
            **_fields(res),
            names=tuple(obj.names),
            shapes=tuple(tuple(s) for s in shapes),
            curvature=op.name,
            graph_reused=op.graph_reused,
        )


def trace(
    op: CurvatureOperator,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    n_matvec: int = 100,
    seed: int = 0,
    progress: ProgressArg = False,
) -> CurvatureTrace:
    """tr(A) of a curvature operator by Hutch++ or Hutchinson with Rademacher probes.

    .. math:: \\mathrm{tr}(A) \\approx \\mathrm{tr}(Q^\\top A Q)
        + \\tfrac1l \\sum_i g_i^\\top (I-QQ^\\top) A (I-QQ^\\top) g_i

    Hutch++: Meyer, Musco, Musco & Woodruff 2021, arXiv 2010.09649; Hutchinson 1989. By
    :func:`flatness.trace_estimate` inside ``op.reusing_graph()``; :func:`flatness.hessian_trace`
    is this on the operator it builds. Cost: exactly ``n_matvec`` products.

    Examples:
        >>> import torch, flatness
        >>> model = torch.nn.Linear(3, 2)
        >>> data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
        >>> op = flatness.HessianOperator(model, torch.nn.functional.cross_entropy, data)
        >>> tr = flatness.trace(op, n_matvec=30)  # Hutch++ with a sketch of 10 ≥ n = 8: exact
        >>> tr.n_matvec, bool(abs(tr.estimate - op.dense().trace()) < 1e-4)
        (30, True)

    Args:
        op: a curvature operator, as in :func:`topk`.
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        n_matvec: the budget of products (≥ 4 for Hutch++, ≥ 2 for Hutchinson).
        seed: seed of the probes.
        progress: opt-in progress reporting.

    Returns:
        :class:`CurvatureTrace` with ``curvature=op.name``.

    Raises:
        TypeError: ``op`` is not a curvature operator.
        ValueError, TypeError: for an unknown method or a bad ``n_matvec``;
            :class:`flatness.NonFiniteLossError` when the loss is not finite.
    """
    _check_op(op)
    check_trace(method, n_matvec)
    with model_guard(op.objective.model):
        with op.reusing_graph():
            res = trace_estimate(op, method=method, n_matvec=n_matvec, seed=seed, progress=progress)
        return CurvatureTrace(**_fields(res), curvature=op.name, graph_reused=op.graph_reused)


def density(
    op: CurvatureOperator,
    *,
    n_runs: int = 10,
    n_steps: int = 80,
    sigma: float | None = None,
    grid: torch.Tensor | int = 1000,
    seed: int = 0,
    basis_device: torch.device | str | None = None,
    progress: ProgressArg = False,
) -> CurvatureDensity:
    """The eigenvalue density of a curvature operator by stochastic Lanczos quadrature.

    .. math:: \\phi(t) = \\frac1{n_v}\\sum_{r}\\sum_j \\tau^{(r)}_j g_\\sigma(t - \\lambda^{(r)}_j)

    Ghorbani, Krishnan & Xiao 2019 (arXiv 1901.10159); Lin, Saad & Yang 2016 (arXiv 1308.5467).
    By :func:`flatness.slq_density` inside ``op.reusing_graph()``; :func:`flatness.hessian_density`
    is this on the operator it builds. Cost: at most n_runs · n_steps products; memory
    n_steps + 1 vectors of n numbers on ``basis_device``.

    Examples:
        >>> import torch, flatness
        >>> model = torch.nn.Linear(3, 2)
        >>> data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
        >>> op = flatness.curvature_operator(model, torch.nn.functional.cross_entropy, data)
        >>> dens = flatness.density(op, n_runs=2, n_steps=5, grid=200)
        >>> dens.grid.shape, dens.density.shape, dens.curvature
        (torch.Size([200]), torch.Size([200]), 'hessian')

    Args:
        op: a curvature operator, as in :func:`topk`.
        n_runs: random start vectors.
        n_steps: Lanczos steps per run.
        sigma: Gaussian width (default: 1/100 of the span of the nodes).
        grid: points (1-D tensor) or their number over [min node − 5σ, max node + 5σ].
        seed: seed of the start vectors.
        basis_device: where the Lanczos vectors live (default: the operator's device).
        progress: opt-in progress reporting.

    Returns:
        :class:`CurvatureDensity` with ``curvature=op.name``.

    Raises:
        TypeError: ``op`` is not a curvature operator.
        ValueError, TypeError: for bad n_runs, n_steps, sigma or grid.
    """
    _check_op(op)
    with model_guard(op.objective.model):
        with op.reusing_graph():
            res = slq_density(
                op,
                n_runs=n_runs,
                n_steps=n_steps,
                sigma=sigma,
                grid=grid,
                seed=seed,
                basis_device=basis_device,
                progress=progress,
            )
        return CurvatureDensity(**_fields(res), curvature=op.name, graph_reused=op.graph_reused)


def _dense_topk(op: CurvatureOperator, k: int, which: str, tol: float, ncv: int) -> CurvatureTopK:
    """All of a small block's matrix (n products) and its exact eigenpairs."""
    with op.reusing_graph():
        A = op.dense().double()
    A = (A + A.T) / 2
    vals, vecs = torch.linalg.eigh(A)
    order = _order(vals, which)[:k]
    vals, vecs = vals[order], vecs[:, order].T
    res = (vecs @ A - vals[:, None] * vecs).norm(dim=1)
    obj = op.objective
    return CurvatureTopK(
        eigenvalues=vals.to(obj.dtype),
        eigenvectors=vecs.to(obj.dtype),
        residuals=res.to(obj.dtype),
        n_matvec=op.shape[0],
        converged=True,
        n_restarts=0,
        which=which,
        k=k,
        tol=float(tol),
        ncv=ncv,
        names=tuple(obj.names),
        shapes=tuple(tuple(s) for s in obj.shapes),
        curvature=op.name,
        graph_reused=op.graph_reused,
    )


def _block_topk(op: CurvatureOperator, k: int = 1, **kwargs: Any) -> CurvatureTopK:
    """:func:`topk` of one block; a block of at most ``ncv`` parameters is solved densely."""
    ncv = kwargs.get("ncv")
    n = op.shape[0]
    whole = op.objective.supports("whole_vectors")  # dense eigenvectors are whole vectors
    if whole and n <= (ncv or default_ncv(k, 10**9)):
        which, tol = kwargs.get("which", "largest"), kwargs.get("tol", 1e-3)
        check_topk(k, which, tol, kwargs.get("max_matvec"), kwargs.get("v0_mix", 0.3))
        return _dense_topk(op, min(k, n), which, tol, ncv or default_ncv(k, n))
    return topk(op, k, **kwargs)


_ANALYSES: dict[str, Callable[..., Any]] = {"topk": topk, "trace": trace, "density": density}


def by_block(
    op: CurvatureOperator,
    blocks: Blocks,
    analysis: Literal["topk", "trace", "density"] | Callable[..., Any],
    **kwargs: Any,
) -> BlockSpectra:
    """One analysis of each diagonal block P_Bᵀ A P_B of a curvature operator A, in one call.

    ``analysis(op.block(params), **kwargs)`` for each block ``params`` — the block
    heterogeneity of Zhang et al. 2024 ("Why Transformers Need Adam: A Hessian Perspective",
    arXiv 2402.16788). For ``"topk"``, a block of at most ``ncv`` parameters (default
    max(2k + 1, 20)) is solved densely, exactly, with one product per parameter; the others by
    Lanczos, each from its own seeded vector. Cost: the blocks' products, each no dearer than
    one of the whole operator.

    Examples:
        >>> import torch, flatness
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
        >>> op = flatness.curvature_operator(model, torch.nn.functional.cross_entropy, data)
        >>> spectra = flatness.by_block(op, "module", "trace", n_matvec=12)
        >>> list(spectra), spectra.params["2"], spectra.n_matvec
        (['0', '2'], ('2.weight', '2.bias'), 24)

    Args:
        op: a curvature operator, as in :func:`topk`.
        blocks: ``"module"`` (one block per module owning parameters: a layer),
            ``"parameter"`` (one per parameter tensor) or ``{block name: [parameter names]}``.
        analysis: ``"topk"``, ``"trace"``, ``"density"`` (or the functions :func:`topk`,
            :func:`trace`, :func:`density`), or any callable ``analysis(block_op, **kwargs)``
            returning a result with ``n_matvec``.
        **kwargs: the analysis' options (``k=``, ``n_matvec=``, ``n_runs=``, ...); ``v0`` is
            not taken (each block starts from its own seeded vector).

    Returns:
        :class:`BlockSpectra`: ``{block name: result}`` in the model's parameter order, with
        the blocks' parameter names and their products in total (``n_matvec``; each block is an
        operator of its own, so ``op.n_matvec`` does not count them).

    Raises:
        TypeError: ``op`` is not a curvature operator, ``analysis`` is neither a name nor a
            callable, or ``v0`` is given.
        ValueError: unknown ``analysis`` name; bad ``blocks`` (unknown parameter names, a
            parameter in two blocks, an empty mapping); the analysis' own checks.
    """
    _check_op(op)
    if isinstance(analysis, str):
        check_choice("analysis", analysis, tuple(_ANALYSES))
        analysis = _ANALYSES[analysis]
    elif not callable(analysis):
        raise TypeError(
            f"analysis: expected 'topk', 'trace', 'density' or a callable(block_op, **kwargs), "
            f"got {type(analysis).__name__}"
        )
    if analysis in _ANALYSES.values():
        known = inspect.signature(analysis).parameters
        unknown = [key for key in kwargs if key not in known or key == "op"]
        if unknown:
            raise TypeError(f"{unknown[0]}: not an option of {analysis.__name__}()")
    if kwargs.get("v0") is not None:
        raise TypeError("v0: not supported per block (each block starts from its own seeded vector)")
    run = _block_topk if analysis is topk else analysis
    groups = parameter_blocks(op.objective.model, op.objective.names, blocks)
    with model_guard(op.objective.model):
        results = {name: run(op.block(list(members)), **kwargs) for name, members in groups.items()}
    return BlockSpectra(results, groups, sum(r.n_matvec for r in results.values()))
