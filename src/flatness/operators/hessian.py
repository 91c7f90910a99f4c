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
    """

    name = "hessian"

    @contextlib.contextmanager
    def reusing_graph(self) -> Iterator[None]:
        """Inside the block, products reuse the kept gradient graphs (freed at the end).

        A no-op for objectives without kept graphs (sharded models: their products are
        finite differences of FSDP gradient passes).
        """
        scope = getattr(self.objective, "reusing_graph", None)
        with scope(self.theta) if scope is not None else contextlib.nullcontext():
            yield

    @property
    def graph_reused(self) -> bool:
        return bool(getattr(self.objective, "graph_reused", False))

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        return self.objective.hvp(v, self.theta)
