"""The Hessian ∇²L(θ₀) of the full-data loss as a linear operator."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from flatness.operators._base import CurvatureOperator
from flatness.results import MatvecCount

__all__ = ["HessianOperator"]


class HessianOperator(CurvatureOperator, MatvecCount):
    """H = ∇²L(θ₀), the full-data Hessian at the model's parameters, as an operator.

    .. math:: H = \\sum_b \\frac{m_b}{M} \\nabla^2_\\theta \\ell_b(\\theta_0)

    Each product is one exact pass over the data (double backward, or forward-over-reverse with
    ``hvp_mode="forward"``; see :class:`flatness.Objective`). Inside ``with op.reusing_graph():``
    the gradient graphs of the data are kept after the first product, so that the next ones are
    one backward pass each (see :meth:`flatness.Objective.reusing_graph`; the spectrum functions
    do this). Keyword options are those of :class:`flatness.Objective` (``params``,
    ``reduction``, ``dtype``, ``hvp_mode``, ``reuse_graph``...).

    Attributes:
        shape: ``(n, n)`` with n the number of chosen parameters.
        n_matvec: products done so far (``n_hvp`` before: a deprecated alias).
        objective: the underlying :class:`flatness.Objective`.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> H = flatness.HessianOperator(model, loss_fn, data)
        >>> A = torch.cat([X, torch.ones(16, 1).double()], 1)
        >>> torch.allclose(H.dense(), 2 * A.T @ A / 16)  # the exact Hessian of a linear least-squares fit
        True
    """

    name = "hessian"
    requires = ()
    product_name = "Hessian-vector product"

    @contextlib.contextmanager
    def reusing_graph(self) -> Iterator[None]:
        """Inside the block, products reuse the kept gradient graphs (freed at the end).

        A no-op where the objective keeps no graphs (finite-difference products).
        """
        with self.objective.reusing_graph(self.theta):
            yield

    @property
    def graph_reused(self) -> bool:
        return self.objective.graph_reused

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        return self.objective.hvp(v, self.theta)
