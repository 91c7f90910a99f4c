"""Loss on lines and planes through parameter space: interpolation, 1-D and 2-D slices.

Every grid is evaluated through :meth:`flatness.Objective.evaluate_many`: each pass over
the data evaluates a group of grid points (vectorized with ``torch.func.vmap`` where the
model allows it), so a DataLoader is read once per group, not once per point.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from flatness._utils.progress import Progress, ProgressArg
from flatness._utils.validate import MAX_SEED
from flatness.landscape.directions import (
    Normalization,
    _check_direction,
    _check_normalization,
    _check_seed,
    _named,
    normalize_direction,
    normalize_parts,
    random_direction,
)
from flatness.landscape.result import (
    Interpolation,
    Landscape1D,
    Landscape2D,
    LandscapeResult,
    load_landscape,
)
from flatness.objective import Objective, check_options
from flatness.objective._guard import model_guard

__all__ = ["accuracy", "interpolate", "landscape_1d", "landscape_2d"]

Metric = Callable[[Any, Any], Any]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of class scores ``outputs`` (batch × classes) against integer ``targets``."""
    return (outputs.argmax(-1) == targets).to(outputs.dtype).mean()


def _coords(values: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(
            values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64
        )
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected a 1-D sequence of numbers, got {type(values).__name__}") from e
    if arr.ndim == 0:
        raise ValueError(f"{name}: got the scalar {values!r}; expected a 1-D sequence of numbers")
    if arr.ndim != 1:
        raise ValueError(f"{name}: got an array of shape {arr.shape}; expected a 1-D sequence of numbers")
    if arr.size == 0:
        raise ValueError(f"{name}: the grid is empty; pass at least one value (e.g. np.linspace(-1, 1, 21))")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains non-finite values; grid coordinates must be finite")
    return arr


def _check_metrics(metrics: Any) -> dict[str, Metric]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"metrics: expected a dict name -> metric(outputs, targets), got {type(metrics).__name__} "
            "(e.g. metrics={'accuracy': flatness.landscape.accuracy})"
        )
    for k, fn in metrics.items():
        if not isinstance(k, str) or not callable(fn):
            raise TypeError(f"metrics: entry {k!r} must map a str to a callable metric(outputs, targets)")
    return dict(metrics)


def _direction_dict(
    direction: Any, model: nn.Module, obj: Objective, params: Any, what: str
) -> dict[str, torch.Tensor]:
    """A dict or flat vector → a checked dict keyed like θ."""
    named = _named(model, params)
    if isinstance(direction, (torch.Tensor, np.ndarray)):
        v = torch.as_tensor(direction)
        if v.ndim != 1 or v.shape[0] != obj.n:
            raise ValueError(
                f"{what}: got shape {tuple(v.shape)}; expected a dict or a flat vector ({obj.n},)"
            )
        flat = v.detach()
        out, i = {}, 0
        for n, w in named:
            out[n] = flat[i : i + w.numel()].reshape(w.shape).to(device=w.device, dtype=w.dtype)
            i += w.numel()
        return out
    return _check_direction(direction, named, what)


def _prepare_direction(
    direction: Any,
    model: nn.Module,
    obj: Objective,
    *,
    normalization: Normalization,
    ignore_1d: bool,
    seed: int,
    params: Any,
    what: str,
) -> dict[str, torch.Tensor]:
    if not obj.supports("whole_vectors"):
        # Directions are this process's parts of θ's vectors (local vectors; e.g. the shards of
        # an FSDP model), drawn and normalized without ever forming a whole vector.
        if direction is None:
            return random_direction(
                model, normalization=normalization, ignore_1d=ignore_1d, seed=seed, params=params
            )
        vec = obj.flatten(dict(direction)) if isinstance(direction, Mapping) else torch.as_tensor(direction)
        d = obj.unflatten(obj.as_vector(vec, what))
        if normalization is None:
            return d
        return normalize_parts(
            d,
            obj.unflatten(obj.theta0),
            normalization=normalization,
            ignore_1d=ignore_1d,
            norm=lambda t: obj.space.norm64(t.reshape(-1)),
        )
    if direction is None:
        return random_direction(
            model, normalization=normalization, ignore_1d=ignore_1d, seed=seed, params=params
        )
    d = _direction_dict(direction, model, obj, params, what)
    if normalization is None:
        return d
    return normalize_direction(d, model, normalization=normalization, ignore_1d=ignore_1d, params=params)


def _resume(
    resume_from: Any,
    cls: type[LandscapeResult],
    alphas: np.ndarray,
    betas: np.ndarray | None,
    metric_names: list[str],
) -> LandscapeResult | None:
    if resume_from is None:
        return None
    if isinstance(resume_from, (str, os.PathLike)):
        if not os.path.exists(resume_from):
            return None  # nothing to resume yet: the first run of a checkpointed grid
        resume_from = load_landscape(resume_from)
    if not isinstance(resume_from, cls):
        raise TypeError(
            f"resume_from: expected a path or a {cls.__name__} result, got {type(resume_from).__name__}"
        )
    same_b = (betas is None and resume_from.betas is None) or (
        betas is not None and resume_from.betas is not None and np.array_equal(betas, resume_from.betas)
    )
    if not np.array_equal(alphas, resume_from.alphas) or not same_b:
        raise ValueError("resume_from: its grid (alphas / betas) differs from the one asked for")
    if sorted(resume_from.metrics) != sorted(metric_names):
        raise ValueError(
            f"resume_from: it holds metrics {sorted(resume_from.metrics)}; "
            f"this call asks for {sorted(metric_names)}"
        )
    return resume_from


def _same_directions(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    if len(a) != len(b):
        return False
    for da, db in zip(a, b, strict=True):
        if da.keys() != db.keys():
            return False
        for k in da:
            x, y = da[k].detach().cpu().double(), db[k].detach().cpu().double()
            if x.shape != y.shape or not torch.allclose(x, y, rtol=1e-6, atol=1e-12):
                return False
    return True


@dataclasses.dataclass(frozen=True)
class _Grid:
    """The points of a landscape: θ(c) = origin + Σ_j c_j dirs_j for the coordinates of each index.

    Attributes:
        kind: the result class.
        coords_of: grid indices → their coordinates (k, r).
        dirs: the (r, n) directions; origin: the (n,) origin (None: the model's θ₀).
        center_coords: the coordinates of the centre (evaluated once, with the first pass).
        buffers_of: grid indices → per-point buffers (interpolation of BatchNorm statistics).
        alphas, betas: the axes; directions: as reported in the result.
        normalization, seed: as reported in the result.
        nonfinite_hint: the likely cause named when points have a non-finite loss.
        center_name: what the centre is, named when its own loss is not finite.
    """

    kind: type[LandscapeResult]
    coords_of: Callable[[np.ndarray], np.ndarray]
    dirs: torch.Tensor
    center_coords: np.ndarray
    alphas: np.ndarray
    betas: np.ndarray | None
    directions: list[dict[str, torch.Tensor]]
    origin: torch.Tensor | None = None
    buffers_of: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None
    normalization: str | None = None
    seed: int | None = None
    nonfinite_hint: str = "the grid may reach too far from the centre"
    center_name: str = "the model's parameters"


@dataclasses.dataclass(frozen=True)
class _Evaluation:
    """How a grid is evaluated: metrics, resuming and checkpoints, passes, vectorization, progress."""

    metrics: dict[str, Metric]
    resume: LandscapeResult | None
    checkpoint: str | os.PathLike[str] | None
    points_per_pass: int | None
    vectorize: Any
    chunk_size: int | None
    progress: ProgressArg


def _run_grid(obj: Objective, grid: _Grid, run: _Evaluation) -> LandscapeResult:
    """Evaluate every pending point of ``grid`` in as few passes as ``run`` allows."""
    cls, alphas, betas, directions = grid.kind, grid.alphas, grid.betas, grid.directions
    metrics, resume, checkpoint, points_per_pass = (
        run.metrics,
        run.resume,
        run.checkpoint,
        run.points_per_pass,
    )
    progress = run.progress
    shape = (len(alphas),) if betas is None else (len(alphas), len(betas))
    total = math.prod(shape)
    if resume is not None:
        if not _same_directions(resume.directions, directions):
            raise ValueError(
                "resume_from: its directions differ from this call's (model, seed or directions changed)"
            )
        loss = resume.loss.reshape(-1).astype(np.float64).copy()
        done = resume.done.reshape(-1).astype(bool).copy()
        values = {m: resume.metrics[m].reshape(-1).astype(np.float64).copy() for m in metrics}
        center: float | None = resume.center_loss
        n_passes = resume.n_passes
    else:
        loss = np.full(total, np.nan)
        done = np.zeros(total, dtype=bool)
        values = {m: np.full(total, np.nan) for m in metrics}
        center, n_passes = None, 0
    if points_per_pass is not None and (
        isinstance(points_per_pass, bool) or not isinstance(points_per_pass, int) or points_per_pass <= 0
    ):
        raise ValueError(f"points_per_pass: got {points_per_pass!r}; expected a positive int or None")
    if points_per_pass is None:
        # Points are coordinates along the directions (no (k, n) array), so one pass can
        # take the whole grid; with a checkpoint or progress, a row (a tenth in 1-D) per pass.
        points_per_pass = total
        if checkpoint is not None or progress:
            points_per_pass = shape[1] if len(shape) == 2 else max(1, math.ceil(total / 10))
    pending = np.flatnonzero(~done)
    bar = Progress(progress, total=len(pending), desc=f"flatness {cls.kind} grid")
    vectorized: bool | None = None
    evaluated = 0

    def result() -> LandscapeResult:
        nonfinite = int((done & ~np.isfinite(loss)).sum())
        return cls(
            loss=loss.reshape(shape).copy(),
            alphas=alphas,
            betas=betas,
            metrics={m: v.reshape(shape).copy() for m, v in values.items()},
            directions=directions,
            center_loss=float("nan") if center is None else center,
            done=done.reshape(shape).copy(),
            n_points=total,
            n_evaluated=evaluated,
            n_nonfinite=nonfinite,
            n_passes=n_passes,
            vectorized=vectorized,
            normalization=grid.normalization,
            seed=grid.seed,
        )

    groups = [pending[i : i + points_per_pass] for i in range(0, len(pending), points_per_pass)]
    if not groups and center is None:
        groups = [np.zeros(0, dtype=np.int64)]
    try:
        for group in groups:
            coords = grid.coords_of(group)
            bufs = grid.buffers_of(torch.as_tensor(group, dtype=torch.long)) if grid.buffers_of else None
            with_center = center is None
            if with_center:
                # The centre rides along with the first pass: no extra pass over the data.
                coords = np.concatenate([coords, grid.center_coords[None]])
                if bufs is not None:
                    bufs = {n: torch.cat([b, obj.buffers[n][None].to(b.dtype)]) for n, b in bufs.items()}
            losses, mvals = obj.evaluate_many(
                torch.as_tensor(coords, dtype=obj.dtype, device=obj.device),
                directions=grid.dirs,
                origin=grid.origin,
                buffers=bufs,
                metrics=metrics,
                vectorize=run.vectorize,
                chunk_size=run.chunk_size,
            )
            vectorized = obj.last_vectorized
            losses_np = losses.detach().cpu().double().numpy()
            if with_center:
                center = float(losses_np[-1])
            m = len(group)
            loss[group] = losses_np[:m]
            for name in metrics:
                values[name][group] = mvals[name].detach().cpu().double().numpy()[:m]
            done[group] = True
            evaluated += m
            n_passes += 1
            if checkpoint is not None:
                result().save(checkpoint)
            bar.update(m, loss=float(np.nanmin(losses_np)) if np.isfinite(losses_np).any() else float("nan"))
    finally:
        bar.close()
    out = result()
    if out.n_nonfinite and not math.isfinite(out.center_loss):
        warnings.warn(
            f"{out.n_nonfinite} of {total} grid points have a non-finite loss (kept as NaN/inf in "
            f".loss), and the loss at the centre itself ({grid.center_name}) is {out.center_loss}: the "
            "model, the data or the loss function produce it, not the grid's reach; check them "
            "(e.g. flatness.Objective(model, loss_fn, data).loss())",
            RuntimeWarning,
            stacklevel=3,
        )
    elif out.n_nonfinite:
        warnings.warn(
            f"{out.n_nonfinite} of {total} grid points have a non-finite loss (kept as NaN/inf in .loss); "
            + grid.nonfinite_hint,
            RuntimeWarning,
            stacklevel=3,
        )
    return out


def _objective(model: nn.Module, loss_fn: Any, data: Any, options: dict[str, Any]) -> Objective:
    return Objective(model, loss_fn, data, **options)


def landscape_1d(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    data: Any,
    *,
    alphas: Sequence[float] | np.ndarray | torch.Tensor,
    direction: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    normalization: Normalization = "filter",
    ignore_1d: bool = True,
    seed: int = 0,
    metrics: Mapping[str, Metric] | None = None,
    vectorize: bool | str = "auto",
    chunk_size: int | None = None,
    points_per_pass: int | None = None,
    resume_from: str | os.PathLike[str] | Landscape1D | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: ProgressArg = False,
    **options: Any,
) -> Landscape1D:
    """The loss along a line through the model's parameters, f(θ + α d).

    .. math::
        f(\\alpha) = L(\\theta + \\alpha d), \\qquad
        d_j \\leftarrow d_j \\lVert \\theta_j \\rVert / \\lVert d_j \\rVert \\text{ (filter normalization)}

    Li, Xu, Taylor, Studer, Goldstein, 2018, "Visualizing the Loss Landscape of Neural
    Nets", arXiv 1712.09913. On a quadratic, f(α) = f(θ) + α gᵀd + ½ α² dᵀHd exactly.

    Args:
        model: the network (any ``nn.Module``; see :class:`flatness.Objective`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean loss (``None`` with ``batch_loss``).
        data: a DataLoader, a list of batches or one batch.
        alphas: the step sizes (any finite values; include 0 to see the centre).
        direction: a dict or flat vector; default a seeded random direction.
        normalization: ``"filter"`` (Li et al.), ``"layer"`` or ``None`` (use ``direction``
            as given; with ``direction=None``: a raw Gaussian).
        ignore_1d: zero direction for 1-D tensors (biases, BatchNorm) when normalizing.
        seed: seed of the random direction.
        metrics: ``{name: metric(outputs, targets)}`` evaluated at every point, e.g.
            ``{"accuracy": flatness.landscape.accuracy}``.
        vectorize: see :meth:`flatness.Objective.evaluate_many`.
        chunk_size: as ``vectorize``.
        points_per_pass: points evaluated per pass over the data (default: the whole grid
            in one pass; a tenth of it with ``checkpoint`` or ``progress``). Points are
            coordinates along the directions, so memory does not grow with it.
        resume_from: a path or earlier result of the same grid; only missing points run.
        checkpoint: a .npz path rewritten after every pass (resume with ``resume_from``).
        progress: ``True`` for a progress line, or a callable ``(step, total, info)``.
        **options: forwarded to :class:`flatness.Objective` (params, reduction, dtype,
            batch_loss, train, max_batches, batch_size, data_seed, ...).

    Returns:
        :class:`Landscape1D` (``.alphas``, ``.loss``, ``.metrics``, ``.directions``, ...).

    Raises:
        ValueError: empty grid, direction with wrong keys or shapes, mismatched resume file.
        TypeError: arguments of the wrong type.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> line = flatness.landscape_1d(model, loss_fn, data, alphas=torch.linspace(-1, 1, 5))
        >>> line.loss.shape, bool(line.loss[2] == line.loss.min())
        ((5,), False)
    """
    check_options(landscape_1d, options)
    _check_normalization(normalization)
    seed = _check_seed(seed)
    a = _coords(alphas, "alphas")
    metrics_d = _check_metrics(metrics)
    params = options.get("params")
    with model_guard(model):
        obj = _objective(model, loss_fn, data, options)
        d = _prepare_direction(
            direction,
            model,
            obj,
            normalization=normalization,
            ignore_1d=ignore_1d,
            seed=seed,
            params=params,
            what="direction",
        )
        dv = obj.flatten(d)
        resume = _resume(resume_from, Landscape1D, a, None, list(metrics_d))
        grid = _Grid(
            Landscape1D,
            coords_of=lambda idx: a[idx][:, None],
            dirs=dv[None],
            center_coords=np.zeros(1),
            alphas=a,
            betas=None,
            directions=[d],
            normalization=normalization,
            seed=seed if direction is None else None,
        )
        run = _Evaluation(metrics_d, resume, checkpoint, points_per_pass, vectorize, chunk_size, progress)
        return _run_grid(obj, grid, run)  # type: ignore[return-value]


def landscape_2d(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    data: Any,
    *,
    alphas: Sequence[float] | np.ndarray | torch.Tensor,
    betas: Sequence[float] | np.ndarray | torch.Tensor,
    directions: Sequence[Any] | torch.Tensor | None = None,
    normalization: Normalization = "filter",
    ignore_1d: bool = True,
    seed: int = 0,
    metrics: Mapping[str, Metric] | None = None,
    vectorize: bool | str = "auto",
    chunk_size: int | None = None,
    points_per_pass: int | None = None,
    resume_from: str | os.PathLike[str] | Landscape2D | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: ProgressArg = False,
    **options: Any,
) -> Landscape2D:
    """The loss on a plane through the model's parameters, f(θ + α d₁ + β d₂).

    .. math::
        f(\\alpha, \\beta) = L(\\theta + \\alpha d_1 + \\beta d_2)

    Li, Xu, Taylor, Studer, Goldstein, 2018, arXiv 1712.09913 (filter-normalized random
    directions, Fig. 1; PCA directions of a trajectory, §7). Random directions use seeds
    ``seed`` and ``seed + 1`` (modulo 2**63). On a quadratic f is the quadratic form in (α, β) with the
    2×2 matrix [dᵢᵀHdⱼ] plus the linear term.

    Args:
        model: the network (any ``nn.Module``; see :class:`flatness.Objective`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch mean loss (``None`` with ``batch_loss``).
        data: a DataLoader, a list of batches or one batch.
        alphas: grid coordinates along d₁ and d₂.
        betas: as ``alphas``.
        directions: two dicts or flat vectors, or a (2, n) tensor; default seeded random ones.
        normalization: as for :func:`landscape_1d`.
        ignore_1d: as for :func:`landscape_1d`.
        seed: as for :func:`landscape_1d`.
        metrics: as for :func:`landscape_1d`.
        vectorize: as for :func:`landscape_1d`.
        chunk_size: as for :func:`landscape_1d`.
        resume_from: as for :func:`landscape_1d`.
        checkpoint: as for :func:`landscape_1d`.
        progress: as for :func:`landscape_1d`.
        points_per_pass: as for :func:`landscape_1d` (with ``checkpoint`` or ``progress``, the default is
            one row of the grid per pass).
        **options: as for :func:`landscape_1d`.

    Returns:
        :class:`Landscape2D`; ``.loss[i, j]`` is at ``(alphas[i], betas[j])``.

    Raises:
        ValueError: empty grid, directions with wrong keys or shapes or not two of them,
            mismatched resume file. TypeError: arguments of the wrong type.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> a = torch.linspace(-1, 1, 3)
        >>> grid = flatness.landscape_2d(model, loss_fn, data, alphas=a, betas=a)
        >>> grid.loss.shape
        (3, 3)
    """
    check_options(landscape_2d, options)
    _check_normalization(normalization)
    seed = _check_seed(seed)
    a = _coords(alphas, "alphas")
    b = _coords(betas, "betas")
    metrics_d = _check_metrics(metrics)
    params = options.get("params")
    if directions is not None:
        if isinstance(directions, Mapping) or (isinstance(directions, torch.Tensor) and directions.ndim == 1):
            raise ValueError("directions: got one direction; landscape_2d needs two (d1, d2)")
        if len(directions) != 2:
            raise ValueError(f"directions: got {len(directions)}; landscape_2d needs exactly two (d1, d2)")
    with model_guard(model):
        obj = _objective(model, loss_fn, data, options)
        ds = [
            _prepare_direction(
                None if directions is None else directions[i],
                model,
                obj,
                normalization=normalization,
                ignore_1d=ignore_1d,
                seed=(seed + i) % (MAX_SEED + 1),  # seed = 2**63 - 1 wraps to 0, not out of range
                params=params,
                what=f"directions[{i}]",
            )
            for i in range(2)
        ]
        nb = len(b)
        resume = _resume(resume_from, Landscape2D, a, b, list(metrics_d))
        grid = _Grid(
            Landscape2D,
            coords_of=lambda idx: np.stack([a[idx // nb], b[idx % nb]], axis=1),
            dirs=torch.stack([obj.flatten(ds[0]), obj.flatten(ds[1])]),
            center_coords=np.zeros(2),
            alphas=a,
            betas=b,
            directions=ds,
            normalization=normalization,
            seed=seed if directions is None else None,
        )
        run = _Evaluation(metrics_d, resume, checkpoint, points_per_pass, vectorize, chunk_size, progress)
        return _run_grid(obj, grid, run)  # type: ignore[return-value]


def _check_same_structure(model_a: nn.Module, model_b: nn.Module) -> None:
    for what, fa, fb in (
        ("parameters", model_a.named_parameters(), model_b.named_parameters()),
        ("buffers", model_a.named_buffers(), model_b.named_buffers()),
    ):
        a = {n: (tuple(t.shape), t.dtype) for n, t in fa}
        b = {n: (tuple(t.shape), t.dtype) for n, t in fb}
        if a.keys() != b.keys():
            only_a = [n for n in a if n not in b][:5]
            only_b = [n for n in b if n not in a][:5]
            raise ValueError(
                f"model_b: its {what} differ from model_a's: only in model_a {only_a}, "
                f"only in model_b {only_b}"
            )
        for n in a:
            if a[n][0] != b[n][0]:
                raise ValueError(
                    f"model_b: {what[:-1]} {n!r} has shape {b[n][0]}; model_a's has shape {a[n][0]}"
                )


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    data: Any,
    *,
    alphas: Sequence[float] | np.ndarray | torch.Tensor,
    metrics: Mapping[str, Metric] | None = None,
    interpolate_buffers: bool = True,
    vectorize: bool | str = "auto",
    chunk_size: int | None = None,
    points_per_pass: int | None = None,
    resume_from: str | os.PathLike[str] | Interpolation | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: ProgressArg = False,
    **options: Any,
) -> Interpolation:
    """The loss on the line through two models, θ(α) = (1 − α) θ_a + α θ_b.

    .. math::
        f(\\alpha) = L\\big((1-\\alpha)\\theta_a + \\alpha\\theta_b\\big)

    Goodfellow, Vinyals, Saxe, 2015, "Qualitatively characterizing neural network
    optimization problems", arXiv 1412.6544; Keskar et al., 2017, arXiv 1609.04836, Fig. 3
    (α ∈ [−1, 2] between small- and large-batch solutions). Floating buffers (BatchNorm
    running statistics) are interpolated the same way; integer buffers and parameters
    outside ``params`` are model_a's.

    Args:
        model_a: two models of the same structure (names, shapes of parameters
            and buffers); α = 0 is model_a, α = 1 model_b.
        model_b: as ``model_a``.
        loss_fn: as for :class:`flatness.Objective`.
        data: as ``loss_fn``.
        alphas: the points (any finite values).
        metrics: ``{name: metric(outputs, targets)}``, e.g. accuracy.
        interpolate_buffers: interpolate floating buffers too (default); False keeps model_a's.
        vectorize: as for :func:`landscape_1d`.
        chunk_size: as for :func:`landscape_1d`.
        points_per_pass: as for :func:`landscape_1d`.
        resume_from: as for :func:`landscape_1d`.
        checkpoint: as for :func:`landscape_1d`.
        progress: as for :func:`landscape_1d`.
        **options: as for :func:`landscape_1d`.

    Returns:
        :class:`Interpolation` (``.alphas``, ``.loss``, ``.metrics``; ``.directions[0]`` is
        θ_b − θ_a; ``.center_loss`` is the loss of model_a).

    Raises:
        ValueError: models of different structure, empty grid. TypeError: bad argument types.

    Examples:
        >>> import torch, flatness
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(16, 3).double(), torch.randn(16, 1).double()
        >>> data, loss_fn = [(X, y)], torch.nn.functional.mse_loss
        >>> other = torch.nn.Linear(3, 1).double()
        >>> path = flatness.interpolate(model, other, loss_fn, data, alphas=[0.0, 0.5, 1.0])
        >>> path.loss.shape, round(float(path.loss[0]), 6) == round(loss_fn(model(X), y).item(), 6)
        ((3,), True)
    """
    check_options(interpolate, options)
    for name, m in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name}: expected a torch.nn.Module, got {type(m).__name__}")
    a = _coords(alphas, "alphas")
    metrics_d = _check_metrics(metrics)
    _check_same_structure(model_a, model_b)
    with model_guard(model_a, model_b):
        obj = _objective(model_a, loss_fn, data, options)
        named_b = dict(model_b.named_parameters())
        theta_b = obj.flatten({n: named_b[n].detach() for n in obj.names})
        theta_a = obj.theta0
        direction = obj.unflatten(theta_b - theta_a)
        named_a = dict(model_a.named_parameters())
        direction = {n: t.to(named_a[n].dtype).clone() for n, t in direction.items()}
        buffers_of = None
        if interpolate_buffers:
            bufs_a = {n: t for n, t in model_a.named_buffers() if t.is_floating_point()}
            bufs_b = dict(model_b.named_buffers())
            if bufs_a:

                def buffers_of(idx: torch.Tensor) -> dict[str, torch.Tensor]:
                    out = {}
                    for n, ba in bufs_a.items():
                        al = torch.as_tensor(a[idx.numpy()], dtype=ba.dtype, device=ba.device)
                        al = al.reshape(-1, *([1] * ba.ndim))
                        bb = bufs_b[n].detach().to(device=ba.device, dtype=ba.dtype)
                        out[n] = (1 - al) * ba.detach()[None] + al * bb[None]
                    return out

        resume = _resume(resume_from, Interpolation, a, None, list(metrics_d))
        grid = _Grid(
            Interpolation,
            # θ(α) = (1 − α) θ_a + α θ_b: coordinates (1 − α, α) on the directions (θ_a, θ_b).
            coords_of=lambda idx: np.stack([1 - a[idx], a[idx]], axis=1),
            dirs=torch.stack([theta_a, theta_b]),
            origin=torch.zeros_like(theta_a),
            center_coords=np.array([1.0, 0.0]),
            buffers_of=buffers_of,
            alphas=a,
            betas=None,
            directions=[direction],
            center_name="model_a's parameters, alpha = 0",
            nonfinite_hint=(
                "interpolated buffers (e.g. BatchNorm running_var) can turn negative outside "
                "alpha in [0, 1]; pass interpolate_buffers=False to keep model_a's buffers"
                if buffers_of is not None and (a.min() < 0 or a.max() > 1)
                else "the models may be too far apart for these alphas"
            ),
        )
        run = _Evaluation(metrics_d, resume, checkpoint, points_per_pass, vectorize, chunk_size, progress)
        return _run_grid(obj, grid, run)  # type: ignore[return-value]
