"""Average-case sharpness: the expected loss increase under scaled Gaussian perturbations."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from flatness._utils.progress import Progress, ProgressArg
from flatness._utils.validate import check_int, check_positive, check_seed
from flatness.objective import NonFiniteLossError, Objective, check_options
from flatness.objective._guard import model_guard
from flatness.sharpness._common import (
    AverageSharpnessResult,
    _scale,
)


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
