"""What the sharpness measures share: their results, the evaluator of f(x + Ay), the checks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np
import torch

from flatness._utils.progress import Progress
from flatness._utils.validate import check_int
from flatness.algorithms.maximize import MaximizeResult, maximize_box, vertex_search
from flatness.objective import NonFiniteLossError, Objective
from flatness.results import Result


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


def _scale(obj: Objective, adaptive: Any, eta: Any) -> torch.Tensor:
    """c = |θ| + η (adaptive) or 1, in the objective's dtype."""
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive: expected a bool, got {adaptive!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta: got {eta!r}; expected a finite number >= 0")
    if adaptive:
        return obj.theta0.abs() + eta
    return torch.ones_like(obj.theta0)
