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

    ‖error‖ ≤ h²/6 · max‖∇⁴L[v̂, v̂, v̂, ·]‖  (truncation; the even orders cancel)
            + c ε ‖∇L‖/h                 (rounding of the two gradients, c of order 1)
            + ε ‖H‖ ‖θ‖_∞ √n/h          (rounding of θ ± h v̂ itself; random in sign, so
                                            typically ε ‖H‖_F ‖θ‖/(h √n))

i.e. about ε^(2/3) relative: ~2.4e-5 in float32, ~3.7e-11 in float64, ~4e-2 in bfloat16.

Non-smooth models (ReLU, max-pooling, ``abs``, ``clamp``): where a kink lies within h of θ
along v̂, the gradient jumps by some J on the segment and the product picks up J/2h — of order
one, whatever h. :class:`KinkGuard` watches every product for it at the cost of one gradient
at θ (computed once per θ and kept): the second difference

    s = ∇L(θ + h v̂) + ∇L(θ − h v̂) − 2 ∇L(θ)

is h² ∇³L[v̂, v̂, ·] + O(h⁴) on a smooth loss, so ‖s‖/‖∇L(θ + h v̂) − ∇L(θ − h v̂)‖ is about
(h/2) ‖∇³L[v̂, v̂, ·]‖/‖H v̂‖ (~ε^(1/3), a few 1e-3 in float32, 1e-6 in float64), while a jump J
on either side adds J to s: the ratio then estimates the product's relative error itself.
Above τ = max(0.05, 10 ε^(1/3)) (:func:`kink_tol`) it warns once, naming the cause and the fix.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from flatness._utils.compat import is_once_differentiable

__all__ = [
    "KINK_TOL",
    "KinkGuard",
    "NoSecondDerivativeError",
    "NonSmoothWarning",
    "check_second_derivatives",
    "explain",
    "fd_step",
    "forward_ad_unsupported",
    "kink_tol",
    "same_randomness",
]

FD_HINT = (
    'pass hvp_mode="finite_difference" to compute Hessian-vector products from two gradient '
    "passes instead (no second derivatives needed; about ε^(2/3) relative error, see the "
    "'Large models' page of the docs)"
)


class NoSecondDerivativeError(RuntimeError):
    """An exact Hessian-vector product needs a second derivative that the model does not have.

    Raised with the op named and the fix (``hvp_mode="finite_difference"``), e.g. for a custom
    ``autograd.Function`` whose backward is not differentiable.

    Examples:
        >>> import torch, flatness
        >>> class Cube(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x**3
        ...     @staticmethod
        ...     @torch.autograd.function.once_differentiable
        ...     def backward(ctx, g):
        ...         (x,) = ctx.saved_tensors
        ...         return 3 * x**2 * g
        >>> model = torch.nn.Linear(2, 1).double()
        >>> data = [(torch.ones(4, 2).double(), torch.zeros(4, 1).double())]
        >>> loss = lambda out, y: Cube.apply(out - y).mean()
        >>> v = torch.ones(3, dtype=torch.float64)
        >>> try:
        ...     flatness.Objective(model, loss, data).hvp(v)
        ... except flatness.NoSecondDerivativeError:
        ...     print("no second derivative")
        no second derivative
        >>> fd = flatness.Objective(model, loss, data, hvp_mode="finite_difference")
        >>> tuple(fd.hvp(v).shape)
        (3,)
    """


def fd_step(theta_norm: float, n: int, eps: float) -> float:
    """h = ε^(1/3) · max(1, ‖θ‖/√n): the central-difference step along a unit vector."""
    return eps ** (1 / 3) * max(1.0, theta_norm / math.sqrt(max(n, 1)))


#: A finite-difference product warns when ‖s‖ > τ ‖∇L(θ + h v̂) − ∇L(θ − h v̂)‖ (see the module
#: docstring), τ = max(KINK_TOL, KINK_SMOOTH · ε^(1/3)): an estimated relative error above 5 %, and
#: 10 ε^(1/3), about 5× the largest ratio measured on the smooth networks of benchmarks/bench_fd.py
#: (1.1 ε^(1/3) in float32, 1.4 ε^(1/3) in float64, 1.8 ε^(1/3) in bfloat16). In bfloat16 τ ≈ 2:
#: there the step is too large (h ≈ 0.2) to tell a kink from curvature, and only jumps twice the
#: product's size are reported. ‖s‖ is first reduced by 16 ε ‖∇L(θ)‖ (the gradients' rounding)
#: and the ratio taken against the largest difference seen at this θ (see KinkGuard).
KINK_TOL = 0.05
KINK_SMOOTH = 10.0


def kink_tol(eps: float) -> float:
    """τ = max(KINK_TOL, KINK_SMOOTH · ε^(1/3)): the guard's threshold for machine epsilon ε."""
    return max(KINK_TOL, KINK_SMOOTH * eps ** (1 / 3))


class NonSmoothWarning(RuntimeWarning):
    """Finite-difference products of a model whose gradient jumps (ReLU, max-pooling...).

    Issued once per objective by ``hvp_mode="finite_difference"`` (and on FSDP models, where it
    is the default) when ‖∇L(θ+hv̂) + ∇L(θ−hv̂) − 2∇L(θ)‖ > τ ‖∇L(θ+hv̂) − ∇L(θ−hv̂)‖, τ =
    max(0.05, 10 ε^(1/3)) (see :class:`KinkGuard`): the products, and the eigenvalues, traces and
    densities built on them, may be wrong by about that ratio or more. Turn it into an error
    with ``warnings.simplefilter("error", flatness.NonSmoothWarning)``.

    Examples:
        >>> import warnings, torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        >>> data = [(torch.randn(512, 2), torch.randn(512, 1))]
        >>> obj = flatness.Objective(model, torch.nn.functional.mse_loss, data, hvp_mode="finite_difference")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = [obj.hvp(torch.randn(obj.n)) for _ in range(3)]
        >>> any(issubclass(w.category, flatness.NonSmoothWarning) for w in caught)
        True
    """


class KinkGuard:
    """Detects gradient jumps inside the finite-difference step h (non-smooth models).

    Per product, compares the second difference s = g₊ + g₋ − 2 g₀ with the first difference
    g₊ − g₋ (g± the gradients at θ ± h v̂, g₀ the gradient at θ; the largest ‖g₊ − g₋‖ seen at
    this θ, so that a vector with H v ≈ 0 is not judged by its rounding noise; and ‖s‖ less the
    gradients' rounding, 16 ε ‖g₀‖): the ratio is ~(h/2)
    ‖∇³L[v̂, v̂, ·]‖/‖H v̂‖ on a smooth loss and about the product's relative error where the
    gradient jumps. Above τ = :func:`kink_tol` (ε) it warns (once per guard). Cost: g₀, one gradient
    pass per θ (kept, one vector); the products themselves are unchanged.

    Attributes:
        worst: the largest ratio seen so far.
        n_checked: products checked.
        warned: whether the warning was issued.
    """

    def __init__(self, norm: Callable[[torch.Tensor], float], eps: float, *, exact: bool = True) -> None:
        self._norm = norm
        self._eps = eps
        self._noise = 0.0
        self.tol = kink_tol(eps)
        self._exact = exact  # whether exact modes exist for this model (the advice differs)
        self._theta: torch.Tensor | None = None
        self._version = -1
        self._g0: torch.Tensor | None = None
        self._scale = 0.0
        self.worst = 0.0
        self.n_checked = 0
        self.warned = False

    def base_gradient(
        self, theta: torch.Tensor, grad: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """∇L(θ), from ``grad(theta)`` the first time this θ is seen, then from memory."""
        same = False
        if self._theta is not None and self._theta.shape == theta.shape:
            if theta.data_ptr() == self._theta.data_ptr():
                same = theta._version == self._version
            else:
                same = bool(torch.equal(theta, self._theta))
        if not same or self._g0 is None:
            self._g0 = None  # free the old one first
            self._g0 = grad(theta).detach()
            self._theta, self._version = theta, theta._version
            self._scale = 0.0
            # Rounding of the gradients (~ε‖∇L‖ each, four of them in s) is not a jump.
            self._noise = 16.0 * self._eps * self._norm(self._g0)
        return self._g0

    def check(self, second: torch.Tensor, diff: torch.Tensor) -> None:
        """Warn if ‖second‖ > τ · ‖diff‖ (norms of the vector space, over every rank)."""
        self.n_checked += 1
        d = self._norm(diff)
        s = self._norm(second)
        # Relative to the largest product seen at this θ (a lower bound of ‖H‖ · 2h): a vector
        # with H v ≈ 0 (a symmetry of the loss) has a difference of pure rounding noise.
        self._scale = max(self._scale, d)
        s = max(0.0, s - self._noise)
        if self._scale == 0.0:
            ratio = 0.0 if s == 0.0 else math.inf
        else:
            ratio = s / self._scale
        self.worst = max(self.worst, ratio)
        if ratio > self.tol and not self.warned:
            self.warned = True
            fix = (
                "use smooth activations (GELU, SiLU, softplus, average pooling), or measure the "
                "model in one process with hvp_mode='reverse'"
                if not self._exact
                else "use an exact mode (hvp_mode='reverse' or 'auto') or smooth activations "
                "(GELU, SiLU, softplus, average pooling)"
            )
            warnings.warn(
                "hvp_mode='finite_difference': the gradient jumps inside the finite-difference "
                f"step (‖∇L(θ+hv̂) + ∇L(θ−hv̂) − 2∇L(θ)‖ is {ratio:.2g} times the largest "
                f"‖∇L(θ+hv̂) − ∇L(θ−hv̂)‖ at this θ; a smooth loss gives ~ε^(1/3), below "
                f"{self.tol:.2g}): the model is not "
                "smooth (ReLU, max-pooling, abs, clamp...) or its gradient is not reproducible "
                "(nondeterministic kernels), so these products, and the eigenvalues, traces and "
                f"densities built on them, can be wrong by about that fraction or more; {fix}",
                NonSmoothWarning,
                stacklevel=4,
            )


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


#: What torch (2.x) says when forward-mode AD is not available for an op or a construct; a
#: forward-mode product falls back to double backward for these errors only (any other error,
#: out-of-memory and the user's own included, propagates unchanged).
FORWARD_AD_GAPS = (
    "Trying to use forward AD with",  # an aten op without a forward derivative (NotImplementedError)
    "to use it with forward mode AD",  # a custom autograd.Function without a jvp staticmethod
    "jvp is not implemented for the c++ API of custom Function",
    "must override the setup_context staticmethod",  # an old-style autograd.Function under torch.func
    "don't yet support saved tensor hooks",  # activation checkpointing / saved-tensor hooks, torch.func
    "Nested forward mode AD is not supported",
    "ZeroTensors are immutable",  # torch.func.jvp of grad through F.mse_loss (torch 2.13)
)


def forward_ad_unsupported(err: BaseException) -> bool:
    """Whether ``err`` is torch saying that forward-mode AD is not implemented for this model."""
    if not isinstance(err, (RuntimeError, NotImplementedError)) or isinstance(err, torch.OutOfMemoryError):
        return False
    text = str(err)
    return any(key in text for key in FORWARD_AD_GAPS)


#: torch's words for an op without a double-backward derivative ("derivative for aten::X is not
#: implemented", "the derivative for 'X' is not implemented.") and for a custom Function whose
#: backward is @once_differentiable; only these (not the user's own errors) are explained.
_NO_DOUBLE_BACKWARD = re.compile(r"derivative for (aten::\S+|'[^']*') is not implemented")
_ONCE_DIFFERENTIABLE = "trying to differentiate twice a function that was marked with @once_differentiable"
_REENTRANT = "When use_reentrant=True, torch.utils.checkpoint is incompatible"


def _is_reentrant_checkpoint(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and _REENTRANT in str(err)


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
    if mode == "forward" and forward_ad_unsupported(err):
        return NoSecondDerivativeError(
            "hvp_mode: forward-mode AD (hvp_mode='forward') is not implemented for an op of this "
            f"model; use hvp_mode='reverse', or {FD_HINT}. (torch: {text.splitlines()[0]})"
        )
    if _NO_DOUBLE_BACKWARD.search(text) or _ONCE_DIFFERENTIABLE in text:
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
    whenever the incoming gradients are — or, for a backward marked ``@once_differentiable``,
    whenever the Function has inputs that require grad (its gradient then depends on θ through
    what it saved, also when the incoming gradient is a constant, e.g. a custom loss on the
    outputs) — and raises :class:`NoSecondDerivativeError` if not.
    """
    if loss.grad_fn is None:
        return
    for node in _custom_function_nodes(loss.grad_fn):
        name = type(node).__name__.removesuffix("Backward")
        backward = getattr(getattr(node, "_forward_cls", None), "backward", None)
        once = is_once_differentiable(backward)
        has_inputs = any(fn is not None for fn, _ in node.next_functions)

        def hook(
            grad_inputs: Any,
            grad_outputs: Any,
            name: str = name,
            once: bool = once,
            has_inputs: bool = has_inputs,
        ) -> None:
            incoming = any(isinstance(g, torch.Tensor) and g.requires_grad for g in grad_outputs)
            if once and has_inputs and not incoming:
                if any(
                    isinstance(g, torch.Tensor) and not g.requires_grad and bool(g.any()) for g in grad_inputs
                ):
                    raise NoSecondDerivativeError(
                        f"hvp_mode: the custom autograd.Function {name!r} of this model has a backward "
                        "marked @once_differentiable, so exact Hessian-vector products through it "
                        f"would silently miss terms; {FD_HINT}"
                    )
                return
            if not incoming:
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
