"""Plots of landscapes and spectra (optional: ``pip install "flatness[plot]"``).

matplotlib is imported when a plot function is called, never at ``import flatness``.
Every function draws on ``ax`` (a new figure when None) and returns the Axes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "plot_1d",
    "plot_block_densities",
    "plot_contour",
    "plot_density",
    "plot_monitor",
    "plot_spectrum",
    "plot_surface",
]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('flatness.plot needs matplotlib: pip install "flatness[plot]"') from e
    return plt


def _array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected an array of numbers, got {type(x).__name__}") from e


def _new_ax(ax: Any, projection: str | None = None) -> Any:
    if ax is not None:
        return ax
    plt = _pyplot()
    fig = plt.figure()
    return fig.add_subplot(projection=projection) if projection else fig.add_subplot()


def _grid_2d(result: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    betas = getattr(result, "betas", None)
    if betas is None:
        raise TypeError(f"result: expected a 2-D landscape (with betas), got {type(result).__name__}")
    loss = _array(result.loss, "result.loss")
    return _array(result.alphas, "alphas"), _array(betas, "betas"), loss


def plot_1d(
    result: Any,
    *,
    ax: Any = None,
    metric: str | None = None,
    log: bool = False,
    label: str | None = None,
) -> Any:
    """Loss against α for a 1-D landscape or an interpolation, with an optional metric axis.

    Args:
        result: an :class:`~flatness.landscape.Interpolation` / ``Landscape1D`` (or anything
            with ``alphas`` and 1-D ``loss``).
        ax: Axes to draw on; default a new figure.
        metric: name of a metric in ``result.metrics`` (e.g. ``"accuracy"``) drawn on a
            second y-axis (dashed); a legend then names both curves.
        log: logarithmic loss axis.
        label: legend label of the loss curve (default ``"loss"``).

    Returns:
        The Axes of the loss curve.

    Raises:
        ImportError: matplotlib is missing. KeyError: unknown metric. TypeError: not a 1-D result.
    """
    alphas, loss = _array(result.alphas, "alphas"), _array(result.loss, "loss")
    if loss.ndim != 1:
        raise TypeError(f"result: expected a 1-D landscape, got loss of shape {loss.shape}; use plot_contour")
    ax = _new_ax(ax)
    # A fixed colour only when a metric shares the figure; otherwise the next colour of the
    # cycle, so that several curves drawn on one Axes stay distinguishable.
    style = {"color": "C0"} if metric is not None else {}
    ax.plot(alphas, loss, "-", label=label or "loss", **style)
    ax.set_xlabel("α")
    ax.set_ylabel("loss")
    if log:
        ax.set_yscale("log")
    if metric is not None:
        metrics = getattr(result, "metrics", {}) or {}
        if metric not in metrics:
            raise KeyError(f"metric: {metric!r} is not in the result; it has {sorted(metrics)}")
        twin = ax.twinx()
        twin.plot(alphas, _array(metrics[metric], metric), "C1--", label=metric)
        twin.set_ylabel(metric)
        # Two y-axes: the legend says which curve is which (solid: loss, left; dashed: metric).
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="best")
        ax.set_zorder(twin.get_zorder() + 1)  # the legend above the metric's curve
        ax.patch.set_visible(False)
    elif label is not None:
        ax.legend(loc="best")  # redrawn with every labelled curve added to this Axes
    return ax


def plot_contour(
    result: Any,
    *,
    ax: Any = None,
    levels: int | Any = 20,
    log: bool = False,
    filled: bool = False,
    colorbar: bool = True,
) -> Any:
    """Contours of a 2-D landscape over (α, β) with the centre (0, 0) marked.

    Args:
        result: a ``Landscape2D`` (``alphas``, ``betas``, ``loss`` of shape len(α) × len(β)).
        ax: Axes to draw on; default a new figure.
        levels: number of contour levels or their values (of log10 of the loss with ``log``).
        log: contour log10 of the loss (as Li et al. do for deep nets); the colour bar is then
            labelled ``log10 loss``, and so are the values on the contour lines.
        filled: filled contours (``contourf``) instead of labelled contour lines.
        colorbar: draw a colour bar (with round ticks) naming the scale.

    Returns:
        The Axes.

    Raises:
        ImportError: matplotlib is missing. TypeError: not a 2-D result.
    """
    alphas, betas, loss = _grid_2d(result)
    z = np.log10(np.where(loss > 0, loss, np.nan)) if log else loss
    ax = _new_ax(ax)
    b, a = np.meshgrid(betas, alphas)
    z = np.ma.masked_invalid(z)
    cs = (ax.contourf if filled else ax.contour)(a, b, z, levels=levels)
    if not filled:
        ax.clabel(cs, inline=True, fontsize=7)
    if colorbar:
        from matplotlib.ticker import MaxNLocator

        bar = ax.figure.colorbar(cs, ax=ax, label="log10 loss" if log else "loss")
        bar.locator = MaxNLocator(nbins=6)  # round ticks, not the level values
        bar.update_ticks()
    ax.plot([0.0], [0.0], "k*", markersize=10, label="centre")
    ax.set_xlabel("α (d₁)")
    ax.set_ylabel("β (d₂)")
    return ax


def plot_surface(result: Any, *, ax: Any = None, log: bool = False, cmap: str = "viridis") -> Any:
    """A 3-D surface of a 2-D landscape.

    Args:
        result: a ``Landscape2D``.
        ax: a 3-D Axes (``projection="3d"``); default a new figure.
        log: plot log10 of the loss.
        cmap: matplotlib colour map.

    Returns:
        The 3-D Axes.

    Raises:
        ImportError: matplotlib is missing. TypeError: not a 2-D result.
    """
    alphas, betas, loss = _grid_2d(result)
    z = np.log10(np.where(loss > 0, loss, np.nan)) if log else loss
    ax = _new_ax(ax, projection="3d")
    b, a = np.meshgrid(betas, alphas)
    ax.plot_surface(a, b, z, cmap=cmap, linewidth=0, antialiased=True)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_zlabel("log10 loss" if log else "loss")
    return ax


def plot_spectrum(eigenvalues: Any, *, ax: Any = None, log: bool = False) -> Any:
    """Hessian eigenvalues as a stem plot, largest first.

    Args:
        eigenvalues: an array / tensor, or an object with ``eigenvalues`` (e.g. a
            ``hessian_topk`` result).
        ax: Axes to draw on; default a new figure.
        log: symmetric-log y-axis (eigenvalues can be negative).

    Returns:
        The Axes.

    Raises:
        ImportError: matplotlib is missing. ValueError: no eigenvalues.
    """
    values = _array(getattr(eigenvalues, "eigenvalues", eigenvalues), "eigenvalues").reshape(-1)
    if values.size == 0:
        raise ValueError("eigenvalues: got none")
    values = np.sort(values)[::-1]
    ax = _new_ax(ax)
    ax.stem(np.arange(1, values.size + 1), values)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    if log:
        ax.set_yscale("symlog")
    return ax


def plot_density(result: Any = None, density: Any = None, *, ax: Any = None, log: bool = True) -> Any:
    """A spectral density φ(t) (e.g. from stochastic Lanczos quadrature) against t.

    Ghorbani, Krishnan, Xiao, 2019, arXiv 1901.10159 plot it on a log scale.

    Args:
        result: an object with ``grid`` and ``density`` (a ``hessian_density`` result), or
            the grid array itself (then pass ``density``).
        density: the density values when ``result`` is the grid.
        ax: Axes to draw on; default a new figure.
        log: logarithmic density axis showing the 10 decades below the peak (smaller values,
            zeros included, are drawn at that floor).

    Returns:
        The Axes.

    Raises:
        ImportError: matplotlib is missing. ValueError: grid and density of different lengths.
    """
    if density is None:
        if not (hasattr(result, "grid") and hasattr(result, "density")):
            raise TypeError("result: pass an object with grid and density, or plot_density(grid, density)")
        grid, density = result.grid, result.density
    else:
        grid = result
    t, phi = _array(grid, "grid").reshape(-1), _array(density, "density").reshape(-1)
    if t.shape != phi.shape or t.size == 0:
        raise ValueError(f"grid, density: got lengths {t.size} and {phi.size}; expected equal and > 0")
    ax = _new_ax(ax)
    if log:
        # Gaussian-smoothed densities reach 1e-50 and below in their tails; show the 10
        # decades under the peak, where the spectrum is.
        positive = phi[phi > 0]
        floor = max(positive.min(), positive.max() * 1e-10) if positive.size else 1e-12
        ax.semilogy(t, np.maximum(phi, floor))
        ax.set_ylim(bottom=floor)
    else:
        ax.plot(t, phi)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    return ax


def plot_block_densities(
    result: Any, *, axes: Any = None, log: bool = True, sharex: bool = True, ncols: int | None = None
) -> Any:
    """One spectral density per parameter block, on a grid of panels (a ``hessian_density(blocks=...)`` result).

    Block heterogeneity — blocks whose spectra differ by orders of magnitude — is what Zhang et
    al. 2024 ("Why Transformers Need Adam: A Hessian Perspective", arXiv 2402.16788) relate to
    SGD's trouble with transformers.

    Args:
        result: a :class:`flatness.BlockSpectra` of densities.
        axes: a sequence of Axes, one per block; default a new figure with a grid of panels,
            ``ncols`` wide, in the blocks' order.
        log: logarithmic density axes (see :func:`plot_density`).
        sharex: the same eigenvalue range on every panel, so blocks compare by eye.
        ncols: panels per row of a new figure (default: up to 4, so that 15 blocks make a 4 × 4
            grid rather than one unreadable row).

    Returns:
        The list of Axes, one per block, titled by block.

    Raises:
        ImportError: matplotlib is missing. TypeError: not a per-block density result.
        ValueError: ``axes`` not one per block, or ``ncols`` < 1.
    """
    blocks = getattr(result, "blocks", None)
    if not isinstance(blocks, dict) or not blocks or not all(hasattr(r, "density") for r in blocks.values()):
        raise TypeError("result: expected hessian_density(..., blocks=...)'s result (densities per block)")
    if ncols is not None and (isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1):
        raise ValueError(f"ncols: got {ncols!r}; expected an int >= 1 or None")
    plt = _pyplot()
    new = axes is None
    if new:
        cols = min(len(blocks), ncols or 4)
        rows = -(-len(blocks) // cols)
        fig, grid = plt.subplots(
            rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False, layout="constrained"
        )
        axes = list(grid.ravel()[: len(blocks)])
        for extra in grid.ravel()[len(blocks) :]:
            fig.delaxes(extra)
    axes = list(axes)
    if len(axes) != len(blocks):
        raise ValueError(f"axes: got {len(axes)} Axes for {len(blocks)} blocks")
    for i, (ax, (name, res)) in enumerate(zip(axes, blocks.items(), strict=True)):
        plot_density(res, ax=ax, log=log)
        ax.set_title(str(name), fontsize=9)
        if new:  # axis names on the outer panels only
            if i + cols < len(blocks):
                ax.set_xlabel("")
            if i % cols:
                ax.set_ylabel("")
    if sharex:
        lo = min(float(np.min(_array(r.grid, "grid"))) for r in blocks.values())
        hi = max(float(np.max(_array(r.grid, "grid"))) for r in blocks.values())
        for ax in axes:
            ax.set_xlim(lo, hi)
    return axes


def plot_monitor(
    records: Any,
    measures: Any = None,
    *,
    ax: Any = None,
    log: bool = False,
    edge: bool = True,
) -> Any:
    """Recorded measures against the training step, with 2/η beside λ₁ when it was recorded.

    Args:
        records: a :class:`flatness.Monitor` (or a callback holding one as ``monitor``), or its
            ``records`` (a list of rows with ``"step"``).
        measures: column names to draw (default: every numeric column except ``step``,
            ``epoch``, ``time_s``, ``two_over_lr`` and standard errors). A measure with a
            ``<name>_std_error`` column (a ``trace``) is drawn with a band of ± one standard
            error. Measures of different scales are best drawn on separate Axes, one call each.
        ax: Axes to draw on; default a new figure.
        log: logarithmic y-axis.
        edge: draw ``two_over_lr`` (2/η, the edge of stability of gradient descent) as a dashed
            line when the rows have it.

    Returns:
        The Axes.

    Raises:
        ImportError: matplotlib is missing. ValueError: no records. KeyError: a measure no row has.
    """
    monitor = getattr(records, "monitor", records)
    rows = list(getattr(monitor, "records", monitor))
    if not rows:
        raise ValueError("records: got none; record at least one step before plotting")
    if not all(isinstance(r, dict) and "step" in r for r in rows):
        raise TypeError("records: expected a Monitor or a list of rows (dicts with 'step')")
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    skip = {"step", "epoch", "time_s", "two_over_lr"} | {f"{k}_std_error" for k in columns}
    if measures is None:
        measures = [
            k
            for k in columns
            if k not in skip
            and any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)
        ]
    elif isinstance(measures, str):
        measures = [measures]
    missing = [m for m in measures if m not in columns]
    if missing:
        raise KeyError(f"measures: {missing} are not in the records; they have {columns}")
    ax = _new_ax(ax)

    def series(name: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))]
        arr = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        return arr[:, 0], arr[:, 1]

    for name in measures:
        x, y = series(name)
        (line,) = ax.plot(x, y, ".-", label=name)
        if f"{name}_std_error" in columns:
            xe, se = series(f"{name}_std_error")
            if xe.shape == x.shape and np.array_equal(xe, x):
                ax.fill_between(
                    x, y - se, y + se, color=line.get_color(), alpha=0.2, label=f"{name} ± 1 s.e."
                )
    if edge and "two_over_lr" in columns:
        x, y = series("two_over_lr")
        ax.plot(x, y, "k--", label="2/η")
    ax.set_xlabel("step")
    ax.set_ylabel(measures[0] if len(measures) == 1 else "value")
    if log:
        ax.set_yscale("log")
    ax.legend(loc="best")
    return ax
