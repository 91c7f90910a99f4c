"""Sharpness of a minimum: Keskar's ε-box measure, adaptive worst-case and average-case sharpness.

- :func:`sharpness`: Keskar et al. (2017, arXiv 1609.04836), Metric 2.1, by L-BFGS-B on the
  box C_ε, in the full space or a random (or given) subspace.
- :func:`adaptive_sharpness`: worst-case (adaptive) sharpness over an ℓ_p ball scaled by |θ|
  (Kwon et al. 2021, arXiv 2102.11600; Andriushchenko et al. 2023, arXiv 2302.07011).
- :func:`average_sharpness`: the expected loss increase under Gaussian perturbations scaled by
  |θ| (Andriushchenko et al. 2023).

All evaluate the full data through :class:`flatness.Objective` and leave the model untouched.
The optimizers live in :mod:`flatness.algorithms.maximize` and know nothing of models.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from flatness._utils.progress import Progress, ProgressArg
from flatness._utils.validate import check_int, check_positive, check_seed
from flatness.algorithms.maximize import MaximizeResult, maximize_ball, maximize_box, vertex_search
from flatness.objective import NonFiniteLossError, Objective, check_options
from flatness.objective._guard import model_guard
from flatness.results import Result

__all__ = [
    "AdaptiveSharpnessResult",
    "AverageSharpnessResult",
    "SharpnessResult",
    "adaptive_sharpness",
    "average_sharpness",
    "sharpness",
]


@dataclasses.dataclass(frozen=True)
class SharpnessResult(Result):
    """Keskar's φ and the evidence: the losses, the worst perturbation, the optimizer's report.

    Attributes:
        value: φ in percent, (max_loss − loss) / (1 + loss) × 100.
        loss: f(x), the loss at the model's parameters.
        max_loss: the largest loss seen in the box, f(x + A y).
        perturbation: A y at the best point, shaped like the parameters.
        n_evals: loss+gradient passes over the data (the one at x included).
        nit, status, message: L-BFGS-B's iterations, status and message (status −1: stopped by a
            non-finite loss at a perturbed point, see :class:`flatness.NonFiniteLossError`).
        epsilon, subspace, max_iter, seed, start: the options used (``subspace``: p, or None
            for the full space).

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> res = flatness.sharpness(model, loss_fn, data, epsilon=1e-3, subspace=2)
        >>> round(res.value, 4), res.subspace, sorted(res.perturbation)
        (0.0777, 2, ['bias', 'weight'])
    """

    value: float
    loss: float
    max_loss: float
    perturbation: dict[str, torch.Tensor]
    n_evals: int
    nit: int
    status: int
    message: str
    epsilon: float
    subspace: int | None
    max_iter: int
    seed: int
    start: str = "auto"


@dataclasses.dataclass(frozen=True)
class AdaptiveSharpnessResult(Result):
    """Worst-case (adaptive) sharpness L(θ + δ*) − L(θ) and the evidence.

    Attributes:
        value: max_loss − loss (a loss difference, not a percentage).
        loss: L(θ).
        max_loss: the largest loss seen in the feasible set, L(θ + δ).
        perturbation: δ at the best point, shaped like the parameters.
        n_evals: loss+gradient passes over the data (the one at θ included).
        nit, status, message: the optimizer's iterations, status and message.
        rho, p, adaptive, eta, max_iter, seed, start: the options used (``start`` matters
            for p = ∞ only).

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> res = flatness.adaptive_sharpness(model, loss_fn, data, rho=0.05, p="inf")
        >>> res.p, res.adaptive, res.n_evals
        (inf, True, 5)
    """

    value: float
    loss: float
    max_loss: float
    perturbation: dict[str, torch.Tensor]
    n_evals: int
    nit: int
    status: int
    message: str
    rho: float
    p: float
    adaptive: bool
    eta: float
    max_iter: int
    seed: int
    start: str = "auto"


@dataclasses.dataclass(frozen=True)
class AverageSharpnessResult(Result):
    """Average-case sharpness E[L(θ + δ)] − L(θ), its standard error and the options used.

    Attributes:
        value: the sample mean of L(θ + δ_s) − L(θ) over ``n_samples`` draws.
        std_error: its standard error, sample std / √n_samples (NaN for one sample).
        loss: L(θ).
        n_evals: loss passes over the data (the one at θ included).
        rho, n_samples, adaptive, eta, seed: the options used.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> res = flatness.average_sharpness(model, loss_fn, data, rho=0.05, n_samples=4, adaptive=False)
        >>> res.n_samples, res.adaptive, res.n_evals
        (4, False, 5)
    """

    value: float
    std_error: float
    loss: float
    n_evals: int
    rho: float
    n_samples: int
    adaptive: bool
    eta: float
    seed: int


# ---------------------------------------------------------------------------- helpers
def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


class _PerturbedNonFinite(Exception):
    """The loss or gradient is not finite at a perturbed point (caught by the measures)."""

    def __init__(self, error: NonFiniteLossError, y: np.ndarray, index: int) -> None:
        super().__init__(str(error))
        self.error, self.y, self.index = error, y, index


class _Evaluator:
    """θ0 + map(y) → (L, map⁎(∇L)) with one loss+gradient pass per new point, as float64 NumPy.

    Remembers the best finite point seen (every call counts, whoever makes it) and serves the
    last few points from a cache, so a start evaluated while choosing it costs nothing more.
    A non-finite loss at θ (y = 0, the first call) raises :class:`NonFiniteLossError` saying
    so; at a perturbed point it raises :class:`_PerturbedNonFinite` for the measure to report.
    """

    def __init__(self, obj: Objective, progress: Progress, forward: Any = None, adjoint: Any = None) -> None:
        self.obj = obj
        self.progress = progress
        self._forward = forward
        self._adjoint = adjoint
        self.n_evals = 0
        self.best_f = -math.inf
        self.best_y: np.ndarray | None = None
        self._cache: dict[bytes, tuple[float, np.ndarray]] = {}

    def delta(self, y: np.ndarray) -> torch.Tensor:
        yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64)).to(
            device=self.obj.device, dtype=self.obj.dtype
        )
        return yt if self._forward is None else self._forward(yt)

    def __call__(self, y: np.ndarray) -> tuple[float, np.ndarray]:
        y = np.array(y, dtype=np.float64, copy=True).reshape(-1)
        key = y.tobytes()
        if key in self._cache:
            value, grad_np = self._cache[key]
            return value, grad_np.copy()
        try:
            loss, grad = self.obj.loss_and_grad(self.obj.theta0 + self.delta(y))
        except NonFiniteLossError as e:
            if self.n_evals == 0:
                raise NonFiniteLossError(
                    f"{e} — at θ itself, the model's own parameters, before any perturbation"
                ) from e
            raise _PerturbedNonFinite(e, y, self.n_evals) from e
        self.n_evals += 1
        value = float(loss)
        self.progress.update(loss=value)
        if self._adjoint is not None:
            grad = self._adjoint(grad)
        grad_np = _to_numpy(grad)
        if value > self.best_f or self.best_y is None:
            self.best_f, self.best_y = value, y
        if len(self._cache) >= 8:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (value, grad_np)
        return value, grad_np.copy()


def _box_maximum(
    evaluator: _Evaluator,
    half: np.ndarray,
    grad0: np.ndarray,
    generator: torch.Generator,
    *,
    start: str,
    max_iter: int,
    max_evals: int,
    tol: float,
    relative_to: float | None = None,
) -> MaximizeResult:
    """max f(x + A y) over |y_i| ≤ half_i by L-BFGS-B from a vertex chosen by ``start``.

    ``"keskar"``: L-BFGS-B from the gradient-sign vertex (seeded random signs where ∇f = 0),
    Keskar et al.'s single run. ``"auto"``: a model-guided search
    (:func:`flatness.algorithms.maximize.vertex_search`: ``_LANCZOS_STEPS`` Lanczos steps
    started at that same vertex, whose first evaluation is the vertex itself, then up to
    ``_PROBES`` evaluations at the quadratic model's best points) and L-BFGS-B from the best
    point it evaluated. Every evaluation counts against ``max_evals``, one always left to
    L-BFGS-B; the evaluator keeps the best point of all.
    """
    used = 0
    gradient_vertex = _random_signs(grad0, generator) * half
    x0 = gradient_vertex
    steps = min(_LANCZOS_STEPS, half.shape[0] + 1, max(0, max_evals - 2))
    if start == "auto" and steps > 0:
        probes = min(_PROBES, max(0, max_evals - 1 - steps))
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        signs, used = vertex_search(
            evaluator,
            half,
            g0=grad0,
            z0=gradient_vertex / half,
            steps=steps,
            probes=probes,
            rng=np.random.default_rng(seed),
        )
        x0 = signs * half
    res = maximize_box(
        evaluator,
        -half,
        half,
        x0=x0,
        max_iter=max_iter,
        max_evals=max(1, max_evals - used),
        ftol=tol,
        relative_to=relative_to,
    )
    return res


# Evaluations of start="auto" before L-BFGS-B: Lanczos steps, then probes of the model's best
# points (benchmarks/bench_keskar_quality.py and docs/sharpness.md: mean φ / exact φ 0.998,
# worst 0.89, at 9 evaluations on held-out quadratic families at a minimum, against 0.983 and
# 0.56 at 7 with the Lanczos steps alone).
_LANCZOS_STEPS = 5
_PROBES = 4
STARTS = ("auto", "keskar")


def _random_signs(g: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """sign(g), with seeded random ±1 where g is zero (at a minimum y = 0 cannot ascend)."""
    coins = torch.randint(0, 2, (g.shape[0],), generator=generator).numpy() * 2.0 - 1.0
    return np.where(g > 0, 1.0, np.where(g < 0, -1.0, coins))


def _max_evals(max_evals: Any, max_iter: int) -> int:
    if max_evals is None:
        return 3 * max_iter + 10
    check_int("max_evals", max_evals, 1)
    return int(max_evals)


def _check_tol(tol: Any) -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol: expected a number >= 0, got {tol!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol: got {tol!r}; expected a finite number >= 0")


def _check_start(start: Any) -> None:
    if not isinstance(start, str) or start not in STARTS:
        raise ValueError(f"start: got {start!r}; expected one of {STARTS}")


def _subspace_matrix(
    subspace: Any, obj: Objective, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, A⁺x): A in the objective's dtype and device, A⁺x in float64 (n×p work only)."""
    n = obj.n
    x = obj.theta0.to(torch.float64)
    if isinstance(subspace, (int, np.integer)) and not isinstance(subspace, bool):
        p = int(subspace)
        if not 1 <= p <= n:
            raise ValueError(
                f"subspace: got p={p}; expected 1 <= p <= n = {n} (the number of parameters), "
                "or None for the full space"
            )
        # Orthonormal columns (Haar): Q of a Gaussian n×p matrix G = QR with diag(R) > 0.
        # Drawn in float32 (4x faster on the CPU), orthonormalized in float64.
        gauss = torch.randn(n, p, generator=generator).to(device=obj.device, dtype=torch.float64)
        q = None
        if n >= 8 * p:
            # Cholesky QR: R = chol(GᵀG)ᵀ, Q = G R⁻¹ — a few times faster than Householder
            # and the same Q to rounding: cond(G) ≤ ~2 here, so ‖QᵀQ − I‖ ~ 1e-15.
            chol, info = torch.linalg.cholesky_ex(gauss.T @ gauss)
            if int(info) == 0:
                q = torch.linalg.solve_triangular(chol.T, gauss, upper=True, left=False)
        if q is None:
            q, r = torch.linalg.qr(gauss)
            q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
        return q.to(obj.dtype), q.T @ x.to(q.device)
    if isinstance(subspace, np.ndarray):
        subspace = torch.from_numpy(subspace)
    if not isinstance(subspace, torch.Tensor):
        raise TypeError(
            "subspace: expected None (full space), an int p or an n×p matrix (Tensor or ndarray), "
            f"got {type(subspace).__name__}"
        )
    if subspace.ndim != 2 or subspace.shape[0] != n or not 1 <= subspace.shape[1] <= n:
        raise ValueError(
            f"subspace: a matrix of shape {tuple(subspace.shape)}; expected (n, p) = ({n}, p) "
            f"with 1 <= p <= {n}"
        )
    if not subspace.is_floating_point() or not bool(torch.isfinite(subspace).all()):
        raise ValueError("subspace: the matrix must be floating point with finite entries")
    a64 = subspace.detach().to(device=obj.device, dtype=torch.float64)
    # A⁺x by a thin SVD of the n×p matrix (handles rank deficiency; never n×n).
    u, s, vh = torch.linalg.svd(a64, full_matrices=False)
    cutoff = max(a64.shape) * torch.finfo(torch.float64).eps * (s.max() if s.numel() else 0.0)
    inv = torch.where(s > cutoff, 1.0 / s, torch.zeros_like(s))
    pinv_x = vh.T @ (inv * (u.T @ x.to(a64.device)))
    return a64.to(obj.dtype), pinv_x


def _space_subspace(
    subspace: Any, obj: Objective, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A's local rows (n_local, p), A⁺x = Aᵀx) of a random orthonormal A, drawn by ``obj.space``.

    For objectives whose vectors are not whole in this process: A's columns are p Gaussian
    vectors drawn by the objective's vector space (each rank its rows), orthonormalized there
    (CholeskyQR2 on a sharded space: one p×p reduction each time).
    """
    if subspace is None or not (isinstance(subspace, (int, np.integer)) and not isinstance(subspace, bool)):
        raise ValueError(
            f"subspace: for {obj.backend.description} pass an int p (a random p-dimensional "
            "subspace; Keskar et al. used p = 100): the full-space box maximization (L-BFGS-B) "
            f"and a given n×p matrix need whole vectors in one process; got {type(subspace).__name__}"
        )
    p = int(subspace)
    if not 1 <= p <= obj.n:
        raise ValueError(f"subspace: got p={p}; expected 1 <= p <= n = {obj.n} (the number of parameters)")
    q = obj.space.orthonormalize(obj.space.randn(generator, p).double())  # (p, n_local)
    center = obj.space.coeffs(q, obj.theta0.double()).cpu()
    return q.T.to(obj.dtype), center


# ---------------------------------------------------------------------------- Keskar
def sharpness(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    epsilon: float = 1e-3,
    subspace: int | torch.Tensor | np.ndarray | None = None,
    max_iter: int = 10,
    max_evals: int | None = None,
    tol: float = 1e-10,
    start: str = "auto",
    seed: int = 0,
    progress: ProgressArg = False,
    **options: Any,
) -> SharpnessResult:
    """Keskar et al.'s ε-sharpness φ: the largest relative loss increase in a box around θ.

    .. math::
        C_\\varepsilon = \\{ z \\in \\mathbb{R}^p : |z_i| \\le \\varepsilon (|(A^+x)_i| + 1) \\},
        \\qquad
        \\phi_{x,f}(\\varepsilon, A) =
        \\frac{\\max_{y \\in C_\\varepsilon} f(x + Ay) - f(x)}{1 + f(x)} \\times 100

    Keskar, Mudigere, Nocedal, Smelyanskiy, Tang (2017), "On Large-Batch Training for Deep
    Learning: Generalization Gap and Sharp Minima", arXiv 1609.04836, Metric 2.1. Defined for
    f(x) > −1. The maximum is approximated by L-BFGS-B (scipy, float64, ``max_iter`` iterations,
    as in the paper) from a box vertex: ``start="keskar"`` the gradient-sign vertex;
    ``start="auto"`` the best point of a search guided by a quadratic model of f over the box
    (docs: "sharpness"; its quality is measured by ``benchmarks/bench_keskar_quality.py``). The
    largest loss seen, x included, is reported, so φ ≥ 0. ``subspace=p`` draws A with p
    orthonormal columns (Haar) from ``seed``; no n × n matrix is formed.

    Cost: ``n_evals`` loss+gradient passes: one at x, then at most ``max_evals`` (default
    ``3 * max_iter + 10``) for the start (``"auto"``: up to 9) and L-BFGS-B.

    Args:
        model: the network (left untouched).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean loss.
        data: a DataLoader, an iterable of batches or one ``(inputs, targets)`` batch.
        epsilon: box size ε > 0 (the paper uses 1e-3 and 5e-4).
        subspace: None (full space, A = I), an int p (random A, the paper used p = 100) or
            an n×p matrix (used as given, A⁺x by a thin SVD).
        max_iter: L-BFGS-B iterations (paper: 10).
        max_evals: cap on the evaluations after x; ``n_evals <= max_evals + 1``.
        tol: L-BFGS-B stops when the loss rises by less than ``tol * max(|f|, 1)`` in an
            iteration (scipy's ``ftol``).
        start: ``"auto"`` (default) or ``"keskar"`` (one L-BFGS-B run from the gradient-sign
            vertex).
        seed: seeds the random subspace and the random start signs (a local generator).
        progress: False, True (a line on stderr) or a callable ``(step, total, info)``.
        **options: forwarded to :class:`flatness.Objective` (``params``, ``reduction``,
            ``dtype``, ``batch_loss``, ``train``, ``max_batches``, ...).

    Returns:
        SharpnessResult: ``value`` (φ, percent), ``loss``, ``max_loss``, ``perturbation``,
        ``n_evals``, the optimizer's ``nit``/``status``/``message`` and the options used.

    Raises:
        ValueError: ε ≤ 0, max_iter < 1, p ∉ [1, n], a matrix not of shape (n, p), an unknown
            ``start``, or f(x) ≤ −1 (φ undefined; the message names the alternatives).
        TypeError: arguments of the wrong type.
        NonFiniteLossError: the loss is not finite at θ or at a perturbed point; then its
            ``best`` holds the result at the best finite point found (a lower bound, status −1).

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> res = flatness.sharpness(model, loss_fn, data, epsilon=1e-3)
        >>> res.value > 0, res.max_loss >= res.loss, res.n_evals
        (True, True, 5)
    """
    check_options(sharpness, options)
    check_positive("epsilon", epsilon)
    _check_tol(tol)
    check_int("max_iter", max_iter, 1)
    max_evals = _max_evals(max_evals, max_iter)
    _check_start(start)
    check_seed(seed)
    with model_guard(model):
        obj = Objective(model, loss_fn, data, **options)
        generator = torch.Generator().manual_seed(int(seed))
        if not obj.supports("whole_vectors"):
            a, center = _space_subspace(subspace, obj, generator)
            rows = a.T  # (p, n_local): the coefficients Aᵀg are inner products, summed over ranks
            p = a.shape[1]
            evaluator = _Evaluator(
                obj,
                Progress(progress, total=None, desc="sharpness"),
                forward=lambda y: a @ y,
                adjoint=lambda g: obj.space.coeffs(rows, g),
            )
        elif subspace is None:
            a, center, p = None, obj.theta0.to(torch.float64), None
            evaluator = _Evaluator(obj, Progress(progress, total=None, desc="sharpness"))
        else:
            a, center = _subspace_matrix(subspace, obj, generator)
            p = a.shape[1]
            evaluator = _Evaluator(
                obj,
                Progress(progress, total=None, desc="sharpness"),
                forward=lambda y: a @ y,
                adjoint=lambda g: a.T @ g,
            )
        dim = obj.n if a is None else p
        half = float(epsilon) * (np.abs(_to_numpy(center)) + 1.0)

        def result(best_f: float, y_best: np.ndarray, nit: int, status: int, message: str) -> SharpnessResult:
            if not best_f > loss0:
                best_f, y_best = loss0, np.zeros(dim)
            delta = evaluator.delta(y_best)
            return SharpnessResult(
                value=(best_f - loss0) / (1.0 + loss0) * 100.0,
                loss=loss0,
                max_loss=best_f,
                perturbation={k: v.detach().clone() for k, v in obj.unflatten(delta).items()},
                n_evals=evaluator.n_evals,
                nit=nit,
                status=status,
                message=message,
                epsilon=float(epsilon),
                subspace=p,
                max_iter=int(max_iter),
                seed=int(seed),
                start=start,
            )

        try:
            loss0, grad0 = evaluator(np.zeros(dim))
            if not 1.0 + loss0 > 0:
                raise ValueError(
                    f"sharpness: Keskar's φ = 100·(max f − f(x)) / (1 + f(x)) is defined for "
                    f"f(x) > −1, but the loss at the model's parameters is f(x) = {loss0:.6g}, which "
                    "would make φ negative or infinite. The normalization assumes a loss ≥ 0 (cross-"
                    "entropy, MSE). For a loss that can be ≤ −1, shift it by a constant "
                    "(batch_loss=lambda model, batch: my_loss(model, batch) + c leaves max f − f(x) "
                    "unchanged), or report the unnormalized increase over the same box: "
                    f"adaptive_sharpness(..., rho={float(epsilon)!r}, p='inf', eta=1.0) maximizes "
                    "f over |δ_i| ≤ ε(|x_i| + 1) in the full space"
                )
            res = _box_maximum(
                evaluator,
                half,
                grad0,
                generator,
                start=start,
                max_iter=max_iter,
                max_evals=max_evals,
                tol=tol,
            )
        except _PerturbedNonFinite as e:
            _raise_perturbed(e, evaluator, "sharpness", f"epsilon={float(epsilon)!r}", result, loss0)
        finally:
            evaluator.progress.close()
        assert evaluator.best_y is not None
        return result(evaluator.best_f, evaluator.best_y, res.nit, res.status, res.message)


def _raise_perturbed(
    e: _PerturbedNonFinite,
    evaluator: _Evaluator,
    name: str,
    size: str,
    result: Callable[[float, np.ndarray, int, int, str], Any],
    loss0: float,
) -> NoReturn:
    """Re-raise a non-finite loss at a perturbed point with its place and the best result so far."""
    assert evaluator.best_y is not None
    message = f"stopped: the loss is not finite at evaluation {e.index + 1}"
    best = result(evaluator.best_f, evaluator.best_y, 0, -1, message)
    step = float(np.max(np.abs(e.y))) if e.y.size else 0.0
    raise NonFiniteLossError(
        f"{name}: {e.error}, at a perturbed point θ + δ (evaluation {e.index + 1}, ‖y‖∞ = {step:.3g} "
        f"in the solver's coordinates), not at θ, where the loss is {loss0:.6g}. The maximum over "
        f"the perturbation set is then +inf (an overflow) or undefined (NaN), so no value is "
        f"returned; the error's .best holds the result at the best finite point found so far "
        f"(value {best.value:.6g}, a lower bound). Try a smaller {size.split('=')[0]} (now "
        f"{size.split('=')[1]}), compute in float64 (dtype=torch.float64), or find where the model "
        "overflows",
        best=best,
    ) from e.error


# ---------------------------------------------------------------------------- adaptive
def _parse_p(p: Any) -> float:
    if isinstance(p, str) and p.strip().lower() in ("inf", "infinity"):
        return math.inf
    if not isinstance(p, bool) and isinstance(p, (int, float, np.integer, np.floating)):
        if p == 2:
            return 2.0
        if p == math.inf:
            return math.inf
    raise ValueError(f"p: got {p!r}; expected 2 or float('inf') (also the string 'inf')")


def _scale(obj: Objective, adaptive: Any, eta: Any) -> torch.Tensor:
    """c = |θ| + η (adaptive) or 1, in the objective's dtype."""
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive: expected a bool, got {adaptive!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta: got {eta!r}; expected a finite number >= 0")
    if adaptive:
        return obj.theta0.abs() + eta
    return torch.ones_like(obj.theta0)


def adaptive_sharpness(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    rho: float,
    p: float | str = 2,
    adaptive: bool = True,
    eta: float = 0.0,
    max_iter: int = 20,
    max_evals: int | None = None,
    tol: float = 1e-10,
    start: str = "auto",
    seed: int = 0,
    progress: ProgressArg = False,
    **options: Any,
) -> AdaptiveSharpnessResult:
    """Worst-case adaptive sharpness: the largest loss increase in an ℓ_p ball scaled by |θ|.

    .. math::
        S^\\rho_{\\max} = \\max_{\\|\\delta \\oslash c\\|_p \\le \\rho} L(\\theta + \\delta) - L(\\theta),
        \\qquad c = |\\theta| + \\eta \\ (\\text{adaptive}) \\ \\text{or}\\ c = 1

    Kwon, Kim, Park, Choi (2021), "ASAM", arXiv 2102.11600; Andriushchenko, Croce, Müller,
    Hein, Flammarion (2023), "A Modern Look at the Relationship between Sharpness and
    Generalization", arXiv 2302.07011. With η = 0 the value is invariant to the rescalings of
    Dinh et al. (2017, arXiv 1703.04933). Solved in z = δ ⊘ c: p = ∞ by L-BFGS-B on the box from
    a vertex chosen by ``start`` (as :func:`sharpness`); p = 2 by projected gradient ascent with
    Barzilai–Borwein steps on the ball, from ρ ∇_z/‖∇_z‖. The largest loss seen is reported, so
    the value is ≥ 0.

    Cost: ``n_evals`` loss+gradient passes: one at θ, then at most ``1 + max_iter`` (p = 2) or
    one per L-BFGS-B evaluation (p = ∞, at most ``max_evals``).

    Args:
        model: the network (any ``nn.Module``; see :class:`flatness.Objective`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean loss (``None`` with ``batch_loss``).
        data: a DataLoader, a list of batches or one batch.
        rho: radius ρ > 0.
        p: 2 or ``float('inf')`` (``"inf"`` accepted).
        adaptive: scale by c = |θ| + η (True) or use the standard ball c = 1 (False).
        eta: η ≥ 0 added to |θ| (keeps zero weights perturbable; breaks exact invariance).
        max_iter: ascent iterations (p = 2) or L-BFGS-B iterations (p = ∞).
        max_evals: p = ∞ only: cap on L-BFGS-B's evaluations; default ``3 * max_iter + 10``.
        tol: p = ∞ only: L-BFGS-B's relative-increase tolerance (scipy's ``ftol``), applied to
            the gain in units of the start vertex's gain.
        start: p = ∞ only: ``"auto"`` or ``"keskar"``, as for :func:`sharpness`.
        seed: seeds the random start (a local generator).
        progress: False, True or a callable ``(step, total, info)``.
        **options: forwarded to :class:`flatness.Objective`.

    Returns:
        AdaptiveSharpnessResult: ``value``, ``loss``, ``max_loss``, ``perturbation`` (δ),
        ``n_evals``, the optimizer's report and the options used.

    Raises:
        ValueError: ρ ≤ 0, p not 2 or ∞, η < 0, max_iter < 1, an unknown ``start``.
        TypeError: arguments of the wrong type.
        NonFiniteLossError: the loss is not finite at θ or at a perturbed point (then with
            ``best``, as for :func:`sharpness`).

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> res = flatness.adaptive_sharpness(model, loss_fn, data, rho=0.05)
        >>> round(res.value, 4), res.max_loss - res.loss == res.value
        (0.0292, True)
    """
    check_options(adaptive_sharpness, options)
    check_positive("rho", rho)
    p_value = _parse_p(p)
    _check_tol(tol)
    check_int("max_iter", max_iter, 1)
    max_evals = _max_evals(max_evals, max_iter)
    _check_start(start)
    check_seed(seed)
    with model_guard(model):
        obj = Objective(model, loss_fn, data, **options)
        obj.require(
            "whole_vectors",
            "model",
            "adaptive_sharpness (a box maximization over whole vectors in one process)",
            "use sharpness(..., subspace=p) or average_sharpness",
        )
        c = _scale(obj, adaptive, eta)
        generator = torch.Generator().manual_seed(int(seed))
        evaluator = _Evaluator(
            obj,
            Progress(progress, total=None, desc="adaptive_sharpness"),
            forward=lambda z: c * z,
            adjoint=lambda g: c * g,
        )
        rho = float(rho)

        def result(
            best_f: float, z_best: np.ndarray, nit: int, status: int, message: str
        ) -> AdaptiveSharpnessResult:
            if not best_f > loss0:
                best_f, z_best = loss0, np.zeros(obj.n)
            delta = evaluator.delta(z_best)
            return AdaptiveSharpnessResult(
                value=best_f - loss0,
                loss=loss0,
                max_loss=best_f,
                perturbation={k: v.detach().clone() for k, v in obj.unflatten(delta).items()},
                n_evals=evaluator.n_evals,
                nit=nit,
                status=status,
                message=message,
                rho=rho,
                p=p_value,
                adaptive=adaptive,
                eta=float(eta),
                max_iter=int(max_iter),
                seed=int(seed),
                start=start,
            )

        try:
            loss0, grad0 = evaluator(np.zeros(obj.n))
            if p_value == math.inf:
                res = _box_maximum(
                    evaluator,
                    np.full(obj.n, rho),
                    grad0,
                    generator,
                    start=start,
                    max_iter=max_iter,
                    max_evals=max_evals,
                    tol=tol,
                    # L-BFGS-B sees the gain over L(θ), scaled: its stopping tests would
                    # otherwise be absolute for a loss below 1 (a tiny box stopped at once).
                    relative_to=loss0,
                )
            else:
                norm = float(np.linalg.norm(grad0))
                if norm > 0 and math.isfinite(norm):
                    x0 = grad0 * (rho / norm)
                else:
                    direction = torch.randn(obj.n, generator=generator, dtype=torch.float64).numpy()
                    x0 = direction * (rho / float(np.linalg.norm(direction)))
                res = maximize_ball(evaluator, radius=rho, x0=x0, max_iter=max_iter)
        except _PerturbedNonFinite as e:
            _raise_perturbed(e, evaluator, "adaptive_sharpness", f"rho={rho!r}", result, loss0)
        finally:
            evaluator.progress.close()
        assert evaluator.best_y is not None
        return result(evaluator.best_f, evaluator.best_y, res.nit, res.status, res.message)


# ---------------------------------------------------------------------------- average
def average_sharpness(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    rho: float,
    n_samples: int,
    adaptive: bool = True,
    eta: float = 0.0,
    seed: int = 0,
    progress: ProgressArg = False,
    **options: Any,
) -> AverageSharpnessResult:
    """Average-case (adaptive) sharpness: the expected loss increase under Gaussian noise.

    .. math::
        S^\\rho_{\\mathrm{avg}} = \\mathbb{E}_{\\delta \\sim \\mathcal{N}(0, \\rho^2 \\mathrm{diag}(c^2))}
        \\bigl[L(\\theta + \\delta)\\bigr] - L(\\theta), \\qquad c = |\\theta| + \\eta\\ \\text{or}\\ 1

    Andriushchenko, Croce, Müller, Hein, Flammarion (2023), arXiv 2302.07011. On a quadratic
    the value is ½ρ² Σ_i c_i² H_ii in expectation.

    Monte Carlo with ``n_samples`` independent draws from a local generator seeded by ``seed``;
    ``std_error`` is the sample standard deviation over √n_samples. Cost: ``n_samples + 1``
    loss passes (no gradients).

    Args:
        model: the network (any ``nn.Module``; see :class:`flatness.Objective`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean loss (``None`` with ``batch_loss``).
        data: a DataLoader, a list of batches or one batch.
        rho: noise scale ρ > 0.
        n_samples: number of draws ≥ 1.
        adaptive: scale by c = |θ| + η (True) or c = 1 (False).
        eta: η ≥ 0 added to |θ|.
        seed: seeds the draws.
        progress: False, True or a callable ``(step, total, info)``.
        **options: forwarded to :class:`flatness.Objective`.

    Returns:
        AverageSharpnessResult: ``value``, ``std_error``, ``loss``, ``n_evals`` and the options.

    Raises:
        ValueError: ρ ≤ 0, n_samples < 1, η < 0.
        TypeError: arguments of the wrong type.
        NonFiniteLossError: the loss is not finite on some batch, at θ or at the perturbed point
            of a draw (named): the expectation is then not finite.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> res = flatness.average_sharpness(model, loss_fn, data, rho=0.05, n_samples=8)
        >>> round(res.value, 4), res.std_error > 0, res.n_evals  # 8 draws + the centre
        (0.0165, True, 9)
    """
    check_options(average_sharpness, options)
    check_positive("rho", rho)
    check_int("n_samples", n_samples, 1)
    check_seed(seed)
    with model_guard(model):
        obj = Objective(model, loss_fn, data, **options)
        c = _scale(obj, adaptive, eta)
        generator = torch.Generator().manual_seed(int(seed))
        bar = Progress(progress, total=n_samples, desc="average_sharpness")
        try:
            try:
                loss0 = float(obj.loss())
            except NonFiniteLossError as e:
                raise NonFiniteLossError(
                    f"{e} — at θ itself, the model's own parameters, before any perturbation"
                ) from e
            gains = []
            for i in range(n_samples):
                noise = obj.random_vector(generator)  # this rank's entries of a sharded θ
                delta = float(rho) * c * noise.to(device=obj.device, dtype=obj.dtype)
                try:
                    gains.append(float(obj.loss(obj.theta0 + delta)) - loss0)
                except NonFiniteLossError as e:
                    raise NonFiniteLossError(
                        f"average_sharpness: {e}, at the perturbed point of draw {i + 1} of "
                        f"{n_samples}, not at θ, where the loss is {loss0:.6g}: the expectation "
                        f"is then not finite (or undefined), so no value is returned. Try a "
                        f"smaller rho (now {float(rho)!r}) or compute in float64 "
                        "(dtype=torch.float64)"
                    ) from e
                bar.update(gain=gains[-1])
        finally:
            bar.close()
        values = np.asarray(gains)
        std_error = float(values.std(ddof=1) / math.sqrt(n_samples)) if n_samples > 1 else math.nan
        return AverageSharpnessResult(
            value=float(values.mean()),
            std_error=std_error,
            loss=loss0,
            n_evals=n_samples + 1,
            rho=float(rho),
            n_samples=int(n_samples),
            adaptive=adaptive,
            eta=float(eta),
            seed=int(seed),
        )
