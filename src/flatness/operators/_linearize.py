"""The model's outputs at θ and their directional derivative J v, in one forward pass.

The GGN and the Fisher are of the form Jᵀ B J with J = ∂z/∂θ the Jacobian of the outputs z of
a batch. Their product needs J v (forward mode) and one vector-Jacobian product Jᵀ u (reverse
mode). Here both come from a single forward pass: θ is a leaf that records the autograd graph
*and* carries the tangent v as a forward-mode dual number, so the pass yields z (with its graph
back to θ, for Jᵀ u) and J v together. Where an op has no forward-mode derivative, J v is taken
as the derivative of the linear map u ↦ Jᵀ u (the "double-VJP" trick, one more backward pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.utils.checkpoint

from flatness.objective import Objective
from flatness.objective._fd import forward_ad_unsupported
from flatness.objective._loss import math_attention as _math_attention

__all__ = ["Compute", "Linearized", "linearize"]


class Linearized:
    """z = f(θ) of one batch with J v, and the means to apply Jᵀ.

    Attributes:
        outputs: z detached (a tensor).
        jvp: J v, shaped like z.
        targets: what ``loss_fn`` takes beside the outputs.
    """

    def __init__(
        self,
        leaf: torch.Tensor,
        z: torch.Tensor,
        jvp: torch.Tensor,
        targets: Any,
        regraph: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self._leaf = leaf
        self._z = z
        self._regraph = regraph
        self.outputs = z.detach()
        self.jvp = jvp
        self.targets = targets

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """Jᵀ u as a flat vector like θ (frees the graph)."""
        try:
            return self._vjp(self._z, u)
        except torch.utils.checkpoint.CheckpointError:
            # Non-reentrant activation checkpointing recomputes its segments in the backward
            # without the dual numbers of the forward pass, saves fewer tensors and refuses;
            # J v is right (the forward ran as recorded), Jᵀ u comes from a plain forward.
            if self._regraph is None:
                raise
            return self._vjp(self._regraph(), u)

    def _vjp(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if not z.requires_grad:
            return torch.zeros_like(self._leaf)
        (g,) = torch.autograd.grad(z, self._leaf, grad_outputs=u.to(z.dtype), allow_unused=True)
        return torch.zeros_like(self._leaf) if g is None else g


def _check_outputs(z: Any) -> torch.Tensor:
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(
            "model outputs: the GGN and the Fisher need the outputs that loss_fn(outputs, targets) "
            f"takes to be one floating tensor, got {type(z).__name__}; pass "
            "batch_outputs=lambda model, batch: (outputs_tensor, targets) to choose it"
        )
    return z


Compute = Callable[[], tuple[Any, Any]]


def _forward_mode(
    obj: Objective, theta: torch.Tensor, v: torch.Tensor, compute: Compute, state: dict[str, Any]
) -> Linearized:
    leaf = theta.detach().requires_grad_(True)
    with torch.enable_grad(), _math_attention(), fwAD.dual_level():
        with obj.at(fwAD.make_dual(leaf, v)):
            z, targets = compute()
        z = _check_outputs(z)
        primal, tangent = fwAD.unpack_dual(z)
    jv = torch.zeros_like(primal) if tangent is None else tangent.detach()

    def regraph() -> torch.Tensor:
        state["reverse"] = True  # the next products take the double-VJP route at once
        with torch.enable_grad(), _math_attention(), obj.at(leaf):
            return _check_outputs(compute()[0])

    return Linearized(leaf, primal, jv, targets, regraph)


def _reverse_mode(obj: Objective, theta: torch.Tensor, v: torch.Tensor, compute: Compute) -> Linearized:
    leaf = theta.detach().requires_grad_(True)
    with torch.enable_grad(), _math_attention():
        with obj.at(leaf):
            z, targets = compute()
        z = _check_outputs(z)
        if not z.requires_grad:
            return Linearized(leaf, z, torch.zeros_like(z), targets)
        # J v = d/du (Jᵀ u)·v: Jᵀ u is linear in u, so its derivative along v is J v.
        u = torch.zeros_like(z, requires_grad=True)
        (jtu,) = torch.autograd.grad(z, leaf, grad_outputs=u, create_graph=True)
        (jv,) = torch.autograd.grad(jtu, u, grad_outputs=v, allow_unused=True)
    return Linearized(leaf, z, torch.zeros_like(z) if jv is None else jv.detach(), targets)


def linearize(
    obj: Objective, theta: torch.Tensor, v: torch.Tensor, compute: Compute, state: dict[str, Any]
) -> Linearized:
    """z(θ), J v and Jᵀ of ``compute() -> (z, targets)`` run at θ (inside ``obj.at``).

    Forward mode unless an op lacks a forward-mode derivative; then the double-VJP route, and
    ``state["reverse"]`` remembers it for the next products.
    """
    if not state.get("reverse"):
        try:
            return _forward_mode(obj, theta, v, compute, state)
        except (NotImplementedError, RuntimeError) as e:
            # Only torch's "forward AD is not implemented here" (the model's own errors, and
            # out-of-memory, propagate unchanged).
            if not forward_ad_unsupported(e):
                raise
            state["reverse"] = True
    return _reverse_mode(obj, theta, v, compute)
