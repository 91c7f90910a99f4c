"""Model-level spectra: top-k eigenpairs, trace and spectral density of a curvature matrix.

Each function binds ``(model, loss_fn, data)`` into the exact full-data objective
(:class:`flatness.Objective`), builds the curvature operator named by ``curvature=`` (the
Hessian by default; the GGN, the Fisher or the empirical Fisher, see :mod:`flatness.operators`)
and runs an algorithm of :mod:`flatness.algorithms` on it, on the model's device. With
``blocks=`` the same is done for each parameter block's diagonal block, in one call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from flatness._utils.progress import ProgressArg
from flatness._utils.validate import check_choice, check_positive
from flatness.algorithms.density import DensityResult, slq_density
from flatness.algorithms.lanczos import (
    LanczosResult,
    Which,
    check_v0_mix,
    check_which,
    default_ncv,
    lanczos_eigsh,
)
from flatness.algorithms.trace import METHODS, TraceResult, trace_estimate
from flatness.objective import check_options
from flatness.objective._guard import model_guard
from flatness.operators import CurvatureOperator, build_operator, curvatures, split_options
from flatness.results import Result

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


@dataclasses.dataclass(frozen=True)
class HessianTopK(LanczosResult):
    """The k extreme eigenpairs of a curvature matrix (the Hessian by default), certified.

    The fields of :class:`flatness.algorithms.LanczosResult` (eigenvalues, eigenvectors (k, n) in
    θ's flat order, true residuals, ``n_matvec``, converged, ...), plus:

    Attributes:
        names, shapes: θ's parameter names and shapes (see :meth:`eigenvector_dicts`).
        curvature: the matrix: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        graph_reused: whether the products reused kept gradient graphs (one backward pass per
            batch instead of a full pass; see :meth:`flatness.Objective.reusing_graph`).
        n_hvp: the products used (= ``n_matvec``).
    """

    names: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    curvature: str = "hessian"
    graph_reused: bool = False
    _extra_keys: ClassVar[tuple[str, ...]] = ("n_hvp",)

    @property
    def n_hvp(self) -> int:
        return self.n_matvec

    def eigenvector_dicts(self) -> list[dict[str, torch.Tensor]]:
        """The eigenvectors as parameter-shaped dicts keyed like ``model.named_parameters()``."""
        from flatness.objective._params import ParamLayout

        layout = ParamLayout(self.names, self.shapes)
        return [layout.unflatten(vec) for vec in self.eigenvectors]


@dataclasses.dataclass(frozen=True)
class HessianTrace(TraceResult):
    """An estimate of tr(A) for a curvature matrix A (the Hessian by default).

    The fields of :class:`flatness.algorithms.TraceResult` (estimate, std_error, ``n_matvec``,
    method, n_probes, sketch_size), plus ``curvature``, ``graph_reused`` (as in
    :class:`HessianTopK`) and ``n_hvp`` (= ``n_matvec``).
    """

    curvature: str = "hessian"
    graph_reused: bool = False
    _extra_keys: ClassVar[tuple[str, ...]] = ("n_hvp",)

    @property
    def n_hvp(self) -> int:
        return self.n_matvec


@dataclasses.dataclass(frozen=True)
class HessianDensity(DensityResult):
    """The eigenvalue density of a curvature matrix by stochastic Lanczos quadrature.

    The fields of :class:`flatness.algorithms.DensityResult` (grid, density, nodes, weights,
    ``n_matvec``, sigma, n_runs, n_steps), plus ``curvature``, ``graph_reused`` (as in
    :class:`HessianTopK`) and ``n_hvp`` (= ``n_matvec``).
    """

    curvature: str = "hessian"
    graph_reused: bool = False
    _extra_keys: ClassVar[tuple[str, ...]] = ("n_hvp",)

    @property
    def n_hvp(self) -> int:
        return self.n_matvec


@dataclasses.dataclass(frozen=True)
class BlockSpectra(Result, Mapping):  # type: ignore[misc]
    """One result per parameter block (the diagonal blocks of the curvature matrix).

    A read-only mapping block name → result (``spectra["fc1"]``, ``.items()``, ``.keys()``,
    ``in``, ``len``), in the model's parameter order.

    Attributes:
        blocks: ``{block name: result}`` in the model's parameter order; each result is a
            :class:`HessianTopK`, :class:`HessianTrace` or :class:`HessianDensity` of that block.
        params: ``{block name: the parameter names in it}``.
        n_hvp: products used over all blocks.

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
    n_hvp: int

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


def _per_block(op: CurvatureOperator, blocks: Blocks, fn: Callable[[CurvatureOperator], Any]) -> BlockSpectra:
    groups = parameter_blocks(op.objective.model, op.objective.names, blocks)
    results = {name: fn(op.block(list(members))) for name, members in groups.items()}
    return BlockSpectra(results, groups, sum(r.n_matvec for r in results.values()))


def _start(op: CurvatureOperator, v0: Any) -> torch.Tensor | None:
    if v0 is None:
        return None
    if isinstance(v0, Mapping):
        return op.objective.flatten(dict(v0))
    return op.objective.as_vector(v0, "v0")


def _dense_topk(op: CurvatureOperator, k: int, which: str, tol: float, ncv: int) -> HessianTopK:
    """All of a small block's matrix (n products) and its exact eigenpairs."""
    from flatness.algorithms.lanczos import _order

    with op.reusing_graph():
        A = op.dense().double()
    A = (A + A.T) / 2
    vals, vecs = torch.linalg.eigh(A)
    order = _order(vals, which)[:k]
    vals, vecs = vals[order], vecs[:, order].T
    res = (vecs @ A - vals[:, None] * vecs).norm(dim=1)
    obj = op.objective
    return HessianTopK(
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
) -> HessianTopK | BlockSpectra:
    """The k extreme eigenpairs of the loss Hessian (or GGN, Fisher), certified by their residuals.

    .. math:: A\\, v_i = \\lambda_i v_i,\\qquad
        \\|A v_i - \\lambda_i v_i\\| \\le \\mathrm{tol}\\cdot\\max(|\\lambda_i|, \\mathrm{tiny})

    with A = ∇²L(θ) (default) or the matrix named by ``curvature``. Thick-restart Lanczos with
    full reorthogonalization (Lanczos 1950; Wu & Simon 2000; :func:`flatness.lanczos_eigsh`); like
    ARPACK, it may return an exactly repeated eigenvalue fewer times than its multiplicity.

    Cost: one product per Lanczos step (a full data pass, or one backward pass per batch when the
    gradient graphs are kept, see :meth:`flatness.Objective.reusing_graph`), at least
    ``min_steps``, plus k to confirm the residuals unless the products are stored. Memory: up to
    m + 1 basis vectors of n numbers on ``basis_device`` (m = ``ncv``), m more with
    ``keep_products``, and one product's working memory (docs: "large models").

    Args:
        model: the network (any ``nn.Module``; see :class:`flatness.Objective`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean loss (``None`` with ``batch_loss``).
        data: a DataLoader, a list of batches or one batch.
        k: how many eigenpairs, 1 ≤ k < n.
        which: ``"largest"``, ``"smallest"`` (algebraic) or ``"magnitude"``.
        tol: relative residual tolerance (> 0).
        max_hvp: product budget (default 100·m); ``converged=False`` if it runs out.
        ncv: Lanczos basis size m, k < m ≤ n; default max(2k + 1, 20), or max(2k + 1, 10) when
            m + 1 vectors would take more than 256 MiB.
        seed: seed of the starting vector.
        v0: a starting vector instead (flat, or a dict like ``named_parameters()``), e.g. the
            previous eigenvector when λ₁ is tracked during training.
        v0_mix: weight of the seeded standard Gaussian vector added to the unit ``v0`` (default
            0.3; 0 starts from v0 exactly), so that a new top eigenvector orthogonal to v0 is found.
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        blocks: ``"module"``, ``"parameter"`` or ``{name: [parameter names]}``: one result per
            diagonal block (small blocks solved densely); ``None`` (default): the whole matrix.
        basis_device: where the basis and the eigenvectors live (default: the model's device).
        keep_products: store A V to confirm residuals without extra products: ``True``,
            ``False`` or ``"auto"`` (when they take ≤ 256 MiB).
        min_steps: products before any pair may be accepted; default min(ncv, 11) for k = 1,
            ncv for k > 1 (see :func:`flatness.algorithms.lanczos.default_min_steps`).
        progress: ``True``, a callable ``(step, total, info)``, or False.
        **options: forwarded to :class:`flatness.Objective` (``params``, ``dtype``,
            ``batch_loss``, ``max_batches``, ``hvp_mode``, ``reuse_graph``, ...) and to the
            operator (``mc_samples``, ``likelihood``, ``mc_seed`` for the Fisher).

    Returns:
        :class:`HessianTopK` (or :class:`BlockSpectra` of them with ``blocks``).

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
        >>> [round(v, 3) for v in top.eigenvalues.tolist()], top.converged, top.n_hvp
        ([3.41, 2.85], True, 4)
        >>> A = torch.cat([X, torch.ones(16, 1).double()], 1)
        >>> torch.linalg.eigvalsh(2 * A.T @ A / 16)[-2:].flip(0).round(decimals=3).tolist()  # the exact H
        [3.41, 2.85]
    """
    _check(hessian_topk, curvature, options)
    check_which(which)
    check_positive("tol", tol)
    check_positive("max_hvp", max_hvp, integer=True, allow_none=True)
    check_positive("k", k, integer=True)
    check_v0_mix(v0_mix)
    with model_guard(model):
        op = build_operator(model, loss_fn, data, curvature, options)

        def solve(o: CurvatureOperator) -> HessianTopK:
            n = o.shape[0]
            whole = o.objective.supports("whole_vectors")  # eigenvectors as whole vectors here
            if blocks is not None and whole and n <= (ncv or default_ncv(k, 10**9)):
                return _dense_topk(o, min(k, n), which, tol, ncv or default_ncv(k, n))
            with o.reusing_graph():
                res = lanczos_eigsh(
                    o,
                    k=k,
                    which=which,
                    tol=tol,
                    ncv=ncv,
                    max_matvec=max_hvp,
                    v0=_start(o, v0) if blocks is None else None,
                    v0_mix=v0_mix,
                    seed=seed,
                    basis_device=basis_device,
                    keep_products=keep_products,
                    min_steps=min_steps,
                    progress=progress,
                )
            obj = o.objective
            # Eigenvectors are local vectors: this process's part of each parameter.
            shapes = obj.local_shapes
            return HessianTopK(
                **_fields(res),
                names=tuple(obj.names),
                shapes=tuple(tuple(s) for s in shapes),
                curvature=curvature,
                graph_reused=o.graph_reused,
            )

        if blocks is not None:
            if v0 is not None:
                raise TypeError(
                    "v0: not supported with blocks= (each block starts from its own seeded vector)"
                )
            return _per_block(op, blocks, solve)
        return solve(op)


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
) -> HessianTrace | BlockSpectra:
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
        :class:`HessianTrace` (or :class:`BlockSpectra` with ``blocks``).

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
        >>> round(tr.estimate, 4), tr.n_hvp
        (8.2405, 12)
        >>> A = torch.cat([X, torch.ones(16, 1).double()], 1)
        >>> round((2 * A.T @ A / 16).trace().item(), 4)  # the exact trace
        8.2405
    """
    _check(hessian_trace, curvature, options)
    check_choice("method", method, METHODS)
    check_positive("n_hvp", n_hvp, integer=True)
    least = 4 if method == "hutch++" else 2
    if n_hvp < least:
        raise ValueError(
            f"n_hvp: got {n_hvp}; {method} needs at least {least} "
            + ("(a sketch and ≥ 2 probes)" if method == "hutch++" else "probes for a standard error")
        )
    with model_guard(model):
        op = build_operator(model, loss_fn, data, curvature, options)

        def solve(o: CurvatureOperator) -> HessianTrace:
            with o.reusing_graph():
                res = trace_estimate(o, method=method, n_matvec=n_hvp, seed=seed, progress=progress)
            return HessianTrace(**_fields(res), curvature=curvature, graph_reused=o.graph_reused)

        return _per_block(op, blocks, solve) if blocks is not None else solve(op)


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
) -> HessianDensity | BlockSpectra:
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
        :class:`HessianDensity` (or :class:`BlockSpectra` with ``blocks``).

    Raises:
        ValueError, TypeError: for bad n_runs, n_steps, sigma, grid, or the objective's checks.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> dens = flatness.hessian_density(model, loss_fn, data, n_runs=2, n_steps=4, grid=100)
        >>> dens.grid.shape, round(torch.trapezoid(dens.density, dens.grid).item(), 3), dens.n_hvp
        (torch.Size([100]), 1.0, 8)
    """
    _check(hessian_density, curvature, options)
    with model_guard(model):
        op = build_operator(model, loss_fn, data, curvature, options)

        def solve(o: CurvatureOperator) -> HessianDensity:
            with o.reusing_graph():
                res = slq_density(
                    o,
                    n_runs=n_runs,
                    n_steps=n_steps,
                    sigma=sigma,
                    grid=grid,
                    seed=seed,
                    basis_device=basis_device,
                    progress=progress,
                )
            return HessianDensity(**_fields(res), curvature=curvature, graph_reused=o.graph_reused)

        return _per_block(op, blocks, solve) if blocks is not None else solve(op)


def _fields(res: Result) -> dict[str, Any]:
    return {f.name: getattr(res, f.name) for f in dataclasses.fields(res)}


def _check(fn: Callable[..., Any], curvature: Any, options: dict[str, Any]) -> None:
    check_choice("curvature", curvature, curvatures())
    rest, _own = split_options(curvature, options)
    check_options(fn, rest)
