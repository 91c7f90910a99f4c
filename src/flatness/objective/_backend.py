"""Where a model's parameters live: the backend interface, and the one-process backend.

:class:`flatness.Objective` is written once over a :class:`Backend`; a backend says how to

- write θ into the model and forward a batch (:meth:`Backend.batch_loss`),
- take one batch's gradient (:meth:`Backend.batch_grad`),
- run a pass (:meth:`Backend.session`, :meth:`Backend.steps`),
- hold vectors (:attr:`Backend.space`, the parameter layout with *local* shapes),

and which of the optional features it has (:attr:`Backend.capabilities`).
:func:`flatness.objective._select.backend_for` picks the backend of a model: :class:`LocalBackend` (the whole θ in this process; the model is
called with ``torch.func.functional_call`` on tensors of ours, so its own parameters are never
written) or the FSDP2 backend of :mod:`flatness.objective._fsdp` (each rank a shard of θ).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from flatness._utils.compat import is_conv, reparametrize
from flatness.algorithms._linalg import VectorSpace
from flatness.objective import _dist
from flatness.objective._data import DataSource, batch_size_of, move_batch, tensors_of
from flatness.objective._fd import _is_reentrant_checkpoint, same_randomness
from flatness.objective._guard import model_guard
from flatness.objective._loss import LossModule, scalar_loss
from flatness.objective._params import ParamLayout, ParamSpec, alias_map, select_params

__all__ = ["ACCUMULATED", "CAPABILITIES", "Accumulated", "Backend", "LocalBackend", "Swap"]

#: The optional features a backend may have (:attr:`Backend.capabilities`):
#: ``"exact_hvp"`` double-backward / forward-over-reverse products; ``"kept_graphs"`` gradient
#: graphs kept across products; ``"dtype"`` computing in another dtype than the model's;
#: ``"functional"`` computing at θ with autograd (or forward-mode) tangents through
#: :meth:`Backend.at`, which the GGN, the Fisher and the empirical Fisher need; ``"vmap"``
#: evaluating many points at once with ``torch.func.vmap``; ``"whole_vectors"`` this process
#: holds every entry of a vector (full-space box maximization, user-given matrices);
#: ``"batch_gradients"`` each batch's gradient as a vector of its own (finite differences are then
#: formed batch by batch; otherwise from two whole-pass gradients).
CAPABILITIES = ("exact_hvp", "kept_graphs", "dtype", "functional", "vmap", "whole_vectors", "batch_gradients")


class Accumulated:
    """What a backend's :meth:`Backend.batch_grad` returns when it adds the batch's weighted
    gradient to a sum of its own (a sharded model's ``.grad`` fields, reduce-scattered over the
    ranks in the backward pass): the pass reads the sum once, at its end
    (:meth:`Backend.take_gradient`), and does not sum it over the ranks again.
    """


#: the one instance of :class:`Accumulated`.
ACCUMULATED = Accumulated()


class Backend:
    """The interface :class:`flatness.Objective` computes through (see the module docstring).

    Attributes:
        model: the model the backend computes with.
        names, shapes: θ's parameter names and (global) shapes.
        local_shapes, local_numels: this process's part of each parameter (the shapes
            themselves for a whole-θ backend).
        n, n_local: θ's global length and this process's part of it.
        device, dtype: of θ's vectors.
        theta0: the model's θ as a local vector.
        space: the :class:`flatness.algorithms.VectorSpace` of local vectors.
        group: the process group the pass sums its scalars over (None: this process only).
        eps: machine epsilon of the least precise dtype gradients are computed in.
        buffers: the model's buffers by name (constants of every pass).
        capabilities: a subset of :data:`CAPABILITIES`.
    """

    model: nn.Module
    module: LossModule
    names: list[str]
    shapes: list[torch.Size]
    numels: list[int]
    local_shapes: list[torch.Size]
    local_numels: list[int]
    n: int
    n_local: int
    device: torch.device
    dtype: torch.dtype
    theta0: torch.Tensor
    space: VectorSpace
    group: Any
    eps: float
    buffers: dict[str, torch.Tensor]
    capabilities: frozenset[str] = frozenset()
    #: how the backend is named in messages ("a model sharded with fully_shard", ...).
    description: str = ""
    #: whether the model has convolutions (``evaluate_many`` then loops over points on the CPU).
    has_conv: bool = False

    def session(self, train: bool, *, with_grad: bool) -> contextlib.AbstractContextManager[None]:
        """One pass's guard: the model's mode set, everything of the model restored on exit."""
        raise NotImplementedError

    def steps(
        self, data: DataSource, size_fn: Callable[[Any], int] | None
    ) -> Iterator[tuple[Any, int, bool]]:
        """``(batch, size, real)`` per step of a pass, batches on θ's device (``real``: counted)."""
        raise NotImplementedError

    def batch_loss(self, theta: torch.Tensor, batch: Any) -> torch.Tensor:
        """ℓ_b(θ) of one batch, as a 0-d tensor (no gradient)."""
        raise NotImplementedError

    def at(self, theta: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
        """Inside the block the model computes with θ = ``theta`` (``"functional"`` backends)."""
        raise NotImplementedError

    def const(self, t: torch.Tensor) -> torch.Tensor:
        """A constant of the computation (a buffer value) as the model computes with it."""
        return t

    def batch_grad(self, theta: torch.Tensor, batch: Any, weight: float) -> tuple[torch.Tensor, Any]:
        """(ℓ_b(θ), ∇ℓ_b(θ)) of one batch, or (ℓ_b(θ), :data:`ACCUMULATED`) for a backend
        without ``"batch_gradients"``, which adds ``weight`` · ∇ℓ_b(θ) to a sum of its own."""
        raise NotImplementedError

    def take_gradient(self, out: torch.Tensor) -> torch.Tensor:
        """The sum the ``ACCUMULATED`` gradients of this pass were added to, written into ``out``."""
        raise NotImplementedError

    def swapped(self, work: torch.Tensor) -> contextlib.AbstractContextManager[Swap]:
        """Inside the block the model computes with θ = ``work`` once :meth:`Swap.refill` ran."""
        raise NotImplementedError

    def as_vector(self, v: Any, name: str) -> torch.Tensor:
        """``v`` checked as a local vector and moved to θ's device and dtype."""
        raise NotImplementedError

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """A local vector as parameter-shaped pieces (this process's part) keyed by name."""
        return {
            n: t.view(s)
            for n, t, s in zip(
                self.names, torch.split(theta, self.local_numels), self.local_shapes, strict=True
            )
        }

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Parameter-shaped pieces keyed by name as a local vector."""
        raise NotImplementedError

    def with_params(self, params: ParamSpec) -> Backend:
        """The same model with θ restricted to another parameter selection."""
        raise NotImplementedError

    def explain_error(self, batch: Any, error: RuntimeError) -> None:
        """Raise a clearer error for a failure inside a batch's computation, if there is one."""


class Swap:
    """What :meth:`Backend.swapped` gives: refill θ after changing the vector; buffer slots."""

    def __init__(self, refill: Callable[[], None], buffers: dict[str, torch.Tensor]) -> None:
        self.refill = refill
        #: the tensors the forward reads as each buffer (writable copies or the model's own).
        self.buffers = buffers


class LocalBackend(Backend):
    """The whole θ in this process: the model is called on tensors of ours (``functional_call``).

    Parameters outside θ and all buffers enter as constants (buffers as copies, since a
    train-mode forward updates running statistics in place); shared (tied) tensors get the same
    tensor in every slot. With ``dtype``, θ, the constants and the floating inputs are cast.
    """

    capabilities = frozenset(CAPABILITIES)
    description = "a model in this process"

    def __init__(
        self,
        model: nn.Module,
        module: LossModule,
        *,
        params: ParamSpec,
        dtype: torch.dtype | None,
        process_group: Any,
    ) -> None:
        self.model = model
        self.module = module
        self._spec = (params, dtype, process_group)
        self.group = _dist.resolve_group(process_group)
        chosen = select_params(model, params)
        for name, p in chosen:
            if not p.is_floating_point():
                raise TypeError(f"params: parameter {name!r} has dtype {p.dtype}; expected floating")
        self.layout = ParamLayout.of(chosen)
        self.names = list(self.layout.names)
        self.shapes = [p.shape for _, p in chosen]
        self.numels = self.layout.numels
        self.local_shapes, self.local_numels = self.shapes, self.numels
        self._param_dtypes = [p.dtype for _, p in chosen]
        self.device = chosen[0][1].device
        self.dtype = dtype or _promote(self._param_dtypes)
        self._cast = dtype
        self.n = self.n_local = sum(self.numels)
        chosen_ids = {id(p) for _, p in chosen}
        self._fixed_params = {n: p for n, p in model.named_parameters() if id(p) not in chosen_ids}
        self.buffers = dict(model.named_buffers())
        self._aliases = alias_map(model)
        with torch.no_grad():
            self.theta0 = torch.cat([p.detach().reshape(-1).to(self.dtype) for _, p in chosen])
        self.space = VectorSpace(self.n, dtype=self.dtype, device=self.device)
        self.eps = max(torch.finfo(d).eps for d in ([dtype] if dtype is not None else self._param_dtypes))  # type: ignore[misc]
        _dist.check_same_size(self.group, self.n)
        # vmap over weights turns convolutions into grouped convolutions: 2-3.6x slower than the
        # loop on the CPU (benchmarks/bench_landscape.py), so "auto" loops for such models there.
        self.has_conv = any(is_conv(m) for m in model.modules())
        # Reentrant checkpointing forbids torch.autograd.grad: gradients then come from
        # loss.backward() into our leaf (found on the first gradient, remembered).
        self._reentrant = False

    def with_params(self, params: ParamSpec) -> LocalBackend:
        _, dtype, group = self._spec
        return LocalBackend(self.model, self.module, params=params, dtype=dtype, process_group=group)

    # ------------------------------------------------------------------ vectors
    def as_vector(self, v: Any, name: str) -> torch.Tensor:
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(v).__name__}")
        if v.ndim != 1 or v.shape[0] != self.n:
            raise ValueError(
                f"{name}: got shape {tuple(v.shape)}; expected a flat vector of shape ({self.n},) "
                "(use objective.flatten(dict) for parameter-shaped tensors)"
            )
        if v.device != self.device or v.dtype != self.dtype:
            v = v.to(device=self.device, dtype=self.dtype)
        return v

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(theta)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.layout.flatten(tensors, device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ one batch
    def state(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors to call the wrapped model with: θ's pieces, constants, buffer copies."""
        pieces = torch.split(theta, self.numels)
        state: dict[str, torch.Tensor] = {}
        for n, t, s, dt in zip(self.names, pieces, self.shapes, self._param_dtypes, strict=True):
            t = t.view(s)
            state["model." + n] = t if self._cast is not None else t.to(dt)
        for n, p in self._fixed_params.items():
            state["model." + n] = self.const(p.detach())
        for n, b in self.buffers.items():
            # A copy: train-mode forward passes update running statistics in place.
            state["model." + n] = self.const(b).clone()
        for n, others in self._aliases.items():
            for other in others:
                state["model." + other] = state["model." + n]
        return state

    def const(self, t: torch.Tensor) -> torch.Tensor:
        """A constant of the computation, cast to ``dtype`` when one is given."""
        if self._cast is not None and t.is_floating_point():
            return t.to(self._cast)
        return t

    def at(self, theta: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
        """Inside the block the wrapped model computes with θ = ``theta`` (tangents allowed)."""
        return reparametrize(self.module, self.state(theta))

    def batch_loss(self, theta: torch.Tensor, batch: Any) -> torch.Tensor:
        loss = functional_call(self.module, self.state(theta), (batch,), tie_weights=False, strict=False)
        return scalar_loss(self.module, loss)

    def batch_grad(self, theta: torch.Tensor, batch: Any, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        with same_randomness() as replay:
            try:
                return self._batch_grad_once(theta, batch, backward=self._reentrant)
            except RuntimeError as err:
                if self._reentrant or not _is_reentrant_checkpoint(err):
                    raise
            # Reentrant checkpointing: torch.autograd.grad is not allowed, loss.backward() is.
            self._reentrant = True
            replay()
            return self._batch_grad_once(theta, batch, backward=True)

    def _batch_grad_once(
        self, theta: torch.Tensor, batch: Any, *, backward: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = theta.detach().requires_grad_(True)
        with torch.enable_grad(), self.at(leaf):
            loss = scalar_loss(self.module, self.module(batch))
            if backward:
                loss.backward()
                g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            else:
                (g,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), g

    # ------------------------------------------------------------------ passes
    @contextlib.contextmanager
    def session(self, train: bool, *, with_grad: bool) -> Iterator[None]:
        with model_guard(self.model):
            self.model.train(train)
            yield

    def steps(
        self, data: DataSource, size_fn: Callable[[Any], int] | None
    ) -> Iterator[tuple[Any, int, bool]]:
        for batch in data:
            size = batch_size_of(batch, size_fn)
            yield move_batch(batch, self.device, self._cast), size, True

    @contextlib.contextmanager
    def swapped(self, work: torch.Tensor) -> Iterator[Swap]:
        # The model's tensors are swapped for ours once; each point only refills them.
        state = self.state(work)
        views = [state["model." + n] for n in self.names]
        cast = any(
            v.data_ptr() != w.data_ptr() for v, w in zip(views, torch.split(work, self.numels), strict=True)
        )

        def refill() -> None:
            if cast:  # parameters kept in their own dtypes: refill the cast copies
                for v, w in zip(views, torch.split(work, self.numels), strict=True):
                    v.copy_(w.view(v.shape))

        with reparametrize(self.module, state):
            yield Swap(refill, {n: state["model." + n] for n in self.buffers})

    def explain_error(self, batch: Any, error: RuntimeError) -> None:
        """Raise a TypeError naming ``data`` when a batch's floating dtype differs from the model's."""
        if self._cast is not None:
            return
        model_dtypes = {p.dtype for p in self.model.parameters() if p.is_floating_point()}
        data_dtypes = {t.dtype for t in tensors_of(batch) if t.is_floating_point()}
        if not model_dtypes or not data_dtypes or data_dtypes <= model_dtypes:
            return
        data_names = ", ".join(sorted(str(d).removeprefix("torch.") for d in data_dtypes))
        model_names = ", ".join(sorted(str(d).removeprefix("torch.") for d in model_dtypes))
        raise TypeError(
            f"data: the batch holds {data_names} tensors but the model's parameters are "
            f"{model_names} ({error}); convert the data to the model's dtype, or pass "
            f"dtype=torch.float64 (or another floating dtype) to compute everything in that dtype"
        ) from error


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out
