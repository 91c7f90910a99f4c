"""Keskar et al.'s ε-sharpness φ: the largest relative loss increase in a box (arXiv 1609.04836)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from flatness._utils.progress import Progress, ProgressArg
from flatness._utils.validate import check_int, check_positive, check_seed
from flatness.objective import Objective, check_options
from flatness.objective._guard import model_guard
from flatness.sharpness._common import (
    SharpnessResult,
    _box_maximum,
    _check_start,
    _check_tol,
    _Evaluator,
    _max_evals,
    _PerturbedNonFinite,
    _raise_perturbed,
    _to_numpy,
)


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
