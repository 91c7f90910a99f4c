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

from flatness._utils.compat import lbfgsb_kernel, single_threaded_blas
from flatness.results import Result

__all__ = ["MaximizeResult", "curvature_vertex", "maximize_ball", "maximize_box", "vertex_search"]

FunAndGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class MaximizeResult(Result):
    """The best point seen and how it was found (like ``scipy.optimize.OptimizeResult``).

    Examples:
        >>> import numpy as np
        >>> from flatness.algorithms import MaximizeResult, maximize_box
        >>> def f_and_grad(x):  # linear: the maximum is the corner (1, 1)
        ...     return float(x.sum()), np.ones_like(x)
        >>> res = maximize_box(f_and_grad, -np.ones(2), np.ones(2), x0=np.zeros(2), max_iter=5)
        >>> isinstance(res, MaximizeResult), res.x.tolist(), res.fun
        (True, [1.0, 1.0], 2.0)
    """

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

    Examples:
        >>> import numpy as np
        >>> from flatness.algorithms import maximize_box
        >>> c = np.array([2.0, -0.5])
        >>> def f_and_grad(x):  # concave, peak at c
        ...     return float(-((x - c) ** 2).sum()), -2 * (x - c)
        >>> res = maximize_box(f_and_grad, -np.ones(2), np.ones(2), x0=np.zeros(2), max_iter=20)
        >>> np.round(res.x, 6).tolist(), round(res.fun, 6)
        ([1.0, -0.5], -1.0)
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
            if _LBFGSB is not None:
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

    Examples:
        >>> import numpy as np
        >>> from flatness.algorithms import curvature_vertex
        >>> H = np.array([[2.0, 1.0, 0.5], [1.0, 2.0, 0.5], [0.5, 0.5, 1.0]])
        >>> def f_and_grad(x):
        ...     return float(x @ H @ x / 2), H @ x
        >>> z0 = np.array([1.0, 0.2, 0.3])
        >>> s, calls = curvature_vertex(f_and_grad, np.ones(3), g0=np.zeros(3), z0=z0, steps=4)
        >>> (s * s[0]).tolist(), calls  # ±(1, 1, 1): the top eigenvector's signs
        ([1.0, 1.0, 1.0], 3)
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


_MODEL_FLOATS = 250_000  # n × candidate columns, at most (at least 6 columns)


class _SubspaceModel:
    """m(s) = g̃ᵀs + ½ sᵀ M̂ s, M̂ = W Qᵀ + Q Wᵀ − Q (QᵀW) Qᵀ: exact on span(Q) (W = M Q known).

    M̂ agrees with M on every product with a vector of span(Q); off span(Q) it is σ(I − QQᵀ),
    an isotropic guess (σ = 0: the block is dropped, and for M ⪰ 0 m bounds the quadratic
    from below).
    """

    def __init__(self, gt: np.ndarray) -> None:
        self.gt = gt
        self.q = np.zeros((gt.shape[0], 0))
        self.w = np.zeros((gt.shape[0], 0))
        self.sigma = 0.0  # M̂ += σ (I − Q Qᵀ): an isotropic guess of M off span(Q)
        self._qw: np.ndarray | None = None

    @property
    def k(self) -> int:
        return self.q.shape[1]

    def add(self, v: np.ndarray, mv: np.ndarray) -> bool:
        """Add the direction v with its image M v (orthogonalized against the basis, twice)."""
        c = np.zeros(self.k)
        r = v.astype(np.float64, copy=True)
        for _ in range(2):
            d = self.q.T @ r
            r -= self.q @ d
            c += d
        beta = float(np.linalg.norm(r))
        if not beta > 1e-10 * max(float(np.linalg.norm(v)), 1e-300) or not np.all(np.isfinite(mv)):
            return False
        self.q = np.column_stack([self.q, r / beta])
        self.w = np.column_stack([self.w, (mv - self.w @ c) / beta])
        return True

    def t(self) -> np.ndarray:
        t = self.q.T @ self.w
        return (t + t.T) / 2

    def apply(self, s: np.ndarray, t: np.ndarray) -> np.ndarray:
        """M̂ s for the columns of s (n × c): W c + Q (Wᵀs − T c − σ c) + σ s, c = Qᵀs."""
        k = self.k
        if self._qw is None or self._qw.shape[1] != 2 * k:
            self._qw = np.concatenate([self.q, self.w], axis=1)
        cd = self._qw.T @ s  # [Qᵀs; Wᵀs]: one pass over the n × 2k basis
        c = cd[:k]
        out = self._qw @ np.concatenate([cd[k:] - t @ c - self.sigma * c, c])
        if self.sigma:
            out += self.sigma * s
        return out

    def values(self, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(m(s_j), ∇m(s_j)) for the columns s_j of s."""
        ms = self.apply(s, t)
        return self.gt @ s + 0.5 * np.einsum("ij,ij->j", s, ms), self.gt[:, None] + ms

    def ascend(self, s: np.ndarray, t: np.ndarray, rounds: int = 4) -> tuple[np.ndarray, np.ndarray]:
        """Sign iteration s ← sign(∇m(s)) per column, a step kept where m rises."""
        val, grad = self.values(s, t)
        for _ in range(rounds):
            new = np.where(grad < 0, -1.0, 1.0)
            if np.array_equal(new, s):
                break
            nval, ngrad = self.values(new, t)
            better = nval > val
            if not np.any(better):
                break
            s = np.where(better[None, :], new, s)
            val = np.where(better, nval, val)
            grad = np.where(better[None, :], ngrad, grad)
        return s, val


def vertex_search(
    f_and_grad: FunAndGrad,
    half: np.ndarray,
    *,
    g0: np.ndarray,
    z0: np.ndarray,
    steps: int,
    probes: int,
    rng: np.random.Generator,
    draws: int = 32,
) -> tuple[np.ndarray, int]:
    """A point of the box |x_i| ≤ half_i (a vertex unless the model is indefinite) where f is large.

    .. math::
        \\max_{s \\in [-1, 1]^n} m(s) = \\tilde g^\\top s + \\tfrac12 s^\\top \\hat M s,
        \\qquad \\tilde g = E g_0,\\ E = \\mathrm{diag}(\\text{half}),\\ \\hat M \\approx M = E H E

    ``steps`` Lanczos steps from z0 give a basis Q and the products M Q, each from one
    gradient: M z ≈ E (∇f(E z / ‖z‖∞) − g₀) ‖z‖∞, a secant across the box (exact for a
    quadratic). M̂ agrees with M on span(Q) (M̂ = W Qᵀ + Q Wᵀ − Q QᵀW Qᵀ, W = M Q) and is
    σ(I − QQᵀ) off it, σ ≥ 0 the rest of the trace estimated from z0's Rayleigh quotient
    (n·q₁ᵀMq₁ − tr QᵀMQ)/(n − k). Candidates, all on the model (no evaluations): the sign
    vectors of the Ritz vectors, of ``draws`` Gaussian combinations of them weighted by √θ
    (Goemans–Williamson rounding), of the points seen and their mirrors, each improved by the
    sign iteration s ← sign(∇m(s)) (kept where m rises; monotone where M̂ ⪰ 0); where the
    model is indefinite, L-BFGS-B on m from the 4 best (a maximum may lie inside a face).
    Then, ``probes`` times at most, f is evaluated at the model's best point if it is new (its
    gradient there, M s, joins the model: it is then exact at every point seen, and the true
    sign iteration is part of the search), else the model grows by one Lanczos direction (the
    part of M u off span(Q), u its top Ritz vector). Model work: O(n k (draws + k)) per probe.

    Args:
        f_and_grad: ``f_and_grad(x) -> (f(x), ∇f(x))``; called ``steps + probes`` times at most.
        half: the box's half-widths (> 0).
        g0: ∇f at the box's centre x = 0.
        z0: the Lanczos start (e.g. the gradient-sign vertex; then the first call is there).
        steps: Lanczos steps (evaluations).
        probes: further evaluations, at the model's best points or extending the model.
        rng: draws the random combinations.
        draws: random combinations per probe.

    Returns:
        ``(s, evaluations)``: the best point evaluated (by f, in units of ``half``: the box is
        [−1, 1]ⁿ; z0's sign vector where none was) and the calls made.

    Examples:
        >>> import numpy as np
        >>> from flatness.algorithms import vertex_search
        >>> H = np.array([[2.0, 1.0, 0.5], [1.0, 2.0, 0.5], [0.5, 0.5, 1.0]])
        >>> def f_and_grad(x):
        ...     return float(x @ H @ x / 2), H @ x
        >>> rng = np.random.default_rng(0)
        >>> s, calls = vertex_search(f_and_grad, np.ones(3), g0=np.zeros(3), z0=np.ones(3), steps=2, probes=2, rng=rng)
        >>> np.abs(s).tolist(), calls
        ([1.0, 1.0, 1.0], 3)
    """
    half = _vector("half", half)
    n = half.shape[0]
    g0 = _vector("g0", g0, n)
    gt = half * g0
    model = _SubspaceModel(gt)
    symmetric = not np.any(gt)  # at a minimum m(−s) = m(s): a vertex stands for its mirror
    used = 0

    def image(z: np.ndarray) -> tuple[np.ndarray | None, float | None]:
        nonlocal used
        scale = float(np.max(np.abs(z)))
        if not (scale > 0 and math.isfinite(scale)):
            return None, None
        f, g = f_and_grad(half * (z / scale))
        used += 1
        mz = half * (np.asarray(g, dtype=np.float64).reshape(-1) - g0) * scale
        return (mz if np.all(np.isfinite(mz)) else None), float(f)

    def polish(s: np.ndarray, val: np.ndarray, t: np.ndarray, count: int) -> tuple[np.ndarray, float]:
        """An indefinite model can peak inside a face: L-BFGS-B on m from the best vertices."""
        best_j = int(np.argmax(val))
        point, value = s[:, best_j], float(val[best_j])

        def fg(y: np.ndarray) -> tuple[float, np.ndarray]:
            v, g = model.values(y[:, None], t)
            return float(v[0]), g[:, 0]

        for j in np.argsort(-val, kind="stable")[:count]:
            res = maximize_box(fg, -np.ones(n), np.ones(n), x0=s[:, j], max_iter=30, ftol=1e-12, gtol=1e-12)
            if res.fun > value + 1e-12 * abs(value):
                point, value = res.x, res.fun
        return point, value

    z = _vector("z0", z0, n).astype(np.float64, copy=True)
    best_s = np.where(z < 0, -1.0, 1.0)
    best_f = -math.inf
    seen: list[np.ndarray] = []
    # Lanczos (full reorthogonalization): every product extends the model.
    for _ in range(max(0, int(steps))):
        if model.k >= n:
            break
        mz, f = image(z)
        if mz is None or not model.add(z, mz):
            break
        if np.all(np.abs(z) == np.max(np.abs(z))):  # a vertex: its value is known too
            v = np.where(z < 0, -1.0, 1.0)
            seen.append(v)
            if f is not None and f > best_f:
                best_f, best_s = f, v
        z = model.w[:, -1] - model.q @ (model.q.T @ model.w[:, -1])
        if not float(np.linalg.norm(z)) > 0:
            break
    for _ in range(max(0, int(probes))):
        if model.k == 0:
            break
        t = model.t()
        theta, y = np.linalg.eigh(t)
        if model.k < n:
            model.sigma = max(0.0, (n * t[0, 0] - float(np.trace(t))) / (n - model.k))
        ritz = model.q @ y[:, ::-1]
        weights = np.sqrt(np.maximum(theta[::-1], 0.0))
        # Candidate columns: the model's work is O(n k width) per sign-iteration round, so
        # for large n the random draws give way first, then the Ritz vectors.
        width = max(6, _MODEL_FLOATS // n)
        per = width if symmetric else width // 2  # away from a minimum the mirrors count too
        s = np.column_stack([best_s, *seen[-3:], ritz[:, : min(model.k, 8)]])[:, :per]
        room = min(int(draws), per - s.shape[1])
        if room > 0 and weights[0] > 0:
            s = np.column_stack([s, ritz @ (weights[:, None] * rng.standard_normal((model.k, room)))])
        s = np.where(s < 0, -1.0, 1.0)
        if not symmetric:
            s = np.concatenate([s, -s], axis=1)
        s, val = model.ascend(s, t)
        keys = np.packbits(s > 0, axis=0)  # the sign vectors, 8 to a byte: drop duplicates
        first = sorted({keys[:, j].tobytes(): j for j in range(s.shape[1] - 1, -1, -1)}.values())
        s, val = s[:, first], val[first]
        if theta[0] < -1e-12 * max(float(np.max(np.abs(theta))), 1e-300):
            pick, _ = polish(s, val, t, min(4, max(1, width // 16)))
        else:
            pick = s[:, int(np.argmax(val))]
        if any(np.array_equal(pick, v) or (symmetric and np.array_equal(pick, -v)) for v in seen):
            # The model's best point was evaluated: extend the model instead, by the part of
            # M u off span(Q) for the top Ritz vector u (the next Lanczos direction).
            if model.k >= n:
                break
            r = model.w @ y[:, -1]
            r -= model.q @ (model.q.T @ r)
            r -= model.q @ (model.q.T @ r)
            mz, _ = image(r)
            if mz is None or not model.add(r, mz):
                break
            continue
        mz, f = image(pick)
        seen.append(pick)
        if f is not None and f > best_f:
            best_f, best_s = f, pick
        if mz is None or not model.add(pick, mz):
            break
    return best_s, used


# scipy's L-BFGS-B kernel and message tables (a private API, see flatness._utils.compat), or None
# where its interface differs: then ``scipy.optimize.minimize`` runs instead. ``minimize`` turns
# the bounds into n Python tuples and back and walks them one coordinate at a time (about 6 s
# and a GB of Python objects per million parameters); :func:`_lbfgsb_direct` prepares them
# with NumPy.
_LBFGSB = lbfgsb_kernel()


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
    assert _LBFGSB is not None
    setulb, status_messages, task_messages = _LBFGSB
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
        setulb(m, x, low, up, nbd, f, g, factr, gtol, wa, iwa, task, lsave, isave, dsave, maxls, ln_task)
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

    Examples:
        >>> import numpy as np
        >>> from flatness.algorithms import maximize_ball
        >>> M = np.diag([3.0, 1.0])
        >>> def f_and_grad(x):  # a convex quadratic: its maximum on the sphere is the top eigenvector
        ...     return float(x @ M @ x / 2), M @ x
        >>> res = maximize_ball(f_and_grad, radius=1.0, x0=np.array([0.6, 0.8]), max_iter=50)
        >>> np.round(np.abs(res.x), 4).tolist(), round(res.fun, 4)
        ([1.0, 0.0], 1.5)
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
