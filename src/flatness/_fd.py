"""Finite-difference Hessian-vector products and the errors of missing second derivatives.

The central difference of the gradient along the unit vector v̂ = v/‖v‖,

    H v ≈ ‖v‖ (∇L(θ + h v̂) − ∇L(θ − h v̂)) / 2h,

needs only first derivatives, so it works where double backward does not (custom
``autograd.Function`` s without a differentiable backward, reentrant activation checkpointing,
fused kernels) and on sharded (FSDP) models, whose gradient passes are ordinary training passes.

Step rule and error (Nocedal & Wright 2006, "Numerical Optimization", §8.1; the central-difference
step ∝ ε^(1/3) balances the two terms):

    h = ε^(1/3) · max(1, ‖θ‖/√n)

with ε the machine epsilon of the dtype the gradients are computed in and ‖θ‖/√n the root mean
square parameter (so h scales with the parameters' size). Then, per unit of ‖v‖,

    ‖error‖ ≤ h²/6 · max‖∇³L[v̂, v̂, ·]‖  (truncation; the odd terms cancel)
            + c ε ‖∇L‖/h                 (rounding of the two gradients, c of order 1)
            + ε ‖H‖ ‖θ‖_∞ √n/h          (rounding of θ ± h v̂ itself; random in sign, so
                                            typically ε ‖H‖_F ‖θ‖/(h √n))

i.e. about ε^(2/3) relative: ~2.4e-5 in float32, ~3.7e-11 in float64, ~4e-2 in bfloat16.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["NoSecondDerivativeError", "check_second_derivatives", "explain", "fd_step", "same_randomness"]

FD_HINT = (
    'pass hvp_mode="finite_difference" to compute Hessian-vector products from two gradient '
    "passes instead (no second derivatives needed; about ε^(2/3) relative error, see the "
    "'Large models' page of the docs)"
)


class NoSecondDerivativeError(RuntimeError):
    """An exact Hessian-vector product needs a second derivative that the model does not have."""


def fd_step(theta_norm: float, n: int, eps: float) -> float:
    """h = ε^(1/3) · max(1, ‖θ‖/√n): the central-difference step along a unit vector."""
    return eps ** (1 / 3) * max(1.0, theta_norm / math.sqrt(max(n, 1)))


@contextlib.contextmanager
def same_randomness() -> Iterator[Any]:
    """Yield a ``replay()`` that resets the torch RNGs to their state at entry.

    The two gradients of a central difference must see the same dropout masks and random
    augmentations; ``replay()`` before the second one makes them identical.
    """
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def replay() -> None:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    yield replay


def _is_reentrant_checkpoint(err: BaseException) -> bool:
    return "use_reentrant=True" in str(err) and "checkpoint" in str(err)


def explain(err: BaseException, mode: str) -> NoSecondDerivativeError | None:
    """A clear error for an exception raised by an exact HVP, or None if it is unrelated."""
    text = str(err)
    if isinstance(err, NoSecondDerivativeError):
        return err
    if _is_reentrant_checkpoint(err):
        return NoSecondDerivativeError(
            "hvp_mode: the model uses reentrant activation checkpointing "
            "(torch.utils.checkpoint with use_reentrant=True), which supports neither "
            f"torch.autograd.grad nor second derivatives; {FD_HINT}, or checkpoint with "
            f"use_reentrant=False. (torch: {text.splitlines()[0]})"
        )
    lowered = text.lower()
    if mode == "forward" and any(
        key in lowered for key in ("forward ad", "forward-mode", "jvp", "saved tensor hooks")
    ):
        return NoSecondDerivativeError(
            "hvp_mode: forward-mode AD (hvp_mode='forward') is not implemented for an op of this "
            f"model; use hvp_mode='reverse', or {FD_HINT}. (torch: {text.splitlines()[0]})"
        )
    if ("derivative for" in lowered and "not implemented" in lowered) or "once_differentiable" in lowered:
        return NoSecondDerivativeError(
            "hvp_mode: an op of this model has no second derivative (double backward), so exact "
            f"Hessian-vector products are impossible; {FD_HINT}. (torch: {text.splitlines()[0]})"
        )
    return None


def _custom_function_nodes(root: Any) -> list[Any]:
    """The autograd nodes of custom ``torch.autograd.Function`` s in the graph below ``root``."""
    from torch.autograd.function import BackwardCFunction

    out, seen, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, BackwardCFunction):
            out.append(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return out


def check_second_derivatives(loss: torch.Tensor) -> None:
    """Make a ``create_graph`` backward of ``loss`` raise where a custom Function cuts the graph.

    A custom ``autograd.Function`` whose backward is marked ``@once_differentiable`` or runs
    without autograd (``torch.no_grad()``, ``.detach()``, NumPy) returns gradients that are
    constants of the graph: the second derivative through it would silently be zero. A hook on
    each such node checks, during the first backward, that its gradients are differentiable
    whenever the incoming gradients are, and raises :class:`NoSecondDerivativeError` if not.
    """
    if loss.grad_fn is None:
        return
    for node in _custom_function_nodes(loss.grad_fn):
        name = type(node).__name__.removesuffix("Backward")

        def hook(grad_inputs: Any, grad_outputs: Any, name: str = name) -> None:
            if not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grad_outputs):
                return
            for g in grad_inputs:
                if not isinstance(g, torch.Tensor):
                    continue
                if type(g.grad_fn).__name__ in ("Error", "DelayedError"):
                    cut = True  # @once_differentiable
                else:  # computed without autograd; an all-zero gradient is a legitimate constant
                    cut = not g.requires_grad and bool(g.any())
                if cut:
                    raise NoSecondDerivativeError(
                        f"hvp_mode: the custom autograd.Function {name!r} of this model has a "
                        "backward that is not differentiable (marked @once_differentiable, or "
                        "computed without autograd), so exact Hessian-vector products through "
                        f"it would silently miss terms; {FD_HINT}"
                    )

        node.register_hook(hook)
