"""The objective core: a model, a loss and data bound into functions of a flat vector θ.

Let θ ∈ Rⁿ be the chosen parameters flattened in ``model.named_parameters()`` order and
let the data be batches b = 1..B of sizes m_b. With ℓ_b(θ) the loss of batch b,

    reduction="mean":  L(θ) = Σ_b m_b ℓ_b(θ) / Σ_b m_b
    reduction="sum":   L(θ) = Σ_b ℓ_b(θ)

so L does not depend on how the same samples are split into batches (partial last batch
included). ∇L and the Hessian-vector product H(θ)v = ∇²L(θ)v follow by linearity.

Every other capability of flatness reaches the data only through :class:`Objective`, which is
written once over a backend (:mod:`flatness.objective._backend`): the pass over the data, the
replay check, the finite-difference product, the many-point evaluation and the refusal of
options a backend cannot honour are here; how θ is written into the model and where vectors
live is the backend's. Modes, flags and random states are restored after every call (see
:mod:`flatness.objective._guard`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn

from flatness._utils.validate import check_choice, check_loss_reduction, check_seed
from flatness._utils.validate import check_options as _check_options
from flatness.algorithms._linalg import VectorSpace
from flatness.objective import _dist, _hvp
from flatness.objective._backend import Accumulated, Backend
from flatness.objective._data import DataSource
from flatness.objective._evaluate import evaluate_many as _evaluate_many
from flatness.objective._fd import KinkGuard, NoSecondDerivativeError, fd_step, same_randomness
from flatness.objective._guard import seed_everything
from flatness.objective._loss import (
    _NEEDS_OUTPUTS,
    BatchLoss,
    BatchOutputs,
    LossFn,
    LossModule,
    NonFiniteLossError,
    scalar_loss,
)
from flatness.objective._params import ParamSpec, unwrap
from flatness.objective._select import backend_for

__all__ = ["NoSecondDerivativeError", "NonFiniteLossError", "Objective", "ParamSpec", "check_options"]

#: per_batch(batch, weight) -> (loss, extra): what :meth:`Objective.sum_over_data` sums.
PerBatch = Callable[[Any, float], tuple[torch.Tensor, Any]]


class Objective:
    """A model, a loss and data as exact functions of a flat parameter vector θ.

    .. math::
        L(\\theta) = \\frac{\\sum_b m_b \\ell_b(\\theta)}{\\sum_b m_b}
        \\quad\\text{(reduction="mean"; "sum" drops the weights)}

    Methods evaluate :math:`L`, :math:`\\nabla L` and :math:`\\nabla^2 L\\, v` over a full
    pass of the data, on the model's device, in the model's dtype or ``dtype``; the sums over
    batches accumulate in at least float32 (``acc_dtype``), in which losses are returned.
    Every pass sees the same batches: the global RNGs are seeded with ``data_seed``, the
    loader's generators rewound, ``persistent_workers`` loaders iterated with fresh workers,
    ``DistributedSampler`` padding dropped; data whose passes still differ raises ValueError.

    The model's parameters may live in this process (DDP / DataParallel wrappers are
    unwrapped) or be sharded with FSDP2's ``fully_shard``: vectors are then each rank's shards
    (*local vectors*, ``n_local`` numbers; :attr:`space` sums their dot products over the ranks),
    every rank calls every method together, and products are finite differences of FSDP
    gradient passes. An option the model's backend cannot honour (``dtype``, an exact
    ``hvp_mode``, ``reuse_graph=True`` on a sharded model) raises a ``ValueError`` naming it.

    Args:
        model: any ``nn.Module``, or one sharded with ``fully_shard``.
        loss_fn: ``loss_fn(model(inputs), targets)`` returning the batch *mean* loss (or the
            batch sum with ``reduction="sum"``). Omit it when ``batch_loss`` is given.
        data: a DataLoader, a re-iterable of batches, or one ``(inputs, targets)`` batch.
        batch_loss: ``batch_loss(model, batch) -> scalar`` replacing ``loss_fn`` for dict
            batches or models whose call is not ``model(inputs)`` (Hessian measures only, unless
            it states its split as ``batch_loss.split = (batch_outputs, loss_fn)``, as
            :func:`flatness.integrations.huggingface.lm_loss` does).
        batch_outputs: ``batch_outputs(model, batch) -> (outputs, targets)``, used with
            ``loss_fn(outputs, targets)`` for batches that are not ``(inputs, targets)`` pairs.
            Unlike ``batch_loss`` it tells which part is the model's output and which the loss,
            which the GGN and the Fisher need (see :mod:`flatness.operators`).
        params: which parameters form θ: ``None`` (all with ``requires_grad``), names,
            parameter tensors, or a predicate ``(name, param) -> bool``.
        reduction: ``"mean"`` (size-weighted mean over batches) or ``"sum"``.
        train: evaluate in train mode (dropout on, BatchNorm batch statistics). Buffers the
            forward pass would update are copies; the model's own stay as they are.
        max_batches: use only the first ``max_batches`` batches of every pass.
        batch_size: ``batch_size(batch) -> int``; default: leading dimension of the inputs.
        dtype: compute in this floating dtype (e.g. ``torch.float64``); default: the model's.
        hvp_mode: ``"forward"`` (forward-over-reverse, ``torch.func.jvp`` of ``grad``),
            ``"reverse"`` (double backward) or ``"auto"`` (currently double backward: it
            measured faster on the CPU benchmarks, and forward-mode AD is missing for some
            ops, e.g. ``F.mse_loss`` under ``jvp(grad)`` in torch 2.13). Both are exact.
            ``"finite_difference"``: H v ≈ ‖v‖ (∇L(θ + h v̂) − ∇L(θ − h v̂)) / 2h with
            h = ε^(1/3) · max(1, ‖θ‖/√n) (:meth:`fd_step`), two gradient passes and no second
            derivatives, for models whose ops have none (custom ``autograd.Function`` s,
            reentrant checkpointing); relative error about ε^(2/3) on smooth losses (see
            :mod:`flatness.objective._fd`; not for ReLU / max-pooling networks, whose gradient jumps:
            :class:`flatness.NonSmoothWarning` says so when a step crosses a kink, at the cost
            of one gradient pass per θ).
        data_seed: the seed every pass starts from, so shuffling loaders replay the same
            batches and random augmentations are the same in every pass.
        reuse_graph: inside :meth:`reusing_graph` (which the spectrum functions use), keep the
            gradient graph of every batch across Hessian-vector products, so that each product
            is one backward pass instead of a forward and two backward passes (as PyHessian does
            for one batch). ``"auto"`` (default): when the double-backward mode is used, the data
            is one batch or a list / tuple of at most 8 batches, and the graphs take at most half
            the free memory (measured on the graphs the first product builds); ``True``: whenever
            the mode allows (any data, e.g. a DataLoader that replays); ``False``: never.
            Products are exactly the same either way; the graphs are freed when the block ends.
        process_group: a ``torch.distributed`` group whose ranks each hold a shard of the
            data; default: the world group when one is initialized, else none; ``False``:
            this process's data alone, no collectives (for measuring on one rank only).

    Raises:
        TypeError, ValueError: with the argument named, for bad input (``data`` for empty
            batches, data of another floating dtype than the model's, or passes that differ;
            ``model`` for a model without parameters; ``loss_fn`` for a loss module whose
            ``reduction`` contradicts ``reduction``). Errors raised by the model or the loss
            function themselves propagate unchanged.
        NonFiniteLossError: a loss, gradient or HVP that is not finite (naming the batch).

    Warns:
        NonSmoothWarning: finite-difference products whose gradient jumps inside the step.
        RuntimeWarning: ``hvp_mode="forward"`` where torch has no forward-mode derivative for an
            op of the model (the products are then computed by double backward).

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> obj = flatness.Objective(model, torch.nn.functional.mse_loss, [(X[:10], y[:10]), (X[10:], y[10:])])
        >>> bool(torch.isclose(obj.loss(), torch.nn.functional.mse_loss(model(X), y)))  # size-weighted
        True
        >>> A = torch.cat([X, torch.ones(16, 1).double()], 1)
        >>> v = torch.ones(obj.n, dtype=torch.float64)
        >>> torch.allclose(obj.hvp(v), 2 * A.T @ A @ v / 16)  # H = 2 AᵀA / N
        True
        >>> obj.supports("exact_hvp"), obj.hvp_mode_used
        (True, 'reverse')
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        data: Any = None,
        *,
        batch_loss: BatchLoss | None = None,
        batch_outputs: BatchOutputs | None = None,
        params: ParamSpec = None,
        reduction: Literal["mean", "sum"] = "mean",
        train: bool = False,
        max_batches: int | None = None,
        batch_size: Callable[[Any], int] | None = None,
        dtype: torch.dtype | None = None,
        hvp_mode: Literal["auto", "forward", "reverse", "finite_difference"] = "auto",
        data_seed: int = 0,
        reuse_graph: bool | Literal["auto"] = "auto",
        process_group: Any = None,
        _backend: Backend | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if batch_outputs is not None and loss_fn is None:
            raise TypeError(
                "batch_outputs: needs loss_fn(outputs, targets) to turn the outputs into a loss; "
                "pass loss_fn instead of batch_loss"
            )
        if (loss_fn is None) == (batch_loss is None):
            raise TypeError(
                "loss_fn / batch_loss: pass exactly one: loss_fn(outputs, targets) or "
                "batch_loss(model, batch)"
            )
        for name, fn in (("loss_fn", loss_fn), ("batch_loss", batch_loss), ("batch_outputs", batch_outputs)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")
        check_choice("reduction", reduction, ("mean", "sum"))
        check_loss_reduction(loss_fn, reduction)
        check_choice("hvp_mode", hvp_mode, ("auto", "forward", "reverse", "finite_difference"))
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        if batch_size is not None and not callable(batch_size):
            raise TypeError(f"batch_size: expected a callable(batch) -> int, got {batch_size!r}")
        data_seed = check_seed(data_seed, "data_seed")
        if reuse_graph != "auto" and not isinstance(reuse_graph, bool):
            raise TypeError(f"reuse_graph: expected True, False or 'auto', got {reuse_graph!r}")
        self.data = DataSource(data, max_batches=max_batches)
        self.reduction = reduction
        self.train = bool(train)
        self.hvp_mode = hvp_mode
        self.data_seed = int(data_seed)
        self.reuse_graph = reuse_graph
        self.size_fn = batch_size
        self._options = {
            "loss_fn": loss_fn,
            "batch_loss": batch_loss,
            "batch_outputs": batch_outputs,
            "reduction": reduction,
            "train": train,
            "max_batches": max_batches,
            "batch_size": batch_size,
            "dtype": dtype,
            "hvp_mode": hvp_mode,
            "data_seed": data_seed,
            "reuse_graph": reuse_graph,
            "process_group": process_group,
        }
        if _backend is None:
            model = unwrap(model)  # DDP / DataParallel: the module inside
            module = LossModule(model, loss_fn, batch_loss, batch_outputs)
            _backend = backend_for(model, module, params=params, dtype=dtype, process_group=process_group)
        self.backend = _backend
        _refuse_unsupported(_backend, self._options)
        b = _backend
        self.model: nn.Module = b.model
        self.module: LossModule = b.module
        self.names: list[str] = list(b.names)
        self.shapes: list[torch.Size] = list(b.shapes)
        self.numels: list[int] = list(b.numels)
        self.local_shapes: list[torch.Size] = list(b.local_shapes)
        self.n: int = b.n
        self.n_local: int = b.n_local
        self.device: torch.device = b.device
        self.dtype: torch.dtype = b.dtype
        # Full-data sums accumulate in at least float32 whatever the model's dtype.
        self.acc_dtype: torch.dtype = torch.promote_types(self.dtype, torch.float32)
        self.theta0: torch.Tensor = b.theta0
        #: the vector space of θ's (local) vectors: dot products and norms over every rank.
        self.space: VectorSpace = b.space
        self.buffers: dict[str, torch.Tensor] = b.buffers
        self.n_loss = 0
        self.n_grad = 0
        self.n_hvp = 0
        self.n_passes = 0
        # evaluate_many: whether vmap works, per kind of call (metrics, buffers); the path last used.
        self._vmap_ok: dict[tuple[tuple[str, ...], tuple[str, ...]], bool] = {}
        self.last_vectorized: bool | None = None
        exact = "exact_hvp" in b.capabilities
        # benchmarks/bench_hvp.py: double backward 2.3-2.8x a gradient pass on the CNN, 3.1-4.8x on
        # the MLP; forward-over-reverse 2.9-3.3x and 6.4-8.7x (torch 2.13, CPU).
        self._forward = hvp_mode == "forward"
        self._fd = hvp_mode == "finite_difference" or not exact
        # Finite differences: warns where the gradient jumps inside the step (ReLU, max-pooling).
        self._kinks = KinkGuard(self.space.norm64, b.eps, exact=exact)
        # Custom autograd.Functions are checked for a differentiable backward on the first
        # exact HVP pass (a structural property of the model).
        self._checked_second = False
        # The kept gradient graphs of a reusing_graph() block (None outside one).
        self._kept: _hvp.KeptGraphs | None = None
        #: whether Hessian-vector products of the last reusing_graph() block used kept graphs.
        self.graph_reused = False

    # ------------------------------------------------------------------ what the backend offers
    def supports(self, capability: str) -> bool:
        """Whether the model's backend has ``capability`` (see :data:`flatness.objective.CAPABILITIES`)."""
        return capability in self.backend.capabilities

    def require(self, capability: str, option: str, what: str, fix: str = "") -> None:
        """Raise a ValueError naming ``option`` unless the backend has ``capability``."""
        if capability not in self.backend.capabilities:
            raise ValueError(
                f"{option}: {what} is not available for {self.backend.description}"
                + (f"; {fix}" if fix else "")
            )

    # ------------------------------------------------------------------ flat <-> dict
    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat (local) vector into parameter-shaped tensors keyed like ``named_parameters``."""
        return self.backend.unflatten(self.as_vector(theta, "theta"))

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate parameter-shaped tensors (keyed like θ's names) into a flat (local) vector."""
        return self.backend.flatten(tensors)

    def with_params(self, params: ParamSpec) -> Objective:
        """The same model, loss, data and options with θ restricted to another parameter selection."""
        return Objective(
            self.model, data=self.data.source, _backend=self.backend.with_params(params), **self._options
        )

    def as_vector(self, v: Any, name: str) -> torch.Tensor:
        """``v`` checked as a (local) vector of θ's size, on θ's device and in its dtype."""
        return self.backend.as_vector(v, name)

    def theta_or_default(self, theta: Any) -> torch.Tensor:
        """``theta`` as a vector, θ₀ when None."""
        return self.theta0 if theta is None else self.as_vector(theta, "theta")

    # ------------------------------------------------------------------ one batch
    def at(self, theta: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
        """Inside the block the wrapped model computes with θ = ``theta`` (our tensors swapped in).

        For operators that need more than the batch loss (outputs, per-sample losses): call
        :meth:`batch_outputs` / :meth:`output_loss` inside. ``theta`` may carry autograd or
        forward-mode tangents. Forward *and* backward should run inside, so that activation
        checkpointing, which recomputes the forward during the backward, recomputes it at θ and
        not at the model's own parameters. Needs the ``"functional"`` capability.
        """
        self.require("functional", "model", "computing at θ with autograd tangents")
        return self.backend.at(theta)

    def require_outputs(self, what: str) -> None:
        """Raise a TypeError naming ``what`` unless the outputs are separate from the loss."""
        if self.module._batch_loss is not None:
            raise TypeError(_NEEDS_OUTPUTS.format(what=what))

    def batch_outputs(self, batch: Any) -> tuple[Any, Any]:
        """``(outputs, targets)`` of a batch at the θ of the enclosing :meth:`at` block."""
        return self.module.outputs(batch)

    def output_loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        """The batch loss ``loss_fn(outputs, targets)`` as a 0-d tensor."""
        return scalar_loss(self.module, self.module._loss_fn(outputs, targets))  # type: ignore[misc]

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """The batch loss at the θ of the enclosing :meth:`at` block, as a 0-d tensor."""
        return scalar_loss(self.module, self.module(batch))

    @property
    def loss_fn(self) -> LossFn | None:
        """The user's ``loss_fn`` (None when ``batch_loss`` is used)."""
        return self.module._loss_fn

    # ------------------------------------------------------------------ the pass
    def sum_over_data(
        self, per_batch: PerBatch, what: str, numel: int | None, *, check_finite: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Σ_b w_b (loss_b, extra_b) / Σ_b w_b over one pass of the data, summed over the ranks.

        ``per_batch(batch, w)`` returns the batch's scalar loss and a flat ``extra`` tensor of
        ``numel`` numbers (gradient, product, per-point losses...), a tuple of tensors summed
        side by side (their sizes adding up to ``numel``), or None; the pass weights it by w
        (the batch size, or 1 with ``reduction="sum"``). An extra wrapped in
        :class:`~flatness.objective._backend.Presummed` is already weighted and summed over the
        ranks (a sharded model's gradients) and is added as it is. With ``check_finite=False``
        non-finite values pass through (landscape grids keep NaN). The sums accumulate in
        ``acc_dtype`` (at least float32: a bfloat16 sum of a few hundred batch losses is off by
        percents) and are returned in it. Every pass replays the same batches
        (:class:`flatness.objective._data.DataSource`); one whose batches differ from the
        first pass's raises ValueError on every rank.
        """
        acc = self.acc_dtype
        backend = self.backend
        total_loss = torch.zeros((), dtype=acc, device=self.device)
        total_extra = None if numel is None else torch.zeros(numel, dtype=acc, device=self.device)
        losses: list[torch.Tensor] = []
        total_size = 0
        accumulated = False  # the extra is the backend's own sum (already over every rank)
        with backend.session(self.train, with_grad=True):
            saved = self.data.save_generators()
            try:
                seed_everything(self.data_seed)
                for batch, size, real in backend.steps(self.data, self.size_fn):
                    w = (float(size) if self.reduction == "mean" else 1.0) if real else 0.0
                    try:
                        loss, extra = per_batch(batch, w)
                    except RuntimeError as e:
                        backend.explain_error(batch, e)
                        raise
                    if real:
                        loss = loss.detach()
                        losses.append(loss)
                        total_loss = total_loss + w * loss.to(acc)
                        total_size += size
                    if isinstance(extra, Accumulated):
                        accumulated = True
                        continue
                    alpha = w
                    if total_extra is not None and extra is not None and alpha:
                        # NaN and ±inf survive the sum, so one check of the total suffices.
                        if isinstance(extra, tuple):  # parts summed side by side
                            start = 0
                            for part in extra:
                                part = part.detach().reshape(-1)
                                end = start + part.numel()
                                total_extra[start:end].add_(part.to(acc), alpha=alpha)
                                start = end
                        else:
                            total_extra.add_(extra.detach().reshape(-1).to(acc), alpha=alpha)
                if accumulated and total_extra is not None:
                    backend.take_gradient(total_extra)
            finally:
                self.data.restore_generators(saved)
        self.n_passes += 1
        differs = self.data.end_pass()
        # One host synchronization per pass, not one per batch.
        finite = torch.isfinite(torch.stack(losses)) if losses else torch.ones(1, dtype=torch.bool)
        if not check_finite:
            ok = True
        elif total_extra is not None:
            ok = bool(finite.all() & torch.isfinite(total_extra).all())
        else:
            ok = bool(finite.all())
        # An accumulated extra (a shard of a reduce-scattered gradient) is not summed again.
        total_loss, summed, total_size, n_empty, n_bad, n_differ = _dist.all_reduce_sums(
            backend.group,
            total_loss,
            None if accumulated else total_extra,
            total_size,
            empty=not losses,
            bad=not ok,
            differs=differs is not None,
        )
        if not accumulated:
            total_extra = summed
        if n_empty:
            where = "" if backend.group is None else f" on {n_empty} rank(s); every rank needs a shard"
            raise ValueError(f"data: the data yielded no batches{where}; pass at least one batch")
        self.data.check_replay(differs, n_differ)
        if n_bad:
            bad = (~finite).nonzero()
            if not ok and bad.numel():
                i = int(bad[0, 0])
                raise NonFiniteLossError(
                    f"the loss is {losses[i].item()} on batch {i} (of {len(losses)}) while "
                    f"computing the {what}; check the model, the data and the parameters"
                )
            where = "on this rank" if not ok else "on another rank"
            raise NonFiniteLossError(
                f"the {what} is not finite ({where}) although the loss is finite on every batch; "
                "check the model, the data and the parameters"
            )
        scale = 1.0 / total_size if self.reduction == "mean" else 1.0
        return total_loss * scale, None if total_extra is None else total_extra.mul_(scale)

    # ------------------------------------------------------------------ public evaluations
    def loss(self, theta: Any = None) -> torch.Tensor:
        """L(θ) over one full pass (a 0-d tensor). ``theta=None`` means the model's θ."""
        theta = self.theta_or_default(theta)

        def per_batch(batch: Any, weight: float) -> tuple[torch.Tensor, None]:
            with torch.no_grad():
                return self.backend.batch_loss(theta, batch), None

        self.n_loss += 1
        return self.sum_over_data(per_batch, "loss", None)[0]

    def loss_and_grad(self, theta: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(θ), ∇L(θ)) over one full pass (∇L as this process's local vector)."""
        theta = self.theta_or_default(theta).detach()
        self.n_grad += 1
        loss, grad = self._grad_pass(theta)
        return loss, grad.to(self.dtype)

    def grad(self, theta: Any = None) -> torch.Tensor:
        """∇L(θ) over one full pass."""
        return self.loss_and_grad(theta)[1]

    def _grad_pass(self, theta: torch.Tensor, what: str = "gradient") -> tuple[torch.Tensor, torch.Tensor]:
        backend = self.backend

        def per_batch(batch: Any, weight: float) -> tuple[torch.Tensor, Any]:
            return backend.batch_grad(theta, batch, weight)

        loss, grad = self.sum_over_data(per_batch, what, self.n_local)
        assert grad is not None
        return loss, grad

    def _acc_grad(self, theta: torch.Tensor) -> torch.Tensor:
        """∇L(θ) over one full pass, in the accumulation dtype (counted in ``n_grad``)."""
        self.n_grad += 1
        return self._grad_pass(theta.detach())[1]

    def hvp(self, v: Any, theta: Any = None) -> torch.Tensor:
        """The Hessian-vector product ∇²L(θ) v over one full pass (exact unless finite-difference).

        Inside :meth:`reusing_graph` for this ``theta``, from the kept gradient graphs (one
        backward pass per batch, no forward) once the first product has built them.
        """
        v = self.as_vector(v, "v")
        kept = self._kept
        if kept is not None and theta is kept.key and kept.usable:
            if kept.entries is not None:
                return _hvp.kept_hvp(self, v, kept)
            return _hvp.building_hvp(self, v, kept)
        theta = self.theta_or_default(theta).detach()
        if self._fd:
            return self._fd_hvp(v, theta)
        return _hvp.exact_hvp(self, v, theta, forward=self._forward)

    @contextlib.contextmanager
    def reusing_graph(self, theta: Any = None) -> Iterator[None]:
        """Inside the block, Hessian-vector products at ``theta`` reuse the gradient graphs.

        See :func:`flatness.objective._hvp.reusing_graph` (one backward pass per batch per
        product after the first; the same numbers). A no-op where the backend keeps no graphs.
        """
        with _hvp.reusing_graph(self, theta):
            yield

    def fd_step(self, theta: Any = None) -> float:
        """The finite-difference step h = ε^(1/3) · max(1, ‖θ‖/√n) along a unit vector.

        ε is the machine epsilon of the dtype the gradients are computed in (the lowest
        precision among θ's parameters, or ``dtype``). See :mod:`flatness.objective._fd`.
        """
        return fd_step(self.space.norm64(self.theta_or_default(theta)), self.n, self.backend.eps)

    def _fd_hvp(self, v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """‖v‖ (∇L(θ + h v̂) − ∇L(θ − h v̂)) / 2h: batch by batch, or from two gradient passes.

        With ``"batch_gradients"`` (one process) the difference is formed per batch, in one pass;
        a backend whose gradients come only as whole-pass sums (FSDP) takes two passes.
        """
        vnorm = self.space.norm64(v)
        if not math.isfinite(vnorm):
            raise ValueError("v: the vector has non-finite entries")
        self.n_hvp += 1
        if vnorm == 0.0:
            return torch.zeros_like(theta)
        h = self.fd_step(theta)
        c = h / vnorm
        # The non-smoothness guard (flatness.objective._fd.KinkGuard) until it has warned: ∇L(θ) once per θ.
        kinks = self._kinks
        guard = not kinks.warned
        what = "finite-difference Hessian-vector product"
        point = torch.empty_like(theta)  # θ + h v̂, then θ − h v̂ (one buffer)
        by_batch = self.supports("batch_gradients")
        if by_batch:
            diff, second = self._fd_by_batch(theta, v, c, point, guard, what)
        else:
            # Gradients only as whole-pass sums (a sharded model's .grad): two passes, which
            # see the same batches and random numbers (every pass starts from data_seed).
            torch.add(theta, v, alpha=c, out=point)
            diff = self._grad_pass(point, what)[1]
            torch.add(theta, v, alpha=-c, out=point)
            g_minus = self._grad_pass(point, what)[1]
            diff.sub_(g_minus)
            # g₊ + g₋ = 2 g₋ + (g₊ − g₋), for the guard's second difference.
            second = g_minus.mul_(2.0).add_(diff) if guard else None
            del g_minus
        del point
        # ∇L(θ) after the products' passes (the same numbers; less memory held meanwhile).
        g0 = kinks.base_gradient(theta, self._acc_grad) if guard else None
        if g0 is None:
            return diff.mul_(vnorm / (2.0 * h)).to(self.dtype)
        assert second is not None
        kinks.check(second.sub_(g0, alpha=2.0), diff)
        del second
        if by_batch:  # diff is a view of the 2n sums: a vector of its own
            return diff.mul(vnorm / (2.0 * h)).to(self.dtype)
        return diff.mul_(vnorm / (2.0 * h)).to(self.dtype)

    def _fd_by_batch(
        self, theta: torch.Tensor, v: torch.Tensor, c: float, point: torch.Tensor, guard: bool, what: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Σ_b w_b (g₊ − g₋) and Σ_b w_b (g₊ + g₋) / Σ_b w_b, differenced batch by batch."""
        backend = self.backend

        def per_batch(batch: Any, weight: float) -> tuple[torch.Tensor, Any]:
            # Both gradients see the same random numbers (dropout, augmentation). Their
            # difference is formed per batch, before the sum over batches, so that the sum
            # does not carry the gradients' magnitude (a correctly rounded subtraction adds an
            # error relative to the difference only).
            with same_randomness() as replay:
                torch.add(theta, v, alpha=c, out=point)
                loss, g_plus = backend.batch_grad(point, batch, weight)
                replay()
                torch.add(theta, v, alpha=-c, out=point)
                _, g_minus = backend.batch_grad(point, batch, weight)
            g_plus.sub_(g_minus)
            if not guard:
                return loss, g_plus
            # g₊ + g₋ = 2 g₋ + (g₊ − g₋), for the guard's second difference.
            return loss, (g_plus, g_minus.mul_(2.0).add_(g_plus))

        total = self.sum_over_data(per_batch, what, 2 * self.n_local if guard else self.n_local)[1]
        assert total is not None
        if not guard:
            return total, None
        return total[: self.n_local], total[self.n_local :]

    @property
    def hvp_mode_used(self) -> str:
        """The HVP mode in use: "forward", "reverse" or "finite_difference" ("auto" resolved)."""
        if self._fd:
            return "finite_difference"
        return "forward" if self._forward else "reverse"

    def __repr__(self) -> str:
        local = f", n_local={self.n_local}" if self.n_local != self.n else ""
        return (
            f"Objective(n={self.n}{local}, dtype={self.dtype}, device={self.device}, "
            f"reduction={self.reduction!r}, train={self.train})"
        )

    # ------------------------------------------------------------------ many points, one pass
    def evaluate_many(self, thetas: Any, **options: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L(θ_i) and size-weighted metrics at k points in one pass over the data.

        See :func:`flatness.objective._evaluate.evaluate_many` (this method calls it with
        ``obj=self``); the landscape functions are built on it.
        """
        return _evaluate_many(self, thetas, **options)

    # ------------------------------------------------------------------ random vectors
    def random_vector(self, generator: torch.Generator, rows: int | None = None) -> torch.Tensor:
        """Standard normal (local) vector(s) from ``generator``, in float64.

        Whole vectors are drawn as ``torch.randn(n)`` in float64; a sharded θ's entries by the
        counter-based draws of its vector space (the same vector for any number of ranks).
        """
        if self.supports("whole_vectors"):
            shape = (self.n,) if rows is None else (rows, self.n)
            return torch.randn(shape, generator=generator, dtype=torch.float64)
        return self.space.randn(generator, rows).double()


def _refuse_unsupported(backend: Backend, options: dict[str, Any]) -> None:
    """Every option a backend cannot honour is refused here, by name (one place)."""
    caps = backend.capabilities
    where = backend.description

    def refuse(option: str, why: str) -> None:
        raise ValueError(f"{option}: {why} is not available for {where}")

    if options["dtype"] is not None and "dtype" not in caps:
        refuse(
            "dtype",
            "computing in another dtype (the model computes in its own, or its mixed-precision, dtype)",
        )
    if options["hvp_mode"] in ("forward", "reverse") and "exact_hvp" not in caps:
        refuse(
            "hvp_mode",
            f"{options['hvp_mode']!r} (exact products need double backward through the model, "
            "here through FSDP's collectives; use 'auto' or 'finite_difference')",
        )
    if options["reuse_graph"] is True and "kept_graphs" not in caps:
        refuse("reuse_graph", "True (keeping gradient graphs across products; use 'auto' or False)")


def check_options(fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Reject keyword arguments that neither ``fn`` nor :class:`Objective` takes (typos)."""
    _check_options(fn, options, Objective.__init__)
