"""The Hessian ∇²L(θ₀) of the full-data loss as a linear operator."""

from __future__ import annotations

import torch

from flatness.operators._base import CurvatureOperator

__all__ = ["HessianOperator"]


class HessianOperator(CurvatureOperator):
    """H = ∇²L(θ₀), the full-data Hessian at the model's parameters, as an operator.

    .. math:: H = \\sum_b \\frac{m_b}{M} \\nabla^2_\\theta \\ell_b(\\theta_0)

    Each product is one exact pass over the data (double backward, or forward-over-reverse with
    ``hvp_mode="forward"``; see :class:`flatness.Objective`). Keyword options are those of
    :class:`flatness.Objective` (``params``, ``reduction``, ``dtype``, ``hvp_mode``...).

    Attributes:
        shape: ``(n, n)`` with n the number of chosen parameters.
        n_hvp: Hessian-vector products done by the objective so far.
        objective: the underlying :class:`flatness.Objective`.
    """

    name = "hessian"

    @property
    def n_hvp(self) -> int:
        return self.objective.n_hvp

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        return self.objective.hvp(v, self.theta)
