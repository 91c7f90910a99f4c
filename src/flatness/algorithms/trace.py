"""Trace of a symmetric operator from matvecs: Hutchinson and Hutch++.

Hutchinson (1989): tr(H) = E[zᵀHz] for z with independent Rademacher (±1) entries.
Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace Estimation",
arXiv 2010.09649): spend a third of the budget on a sketch Q = orth(H S), take tr(QᵀHQ) exactly
and estimate the rest, tr((I − QQᵀ) H (I − QQᵀ)), by Hutchinson — the error falls like 1/m
instead of 1/√m when H has a few large eigenvalues.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any, Literal

import torch

from flatness._utils.progress import Progress, ProgressArg
from flatness._utils.validate import check_choice, check_positive
from flatness.algorithms._linalg import Operator, as_operator, generator
from flatness.results import Result

__all__ = ["TraceResult", "hutchinson", "hutchpp", "trace_estimate"]

METHODS = ("hutch++", "hutchinson")


@dataclasses.dataclass(frozen=True)
class TraceResult(Result):
    """A trace estimate and its standard error.

    Attributes:
        estimate: the estimate of tr(H).
        std_error: the standard error of the estimate (for Hutch++: of its stochastic part,
            given the sketch), from the sample standard deviation of the probes.
        n_matvec: operator products used.
        method: ``"hutchinson"`` or ``"hutch++"``.
        n_probes: Rademacher probes in the (residual) Hutchinson part.
        sketch_size: columns of the Hutch++ sketch (0 for Hutchinson).

    Examples:
        >>> import torch
        >>> from flatness.algorithms import TraceResult, hutchpp
        >>> res = hutchpp(torch.eye(6, dtype=torch.float64), n_matvec=6)
        >>> isinstance(res, TraceResult), res.method, round(res.estimate, 6)
        (True, 'hutch++', 7.333333)
    """

    estimate: float
    std_error: float
    n_matvec: int
    method: str
    n_probes: int
    sketch_size: int


def _quad_forms(op: Operator, Z: Any, bar: Progress) -> torch.Tensor:
    """zᵀ A z for each z of ``Z`` (rows of a tensor, or any iterable of vectors)."""
    out = []
    for z in Z:
        out.append(torch.as_tensor(op.space.dot(z, op.matvec(z))).reshape(()))
        bar.update(1)
    return torch.stack(out).double().cpu()


def _probes(
    op: Operator, gen: torch.Generator, count: int, Q: torch.Tensor | None = None
) -> Iterator[torch.Tensor]:
    """``count`` Rademacher probes drawn one at a time (the same numbers as drawn at once), each
    projected off the rows of ``Q`` if given: one probe in memory instead of ``count``."""
    space = op.space
    for _ in range(count):
        z = space.rademacher(gen, 1)[0]
        if Q is not None:
            z = z - space.coeffs(Q, z) @ Q
        yield z


def _stats(samples: torch.Tensor) -> tuple[float, float]:
    mean = float(samples.mean())
    se = float(samples.std(unbiased=True) / math.sqrt(len(samples))) if len(samples) > 1 else math.nan
    return mean, se


def hutchinson(
    A: Any,
    n: int | None = None,
    *,
    n_matvec: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: ProgressArg = False,
) -> TraceResult:
    """Hutchinson's trace estimate with Rademacher probes.

    .. math:: \\mathrm{tr}(H) \\approx \\frac1m \\sum_{i=1}^m z_i^\\top H z_i,\\qquad
        \\mathrm{Var} = \\frac2m \\big(\\|H\\|_F^2 - \\sum_i H_{ii}^2\\big)

    Hutchinson 1989 (Commun. Stat. Simul. Comput. 18(3)). Memory: one probe at a time (drawn in
    turn from the seeded generator: the same probes as drawn at once), plus the product.

    Args:
        A: the symmetric operator H (any form :func:`flatness.algorithms.as_operator` takes).
        n: size of H, for a plain ``matvec`` callable.
        n_matvec: number of probes m ≥ 2 (one matvec each).
        seed: seed of the local generator.
        device: of the probes (default: the operator's; CPU, float64 for callables).
        dtype: as ``device``.
        progress: opt-in progress reporting.

    Returns:
        :class:`TraceResult`; std_error = sample std / √m.

    Raises:
        ValueError, TypeError: for n_matvec < 2 or bad arguments.

    Examples:
        >>> import torch
        >>> from flatness.algorithms import hutchinson
        >>> _ = torch.manual_seed(0)
        >>> A = torch.randn(50, 50, dtype=torch.float64)
        >>> H = A @ A.T
        >>> res = hutchinson(H, n_matvec=200)
        >>> round(res.estimate / H.trace().item(), 1), res.n_matvec
        (1.0, 200)
    """
    op = as_operator(A, n, device=device, dtype=dtype)
    check_positive("n_matvec", n_matvec, integer=True)
    if n_matvec < 2:
        raise ValueError(f"n_matvec: got {n_matvec}; Hutchinson needs ≥ 2 probes for a standard error")
    gen = generator(seed)
    bar = Progress(progress, total=n_matvec, desc="hutchinson")
    try:
        mean, se = _stats(_quad_forms(op, _probes(op, gen, n_matvec), bar))
    finally:
        bar.close()
    return TraceResult(mean, se, n_matvec, "hutchinson", n_matvec, 0)


def hutchpp(
    A: Any,
    n: int | None = None,
    *,
    n_matvec: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: ProgressArg = False,
) -> TraceResult:
    """Hutch++ trace estimate: exact trace on a sketched range plus Hutchinson on the rest.

    .. math::
        Q = \\mathrm{orth}(H S),\\quad
        \\mathrm{tr}(H) \\approx \\mathrm{tr}(Q^\\top H Q)
          + \\frac1{l}\\sum_{i=1}^{l} g_i^\\top (I - QQ^\\top) H (I - QQ^\\top) g_i

    with S (n × s) and g_i Rademacher, s = ⌊m/3⌋ (at most n) and l = m − 2s.
    Meyer, Musco, Musco & Woodruff 2021, arXiv 2010.09649 (Algorithm 1). Memory: the s products
    H S and their orthonormalization (about 3s vectors of n numbers at its peak with the default
    QR), then Q and one probe at a time.

    Args:
        A: the symmetric operator H (any form :func:`flatness.algorithms.as_operator` takes).
        n: size of H, for a plain ``matvec`` callable.
        n_matvec: total budget m ≥ 4 (2s for the sketch, l ≥ 2 for the residual).
        seed: as in :func:`hutchinson`.
        device: as ``seed``.
        dtype: as ``seed``.
        progress: as ``seed``.

    Returns:
        :class:`TraceResult`; std_error is that of the Hutchinson part given Q.

    Raises:
        ValueError, TypeError: for n_matvec < 4 or bad arguments.

    Examples:
        >>> import torch
        >>> from flatness.algorithms import hutchpp
        >>> _ = torch.manual_seed(0)
        >>> A = torch.randn(50, 50, dtype=torch.float64)
        >>> H = A @ A.T
        >>> res = hutchpp(H, n_matvec=60)
        >>> round(res.estimate / H.trace().item(), 1), res.sketch_size
        (1.0, 20)
    """
    op = as_operator(A, n, device=device, dtype=dtype)
    space = op.space
    n = op.n
    check_positive("n_matvec", n_matvec, integer=True)
    if n_matvec < 4:
        raise ValueError(f"n_matvec: got {n_matvec}; Hutch++ needs ≥ 4 (a sketch and ≥ 2 probes)")
    gen = generator(seed)
    s = min(n_matvec // 3, n)
    l = n_matvec - 2 * s
    bar = Progress(progress, total=n_matvec, desc="hutch++")
    try:
        HS = torch.empty(s, space.n_local, dtype=space.dtype, device=space.device)
        for i, x in enumerate(_probes(op, gen, s)):
            HS[i] = op.matvec(x)
            bar.update(1)
        Q = space.orthonormalize(HS)  # (s, n) orthonormal rows
        del HS
        low = float(_quad_forms(op, Q, bar).sum())
        mean, se = _stats(_quad_forms(op, _probes(op, gen, l, Q), bar))
    finally:
        bar.close()
    return TraceResult(low + mean, se, n_matvec, "hutch++", l, s)


def trace_estimate(
    A: Any,
    n: int | None = None,
    *,
    method: Literal["hutch++", "hutchinson"] = "hutch++",
    n_matvec: int,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: ProgressArg = False,
) -> TraceResult:
    """tr(H) by ``method`` (``"hutch++"`` or ``"hutchinson"``); see :func:`hutchpp`, :func:`hutchinson`.

    Examples:
        >>> import torch
        >>> from flatness.algorithms import trace_estimate
        >>> H = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> trace_estimate(H, method="hutchinson", n_matvec=4).estimate  # exact for a diagonal H
        55.0
    """
    check_choice("method", method, METHODS)
    fn = hutchpp if method == "hutch++" else hutchinson
    return fn(A, n, n_matvec=n_matvec, seed=seed, device=device, dtype=dtype, progress=progress)
