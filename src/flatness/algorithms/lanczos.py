"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

Lanczos with full reorthogonalization builds an orthonormal basis V_j of the Krylov space
K_j(H, v₀) and the projection T_j = V_jᵀ H V_j; the Ritz pairs (θ, y = V_j s) of T_j approximate
H's extreme eigenpairs. When the basis holds ``ncv`` = m vectors, the thick restart (Wu & Simon
2000, "Thick-restart Lanczos method for large symmetric eigenvalue problems", SIAM J. Matrix Anal.
Appl. 22(2); equivalent to Stewart's Krylov–Schur for symmetric H) keeps the p best Ritz vectors
and the last residual direction and goes on: memory stays at m + 1 basis vectors plus the m
products H v (kept so that residuals are exact, not inferred from the recurrence), i.e. about
(2m + 1)·n numbers.

A Ritz pair is accepted when its *true* residual ‖H y − θ y‖ ≤ tol · max(|θ|, tiny), computed
from the stored products H V (no extra matvec), with tiny = ε^(1/3) · max|θ| (ε the dtype's
machine epsilon) so that eigenvalues at or near zero can converge. This is the test of ARPACK's
``eigsh`` (relative to |θ|), with the true residual in place of ARPACK's Ritz estimate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch

from flatness._progress import Progress, ProgressArg
from flatness._validate import check_choice, check_positive
from flatness.algorithms._linalg import Operator, VectorSpace, as_operator, generator
from flatness.results import Result

__all__ = ["LanczosResult", "lanczos_eigsh", "lanczos_step", "lanczos_tridiagonal"]

Which = Literal["largest", "smallest", "magnitude"]
WHICH = ("largest", "smallest", "magnitude")


@dataclasses.dataclass(frozen=True)
class LanczosResult(Result):
    """k eigenpairs of a symmetric operator and the evidence that they are converged.

    Attributes:
        eigenvalues: (k,) sorted by ``which`` (descending, ascending, or by descending |λ|).
        eigenvectors: (k, n), unit rows, ``eigenvectors[i]`` belongs to ``eigenvalues[i]``.
        residuals: (k,) true residual norms ‖H v − λ v‖ of the returned pairs.
        n_matvec: operator products used.
        converged: whether every pair met ``residual ≤ tol · max(|λ|, tiny)``.
        n_restarts: thick restarts done.
        which, k, tol, ncv: the options used.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    n_matvec: int
    converged: bool
    n_restarts: int
    which: str
    k: int
    tol: float
    ncv: int


def default_ncv(k: int, n: int) -> int:
    """Basis size m = max(2k + 1, 20), at most n (ARPACK's usual choice)."""
    return min(max(2 * k + 1, 20), n)


def _order(theta: torch.Tensor, which: str) -> torch.Tensor:
    if which == "largest":
        return torch.argsort(theta, descending=True, stable=True)
    if which == "smallest":
        return torch.argsort(theta, stable=True)
    return torch.argsort(theta.abs(), descending=True, stable=True)


def check_which(which: str) -> None:
    check_choice("which", which, WHICH)


def lanczos_step(
    op: Operator, V: torch.Tensor, j: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One Lanczos step with full reorthogonalization: the new direction after v_j.

    .. math:: w = A v_j,\\quad h = V_{0:j}^\\top w,\\quad r = w - V_{0:j} h,\\quad \\beta = \\|r\\|

    Classical Gram–Schmidt applied twice ("twice is enough", Giraud et al. 2005), so the basis
    stays orthonormal to working precision. Shared by the thick-restart eigensolver and by the
    tridiagonalization of stochastic Lanczos quadrature.

    Returns:
        ``(w, h, r, beta)`` with w = A v_j, h the coefficients of w in v_0..v_j (float64, CPU),
        r the residual direction (not normalized) and β = ‖r‖.

    Raises:
        ValueError: when the product is not finite.
    """
    space = op.space
    w = op.matvec(V[j])
    basis = V[: j + 1]
    h = space.coeffs(basis, w)
    r = w - basis.T @ h
    h2 = space.coeffs(basis, r)
    r = r - basis.T @ h2
    h = (h + h2).double().cpu()
    beta = space.norm(r)
    if not (math.isfinite(beta) and bool(torch.isfinite(h).all())):
        raise ValueError(
            f"matvec: the product with Lanczos vector {j} is not finite (NaN or inf); the operator "
            "overflowed or is not defined there (for a model: check the loss and its scale)"
        )
    return w, h, r, beta


def lanczos_eigsh(
    A: Any,
    n: int | None = None,
    k: int = 1,
    *,
    which: Which = "largest",
    tol: float = 1e-3,
    ncv: int | None = None,
    max_matvec: int | None = None,
    v0: torch.Tensor | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: ProgressArg = False,
) -> LanczosResult:
    """The k extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    .. math::
        H V_j = V_j T_j + \\beta_j v_{j+1} e_j^\\top,\\qquad
        T_j s = \\theta s,\\quad y = V_j s,\\quad
        \\|H y - \\theta y\\| \\le \\mathrm{tol}\\cdot\\max(|\\theta|, \\mathrm{tiny})

    Lanczos (1950) with full reorthogonalization (classical Gram–Schmidt, twice) and thick
    restart (Wu & Simon 2000). Each step costs one matvec; each restart keeps
    p = k + ⌊(m − k)/2⌋ Ritz vectors (m = ``ncv``), so no matvec is spent twice on the same
    direction. Pairs are accepted once at least m products are done (as ARPACK, which checks
    after each full basis), which guards against converging to a non-extreme pair of a small
    Krylov space. Memory: (2m + 1) vectors of n numbers on ``device``.

    Args:
        A: the symmetric operator: a linear operator (``matvec``, ``shape``, ``dtype``,
            ``device``), a square tensor / array, a scipy ``LinearOperator``, or a callable
            ``matvec(v) -> H v`` with ``n`` (see :func:`flatness.algorithms.as_operator`).
        n: the size of H (only for a plain callable).
        k: how many eigenpairs, 1 ≤ k < n.
        which: ``"largest"`` / ``"smallest"`` (algebraic) or ``"magnitude"`` (largest |λ|).
        tol: relative residual tolerance, > 0.
        ncv: basis size m (k < m ≤ n); default max(2k + 1, 20) capped at n.
        max_matvec: stop after this many products (``converged=False``); default 100·m.
        v0: starting vector (default: seeded Gaussian).
        seed: seed of the local generator for the start (and any breakdown) vector.
        device: where and in which precision the vectors live (default: the operator's;
            CPU and float64 for callables and arrays).
        dtype: as ``device``.
        progress: ``True`` for a progress line, a callable ``(step, total, info)``, or False.

    Returns:
        :class:`LanczosResult` with eigenvalues, eigenvectors (k × n), true residuals,
        n_matvec, converged.

    Raises:
        ValueError, TypeError: for k outside [1, n), tol ≤ 0, unknown ``which``, bad ncv /
            max_matvec / v0, or a matvec returning the wrong size.
    """
    op = as_operator(A, n, device=device, dtype=dtype)
    space = op.space
    n = op.n
    device, dtype = space.device, space.dtype
    check_positive("k", k, integer=True)
    if k >= n:
        raise ValueError(f"k: got {k}; expected 1 ≤ k < n = {n} (for all eigenvalues use a dense eigh)")
    check_which(which)
    check_positive("tol", tol)
    if ncv is None:
        m = default_ncv(k, n)
    else:
        check_positive("ncv", ncv, integer=True)
        if not k < ncv <= n:
            raise ValueError(f"ncv: got {ncv}; expected k < ncv ≤ n, here {k} < ncv ≤ {n}")
        m = ncv
    check_positive("max_matvec", max_matvec, integer=True, allow_none=True)
    budget = 100 * m if max_matvec is None else max_matvec
    gen = generator(seed)
    if v0 is None:
        start = space.randn(gen)
    else:
        if not isinstance(v0, torch.Tensor) or v0.numel() != space.n_local:
            raise ValueError(f"v0: expected a tensor of {space.n_local} numbers, got {v0!r:.60}")
        start = v0.detach().reshape(-1).to(device=device, dtype=dtype)
    norm0 = space.norm(start)
    if not norm0 > 0 or not math.isfinite(norm0):
        raise ValueError("v0: the starting vector must be finite and nonzero")

    eps = torch.finfo(dtype).eps
    keep = min(k + (m - k) // 2, m - 1)
    V = space.empty(m + 1)
    W = space.empty(m)
    # C[:, i] holds the coordinates of H v_i in the basis v_0..v_{i+1}; float64 on the CPU.
    C = torch.zeros(m + 1, m, dtype=torch.float64)
    V[0] = start / norm0
    j = 0
    n_mv = 0
    n_restarts = 0
    bar = Progress(progress, total=budget, desc=f"lanczos k={k}")
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    try:
        while True:
            w, h, r, beta = lanczos_step(op, V, j)
            n_mv += 1
            W[j] = w
            C[: j + 1, j] = h
            C[j + 1, j] = beta
            j += 1

            T = C[:j, :j]
            theta, S = torch.linalg.eigh((T + T.T) / 2)
            order = _order(theta, which)
            want = order[: min(k, j)]
            scale = float(theta.abs().max())
            tiny = eps ** (1 / 3) * scale
            thresh = tol * torch.clamp(theta[want].abs(), min=tiny)
            # ‖H y − θ y‖ from the stored coordinates: exact up to rounding of the products.
            full = C[: j + 1, :j] @ S[:, want]
            full[:j] -= S[:, want] * theta[want]
            est = full.norm(dim=0)
            bar.update(1, rel_residual=float((est / torch.clamp(theta[want].abs(), min=tiny)).max()))

            invariant = beta <= eps**0.75 * max(scale, 1e-300) or j == n
            # Like ARPACK, accept only once a full basis of m vectors has been built: an early,
            # small Krylov space can hold a converged pair that is not the extreme one.
            ready = j >= k and (n_mv >= m or invariant)
            if ready and (bool((est <= thresh).all()) or invariant or n_mv >= budget):
                vals, vecs, res = _ritz(space, V[:j], W[:j], theta[want], S[:, want])
                best = (vals, vecs, res)
                ok = bool((res.double().cpu() <= thresh).all())
                if ok or n_mv >= budget or j == n:
                    break
            if n_mv >= budget:
                break

            if invariant:
                # An invariant subspace: continue from a fresh direction orthogonal to V.
                C[j, j - 1] = 0.0
                r = space.randn(gen)
                for _ in range(2):
                    r = r - V[:j].T @ space.coeffs(V[:j], r)
                beta = space.norm(r)
            V[j] = r / beta

            if j == m:
                p = keep
                Sp = S[:, order[:p]]
                Sp_t = Sp.to(device=device, dtype=dtype)
                V[:p] = Sp_t.T @ V[:m]
                W[:p] = Sp_t.T @ W[:m]
                V[p] = V[m]
                Cn = torch.zeros_like(C)
                Cn[:p, :p] = Sp.T @ C[:m, :m] @ Sp
                Cn[p, :p] = C[m, :m] @ Sp
                C = Cn
                j = p
                n_restarts += 1
    finally:
        bar.close()

    if best is None:  # the budget ran out before k Ritz pairs existed
        vals, vecs, res = _ritz(space, V[:j], W[:j], theta[want], S[:, want])
    else:
        vals, vecs, res = best
    thresh = tol * torch.clamp(vals.double().cpu().abs(), min=eps ** (1 / 3) * scale)
    return LanczosResult(
        eigenvalues=vals,
        eigenvectors=vecs,
        residuals=res,
        n_matvec=n_mv,
        converged=bool(len(vals) == k and (res.double().cpu() <= thresh).all()),
        n_restarts=n_restarts,
        which=which,
        k=k,
        tol=float(tol),
        ncv=m,
    )


def _ritz(
    space: VectorSpace, V: torch.Tensor, W: torch.Tensor, theta: torch.Tensor, S: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz vectors y = Vᵀs (normalized) and their true residuals ‖(H V)ᵀ s − θ y‖."""
    St = S.to(device=space.device, dtype=space.dtype)
    Y = St.T @ V
    HY = St.T @ W
    norms = torch.sqrt(torch.diagonal(space.gram(Y, Y)).clamp_min(0))[:, None]
    Y = Y / norms
    HY = HY / norms
    vals = theta.to(device=space.device, dtype=space.dtype)
    R = HY - vals[:, None] * Y
    res = torch.sqrt(torch.diagonal(space.gram(R, R)).clamp_min(0))
    return vals, Y, res


def lanczos_tridiagonal(op: Operator, v: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``steps`` Lanczos steps from the unit vector v: the tridiagonal T as (α, β), and matvecs.

    .. math:: A V_m = V_m T_m + \\beta_m v_{m+1} e_m^\\top,\\quad
        T_m = \\mathrm{tridiag}(\\beta_{1:m-1}, \\alpha_{1:m}, \\beta_{1:m-1})

    Stops early when the Krylov space becomes invariant (β ≤ ε^¾ · max|α|). Memory: ``steps``
    vectors (full reorthogonalization, :func:`lanczos_step`).
    """
    space = op.space
    eps = torch.finfo(space.dtype).eps
    V = space.empty(steps)
    V[0] = v
    alpha: list[float] = []
    beta: list[float] = []
    used = 0
    for j in range(steps):
        _w, h, r, b = lanczos_step(op, V, j)
        used += 1
        alpha.append(float(h[j]))
        if j == steps - 1 or b <= eps**0.75 * max(abs(x) for x in [*alpha, 1e-300]):
            break
        beta.append(b)
        V[j + 1] = r / b
    return torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64), used
