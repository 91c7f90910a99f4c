"""The generalized Gauss–Newton matrix G = Jᵀ H_ℓ J of the full-data loss."""

from __future__ import annotations

from typing import Any

import torch

from flatness.objective._fd import check_second_derivatives
from flatness.operators._base import CurvatureOperator
from flatness.operators._linearize import linearize

__all__ = ["GGNOperator", "output_hvp"]


def output_hvp(loss: Any, z: torch.Tensor, *us: torch.Tensor) -> list[torch.Tensor]:
    """H_ℓ u = ∂²ℓ/∂z² u for each u, for a loss built from the leaf ``z`` (output space).

    A custom ``autograd.Function`` in the loss whose backward has no derivative raises
    :class:`flatness.NoSecondDerivativeError` (H_ℓ would silently be 0).
    """
    check_second_derivatives(loss)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    if not g.requires_grad:  # the loss is linear in z: H_ℓ = 0
        return [torch.zeros_like(z) for _ in us]
    out = []
    for i, u in enumerate(us):
        (hu,) = torch.autograd.grad(g, z, grad_outputs=u, allow_unused=True, retain_graph=i < len(us) - 1)
        out.append(torch.zeros_like(z) if hu is None else hu)
    return out


class GGNOperator(CurvatureOperator):
    """The generalized Gauss–Newton matrix of the full-data loss, as an operator.

    .. math::
        G = \\sum_b \\frac{m_b}{M} J_b^\\top H_{\\ell,b} J_b,\\qquad
        J_b = \\frac{\\partial z_b}{\\partial \\theta},\\quad
        H_{\\ell,b} = \\frac{\\partial^2 \\ell_b}{\\partial z_b^2}

    with z_b the model's outputs on batch b (what ``loss_fn`` receives) and ℓ_b the batch loss.
    G is the Hessian without the term Σ (∂ℓ/∂z) ∇²z that carries the network's own curvature,
    so it is positive semi-definite for convex losses (cross-entropy, MSE) and equals the Hessian
    for MSE at zero residual. Schraudolph 2002 (Neural Comput. 14(7)); Martens 2020, "New
    insights and perspectives on the natural gradient method", JMLR 21, arXiv 1412.1193.

    A product G v costs one forward pass carrying J v in forward mode, one Hessian-vector product
    in output space (small) and one backward pass for Jᵀ(H_ℓ J v) — no more than a Hessian
    product, which needs a forward, a backward and a backward of the backward. H_ℓ comes from
    autodiff of ``loss_fn`` in the outputs, so any loss works.

    Needs the outputs separately from the loss: ``loss_fn`` with ``(inputs, targets)`` batches,
    or ``batch_outputs=lambda model, batch: (outputs, targets)``; an opaque ``batch_loss``
    raises a ``TypeError`` saying so.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> G = flatness.GGNOperator(model, loss_fn, data)
        >>> H = flatness.HessianOperator(model, loss_fn, data)
        >>> torch.allclose(G.dense(), H.dense())  # a linear model has no curvature of its own
        True
    """

    name = "ggn"
    product_name = "GGN-vector product"

    def _init(self) -> None:
        self.objective.require_outputs("curvature='ggn'")
        self._state: dict[str, Any] = {}

    def batch_product(self, batch: Any, v: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        obj = self.objective
        lin = linearize(obj, self.theta, v, lambda: obj.batch_outputs(batch), self._state)
        with torch.enable_grad():
            z = lin.outputs.requires_grad_(True)
            loss = obj.output_loss(z, lin.targets)
            (hjv,) = output_hvp(loss, z, lin.jvp)
        return loss.detach(), lin.vjp(hjv)
