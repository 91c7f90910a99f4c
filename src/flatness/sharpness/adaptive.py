"""Worst-case (adaptive) sharpness over an ℓ_p ball scaled by |θ| (arXiv 2102.11600, 2302.07011)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from flatness._utils.progress import Progress, ProgressArg
from flatness._utils.validate import check_int, check_positive, check_seed
from flatness.algorithms.maximize import maximize_ball
from flatness.objective import Objective, check_options
from flatness.objective._guard import model_guard
from flatness.sharpness._common import (
    AdaptiveSharpnessResult,
    _box_maximum,
    _check_start,
    _check_tol,
    _Evaluator,
    _max_evals,
    _PerturbedNonFinite,
    _raise_perturbed,
    _scale,
)


def _parse_p(p: Any) -> float:
    if isinstance(p, str) and p.strip().lower() in ("inf", "infinity"):
        return math.inf
    if not isinstance(p, bool) and isinstance(p, (int, float, np.integer, np.floating)):
        if p == 2:
            return 2.0
        if p == math.inf:
            return math.inf
    raise ValueError(f"p: got {p!r}; expected 2 or float('inf') (also the string 'inf')")


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
