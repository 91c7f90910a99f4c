"""Exact Hessian-vector products: double backward, forward-over-reverse, kept gradient graphs.

Per batch b, with g_b = ∇ℓ_b(θ) taken with ``create_graph=True``,

    reverse:  H_b v = ∇_θ (g_bᵀ v)                 (a forward and two backward passes)
    forward:  H_b v = ∂/∂t ∇ℓ_b(θ + t v) at t = 0  (``torch.func.jvp`` of ``torch.func.grad``)

and H v = Σ_b w_b H_b v with the size weights of :class:`flatness.Objective`. Inside
:func:`reusing_graph` the gradient graphs of every batch are kept after the first product, so
that the next ones are one backward pass per batch (Yao et al. 2020, PyHessian, arXiv
1912.07145, for one batch). These need a backend with the ``"exact_hvp"`` capability (the model
in one process); finite differences, which every backend has, are in :class:`flatness.Objective`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from flatness.objective import _dist
from flatness.objective._data import batch_size_of
from flatness.objective._fd import check_second_derivatives, explain, forward_ad_unsupported
from flatness.objective._loss import NonFiniteLossError, math_attention, scalar_loss

#: the objective these functions work for (:class:`flatness.Objective`; not imported: it imports us).
Objective = Any

__all__ = ["KeptGraphs", "exact_hvp", "reusing_graph"]


class ForwardADFailed(Exception):
    """Forward-mode AD failed on a batch (not a RuntimeError: the pass must not explain it)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def reusing_graph(obj: Objective, theta: Any = None) -> Iterator[None]:
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
    if obj._kept is not None:
        yield
        return
    # "auto" keeps graphs for in-memory batches only (one batch, a list or tuple): they are
    # the same in every pass by construction, while a loader's passes are compared with
    # each other (a loader that does not replay is reported by the second pass).
    in_memory = not obj.data.checked
    wanted = obj.reuse_graph is True or (obj.reuse_graph == "auto" and in_memory)
    usable = wanted and obj.hvp_mode_used == "reverse" and obj.supports("kept_graphs")
    obj._kept = KeptGraphs(theta, usable)
    obj.graph_reused = False
    try:
        yield
    finally:
        obj._kept = None


def building_hvp(obj: Objective, v: torch.Tensor, kept: KeptGraphs) -> torch.Tensor:
    """The first product of a reusing_graph() block: an ordinary pass that keeps the graphs."""
    theta = obj.theta_or_default(kept.key).detach()
    leaf = theta.detach().requires_grad_(True)
    entries: list[tuple[float, torch.Tensor, torch.Tensor]] = []
    forced = obj.reuse_graph is True
    budget = None if forced else _graph_budget(obj.device, obj.n * obj.dtype.itemsize)
    held = {theta.untyped_storage().data_ptr()}
    used = [0]
    check = not obj._checked_second

    def per_batch(batch: Any, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        keep = kept.usable
        if keep and not forced and len(entries) >= MAX_KEPT_BATCHES:
            keep = kept.drop(entries)
        with torch.enable_grad(), math_attention(), obj.backend.at(leaf):
            loss = scalar_loss(obj.module, obj.module(batch))
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
                size = batch_size_of(batch, obj.size_fn)
            entries.append((float(size) if obj.reduction == "mean" else 1.0, loss.detach(), g))
        return loss, hv

    obj.n_hvp += 1
    try:
        hv = obj.sum_over_data(per_batch, "Hessian-vector product", obj.n)[1]
    except (RuntimeError, NotImplementedError) as err:
        kept.usable = False
        clear = explain(err, "reverse")
        if clear is None or clear is err:
            raise
        raise clear from err
    obj._checked_second = True
    assert hv is not None
    if kept.usable:
        kept.entries, kept.leaf = entries, leaf
        kept.size = int(sum(w for w, _, _ in entries)) if obj.reduction == "mean" else 1
    return hv.to(obj.dtype)


def kept_hvp(obj: Objective, v: torch.Tensor, kept: KeptGraphs) -> torch.Tensor:
    """H v from the kept graphs: one backward pass per batch, no forward.

    The same operations as in the pass that built them, so the same numbers. The backward
    runs with our tensors swapped in and the model in the objective's mode, as in a pass,
    because activation checkpointing recomputes forward segments inside it. The losses were
    checked when the graphs were built; the product is checked here.
    """
    assert kept.entries is not None and kept.leaf is not None
    acc = obj.acc_dtype
    total = torch.empty(0)
    with obj.backend.session(obj.train, with_grad=False), torch.enable_grad(), obj.backend.at(kept.leaf):
        for i, (w, _loss, g) in enumerate(kept.entries):
            hv = _second(g, kept.leaf, v, retain_graph=True)
            hv = hv.reshape(-1).to(acc)
            if i == 0 and hv.is_contiguous() and not _shares(hv, v):
                total = hv.mul_(w)  # = 0 + w·hv, bitwise, without a second vector
            else:
                total.add_(hv, alpha=w)
            del hv
    obj.n_hvp += 1
    obj.graph_reused = True
    ok = bool(torch.isfinite(total).all())
    zero = torch.zeros((), dtype=acc, device=obj.device)
    _, summed, size, _, n_bad, _ = _dist.all_reduce_sums(
        obj.backend.group, zero, total, kept.size, empty=False, bad=not ok
    )
    if n_bad:
        where = "on this rank" if not ok else "on another rank"
        raise NonFiniteLossError(
            f"the Hessian-vector product is not finite ({where}) although the loss is finite "
            "on every batch; check the model, the data and the parameters"
        )
    assert summed is not None
    return summed.mul_(1.0 / size if obj.reduction == "mean" else 1.0).to(obj.dtype)


def exact_hvp(obj: Objective, v: torch.Tensor, theta: torch.Tensor, *, forward: bool) -> torch.Tensor:
    if forward:

        def per_batch(batch: Any, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
            def f(t: torch.Tensor) -> torch.Tensor:
                return obj.backend.batch_loss(t, batch)

            try:
                with math_attention():
                    (_g, loss), (hv, _) = torch.func.jvp(torch.func.grad_and_value(f), (theta,), (v,))
            except (RuntimeError, NotImplementedError) as e:
                # Only torch's "forward AD is not implemented here"; the model's own errors,
                # out-of-memory included, propagate unchanged.
                if forward_ad_unsupported(e):
                    raise ForwardADFailed(e) from e
                raise
            return loss, hv

    else:
        check = not obj._checked_second

        def per_batch(batch: Any, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
            leaf = theta.detach().requires_grad_(True)
            with torch.enable_grad(), math_attention(), obj.backend.at(leaf):
                loss = scalar_loss(obj.module, obj.module(batch))
                if check:
                    check_second_derivatives(loss)
                (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
                hv = _second(g, leaf, v)
            return loss, hv

    obj.n_hvp += 1
    try:
        hv = obj.sum_over_data(per_batch, "Hessian-vector product", obj.n)[1]
    except ForwardADFailed as e:
        # Forward-mode AD is missing or broken for some ops (torch 2.13: F.mse_loss under
        # jvp(grad) raises "ZeroTensors are immutable"; see FORWARD_AD_GAPS). Double
        # backward is exact too.
        obj._forward = False
        warnings.warn(
            f"hvp_mode='forward': forward-mode AD fails on this model and loss "
            f"({type(e.error).__name__}: {str(e.error)[:200]}); using double backward "
            "(hvp_mode='reverse', also exact) for this and later products",
            RuntimeWarning,
            stacklevel=3,
        )
        obj.n_hvp -= 1
        return exact_hvp(obj, v, theta, forward=False)
    except (RuntimeError, NotImplementedError) as err:
        clear = explain(err, "forward" if forward else "reverse")
        if clear is None:
            raise
        if clear is err:
            raise
        raise clear from err
    if not forward:
        obj._checked_second = True
    assert hv is not None
    return hv.to(obj.dtype)


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


class KeptGraphs:
    """The gradient graphs of a :func:`reusing_graph` block.

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
