"""A new curvature in one file: the damped Hessian H + λI.

A curvature is a :class:`flatness.CurvatureOperator` subclass that says what one batch's product
is; the base class owns the pass over the data (size-weighted batches, every rank, the replay
check). Registered, it works wherever ``curvature=`` is taken: ``hessian_topk``,
``hessian_trace``, ``hessian_density``, ``blocks=``, the Monitor.

    python examples/custom_curvature.py
"""

from __future__ import annotations

from typing import Any

import torch

import flatness
from flatness.operators import CurvatureOperator, register_curvature


@register_curvature
class DampedHessianOperator(CurvatureOperator):
    """(H + λI) v: the Hessian of the full-data loss, damped by λ (``damping=``).

    .. math:: \\sum_b \\frac{m_b}{M} (\\nabla^2 \\ell_b(\\theta_0) + \\lambda I)\\, v = (H + \\lambda I)\\, v
    """

    name = "damped_hessian"  # curvature="damped_hessian"
    own_options = ("damping",)  # its keyword options; the rest go to flatness.Objective

    def _init(self, damping: float = 0.1) -> None:
        if not damping >= 0:
            raise ValueError(f"damping: got {damping!r}; expected a number >= 0")
        self.damping = float(damping)

    def batch_product(self, batch: Any, v: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ℓ_b, (H_b + λI) v) of one batch, by double backward at θ₀."""
        obj = self.objective
        leaf = self.theta.detach().requires_grad_(True)
        with torch.enable_grad(), obj.at(leaf):  # the model computes with θ = leaf
            loss = obj.batch_loss(batch)
            (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
            (hv,) = torch.autograd.grad(g, leaf, grad_outputs=v)
        return loss.detach(), hv + self.damping * v


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    data = [(x[:40], y[:40]), (x[40:], y[40:])]  # a partial last batch: weighted by its size
    loss_fn = torch.nn.functional.cross_entropy

    damped = flatness.hessian_topk(model, loss_fn, data, k=2, curvature="damped_hessian", damping=0.5)
    plain = flatness.hessian_topk(model, loss_fn, data, k=2)
    print("damped top-2:", [round(float(e), 6) for e in damped.eigenvalues])
    print("H top-2 + λ: ", [round(float(e) + 0.5, 6) for e in plain.eigenvalues])
    op = flatness.curvature_operator(model, loss_fn, data, curvature="damped_hessian", damping=0.5)
    print("trace(H + λI) =", round(float(op.dense().trace()), 6), "with n =", op.shape[0])


if __name__ == "__main__":
    main()
