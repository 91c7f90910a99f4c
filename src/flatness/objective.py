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
after every call (see :mod:`flatness._guard`).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module  # what functional_call runs

from flatness import _dist
from flatness._data import DataSource, batch_size_of, move_batch, tensors_of
from flatness._guard import model_guard, seed_everything

__all__ = ["NonFiniteLossError", "Objective", "ParamSpec"]

ParamSpec = None | Sequence[str] | Sequence[torch.Tensor] | Callable[[str, torch.Tensor], bool]
LossFn = Callable[[Any, Any], torch.Tensor]
BatchLoss = Callable[[nn.Module, Any], torch.Tensor]


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


class _LossModule(nn.Module):
    """Wraps ``model`` so that one ``functional_call`` computes one batch's loss."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, batch_loss: BatchLoss | None):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn
        self._batch_loss = batch_loss

    def forward(self, batch: Any) -> torch.Tensor:
        if self._batch_loss is not None:
            return self._batch_loss(self.model, batch)
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            kind = type(batch).__name__
            length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            raise TypeError(
                f"data: a batch is a {kind}{length}; loss_fn needs (inputs, targets) batches. "
                "For other batches pass batch_loss=lambda model, batch: <scalar loss>"
            )
        inputs, targets = batch
        return self._loss_fn(self.model(inputs), targets)  # type: ignore[misc]


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _select_params(model: nn.Module, params: ParamSpec) -> list[tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())
    if not named:
        raise ValueError(
            f"model: the {type(model).__name__} has no parameters at all; flatness measures how "
            "the loss changes with a model's parameters, so pass the module that holds them"
        )
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "params: the model has no trainable parameters (all requires_grad=False); "
                "pass params=[names] to choose some explicitly"
            )
        return chosen
    if callable(params) and not isinstance(params, nn.Module):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        if isinstance(params, str):
            raise TypeError(f"params: got the string {params!r}; pass a list of names, e.g. [{params!r}]")
        if not isinstance(params, Iterable):
            raise TypeError(
                "params: expected None, a list of names, a list of parameter tensors or a "
                f"predicate (name, param) -> bool; got {type(params).__name__}"
            )
        items = list(params)
        if not items:
            raise ValueError("params: got an empty selection; pass None for all trainable ones")
        if all(isinstance(x, str) for x in items):
            by_name = dict(model.named_parameters(remove_duplicate=False))
            by_name.update({n.removeprefix("module."): p for n, p in list(by_name.items())})
            unknown = [x for x in items if x not in by_name]
            if unknown:
                raise ValueError(
                    f"params: unknown parameter names {unknown[:5]}; "
                    f"valid names are e.g. {[n for n, _ in named[:5]]}"
                )
            wanted = {id(by_name[x]) for x in items}
        elif all(isinstance(x, torch.Tensor) for x in items):
            wanted = {id(x) for x in items}
            known = {id(p) for _, p in named}
            if not wanted <= known:
                raise ValueError("params: some tensors given are not parameters of the model")
        else:
            raise TypeError(
                "params: expected None, a list of names, a list of parameter tensors or a "
                f"predicate (name, param) -> bool; got {type(params).__name__}"
            )
        chosen = [(n, p) for n, p in named if id(p) in wanted]
    if not chosen:
        raise ValueError("params: the selection matches no parameter of the model")
    return chosen


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


def _alias_map(model: nn.Module) -> dict[str, list[str]]:
    """{first name of a shared tensor: the names of its other module slots}.

    ``functional_call(..., tie_weights=True)`` mishandles a module reused under two names
    (``self.b = self.a``): it swaps the one slot twice and, restoring in the same order, leaves
    the tensor it was given in the user's model (torch 2.13). Here each (module, attribute)
    slot appears once — a reused module's slot under its first name only — and a tensor tied
    into several slots (``dec.weight = enc.weight``) is listed under all of them, so the
    swap needs no re-tying and restores exactly.
    """
    aliases: dict[str, list[str]] = {}
    slots: set[tuple[int, str]] = set()
    first: dict[int, str] = {}
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        owner, _, attr = name.rpartition(".")
        slot = (id(model.get_submodule(owner)), attr)
        if slot in slots:
            continue
        slots.add(slot)
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            aliases.setdefault(canonical, []).append(name)
    return aliases


def _check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    # Same type and equal: an array or a str subclass compares equal elementwise or loosely.
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"{name}: got {value!r}; expected one of {choices}")


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
            batches or models whose call is not ``model(inputs)``.
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
        data_seed: the seed every pass starts from, so shuffling loaders replay the same
            batches and random augmentations are the same in every pass.
        process_group: a ``torch.distributed`` group whose ranks each hold a shard of the
            data; default: the world group when one is initialized, else none.

    Raises:
        TypeError, ValueError: with the argument named, for bad input (``data`` for empty
            batches, data of another floating dtype than the model's, or passes that differ;
            ``model`` for a model without parameters). Errors raised by the model or the loss
            function themselves propagate unchanged.
        NonFiniteLossError: a loss, gradient or HVP that is not finite (naming the batch).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        data: Any = None,
        *,
        batch_loss: BatchLoss | None = None,
        params: ParamSpec = None,
        reduction: Literal["mean", "sum"] = "mean",
        train: bool = False,
        max_batches: int | None = None,
        batch_size: Callable[[Any], int] | None = None,
        dtype: torch.dtype | None = None,
        hvp_mode: Literal["auto", "forward", "reverse"] = "auto",
        data_seed: int = 0,
        process_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if (loss_fn is None) == (batch_loss is None):
            raise TypeError(
                "loss_fn / batch_loss: pass exactly one: loss_fn(outputs, targets) or "
                "batch_loss(model, batch)"
            )
        for name, fn in (("loss_fn", loss_fn), ("batch_loss", batch_loss)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: expected a callable, got {type(fn).__name__}")
        _check_choice("reduction", reduction, ("mean", "sum"))
        _check_choice("hvp_mode", hvp_mode, ("auto", "forward", "reverse"))
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        if batch_size is not None and not callable(batch_size):
            raise TypeError(f"batch_size: expected a callable(batch) -> int, got {batch_size!r}")
        if isinstance(data_seed, bool) or not isinstance(data_seed, (int, np.integer)):
            raise TypeError(f"data_seed: expected an int, got {data_seed!r}")

        self.model = _unwrap(model)
        self.data = DataSource(data, max_batches=max_batches)
        self.reduction = reduction
        self.train = bool(train)
        self.hvp_mode = hvp_mode
        self.data_seed = int(data_seed)
        self._size_fn = batch_size
        self._module = _LossModule(self.model, loss_fn, batch_loss)
        self._group = _dist.resolve_group(process_group)

        chosen = _select_params(self.model, params)
        self.names: list[str] = [n for n, _ in chosen]
        self.shapes: list[torch.Size] = [p.shape for _, p in chosen]
        self.numels: list[int] = [p.numel() for _, p in chosen]
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
        self._aliases = _alias_map(self.model)
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

    # ------------------------------------------------------------------ flat <-> dict
    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into parameter-shaped tensors keyed like ``named_parameters``."""
        theta = self._as_vector(theta, "theta")
        pieces = torch.split(theta, self.numels)
        return {n: t.view(s) for n, t, s in zip(self.names, pieces, self.shapes, strict=True)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate parameter-shaped tensors (keyed like θ's names) into a flat vector."""
        if not isinstance(tensors, dict):
            raise TypeError(f"expected a dict of tensors keyed by name, got {type(tensors).__name__}")
        missing = [n for n in self.names if n not in tensors]
        extra = [k for k in tensors if k not in set(self.names)]
        if missing or extra:
            raise ValueError(
                f"dict keys do not match the parameters: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        out = []
        for n, s in zip(self.names, self.shapes, strict=True):
            t = torch.as_tensor(tensors[n])
            if t.shape != s:
                raise ValueError(f"tensor {n!r} has shape {tuple(t.shape)}; expected {tuple(s)}")
            out.append(t.reshape(-1).to(device=self.device, dtype=self.dtype))
        return torch.cat(out)

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
        per_batch: Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]],
        what: str,
        extra_numel: int | None,
        check_finite: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Σ_b w_b (loss_b, extra_b) / Σ_b w_b over one pass, reduced over ranks.

        ``per_batch(batch)`` returns the batch's scalar loss and a flat ``extra`` tensor of
        ``extra_numel`` numbers (gradient, HVP, per-point losses...) or None. With
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
        if n_differ:
            raise ValueError(differs or f"data: the passes over the data differ on {n_differ} other rank(s)")
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
        return total_loss * scale, None if total_extra is None else total_extra * scale

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
            with torch.enable_grad():
                leaf = theta.detach().requires_grad_(True)
                loss = self._batch_loss(leaf, batch)
                (g,) = torch.autograd.grad(loss, leaf)
            return loss, g

        self.n_grad += 1
        loss, grad = self._pass(per_batch, "gradient", extra_numel=self.n)
        assert grad is not None
        return loss, grad.to(self.dtype)

    def grad(self, theta: Any = None) -> torch.Tensor:
        """∇L(θ) over one full pass."""
        return self.loss_and_grad(theta)[1]

    def hvp(self, v: Any, theta: Any = None) -> torch.Tensor:
        """The Hessian-vector product ∇²L(θ) v over one full pass (exact)."""
        v = self._as_vector(v, "v")
        theta = self._theta(theta).detach()
        return self._hvp(v, theta, forward=self._forward)

    def _hvp(self, v: torch.Tensor, theta: torch.Tensor, *, forward: bool) -> torch.Tensor:
        if forward:

            def per_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
                def f(t: torch.Tensor) -> torch.Tensor:
                    return self._batch_loss(t, batch)

                try:
                    with _math_attention():
                        (_g, loss), (hv, _) = torch.func.jvp(torch.func.grad_and_value(f), (theta,), (v,))
                except (RuntimeError, NotImplementedError) as e:
                    raise _ForwardADFailed(e) from e
                return loss, hv

        else:

            def per_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
                with torch.enable_grad(), _math_attention():
                    leaf = theta.detach().requires_grad_(True)
                    loss = self._batch_loss(leaf, batch)
                    (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
                    (hv,) = torch.autograd.grad(g, leaf, grad_outputs=v)
                return loss, hv

        self.n_hvp += 1
        try:
            hv = self._pass(per_batch, "Hessian-vector product", extra_numel=self.n)[1]
        except _ForwardADFailed as e:
            # Forward-mode AD is missing or broken for some ops (torch 2.13: F.mse_loss under
            # jvp(grad) raises "ZeroTensors are immutable"). Double backward is exact too.
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
        assert hv is not None
        return hv.to(self.dtype)

    @property
    def hvp_mode_used(self) -> str:
        """The HVP mode in use: "forward" or "reverse" (what ``"auto"`` resolved to)."""
        return "forward" if self._forward else "reverse"

    def __repr__(self) -> str:
        return (
            f"Objective(n={self.n}, dtype={self.dtype}, device={self.device}, "
            f"reduction={self.reduction!r}, train={self.train})"
        )

    # ------------------------------------------------------------------ many points, one pass
    def evaluate_many(
        self,
        thetas: Any,
        *,
        directions: Any = None,
        origin: Any = None,
        buffers: dict[str, torch.Tensor] | None = None,
        metrics: dict[str, Callable[[Any, Any], Any]] | None = None,
        vectorize: bool | Literal["auto"] = "auto",
        chunk_size: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L(θ_i) and size-weighted metrics at k points θ_1..θ_k in one pass over the data.

        .. math::
            L(\\theta_i) = \\frac{\\sum_b m_b \\ell_b(\\theta_i)}{\\sum_b m_b},\\qquad
            M(\\theta_i) = \\frac{\\sum_b m_b\\, \\mathrm{metric}(f_{\\theta_i}(x_b), y_b)}{\\sum_b m_b}

        Each batch is fetched once and evaluated at all k points: with ``torch.func.vmap`` over
        the points (chunks of ``chunk_size``) where the model allows it (eval mode, no random
        or data-dependent ops), else a loop over the points that swaps the model's tensors for
        ours once per batch and only refills them per point (no per-point ``functional_call``
        overhead). The numbers agree to float rounding. Non-finite values are returned as they
        are (NaN / inf), not raised.

        Args:
            thetas: a ``(k, n)`` tensor or array of flat parameter vectors; or, with
                ``directions``, a ``(k, r)`` array of coordinates ``c_i``.
            directions: an ``(r, n)`` tensor D; the points are then θ_i = origin + c_iᵀ D and
                no ``(k, n)`` array is ever formed (grids over lines and planes).
            origin: the ``(n,)`` origin for ``directions``; default the model's θ₀.
            buffers: optional per-point buffer values, ``{name: tensor of shape (k, *buffer.shape)}``
                (e.g. interpolated BatchNorm statistics); other buffers are the model's.
            metrics: optional ``{name: metric(outputs, targets) -> scalar}`` (e.g. accuracy),
                averaged over batches like the loss. Needs the ``loss_fn`` path.
            vectorize: ``"auto"`` (vmap, falling back to the loop when the model does not
                support it; the loop when fewer than 128 points fit one call by the memory
                estimate and no ``chunk_size`` is given — the batch is then big enough that a
                point costs about one forward pass either way, and the loop measured faster —
                and for models with convolutions on the CPU, where vmap's grouped convolutions
                measured 2-3.6x slower), ``True`` (vmap; errors propagate) or ``False`` (loop).
            chunk_size: points per vmap call (memory grows with it); default: as many as keep
                an estimated 64 activations per input number under ~512 MiB per call.

        Returns:
            ``(losses, metric_values)``: a ``(k,)`` tensor and ``{name: (k,) tensor}``.
            ``self.last_vectorized`` tells which path ran.

        Raises:
            TypeError: metrics with ``batch_loss``, or arguments of the wrong type.
            ValueError: wrong shapes, unknown buffer names, ``vectorize=True`` with ``train=True``.
        """
        thetas = self._as_matrix(thetas, "thetas")
        if directions is None:
            if origin is not None:
                raise TypeError("origin: only used with directions; pass the points as thetas (k, n)")
            if thetas.shape[1] != self.n:
                raise ValueError(
                    f"thetas: got shape {tuple(thetas.shape)}; expected (k, {self.n}) with k >= 1"
                )
            dirs = None
            base = None
        else:
            dirs = self._as_matrix(directions, "directions")
            if dirs.shape[1] != self.n:
                raise ValueError(f"directions: got shape {tuple(dirs.shape)}; expected (r, {self.n})")
            if thetas.shape[1] != dirs.shape[0]:
                raise ValueError(
                    f"thetas: got coordinates of shape {tuple(thetas.shape)}; with {dirs.shape[0]} "
                    f"directions expected (k, {dirs.shape[0]})"
                )
            base = self.theta0 if origin is None else self._as_vector(origin, "origin")
        k = thetas.shape[0]
        coords = thetas.detach().cpu().double().numpy() if dirs is not None else None
        bufs: dict[str, torch.Tensor] = {}
        if buffers is not None:
            if not isinstance(buffers, dict):
                raise TypeError(
                    f"buffers: expected a dict name -> (k, ...) tensor, got {type(buffers).__name__}"
                )
            for name, value in buffers.items():
                if name not in self._buffers:
                    raise ValueError(
                        f"buffers: unknown buffer {name!r}; the model has {list(self._buffers)[:5]}"
                    )
                ref = self._buffers[name]
                value = torch.as_tensor(value)
                if tuple(value.shape) != (k, *ref.shape):
                    raise ValueError(
                        f"buffers: {name!r} has shape {tuple(value.shape)}; expected {(k, *ref.shape)}"
                    )
                bufs[name] = self._const(value.detach().to(device=ref.device, dtype=ref.dtype))
        metrics = dict(metrics or {})
        for name, fn in metrics.items():
            if not callable(fn):
                raise TypeError(
                    f"metrics: {name!r} is a {type(fn).__name__}; expected metric(outputs, targets)"
                )
        if metrics and self._module._batch_loss is not None:
            raise TypeError(
                "metrics: metrics need model outputs, which the batch_loss path does not expose; "
                "pass loss_fn(outputs, targets) instead of batch_loss to use metrics"
            )
        if vectorize not in ("auto", True, False):
            raise ValueError(f"vectorize: got {vectorize!r}; expected 'auto', True or False")
        if vectorize is True and self.train:
            raise ValueError(
                "vectorize: True is not possible with train=True (in-place buffer updates, dropout)"
            )
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
        ):
            raise ValueError(f"chunk_size: got {chunk_size!r}; expected a positive int or None")
        chunk_box = {"size": chunk_size}
        names = list(metrics)
        loss_fn = self._module._loss_fn

        def compute(batch: Any) -> torch.Tensor:
            """Loss and metrics of one batch at the parameters now swapped into the model."""
            if not names:
                return self._scalar_loss(self._module(batch)).reshape(1).to(self.acc_dtype)
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError("data: metrics need (inputs, targets) batches")
            inputs, targets = batch
            outputs = self.model(inputs)
            out = [self._scalar_loss(loss_fn(outputs, targets))]  # type: ignore[misc]
            out += [metrics[m](outputs, targets) for m in names]
            return torch.stack(
                [
                    (v if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
                    .reshape(())
                    .to(self.acc_dtype)
                    for v in out
                ]
            )

        def rows(sl: slice) -> torch.Tensor:
            if dirs is None:
                return thetas[sl]
            return torch.addmm(base[None], thetas[sl], dirs)  # type: ignore[index]

        def auto_chunk(batch: Any) -> int:
            # Activations scale with the inputs; a rough, safe bound keeps memory in check.
            from flatness._data import _first_tensor

            first = _first_tensor(batch)
            per_point = 64 * (first.numel() * first.element_size() if first is not None else 1 << 20)
            return max(1, (1 << 29) // max(per_point, 1))

        def run_vmap(batch: Any) -> torch.Tensor:
            if chunk_box["size"] is None:
                chunk_box["size"] = min(k, auto_chunk(batch))
            chunk = chunk_box["size"]

            def one(theta: torch.Tensor, point_bufs: dict[str, torch.Tensor]) -> torch.Tensor:
                state = self._state(theta)
                for bname, b in point_bufs.items():
                    state["model." + bname] = b
                with _reparametrize_module(self._module, state, tie_weights=False, strict=False):
                    return compute(batch)

            fn = torch.func.vmap(one, in_dims=(0, 0), randomness="error")
            pieces = []
            for start in range(0, k, chunk):
                sl = slice(start, start + chunk)
                pieces.append(fn(rows(sl), {bname: b[sl] for bname, b in bufs.items()}))
            return torch.cat(pieces)

        def run_loop(batch: Any) -> torch.Tensor:
            # The model's tensors are swapped for ours once per batch; each point only refills
            # them. In train mode every point restarts from the model's buffers and replays the
            # batch's random stream, as a single-θ pass would.
            work = torch.empty(self.n, dtype=self.dtype, device=self.device)
            state = self._state(work)
            views = [state["model." + n] for n in self.names]
            cast = any(
                v.data_ptr() != w.data_ptr()
                for v, w in zip(views, torch.split(work, self.numels), strict=True)
            )
            point_bufs = {bname: state["model." + bname] for bname in bufs}  # our copies
            fresh = [(state["model." + bn], self._const(b)) for bn, b in self._buffers.items()]
            replay = self.train and k > 1
            rng = torch.random.get_rng_state() if replay else None
            cuda = torch.cuda.get_rng_state_all() if replay and torch.cuda.is_initialized() else None
            out = []
            with _reparametrize_module(self._module, state, tie_weights=False, strict=False):
                for i in range(k):
                    if coords is None:
                        work.copy_(thetas[i])
                    else:
                        torch.add(base, dirs[0], alpha=float(coords[i, 0]), out=work)  # type: ignore[index,arg-type]
                        for j in range(1, coords.shape[1]):
                            work.add_(dirs[j], alpha=float(coords[i, j]))  # type: ignore[index]
                    if cast:  # parameters kept in their own dtypes: refill the cast copies
                        for v, w in zip(views, torch.split(work, self.numels), strict=True):
                            v.copy_(w.view(v.shape))
                    if self.train:
                        for dst, src in fresh:
                            dst.copy_(src)
                    for bname, b in point_bufs.items():
                        b.copy_(bufs[bname][i])
                    if replay:
                        torch.random.set_rng_state(rng)  # type: ignore[arg-type]
                        if cuda is not None:
                            torch.cuda.set_rng_state_all(cuda)
                    out.append(compute(batch))
            return torch.stack(out)

        # Whether vmap works depends on the model and on the metrics: remember it per kind of call.
        key = (tuple(names), tuple(bufs))
        cached = self._vmap_ok.get(key)
        if vectorize is False or self.train:
            use_vmap: bool | None = False
        elif vectorize is True:
            use_vmap = True
        elif self._has_conv and self.device.type == "cpu":
            use_vmap = False
        else:
            use_vmap = cached
        mode = {"vmap": use_vmap}

        def per_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                if mode["vmap"] is None and chunk_size is None and k > 1 and auto_chunk(batch) < 128:
                    # A large batch per point: batched kernels (bigger intermediates, grouped
                    # convolutions) were slower than the loop, 2x on the benchmark MLP with
                    # 2,048 samples and 3x on the CNN (benchmarks/bench_landscape.py, CPU).
                    mode["vmap"] = False
                if mode["vmap"] is None:
                    try:
                        out = run_vmap(batch)
                        mode["vmap"] = True
                    except Exception:
                        mode["vmap"] = False
                        out = run_loop(batch)
                else:
                    out = run_vmap(batch) if mode["vmap"] else run_loop(batch)
            return torch.zeros((), dtype=self.acc_dtype, device=self.device), out.reshape(-1)

        width = 1 + len(names)
        self.n_loss += k
        _, total = self._pass(per_batch, "losses", extra_numel=k * width, check_finite=False)
        assert total is not None
        if vectorize == "auto" and not self.train and mode["vmap"] is not None:
            self._vmap_ok[key] = mode["vmap"]
        self.last_vectorized = bool(mode["vmap"])
        table = total.reshape(k, width)
        return table[:, 0].clone(), {m: table[:, j + 1].clone() for j, m in enumerate(names)}

    def _as_matrix(self, m: Any, name: str) -> torch.Tensor:
        if isinstance(m, np.ndarray):
            m = torch.from_numpy(m)
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name}: expected a 2-D tensor or array, got {type(m).__name__}")
        if m.ndim != 2 or m.shape[0] == 0:
            raise ValueError(f"{name}: got shape {tuple(m.shape)}; expected a 2-D (k, ...) array with k >= 1")
        return m.detach().to(device=self.device, dtype=self.dtype)


def check_options(fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Reject keyword arguments that neither ``fn`` nor :class:`Objective` takes.

    Public functions forward ``**options`` to :class:`Objective`; without this check a typo
    such as ``epsilom=`` would surface as an error of ``Objective.__init__``.
    """
    accepted = [
        name
        for name, par in inspect.signature(Objective.__init__).parameters.items()
        if par.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = [k for k in options if k not in accepted]
    if not unknown:
        return
    own = [
        name
        for name, par in inspect.signature(fn).parameters.items()
        if par.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", "this function"))
    key = unknown[0]
    close = difflib.get_close_matches(key, own + accepted, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TypeError(
        f"{name}() got an unexpected keyword argument {key!r}{hint}. Its own options are "
        f"{[o for o in own if o not in ('model', 'loss_fn', 'data', 'self')]}; it also forwards "
        f"{accepted} to flatness.Objective"
    )


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def check_positive(name: str, value: Any, *, integer: bool = False, allow_none: bool = False) -> None:
    """Raise a ValueError/TypeError naming ``name`` unless ``value`` is a positive number."""
    if value is None and allow_none:
        return
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an int" if integer else "a number"
        raise TypeError(f"{name}: expected {what} > 0, got {value!r}")
    if not value > 0 or (not integer and not math.isfinite(value)):
        what = "an int" if integer else "a finite number"
        raise ValueError(f"{name}: got {value!r}; expected {what} > 0")
