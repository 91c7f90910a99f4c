"""The objective core: a model, a loss and data bound into functions of a flat vector θ.

Let θ ∈ Rⁿ be the chosen parameters flattened in ``model.named_parameters()`` order and
let the data be batches b = 1..B of sizes m_b. With ℓ_b(θ) the loss of batch b,

    reduction="mean":  L(θ) = Σ_b m_b ℓ_b(θ) / Σ_b m_b
    reduction="sum":   L(θ) = Σ_b ℓ_b(θ)

so L does not depend on how the same samples are split into batches (partial last batch
included). ∇L and the Hessian-vector product H(θ)v = ∇²L(θ)v follow by linearity.

Every other capability of flatness reaches the data only through :class:`Objective`. The
model is evaluated with ``torch.func.functional_call`` on tensors of our own (grids swap
the tensors in once per batch, by the same mechanism, and refill them per point), so its
parameters and buffers are never written; modes, flags and random states are restored
after every call (see :mod:`flatness.objective._guard`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module  # what functional_call runs

from flatness._utils.validate import check_choice, check_loss_reduction, check_seed
from flatness._utils.validate import check_options as _check_options
from flatness.objective import _dist
from flatness.objective._data import DataSource, batch_size_of, move_batch, tensors_of
from flatness.objective._fd import (
    KinkGuard,
    NoSecondDerivativeError,
    _is_reentrant_checkpoint,
    check_second_derivatives,
    explain,
    fd_step,
    forward_ad_unsupported,
    same_randomness,
)
from flatness.objective._guard import model_guard, seed_everything
from flatness.objective._params import ParamLayout, ParamSpec, alias_map, select_params, unwrap

__all__ = ["NoSecondDerivativeError", "NonFiniteLossError", "Objective", "ParamSpec", "check_options"]

LossFn = Callable[[Any, Any], torch.Tensor]
BatchLoss = Callable[[nn.Module, Any], torch.Tensor]
BatchOutputs = Callable[[nn.Module, Any], tuple[Any, Any]]


class NonFiniteLossError(ValueError):
    """The loss (or its derivative) is NaN or infinite on some batch.

    Attributes:
        best: where the sharpness measures met a non-finite loss at a perturbed point (not at
            θ), their result at the best finite point found before it (its ``value`` is a
            lower bound of the measure); otherwise None.
    """

    def __init__(self, message: str, *, best: Any = None) -> None:
        super().__init__(message)
        self.best = best


class _ForwardADFailed(Exception):
    """Forward-mode AD failed on a batch (not a RuntimeError: ``_pass`` must not explain it)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


_NEEDS_OUTPUTS = (
    "batch_loss: {what} needs the model's outputs separately from the loss (it is built on the "
    "Hessian of the loss with respect to the outputs, or on per-sample losses), which an opaque "
    "batch_loss(model, batch) does not expose. Pass batch_outputs=lambda model, batch: "
    "(outputs, targets) together with loss_fn(outputs, targets) instead of batch_loss"
)


class _LossModule(nn.Module):
    """Wraps ``model`` so that one ``functional_call`` computes one batch's loss.

    The loss of a batch is ``loss_fn(outputs, targets)`` with ``(outputs, targets)`` from
    :meth:`outputs` — ``model(inputs)`` for ``(inputs, targets)`` batches, or the user's
    ``batch_outputs(model, batch)`` — unless an opaque ``batch_loss(model, batch)`` is given.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        batch_loss: BatchLoss | None,
        batch_outputs: BatchOutputs | None = None,
    ):
        super().__init__()
        # A batch_loss that states its own split (``batch_loss.split = (batch_outputs, loss_fn)``,
        # as lm_loss's does) is that pair: the GGN and the Fisher can use it too.
        split = getattr(batch_loss, "split", None)
        if split is not None and loss_fn is None and batch_outputs is None:
            (batch_outputs, loss_fn), batch_loss = split, None
        self.model = model
        self._loss_fn = loss_fn
        self._batch_loss = batch_loss
        self._batch_outputs = batch_outputs

    def outputs(self, batch: Any) -> tuple[Any, Any]:
        """``(outputs, targets)`` of a batch: what ``loss_fn`` is applied to."""
        if self._batch_loss is not None:
            raise TypeError(_NEEDS_OUTPUTS.format(what="this measure"))
        if self._batch_outputs is not None:
            out = self._batch_outputs(self.model, batch)
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise TypeError(
                    "batch_outputs: must return a pair (outputs, targets) that loss_fn(outputs, "
                    f"targets) takes; got {type(out).__name__}"
                )
            return out[0], out[1]
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            kind = type(batch).__name__
            length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            raise TypeError(
                f"data: a batch is a {kind}{length}; loss_fn needs (inputs, targets) batches. "
                "For other batches pass batch_outputs=lambda model, batch: (outputs, targets), "
                "or batch_loss=lambda model, batch: <scalar loss>"
            )
        inputs, targets = batch
        return self.model(inputs), targets

    def forward(self, batch: Any) -> torch.Tensor:
        if self._batch_loss is not None:
            return self._batch_loss(self.model, batch)
        outputs, targets = self.outputs(batch)
        return self._loss_fn(outputs, targets)  # type: ignore[misc]


def _math_attention() -> contextlib.AbstractContextManager[Any]:
    """``scaled_dot_product_attention`` by its plain math kernel inside the block.

    The fused kernels (flash, memory-efficient; CPU and CUDA) have no second derivative
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented"), so Hessian-vector products of attention models need the math kernel. The
    backend choice is restored on exit; torch without ``torch.nn.attention`` gets a no-op.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


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

    Args:
        model: any ``nn.Module`` (DDP / DataParallel wrappers are unwrapped).
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

        from flatness.objective._fsdp import check_not_fsdp1, is_sharded

        check_not_fsdp1(model)
        if is_sharded(model):
            raise TypeError(
                "model: its parameters are sharded with fully_shard (DTensors), and Objective holds "
                "whole vectors; the model-level functions (hessian_topk, hessian_trace, "
                "hessian_density, sharpness, landscapes) and HessianOperator detect sharded models "
                "themselves, and flatness.objective._fsdp.ShardedObjective is the objective of one"
            )
        self.model = unwrap(model)
        self.data = DataSource(data, max_batches=max_batches)
        self.reduction = reduction
        self.train = bool(train)
        self.hvp_mode = hvp_mode
        self.data_seed = int(data_seed)
        self._size_fn = batch_size
        self._module = _LossModule(self.model, loss_fn, batch_loss, batch_outputs)
        self._group = _dist.resolve_group(process_group)
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

        chosen = select_params(self.model, params)
        self.layout = ParamLayout.of(chosen)
        self.names: list[str] = list(self.layout.names)
        self.shapes: list[torch.Size] = [p.shape for _, p in chosen]
        self.numels: list[int] = self.layout.numels
        self._param_dtypes = [p.dtype for _, p in chosen]
        for n, p in chosen:
            if not p.is_floating_point():
                raise TypeError(f"params: parameter {n!r} has dtype {p.dtype}; expected floating")
        first = chosen[0][1]
        self.device: torch.device = first.device
        self.dtype: torch.dtype = dtype or _promote([p.dtype for _, p in chosen])
        # Full-data sums accumulate in at least float32 whatever the model's dtype.
        self.acc_dtype: torch.dtype = torch.promote_types(self.dtype, torch.float32)
        self._cast = dtype
        self.n: int = sum(self.numels)
        chosen_ids = {id(p) for _, p in chosen}
        # Parameters outside θ and all buffers enter as constants (detached; cast if asked).
        self._fixed_params = {n: p for n, p in self.model.named_parameters() if id(p) not in chosen_ids}
        self._buffers = dict(self.model.named_buffers())
        # Shared tensors: every other module slot holding the same tensor gets ours too.
        self._aliases = alias_map(self.model)
        with torch.no_grad():
            self.theta0: torch.Tensor = torch.cat([p.detach().reshape(-1).to(self.dtype) for _, p in chosen])
        _dist.check_same_size(self._group, self.n)
        self.n_loss = 0
        self.n_grad = 0
        self.n_hvp = 0
        self.n_passes = 0
        # evaluate_many: whether vmap works, per kind of call (metrics, buffers); the path last used.
        self._vmap_ok: dict[tuple[tuple[str, ...], tuple[str, ...]], bool] = {}
        self.last_vectorized: bool | None = None
        # vmap over weights turns convolutions into grouped convolutions: 2-3.6x slower than the
        # loop on the CPU (benchmarks/bench_landscape.py), so "auto" loops for such models there.
        self._has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())
        # benchmarks/bench_hvp.py: double backward 2.3-2.8x a gradient pass on the CNN, 3.1-4.8x on
        # the MLP; forward-over-reverse 2.9-3.3x and 6.4-8.7x (torch 2.13, CPU).
        self._forward = hvp_mode == "forward"
        self._fd = hvp_mode == "finite_difference"
        # Finite differences: warns where the gradient jumps inside the step (ReLU, max-pooling).
        self._kinks = KinkGuard(
            lambda t: float(torch.linalg.vector_norm(t, dtype=torch.float64)), self._compute_eps()
        )
        # Reentrant checkpointing forbids torch.autograd.grad: gradients then come from
        # loss.backward() into our leaf (found on the first gradient, remembered).
        self._reentrant = False
        # Custom autograd.Functions are checked for a differentiable backward on the first
        # exact HVP pass (a structural property of the model).
        self._checked_second = False
        self.reuse_graph = reuse_graph
        # The kept gradient graphs of a reusing_graph() block (None outside one).
        self._kept: _KeptGraphs | None = None
        #: whether Hessian-vector products of the last reusing_graph() block used kept graphs.
        self.graph_reused = False

    # ------------------------------------------------------------------ flat <-> dict
    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into parameter-shaped tensors keyed like ``named_parameters``."""
        return self.layout.unflatten(self._as_vector(theta, "theta"))

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate parameter-shaped tensors (keyed like θ's names) into a flat vector."""
        return self.layout.flatten(tensors, device=self.device, dtype=self.dtype)

    def with_params(self, params: ParamSpec) -> Objective:
        """The same model, loss, data and options with θ restricted to another parameter selection."""
        return Objective(self.model, data=self.data.source, params=params, **self._options)

    def _as_vector(self, v: Any, name: str) -> torch.Tensor:
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

    def _theta(self, theta: Any) -> torch.Tensor:
        return self.theta0 if theta is None else self._as_vector(theta, "theta")

    # ------------------------------------------------------------------ one batch
    def _state(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors to call the wrapped model with: θ's pieces, constants, buffer copies."""
        pieces = torch.split(theta, self.numels)
        state: dict[str, torch.Tensor] = {}
        for n, t, s, dt in zip(self.names, pieces, self.shapes, self._param_dtypes, strict=True):
            t = t.view(s)
            state["model." + n] = t if self._cast is not None else t.to(dt)
        for n, p in self._fixed_params.items():
            state["model." + n] = self._const(p.detach())
        for n, b in self._buffers.items():
            # A copy: train-mode forward passes update running statistics in place.
            state["model." + n] = self._const(b).clone()
        for n, others in self._aliases.items():
            for other in others:
                state["model." + other] = state["model." + n]
        return state

    def _const(self, t: torch.Tensor) -> torch.Tensor:
        if self._cast is not None and t.is_floating_point():
            return t.to(self._cast)
        return t

    def _batch_loss(self, theta: torch.Tensor, batch: Any) -> torch.Tensor:
        loss = functional_call(self._module, self._state(theta), (batch,), tie_weights=False, strict=False)
        return self._scalar_loss(loss).reshape(())

    @contextlib.contextmanager
    def at(self, theta: torch.Tensor) -> Iterator[None]:
        """Inside the block the wrapped model computes with θ = ``theta`` (our tensors swapped in).

        For operators that need more than the batch loss (outputs, per-sample losses): call
        :meth:`batch_outputs` / :meth:`output_loss` inside. ``theta`` may carry autograd or
        forward-mode tangents. Forward *and* backward should run inside, so that activation
        checkpointing, which recomputes the forward during the backward, recomputes it at θ and
        not at the model's own parameters.
        """
        with _reparametrize_module(self._module, self._state(theta), tie_weights=False, strict=False):
            yield

    def require_outputs(self, what: str) -> None:
        """Raise a TypeError naming ``what`` unless the outputs are separate from the loss."""
        if self._module._batch_loss is not None:
            raise TypeError(_NEEDS_OUTPUTS.format(what=what))

    def batch_outputs(self, batch: Any) -> tuple[Any, Any]:
        """``(outputs, targets)`` of a batch at the θ of the enclosing :meth:`at` block."""
        return self._module.outputs(batch)

    def output_loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        """The batch loss ``loss_fn(outputs, targets)`` as a 0-d tensor."""
        return self._scalar_loss(self._module._loss_fn(outputs, targets)).reshape(())  # type: ignore[misc]

    @property
    def loss_fn(self) -> LossFn | None:
        """The user's ``loss_fn`` (None when ``batch_loss`` is used)."""
        return self._module._loss_fn

    def _scalar_loss(self, loss: Any) -> torch.Tensor:
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            return loss
        name = "loss_fn" if self._module._batch_loss is None else "batch_loss"
        if isinstance(loss, torch.Tensor):
            raise ValueError(
                f"{name}: the loss of a batch is a tensor of shape {tuple(loss.shape)}; expected one "
                "number (use a reduction='mean' criterion, or reduction='sum' here for summed losses)"
            )
        raise TypeError(
            f"{name}: the loss of a batch is a {type(loss).__name__}; expected a torch tensor holding "
            "one number, computed with torch operations so that it can be differentiated "
            "(e.g. return F.cross_entropy(outputs, targets), not float(...) or .item())"
        )

    # ------------------------------------------------------------------ passes
    def _pass(
        self,
        per_batch: Callable[[Any], tuple[torch.Tensor, Any]],
        what: str,
        extra_numel: int | None,
        check_finite: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Σ_b w_b (loss_b, extra_b) / Σ_b w_b over one pass, reduced over ranks.

        ``per_batch(batch)`` returns the batch's scalar loss and a flat ``extra`` tensor of
        ``extra_numel`` numbers (gradient, HVP, per-point losses...), a tuple of tensors summed
        side by side (their sizes adding up to ``extra_numel``), or None. With
        ``check_finite=False`` non-finite values pass through (landscape grids keep NaN).
        The sums accumulate in ``self.acc_dtype`` (at least float32: a bfloat16 sum of a few
        hundred batch losses is off by percents) and are returned in it.
        """
        acc = self.acc_dtype
        total_loss = torch.zeros((), dtype=acc, device=self.device)
        total_extra = None if extra_numel is None else torch.zeros(extra_numel, dtype=acc, device=self.device)
        losses: list[torch.Tensor] = []
        total_size = 0
        with model_guard(self.model):
            self.model.train(self.train)
            saved = self.data.save_generators()
            try:
                seed_everything(self.data_seed)
                for batch in self.data:
                    size = batch_size_of(batch, self._size_fn)
                    batch = move_batch(batch, self.device, self._cast)
                    try:
                        loss, extra = per_batch(batch)
                    except RuntimeError as e:
                        self._explain_dtype_error(batch, e)
                        raise
                    w = float(size) if self.reduction == "mean" else 1.0
                    loss = loss.detach()
                    losses.append(loss)
                    total_loss = total_loss + w * loss.to(acc)
                    if total_extra is not None and extra is not None:
                        # NaN and ±inf survive the sum, so one check of the total suffices.
                        if isinstance(extra, tuple):  # parts summed side by side
                            start = 0
                            for part in extra:
                                part = part.detach().reshape(-1)
                                end = start + part.numel()
                                total_extra[start:end].add_(part.to(acc), alpha=w)
                                start = end
                        else:
                            total_extra.add_(extra.detach().reshape(-1).to(acc), alpha=w)
                    total_size += size
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
        total_loss, total_extra, total_size, n_empty, n_bad, n_differ = _dist.all_reduce_sums(
            self._group,
            total_loss,
            total_extra,
            total_size,
            empty=not losses,
            bad=not ok,
            differs=differs is not None,
        )
        if n_empty:
            where = "" if self._group is None else f" on {n_empty} rank(s); every rank needs a shard"
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

    def _explain_dtype_error(self, batch: Any, error: RuntimeError) -> None:
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

    # ------------------------------------------------------------------ public evaluations
    def loss(self, theta: Any = None) -> torch.Tensor:
        """L(θ) over one full pass (a 0-d tensor). ``theta=None`` means the model's θ."""
        theta = self._theta(theta)

        def per_batch(batch: Any) -> tuple[torch.Tensor, None]:
            with torch.no_grad():
                return self._batch_loss(theta, batch), None

        self.n_loss += 1
        return self._pass(per_batch, "loss", extra_numel=None)[0]

    def loss_and_grad(self, theta: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(θ), ∇L(θ)) over one full pass."""
        theta = self._theta(theta).detach()

        def per_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return self._batch_grad(theta, batch)

        self.n_grad += 1
        loss, grad = self._pass(per_batch, "gradient", extra_numel=self.n)
        assert grad is not None
        return loss, grad.to(self.dtype)

    def grad(self, theta: Any = None) -> torch.Tensor:
        """∇L(θ) over one full pass."""
        return self.loss_and_grad(theta)[1]

    def _batch_grad(self, theta: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(ℓ_b(θ), ∇ℓ_b(θ)) of one batch."""
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
            loss = self._scalar_loss(self._module(batch)).reshape(())
            if backward:
                loss.backward()
                g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            else:
                (g,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), g

    def hvp(self, v: Any, theta: Any = None) -> torch.Tensor:
        """The Hessian-vector product ∇²L(θ) v over one full pass (exact unless finite-difference).

        Inside :meth:`reusing_graph` for this ``theta``, from the kept gradient graphs (one
        backward pass per batch, no forward) once the first product has built them.
        """
        v = self._as_vector(v, "v")
        kept = self._kept
        if kept is not None and theta is kept.key and kept.usable:
            if kept.entries is not None:
                return self._kept_hvp(v, kept)
            return self._building_hvp(v, kept)
        theta = self._theta(theta).detach()
        if self._fd:
            return self._fd_hvp(v, theta)
        return self._hvp(v, theta, forward=self._forward)

    def _compute_eps(self) -> float:
        """Machine epsilon of the least precise dtype the gradients are computed in."""
        dtypes = [self._cast] if self._cast is not None else self._param_dtypes
        return max(torch.finfo(d).eps for d in dtypes)  # type: ignore[arg-type]

    def fd_step(self, theta: Any = None) -> float:
        """The finite-difference step h = ε^(1/3) · max(1, ‖θ‖/√n) along a unit vector.

        ε is the machine epsilon of the dtype the gradients are computed in (the lowest
        precision among θ's parameters, or ``dtype``). See :mod:`flatness.objective._fd` for the bound.
        """
        theta = self._theta(theta)
        norm = float(torch.linalg.vector_norm(theta, dtype=torch.float64))
        return fd_step(norm, self.n, self._compute_eps())

    def _fd_hvp(self, v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """‖v‖ (∇L(θ + h v̂) − ∇L(θ − h v̂)) / 2h, differenced batch by batch."""
        vnorm = float(torch.linalg.vector_norm(v, dtype=torch.float64))
        if not math.isfinite(vnorm):
            raise ValueError("v: the vector has non-finite entries")
        self.n_hvp += 1
        if vnorm == 0.0:
            return torch.zeros_like(theta)
        h = self.fd_step(theta)
        c = h / vnorm
        point = torch.empty_like(theta)  # θ + h v̂, then θ − h v̂ (one buffer, refilled per batch)

        def per_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            # Both gradients see the same random numbers (dropout, augmentation). Their
            # difference is formed per batch, before the sum over batches, so that the sum
            # does not carry the gradients' magnitude (a correctly rounded subtraction adds an
            # error relative to the difference only).
            with same_randomness() as replay:
                torch.add(theta, v, alpha=c, out=point)
                loss, g_plus = self._batch_grad(point, batch)
                replay()
                torch.add(theta, v, alpha=-c, out=point)
                _, g_minus = self._batch_grad(point, batch)
            g_plus.sub_(g_minus)
            if not guard:
                return loss, g_plus
            # g₊ + g₋ = 2 g₋ + (g₊ − g₋), for the guard's second difference.
            return loss, (g_plus, g_minus.mul_(2.0).add_(g_plus))

        # The non-smoothness guard (flatness.objective._fd.KinkGuard) until it has warned: ∇L(θ) once per θ.
        kinks = self._kinks
        guard = not kinks.warned
        g0 = kinks.base_gradient(theta, self._acc_grad) if guard else None
        what = "finite-difference Hessian-vector product"
        total = self._pass(per_batch, what, extra_numel=2 * self.n if guard else self.n)[1]
        assert total is not None
        if g0 is None:
            return total.mul_(vnorm / (2.0 * h))
        diff, second = total[: self.n], total[self.n :].sub_(g0, alpha=2.0)
        kinks.check(second, diff)
        return diff.mul(vnorm / (2.0 * h))  # a vector of its own, not a view of the 2n sums

    def _acc_grad(self, theta: torch.Tensor) -> torch.Tensor:
        """∇L(θ) over one full pass, in the accumulation dtype (counted in ``n_grad``)."""
        theta = theta.detach()

        def per_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return self._batch_grad(theta, batch)

        self.n_grad += 1
        grad = self._pass(per_batch, "gradient", extra_numel=self.n)[1]
        assert grad is not None
        return grad

    # ------------------------------------------------------------------ kept gradient graphs
    @contextlib.contextmanager
    def reusing_graph(self, theta: Any = None) -> Iterator[None]:
        """Inside the block, Hessian-vector products at ``theta`` reuse the gradient graphs.

        .. math:: g_b = \\nabla \\ell_b(\\theta)\\ \\text{(kept, with its graph)},\\qquad
            H v = \\sum_b w_b\\, \\nabla_\\theta (g_b^\\top v)

        The first product runs the ordinary pass and keeps each batch's gradient g_b together
        with its graph (``create_graph=True``); the next ones are one backward pass per batch
        through them (``retain_graph=True``), skipping the forward and the first backward —
        PyHessian's single-batch shortcut (Yao et al. 2020, arXiv 1912.07145), here for every
        batch of the data. The products are the same as without (the same operations on the
        same graphs; dropout masks and batches are those of the seeded pass, as in every pass).
        Whether graphs are kept follows ``reuse_graph`` (see :class:`Objective`); they are freed
        when the block ends, also on error. ``theta`` must be passed to :meth:`hvp` as the same
        object (``None``: the model's θ₀). Nested blocks use the outer one.

        Memory: the graphs (activations of every batch and the gradient, about what one
        double-backward product holds at its peak, per batch) for the whole block.
        """
        if self._kept is not None:
            yield
            return
        # "auto" keeps graphs for in-memory batches only (one batch, a list or tuple): they are
        # the same in every pass by construction, while a loader's passes are compared with
        # each other (a loader that does not replay is reported by the second pass).
        in_memory = not self.data.checked
        wanted = self.reuse_graph is True or (self.reuse_graph == "auto" and in_memory)
        usable = wanted and self.hvp_mode in ("auto", "reverse")
        self._kept = _KeptGraphs(theta, usable)
        self.graph_reused = False
        try:
            yield
        finally:
            self._kept = None

    def _building_hvp(self, v: torch.Tensor, kept: _KeptGraphs) -> torch.Tensor:
        """The first product of a reusing_graph() block: an ordinary pass that keeps the graphs."""
        theta = self._theta(kept.key).detach()
        leaf = theta.detach().requires_grad_(True)
        entries: list[tuple[float, torch.Tensor, torch.Tensor]] = []
        forced = self.reuse_graph is True
        budget = None if forced else _graph_budget(self.device, self.n * self.dtype.itemsize)
        held = {theta.untyped_storage().data_ptr()}
        used = [0]
        check = not self._checked_second

        def per_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            keep = kept.usable
            if keep and not forced and len(entries) >= MAX_KEPT_BATCHES:
                keep = kept.drop(entries)
            with torch.enable_grad(), _math_attention(), self.at(leaf):
                loss = self._scalar_loss(self._module(batch)).reshape(())
                if check:
                    check_second_derivatives(loss)
                (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
                hv = _second(g, leaf, v, retain_graph=keep)
                if keep and budget is not None:
                    used[0] += graph_bytes(g, held)
                    if used[0] > budget:
                        keep = kept.drop(entries)
            if keep:
                with warnings.catch_warnings():  # the pass itself warns about ambiguous sizes
                    warnings.simplefilter("ignore")
                    size = batch_size_of(batch, self._size_fn)
                entries.append((float(size) if self.reduction == "mean" else 1.0, loss.detach(), g))
            return loss, hv

        self.n_hvp += 1
        try:
            hv = self._pass(per_batch, "Hessian-vector product", extra_numel=self.n)[1]
        except (RuntimeError, NotImplementedError) as err:
            kept.usable = False
            clear = explain(err, "reverse")
            if clear is None or clear is err:
                raise
            raise clear from err
        self._checked_second = True
        assert hv is not None
        if kept.usable:
            kept.entries, kept.leaf = entries, leaf
            kept.size = int(sum(w for w, _, _ in entries)) if self.reduction == "mean" else 1
        return hv.to(self.dtype)

    def _kept_hvp(self, v: torch.Tensor, kept: _KeptGraphs) -> torch.Tensor:
        """H v from the kept graphs: one backward pass per batch, no forward.

        The same operations as in the pass that built them, so the same numbers. The backward
        runs with our tensors swapped in and the model in the objective's mode, as in a pass,
        because activation checkpointing recomputes forward segments inside it. The losses were
        checked when the graphs were built; the product is checked here.
        """
        assert kept.entries is not None and kept.leaf is not None
        acc = self.acc_dtype
        total = torch.empty(0)
        with model_guard(self.model), torch.enable_grad(), self.at(kept.leaf):
            self.model.train(self.train)
            for i, (w, _loss, g) in enumerate(kept.entries):
                hv = _second(g, kept.leaf, v, retain_graph=True)
                hv = hv.reshape(-1).to(acc)
                if i == 0 and hv.is_contiguous() and not _shares(hv, v):
                    total = hv.mul_(w)  # = 0 + w·hv, bitwise, without a second vector
                else:
                    total.add_(hv, alpha=w)
                del hv
        self.n_hvp += 1
        self.graph_reused = True
        ok = bool(torch.isfinite(total).all())
        zero = torch.zeros((), dtype=acc, device=self.device)
        _, summed, size, _, n_bad, _ = _dist.all_reduce_sums(
            self._group, zero, total, kept.size, empty=False, bad=not ok
        )
        if n_bad:
            where = "on this rank" if not ok else "on another rank"
            raise NonFiniteLossError(
                f"the Hessian-vector product is not finite ({where}) although the loss is finite "
                "on every batch; check the model, the data and the parameters"
            )
        assert summed is not None
        return summed.mul_(1.0 / size if self.reduction == "mean" else 1.0).to(self.dtype)

    def _hvp(self, v: torch.Tensor, theta: torch.Tensor, *, forward: bool) -> torch.Tensor:
        if forward:

            def per_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
                def f(t: torch.Tensor) -> torch.Tensor:
                    return self._batch_loss(t, batch)

                try:
                    with _math_attention():
                        (_g, loss), (hv, _) = torch.func.jvp(torch.func.grad_and_value(f), (theta,), (v,))
                except (RuntimeError, NotImplementedError) as e:
                    # Only torch's "forward AD is not implemented here"; the model's own errors,
                    # out-of-memory included, propagate unchanged.
                    if forward_ad_unsupported(e):
                        raise _ForwardADFailed(e) from e
                    raise
                return loss, hv

        else:
            check = not self._checked_second

            def per_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
                leaf = theta.detach().requires_grad_(True)
                with torch.enable_grad(), _math_attention(), self.at(leaf):
                    loss = self._scalar_loss(self._module(batch)).reshape(())
                    if check:
                        check_second_derivatives(loss)
                    (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
                    hv = _second(g, leaf, v)
                return loss, hv

        self.n_hvp += 1
        try:
            hv = self._pass(per_batch, "Hessian-vector product", extra_numel=self.n)[1]
        except _ForwardADFailed as e:
            # Forward-mode AD is missing or broken for some ops (torch 2.13: F.mse_loss under
            # jvp(grad) raises "ZeroTensors are immutable"; see FORWARD_AD_GAPS). Double
            # backward is exact too.
            self._forward = False
            warnings.warn(
                f"hvp_mode='forward': forward-mode AD fails on this model and loss "
                f"({type(e.error).__name__}: {str(e.error)[:200]}); using double backward "
                "(hvp_mode='reverse', also exact) for this and later products",
                RuntimeWarning,
                stacklevel=3,
            )
            self.n_hvp -= 1
            return self._hvp(v, theta, forward=False)
        except (RuntimeError, NotImplementedError) as err:
            clear = explain(err, "forward" if forward else "reverse")
            if clear is None:
                raise
            if clear is err:
                raise
            raise clear from err
        if not forward:
            self._checked_second = True
        assert hv is not None
        return hv.to(self.dtype)

    @property
    def hvp_mode_used(self) -> str:
        """The HVP mode in use: "forward", "reverse" or "finite_difference" ("auto" resolved)."""
        if self._fd:
            return "finite_difference"
        return "forward" if self._forward else "reverse"

    def __repr__(self) -> str:
        return (
            f"Objective(n={self.n}, dtype={self.dtype}, device={self.device}, "
            f"reduction={self.reduction!r}, train={self.train})"
        )

    # ------------------------------------------------------------------ many points, one pass
    def evaluate_many(self, thetas: Any, **options: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L(θ_i) and size-weighted metrics at k points in one pass over the data.

        See :func:`flatness.objective._evaluate.evaluate_many` (this method calls it with
        ``objective=self``); the landscape functions are built on it.
        """
        from flatness.objective._evaluate import evaluate_many

        return evaluate_many(self, thetas, **options)


def _second(
    g: torch.Tensor, leaf: torch.Tensor, v: torch.Tensor, *, retain_graph: bool = False
) -> torch.Tensor:
    """∇(gᵀv) with respect to ``leaf``: H v from a gradient g taken with ``create_graph=True``.

    A gradient that does not depend on θ (a loss linear in θ) has no graph: H v = 0.
    """
    if not g.requires_grad:
        return torch.zeros_like(leaf)
    (hv,) = torch.autograd.grad(g, leaf, grad_outputs=v, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(leaf) if hv is None else hv


#: with ``reuse_graph="auto"``, graphs are kept for at most this many batches.
MAX_KEPT_BATCHES = 8


class _KeptGraphs:
    """The gradient graphs of a :meth:`Objective.reusing_graph` block.

    ``key`` is the ``theta`` argument the products must be asked at; ``entries`` the kept
    (weight, loss, gradient-with-graph) of every batch once built; ``usable`` turns False for
    good when they do not fit.
    """

    def __init__(self, key: Any, usable: bool) -> None:
        self.key = key
        self.usable = usable
        self.entries: list[tuple[float, torch.Tensor, torch.Tensor]] | None = None
        self.leaf: torch.Tensor | None = None
        self.size = 0

    def drop(self, entries: list[Any]) -> bool:
        """Give up keeping graphs (frees those kept so far); returns False."""
        entries.clear()
        self.usable = False
        return False


_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share memory (writing one could change the other)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def graph_bytes(g: torch.Tensor, exclude: set[int]) -> int:
    """Bytes the autograd graph of ``g`` keeps alive: g and every tensor saved in its nodes.

    Walks the graph from ``g.grad_fn`` and sums the storages of the saved tensors (each once),
    skipping the storages in ``exclude`` (held anyway, e.g. θ).
    """
    storages: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.layout == torch.strided:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in exclude:
                storages[ptr] = st.nbytes()

    add(g)
    seen: set[Any] = set()
    stack = [g.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kind = type(node)
        names = _SAVED_NAMES.get(kind)
        if names is None:
            names = _SAVED_NAMES[kind] = tuple(n for n in dir(node) if n.startswith("_saved_"))
        for name in names:
            try:
                value = getattr(node, name)
            except Exception:  # freed or not a tensor attribute
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                add(t)
        for t in getattr(node, "saved_tensors", None) or ():  # custom autograd.Function
            add(t)
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return sum(storages.values())


def _available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CUDA: free plus cached by torch; CPU: MemAvailable), or None."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            import psutil  # type: ignore[import-untyped]

            return int(psutil.virtual_memory().available)
        except ImportError:
            return None
    return None


def _graph_budget(device: torch.device, theta_bytes: int) -> int:
    """How many bytes kept graphs may take: half the free memory (4 θ-sized vectors if unknown)."""
    free = _available_bytes(device)
    return 4 * theta_bytes if free is None else free // 2


def check_options(fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Reject keyword arguments that neither ``fn`` nor :class:`Objective` takes (typos)."""
    _check_options(fn, options, Objective.__init__)


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out
