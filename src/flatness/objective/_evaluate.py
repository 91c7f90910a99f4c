"""Loss (and metrics) at many points of parameter space in one pass over the data.

The engine under every landscape (:mod:`flatness.landscape.grid`): each batch is fetched once
and evaluated at all grid points, vectorized with ``torch.func.vmap`` where the backend and the
model allow it, else by a loop in which the backend swaps θ into the model once per batch
(:meth:`flatness.objective._backend.Backend.swapped`) and refills it per point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from flatness._utils.compat import reparametrize
from flatness.objective._data import first_tensor
from flatness.objective._loss import scalar_loss

#: the objective these functions work for (:class:`flatness.Objective`; not imported: it imports us).
Objective = Any

__all__ = ["evaluate_many"]


def evaluate_many(
    obj: Objective,
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
        obj: the objective (model, loss, data) to evaluate.
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
        ``obj.last_vectorized`` tells which path ran.

    Raises:
        TypeError: metrics with ``batch_loss``, or arguments of the wrong type.
        ValueError: wrong shapes, unknown buffer names, ``vectorize=True`` with ``train=True``.
    """
    thetas = _as_matrix(obj, thetas, "thetas")
    if directions is None:
        if origin is not None:
            raise TypeError("origin: only used with directions; pass the points as thetas (k, n)")
        if thetas.shape[1] != obj.n_local:
            raise ValueError(
                f"thetas: got shape {tuple(thetas.shape)}; expected (k, {obj.n_local}) with k >= 1"
            )
        dirs = None
        base = None
    else:
        dirs = _as_matrix(obj, directions, "directions")
        if dirs.shape[1] != obj.n_local:
            raise ValueError(f"directions: got shape {tuple(dirs.shape)}; expected (r, {obj.n_local})")
        if thetas.shape[1] != dirs.shape[0]:
            raise ValueError(
                f"thetas: got coordinates of shape {tuple(thetas.shape)}; with {dirs.shape[0]} "
                f"directions expected (k, {dirs.shape[0]})"
            )
        base = obj.theta0 if origin is None else obj.as_vector(origin, "origin")
    k = thetas.shape[0]
    coords = thetas.detach().cpu().double().numpy() if dirs is not None else None
    bufs: dict[str, torch.Tensor] = {}
    if buffers is not None:
        if not isinstance(buffers, dict):
            raise TypeError(f"buffers: expected a dict name -> (k, ...) tensor, got {type(buffers).__name__}")
        for name, value in buffers.items():
            if name not in obj.buffers:
                raise ValueError(f"buffers: unknown buffer {name!r}; the model has {list(obj.buffers)[:5]}")
            ref = obj.buffers[name]
            value = torch.as_tensor(value)
            if tuple(value.shape) != (k, *ref.shape):
                raise ValueError(
                    f"buffers: {name!r} has shape {tuple(value.shape)}; expected {(k, *ref.shape)}"
                )
            bufs[name] = obj.backend.const(value.detach().to(device=ref.device, dtype=ref.dtype))
    metrics = dict(metrics or {})
    for name, fn in metrics.items():
        if not callable(fn):
            raise TypeError(f"metrics: {name!r} is a {type(fn).__name__}; expected metric(outputs, targets)")
    if metrics and obj.module._batch_loss is not None:
        raise TypeError(
            "metrics: metrics need model outputs, which the batch_loss path does not expose; "
            "pass loss_fn(outputs, targets) instead of batch_loss to use metrics"
        )
    if vectorize not in ("auto", True, False):
        raise ValueError(f"vectorize: got {vectorize!r}; expected 'auto', True or False")
    if vectorize is True and not obj.supports("vmap"):
        raise ValueError(
            f"vectorize: True (torch.func.vmap over the points) is not available for "
            f"{obj.backend.description}; use 'auto' or False (a loop over the points)"
        )
    if vectorize is True and obj.train:
        raise ValueError("vectorize: True is not possible with train=True (in-place buffer updates, dropout)")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size: got {chunk_size!r}; expected a positive int or None")
    chunk_box = {"size": chunk_size}
    names = list(metrics)
    loss_fn = obj.module._loss_fn

    def compute(batch: Any) -> torch.Tensor:
        """Loss and metrics of one batch at the parameters now swapped into the model."""
        if not names:
            return scalar_loss(obj.module, obj.module(batch)).reshape(1).to(obj.acc_dtype)
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError("data: metrics need (inputs, targets) batches")
        inputs, targets = batch
        outputs = obj.model(inputs)
        out = [scalar_loss(obj.module, loss_fn(outputs, targets))]  # type: ignore[misc]
        out += [metrics[m](outputs, targets) for m in names]
        return torch.stack(
            [
                (v if isinstance(v, torch.Tensor) else torch.tensor(float(v))).reshape(()).to(obj.acc_dtype)
                for v in out
            ]
        )

    def rows(sl: slice) -> torch.Tensor:
        if dirs is None:
            return thetas[sl]
        return torch.addmm(base[None], thetas[sl], dirs)  # type: ignore[index]

    def auto_chunk(batch: Any) -> int:
        # Activations scale with the inputs; a rough, safe bound keeps memory in check.

        first = first_tensor(batch)
        per_point = 64 * (first.numel() * first.element_size() if first is not None else 1 << 20)
        return max(1, (1 << 29) // max(per_point, 1))

    def run_vmap(batch: Any) -> torch.Tensor:
        if chunk_box["size"] is None:
            chunk_box["size"] = min(k, auto_chunk(batch))
        chunk = chunk_box["size"]

        def one(theta: torch.Tensor, point_bufs: dict[str, torch.Tensor]) -> torch.Tensor:
            state = obj.backend.state(theta)  # type: ignore[attr-defined]
            for bname, b in point_bufs.items():
                state["model." + bname] = b
            with reparametrize(obj.module, state):
                return compute(batch)

        fn = torch.func.vmap(one, in_dims=(0, 0), randomness="error")
        pieces = []
        for start in range(0, k, chunk):
            sl = slice(start, start + chunk)
            pieces.append(fn(rows(sl), {bname: b[sl] for bname, b in bufs.items()}))
        return torch.cat(pieces)

    def run_loop(batch: Any) -> torch.Tensor:
        # The backend swaps θ into the model once per batch; each point only refills it. In
        # train mode every point restarts from the model's buffers and replays the batch's
        # random stream, as a single-θ pass would.
        work = torch.empty(obj.n_local, dtype=obj.dtype, device=obj.device)
        replay = obj.train and k > 1
        rng = torch.random.get_rng_state() if replay else None
        cuda = torch.cuda.get_rng_state_all() if replay and torch.cuda.is_initialized() else None
        out = []
        with obj.backend.swapped(work) as swap:
            point_bufs = {bname: swap.buffers[bname] for bname in bufs}
            fresh = [(swap.buffers[bn], obj.backend.const(b).clone()) for bn, b in obj.buffers.items()]
            for i in range(k):
                if coords is None:
                    work.copy_(thetas[i])
                else:
                    torch.add(base, dirs[0], alpha=float(coords[i, 0]), out=work)  # type: ignore[index,arg-type]
                    for j in range(1, coords.shape[1]):
                        work.add_(dirs[j], alpha=float(coords[i, j]))  # type: ignore[index]
                swap.refill()
                if obj.train:
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
    cached = obj._vmap_ok.get(key)
    if vectorize is False or obj.train or not obj.supports("vmap"):
        use_vmap: bool | None = False
    elif vectorize is True:
        use_vmap = True
    elif obj.backend.has_conv and obj.device.type == "cpu":
        use_vmap = False
    else:
        use_vmap = cached
    mode = {"vmap": use_vmap}

    def per_batch(batch: Any, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
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
        return torch.zeros((), dtype=obj.acc_dtype, device=obj.device), out.reshape(-1)

    width = 1 + len(names)
    obj.n_loss += k
    _, total = obj.sum_over_data(per_batch, "losses", k * width, check_finite=False)
    assert total is not None
    if vectorize == "auto" and not obj.train and mode["vmap"] is not None:
        obj._vmap_ok[key] = mode["vmap"]
    obj.last_vectorized = bool(mode["vmap"])
    table = total.reshape(k, width)
    return table[:, 0].clone(), {m: table[:, j + 1].clone() for j, m in enumerate(names)}


def _as_matrix(obj: Objective, m: Any, name: str) -> torch.Tensor:
    if isinstance(m, np.ndarray):
        m = torch.from_numpy(m)
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name}: expected a 2-D tensor or array, got {type(m).__name__}")
    if m.ndim != 2 or m.shape[0] == 0:
        raise ValueError(f"{name}: got shape {tuple(m.shape)}; expected a 2-D (k, ...) array with k >= 1")
    return m.detach().to(device=obj.device, dtype=obj.dtype)
