"""Maximizers of a smooth function of a flat vector over a box or a ball.

The numerical layer of :mod:`flatness.sharpness`: these routines take a function
``f_and_grad(x) -> (f, ∇f)`` of a float64 NumPy vector and know nothing of models, so a
quadratic test is a matrix and users can run them on their own functions.

Both keep the best point of *every* evaluation (an approximate solver may end elsewhere)
and evaluate each point once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.optimize import Bounds, minimize

from flatness._blas import single_threaded_blas
from flatness.results import Result

__all__ = ["MaximizeResult", "curvature_vertex", "maximize_ball", "maximize_box"]

FunAndGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class MaximizeResult(Result):
    """The best point seen and how it was found (like ``scipy.optimize.OptimizeResult``)."""

    x: np.ndarray
    fun: float
    nfev: int
    nit: int
    status: int
    message: str


class _EvaluationLimit(Exception):
    """Raised by the tracker to stop an optimizer at its evaluation budget."""


class _Tracker:
    """Counts evaluations, remembers the best point and caches the last one."""

    def __init__(self, f_and_grad: FunAndGrad, n: int, max_evals: int | None = None) -> None:
        self._f_and_grad = f_and_grad
        self._n = n
        self._max_evals = max_evals
        self.nfev = 0
        self.best_f = -math.inf
        self.best_x: np.ndarray | None = None
        self._last: tuple[np.ndarray, float, np.ndarray] | None = None

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        if self._last is not None and np.array_equal(self._last[0], x):
            return self._last[1], self._last[2]
        if self._max_evals is not None and self.nfev >= self._max_evals:
            raise _EvaluationLimit
        f, g = self._f_and_grad(x)
        f = float(f)
        g = np.asarray(g, dtype=np.float64).reshape(-1)
        if g.shape != (self._n,):
            raise ValueError(f"f_and_grad: the gradient has shape {g.shape}; expected ({self._n},)")
        self.nfev += 1
        # Copies: scipy may reuse its buffers.
        x = np.array(x, dtype=np.float64, copy=True)
        if f > self.best_f or self.best_x is None:
            self.best_f, self.best_x = f, x
        self._last = (x, f, g)
        return f, g


def _vector(name: str, value: np.ndarray, n: int | None = None) -> np.ndarray:
    out = np.asarray(value, dtype=np.float64).reshape(-1) if np.ndim(value) else None
    if out is None or (n is not None and out.shape != (n,)):
        raise ValueError(f"{name}: expected a flat vector of length {n}, got shape {np.shape(value)}")
    return out


def maximize_box(
    f_and_grad: FunAndGrad,
    lower: np.ndarray,
    upper: np.ndarray,
    *,
    x0: np.ndarray,
    max_iter: int,
    max_evals: int | None = None,
    ftol: float = 1e-12,
    gtol: float = 1e-10,
    memory: int = 10,
    relative_to: float | None = None,
) -> MaximizeResult:
    """Maximize f over the box lower ≤ x ≤ upper with L-BFGS-B (scipy), keeping the best point.

    .. math:: \\max_{l \\le x \\le u} f(x) \\quad\\text{as}\\quad \\min_{l \\le x \\le u} -f(x)

    L-BFGS-B: Byrd, Lu, Nocedal, Zhu (1995), SIAM J. Sci. Comput. 16(5). Runs in float64.
    Each evaluation is one call of ``f_and_grad``; a point asked for twice is served from a cache.

    Args:
        f_and_grad: ``f_and_grad(x) -> (f(x), ∇f(x))`` for a float64 vector ``x``.
        lower: the box (``lower[i] == upper[i]`` fixes a coordinate).
        upper: as ``lower``.
        x0: the start, clipped into the box.
        max_iter: L-BFGS-B iterations (each takes one or more evaluations).
        max_evals: hard cap on evaluations (scipy's own ``maxfun`` lets a line search run
            past it); default: none.
        ftol: scipy's stopping tolerances (relative decrease, projected gradient).
        gtol: as ``ftol``.
        memory: number of L-BFGS correction pairs.
        relative_to: a reference value f_ref (e.g. f at the centre of the box): L-BFGS-B then
            sees the gain (f − f_ref) / s, with s = |f(x0) − f_ref| fixed at the start (1 where that
            is 0 or not finite), instead of f. scipy's stopping tests are absolute where |f| < 1
            (``ftol`` relative to max(|f|, 1), ``gtol`` on the projected gradient), so a gain of
            1e-11 over a tiny box would stop it at once; scaled, they are relative to the gain.
            The values reported (``fun``) are f's.

    Returns:
        MaximizeResult: the best point seen, f there, evaluations, iterations, scipy's status
        and message.

    Raises:
        ValueError: for bounds of the wrong shape, ``lower > upper`` or ``max_iter < 1``.
    """
    lower = _vector("lower", lower)
    n = lower.shape[0]
    upper = _vector("upper", upper, n)
    x0 = _vector("x0", x0, n)
    if np.any(lower > upper):
        raise ValueError("lower, upper: expected lower <= upper elementwise")
    if max_iter < 1:
        raise ValueError(f"max_iter: got {max_iter}; expected an int >= 1")
    if max_evals is not None and max_evals < 1:
        raise ValueError(f"max_evals: got {max_evals}; expected an int >= 1 or None")
    tracker = _Tracker(f_and_grad, n, max_evals)
    iterations = [0]

    scale: list[float] = []  # s, fixed at the first evaluation (L-BFGS-B's is at x0)

    def negated(x: np.ndarray) -> tuple[float, np.ndarray]:
        f, g = tracker(x)
        if relative_to is None:
            return -f, -g
        if not scale:
            gain = abs(f - relative_to)
            scale.append(gain if math.isfinite(gain) and gain > 0 else 1.0)
        return -(f - relative_to) / scale[0], -g / scale[0]

    def count(_xk: np.ndarray) -> None:
        iterations[0] += 1

    if relative_to is not None:
        relative_to = float(relative_to)
    start = np.clip(x0, lower, upper)
    options = {"maxiter": int(max_iter), "ftol": ftol, "gtol": gtol, "maxcor": memory}
    try:
        with single_threaded_blas():
            if _setulb is not None:
                nit, status, message = _lbfgsb_direct(negated, start, lower, upper, callback=count, **options)
            else:
                res = minimize(
                    negated,
                    start,
                    jac=True,
                    method="L-BFGS-B",
                    bounds=Bounds(lower, upper),
                    callback=count,
                    options=options,
                )
                nit, status, message = int(res.nit), int(res.status), str(res.message)
    except _EvaluationLimit:
        nit, status, message = iterations[0], 1, f"evaluation limit reached (max_evals={max_evals})"
    assert tracker.best_x is not None
    return MaximizeResult(
        x=tracker.best_x, fun=tracker.best_f, nfev=tracker.nfev, nit=nit, status=status, message=message
    )


def curvature_vertex(
    f_and_grad: FunAndGrad,
    half: np.ndarray,
    *,
    g0: np.ndarray,
    z0: np.ndarray,
    steps: int,
) -> tuple[np.ndarray, int]:
    """A vertex s ⊙ half of the box |x_i| ≤ half_i where the local quadratic model is large.

    .. math::
        \\max_{s \\in \\{\\pm 1\\}^n} \\tilde g^\\top s + \\tfrac12 s^\\top M s,\\qquad
        \\tilde g = E g_0,\\ M = E H E,\\ E = \\mathrm{diag}(\\text{half})

    relaxed to the top eigenvector (z, t) of the homogenized matrix [[M, g̃], [g̃ᵀ, 0]] (with
    t = ±1 its quadratic form is 2 m(t s)), found by ``steps`` Lanczos steps (full
    reorthogonalization, the top Ritz vector; exact once ``steps`` > n), and rounded:
    s = sign(z) · sign(t). The products M z come from gradients, one evaluation each:
    M z ≈ E (∇f(E z / ‖z‖∞) − g₀) ‖z‖∞, a secant across the box (exact for a quadratic), at a
    point on the box's boundary. At a minimum (g₀ = 0) this is the sign vector of the top
    eigenvector of E H E, the usual rounding of the maximum of a convex quadratic over the
    cube; a start at random signs finds a local maximum of it only.

    Args:
        f_and_grad: ``f_and_grad(x) -> (f(x), ∇f(x))``; called ``steps`` times at most.
        half: the box's half-widths (> 0).
        g0: ∇f at the box's centre x = 0.
        z0: the Lanczos start (e.g. a seeded Gaussian vector).
        steps: Lanczos steps (evaluations).

    Returns:
        ``(signs, evaluations)``: a ±1 vector (ties broken towards +1) and the calls made.
    """
    half = _vector("half", half)
    n = half.shape[0]
    g0 = _vector("g0", g0, n)
    gt = half * g0
    start = np.append(_vector("z0", z0, n), 0.0)
    if np.any(gt):
        start[n] = float(np.linalg.norm(start[:n])) or 1.0
    used = 0

    def operator(v: np.ndarray) -> np.ndarray:
        nonlocal used
        z, t = v[:n], v[n]
        scale = float(np.max(np.abs(z)))
        mz = np.zeros(n)
        if scale > 0 and math.isfinite(scale):
            _, g = f_and_grad(half * (z / scale))
            used += 1
            mz = half * (np.asarray(g, dtype=np.float64).reshape(-1) - g0) * scale
        return np.append(mz + gt * t, gt @ z)

    norm = float(np.linalg.norm(start))
    if not norm > 0 or not math.isfinite(norm):
        return np.ones(n), 0
    basis = [start / norm]
    images: list[np.ndarray] = []
    for _ in range(max(0, int(steps))):
        w = operator(basis[-1])
        if not np.all(np.isfinite(w)):
            break
        images.append(w)
        r = w.copy()
        for _ in range(2):  # classical Gram–Schmidt, twice
            r -= np.array(basis).T @ (np.array(basis) @ r)
        beta = float(np.linalg.norm(r))
        if not beta > 1e-12 * max(float(np.linalg.norm(w)), 1e-300) or len(basis) > n:
            break
        basis.append(r / beta)
    k = len(images)
    if k == 0:
        u = basis[0]
    else:
        q = np.array(basis[:k])
        t_mat = q @ np.array(images).T
        _, vecs = np.linalg.eigh((t_mat + t_mat.T) / 2)
        u = q.T @ vecs[:, -1]
    signs = np.where(u[:n] < 0, -1.0, 1.0)
    return (-signs if u[n] < 0 else signs), used


def _find_setulb() -> Callable[..., Any] | None:
    """scipy's L-BFGS-B kernel when its interface is the one :func:`_lbfgsb_direct` drives.

    ``scipy.optimize.minimize`` turns the bounds into a list of n Python tuples and back and
    then walks them one coordinate at a time: about 6 s and a GB of Python objects per
    million parameters. :func:`_lbfgsb_direct` is the same driver loop (scipy >= 1.15, the C
    kernel) with the bounds prepared by NumPy; other scipy versions use ``minimize``.
    """
    try:
        from scipy.optimize import _lbfgsb
        from scipy.optimize._lbfgsb_py import status_messages, task_messages
    except ImportError:
        return None
    doc = (getattr(_lbfgsb.setulb, "__doc__", None) or "").replace(" ", "")
    expected = "setulb(m,x,l,u,nbd,f,g,factr,pgtol,wa,iwa,task,lsave,isave,dsave,maxls,ln_task)"
    if not doc.startswith(expected) or not isinstance(status_messages, dict) or not task_messages:
        return None
    return _lbfgsb.setulb


_setulb = _find_setulb()


def _lbfgsb_direct(
    fun: FunAndGrad,
    x0: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    *,
    maxiter: int,
    ftol: float,
    gtol: float,
    maxcor: int,
    callback: Callable[[np.ndarray], None],
    maxls: int = 20,
) -> tuple[int, int, str]:
    """Minimize ``fun`` on the box as ``scipy.optimize.minimize(method="L-BFGS-B")`` does.

    The loop of scipy's ``_minimize_lbfgsb`` (scipy >= 1.15) without its O(n) Python work:
    the same kernel, arguments, iterates, stopping rules, status and message (tested equal).
    Returns ``(nit, status, message)``; the points are seen through ``fun``.
    """
    from scipy.optimize._lbfgsb_py import status_messages, task_messages

    assert _setulb is not None
    n, m = x0.shape[0], int(maxcor)
    has_l, has_u = np.isfinite(lower), np.isfinite(upper)
    # nbd: 0 unbounded, 1 lower only, 2 both, 3 upper only (scipy's bounds_map).
    nbd = np.where(has_l, np.where(has_u, 2, 1), np.where(has_u, 3, 0)).astype(np.int32)
    low = np.where(has_l, lower, 0.0).astype(np.float64)
    up = np.where(has_u, upper, 0.0).astype(np.float64)
    x = np.array(x0, dtype=np.float64)
    f: Any = np.array(0.0, dtype=np.float64)
    g = np.zeros(n, dtype=np.float64)
    wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, np.float64)
    iwa = np.zeros(3 * n, dtype=np.int32)
    task = np.zeros(2, dtype=np.int32)
    ln_task = np.zeros(2, dtype=np.int32)
    lsave = np.zeros(4, dtype=np.int32)
    isave = np.zeros(44, dtype=np.int32)
    dsave = np.zeros(29, dtype=np.float64)
    factr = ftol / np.finfo(float).eps
    nit = 0
    while True:
        g = g.astype(np.float64)
        _setulb(m, x, low, up, nbd, f, g, factr, gtol, wa, iwa, task, lsave, isave, dsave, maxls, ln_task)
        if task[0] == 3:  # f and g wanted at x
            f, g = fun(x.copy())
        elif task[0] == 1:  # a new iterate
            nit += 1
            callback(x)
            if nit >= maxiter:
                task[0], task[1] = 5, 504
        else:
            break
    status = 0 if task[0] == 4 else (1 if nit >= maxiter else 2)
    return nit, status, status_messages[int(task[0])] + ": " + task_messages[int(task[1])]


def maximize_ball(
    f_and_grad: FunAndGrad,
    *,
    radius: float,
    x0: np.ndarray,
    max_iter: int,
    tol: float = 1e-10,
) -> MaximizeResult:
    """Maximize f over the ball ‖x‖₂ ≤ radius by projected gradient ascent with BB steps.

    .. math:: x_{k+1} = P_{\\|x\\| \\le r}\\bigl(x_k + \\alpha_k \\nabla f(x_k)\\bigr)

    Step α_k: Barzilai–Borwein (1988, IMA J. Numer. Anal. 8) when f is locally concave along
    the last step; grown fourfold otherwise, which on a convex part turns the iteration into
    the power method on the sphere (the maximum of a quadratic form there is its top
    eigenvector, and the sphere has no other local maximum). A step that lowers f is
    rejected and the step size cut fourfold, so the iterates ascend monotonically.

    Args:
        f_and_grad: ``f_and_grad(x) -> (f(x), ∇f(x))`` for a float64 vector ``x``.
        radius: the ball's radius r > 0.
        x0: the start, projected onto the ball; it is evaluated first.
        max_iter: iterations after the start; each takes exactly one evaluation.
        tol: stop when a step moves less than ``tol * radius``.

    Returns:
        MaximizeResult: the best point seen, f there, evaluations (``1 + nit``), iterations,
        status (0: converged, 1: iteration limit) and a message.

    Raises:
        ValueError: for ``radius <= 0`` or ``max_iter < 0``.
    """
    if not radius > 0:
        raise ValueError(f"radius: got {radius}; expected > 0")
    if max_iter < 0:
        raise ValueError(f"max_iter: got {max_iter}; expected an int >= 0")
    x = _vector("x0", x0).copy()
    tracker = _Tracker(f_and_grad, x.shape[0])

    def project(v: np.ndarray) -> np.ndarray:
        norm = float(np.linalg.norm(v))
        return v if norm <= radius else v * (radius / norm)

    with single_threaded_blas():
        x = project(x)
        f, g = tracker(x)
        gnorm = float(np.linalg.norm(g))
        step = radius / gnorm if gnorm > 0 else 1.0
        status, message, nit = 1, "iteration limit reached", 0
        while nit < max_iter:
            if not gnorm > 0:
                status, message = 0, "the gradient is zero"
                break
            step = min(max(step, 1e-12 * radius / gnorm), 1e12 * radius / gnorm)
            x_new = project(x + step * g)
            s = x_new - x
            if float(np.linalg.norm(s)) <= tol * radius:
                status, message = 0, "converged: the step is below tol * radius"
                break
            f_new, g_new = tracker(x_new)
            nit += 1
            if f_new >= f:
                curvature = -float(s @ (g_new - g))
                step = float(s @ s) / curvature if curvature > 0 else 4.0 * step
                x, f, g = x_new, f_new, g_new
                gnorm = float(np.linalg.norm(g))
            else:
                step *= 0.25
    assert tracker.best_x is not None
    return MaximizeResult(
        x=tracker.best_x, fun=tracker.best_f, nfev=tracker.nfev, nit=nit, status=status, message=message
    )
