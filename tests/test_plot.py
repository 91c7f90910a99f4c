"""Plots render from real results with the Agg backend; a clear error without matplotlib."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import classification_data, make_mlp

pytest.importorskip("matplotlib")
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from flatness import interpolate, landscape_2d
from flatness import plot as fplot
from flatness.landscape import accuracy

ce = nn.functional.cross_entropy


@pytest.fixture(scope="module")
def results():
    ma, mb = make_mlp(0), make_mlp(1)
    data = classification_data()
    line = interpolate(ma, mb, ce, data, alphas=np.linspace(-1, 2, 7), metrics={"accuracy": accuracy})
    plane = landscape_2d(ma, ce, data, alphas=np.linspace(-1, 1, 5), betas=np.linspace(-1, 1, 4))
    return line, plane


def test_1d_with_accuracy_axis(results):
    ax = fplot.plot_1d(results[0], metric="accuracy")
    assert len(ax.figure.axes) == 2 and len(ax.lines) == 1
    np.testing.assert_allclose(ax.lines[0].get_xdata(), results[0].alphas)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), results[0].loss)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("α", "loss")
    twin = next(a for a in ax.figure.axes if a is not ax)
    np.testing.assert_allclose(twin.lines[0].get_ydata(), results[0].metrics["accuracy"])
    assert twin.get_ylabel() == "accuracy"
    assert fplot.plot_1d(results[0], log=True).get_yscale() == "log"
    with pytest.raises(KeyError, match="metric"):
        fplot.plot_1d(results[0], metric="nope")
    with pytest.raises(TypeError, match="1-D"):
        fplot.plot_1d(results[1])
    plt.close("all")


def test_1d_curves_on_one_axes_get_distinct_colours(results):
    ax = fplot.plot_1d(results[0], label="train")
    fplot.plot_1d(results[0], ax=ax, label="test")
    assert ax.lines[0].get_color() != ax.lines[1].get_color()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "test"]
    ax = fplot.plot_1d(results[0], metric="accuracy", label="train")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "accuracy"]
    assert fplot.plot_1d(results[0]).get_legend() is None
    plt.close("all")


def test_contour_and_surface(results):
    plane = results[1]
    ax = fplot.plot_contour(plane, log=True, filled=True)
    star = [line for line in ax.lines if line.get_marker() == "*"]
    assert star and tuple(star[0].get_xydata()[0]) == (0.0, 0.0)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("α (d₁)", "β (d₂)")
    # The contour set spans the grid and its levels cover log10 of the losses.
    cs = next(c for c in ax.collections if hasattr(c, "levels"))
    z = np.log10(plane.loss)
    assert cs.levels.min() <= z.min() and cs.levels.max() >= z.max()
    assert ax.get_xlim() == (plane.alphas.min(), plane.alphas.max())
    assert ax.get_ylim() == (plane.betas.min(), plane.betas.max())
    colorbar_axes = [a for a in ax.figure.axes if a is not ax]
    assert colorbar_axes and colorbar_axes[0].get_ylabel() == "log10 loss"
    plain = fplot.plot_contour(plane)
    plain_cs = next(c for c in plain.collections if hasattr(c, "levels"))
    assert plain_cs.levels.min() <= plane.loss.min() and plain_cs.levels.max() >= plane.loss.max()
    ax3 = fplot.plot_surface(plane)
    assert ax3.name == "3d"
    assert (ax3.get_xlabel(), ax3.get_ylabel(), ax3.get_zlabel()) == ("α", "β", "loss")
    zmin, zmax = ax3.get_zlim()
    assert zmin <= plane.loss.min() and zmax >= plane.loss.max()
    with pytest.raises(TypeError, match="2-D"):
        fplot.plot_contour(results[0])
    plt.close("all")


def test_spectrum_and_density_from_arrays_and_objects():
    class Spectrum:
        eigenvalues = torch.tensor([3.0, -1.0, 0.5])
        grid = np.linspace(-2, 4, 50)
        density = np.exp(-((np.linspace(-2, 4, 50) - 1) ** 2))

    ax = fplot.plot_spectrum(Spectrum())
    # A stem plot, largest first, indices from 1.
    markers = ax.containers[0].markerline
    np.testing.assert_allclose(markers.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(markers.get_ydata(), [3.0, 0.5, -1.0])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("index", "eigenvalue")
    assert fplot.plot_spectrum(np.array([1.0, 2.0]), log=True).get_yscale() == "symlog"
    ax = fplot.plot_density(Spectrum())
    np.testing.assert_allclose(ax.lines[0].get_xdata(), Spectrum.grid)
    peak = Spectrum.density.max()
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.maximum(Spectrum.density, peak * 1e-10))
    assert ax.get_yscale() == "log" and (ax.get_xlabel(), ax.get_ylabel()) == ("eigenvalue", "density")
    t = np.linspace(-1, 1, 201)
    ax = fplot.plot_density(t, np.exp(-(t**2) / 1e-3))  # tails down to ~1e-434 (0 in float64)
    assert ax.get_ylim()[0] == pytest.approx(1e-10, rel=1e-6)
    ax = fplot.plot_spectrum(np.array([3.0, 2.0, 1.0]))
    assert all(float(v).is_integer() for v in ax.get_xticks())
    ax = fplot.plot_density(Spectrum.grid, Spectrum.density, log=False)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), Spectrum.density)
    assert ax.get_yscale() == "linear"
    with pytest.raises(ValueError, match="lengths"):
        fplot.plot_density(np.arange(3), np.arange(4))
    plt.close("all")


def test_import_without_matplotlib_is_lazy_and_clear():
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.pyplot'] = None\n"
        "import flatness, flatness.plot\n"
        "try:\n    flatness.plot.plot_spectrum([1.0])\n"
        "except ImportError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "flatness[plot]"' in out.stdout
    lazy = subprocess.run(
        [sys.executable, "-c", "import sys, flatness; print('matplotlib' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert lazy.stdout.strip() == "False"


def test_plot_monitor_draws_records_and_the_edge():
    from flatness import Monitor

    model = make_mlp(0)
    monitor = Monitor(ce, classification_data(), every=1, measures=["loss", "grad_norm"], learning_rate=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        monitor.step(model)
        opt.zero_grad()
        ce(model(classification_data()[0]), classification_data()[1]).backward()
        opt.step()
    ax = fplot.plot_monitor(monitor)
    assert [line.get_label() for line in ax.lines] == ["loss", "grad_norm", "2/η"]
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [r["loss"] for r in monitor.records])
    np.testing.assert_allclose(ax.lines[2].get_ydata(), [4.0] * 3)
    one = monitor.plot("grad_norm", edge=False, log=True)
    assert len(one.lines) == 1 and one.get_yscale() == "log" and one.get_ylabel() == "grad_norm"
    assert len(fplot.plot_monitor(monitor.records, ["loss"]).lines) == 2
    with pytest.raises(KeyError, match="sharpness"):
        fplot.plot_monitor(monitor, ["sharpness"])
    with pytest.raises(ValueError, match="got none"):
        fplot.plot_monitor([])
    plt.close("all")


def test_block_densities_wrap_into_a_grid():
    """15 blocks: a 4 × 4 grid of panels (one row would be 15 panels wide), names on outer panels."""
    import collections

    from flatness import hessian_density

    torch.manual_seed(0)
    layers = [(f"layer{i}", nn.Linear(4 if i else 5, 4 if i < 7 else 3)) for i in range(8)]
    model = nn.Sequential(collections.OrderedDict(layers)).double()
    names = [n for n, _ in model.named_parameters()][:15]
    result = hessian_density(
        model, ce, classification_data(), n_runs=1, n_steps=3, grid=50, blocks={n: [n] for n in names}
    )
    axes = fplot.plot_block_densities(result)
    fig = axes[0].figure
    assert len(axes) == 15 and len(fig.axes) == 15  # the 16th cell removed
    width, height = fig.get_size_inches()
    assert width / height < 2  # a block, not a strip (one row was 3042 x 241 px)
    columns = sorted({round(ax.get_position().x0, 3) for ax in axes})
    rows = sorted({round(ax.get_position().y0, 3) for ax in axes})
    assert (len(columns), len(rows)) == (4, 4)
    assert [ax.get_title() for ax in axes] == names
    assert sum(ax.get_xlabel() == "eigenvalue" for ax in axes) == 4  # the bottom panel of each column
    assert sum(ax.get_ylabel() == "density" for ax in axes) == 4  # the first panel of each row
    assert len({ax.get_xlim() for ax in axes}) == 1
    wide = fplot.plot_block_densities(result, ncols=5)
    assert len({round(ax.get_position().y0, 3) for ax in wide}) == 3
    with pytest.raises(ValueError, match="ncols"):
        fplot.plot_block_densities(result, ncols=0)
    plt.close("all")


def test_contour_lines_have_a_colour_bar_naming_the_log10_scale(results):
    plane = results[1]
    for filled in (False, True):
        ax = fplot.plot_contour(plane, log=True, filled=filled)
        bars = [a for a in ax.figure.axes if a is not ax]
        assert len(bars) == 1 and bars[0].get_ylabel() == "log10 loss", filled
        assert fplot.plot_contour(plane, filled=filled).figure.axes[1].get_ylabel() == "loss"
    assert len(fplot.plot_contour(plane, log=True, colorbar=False).figure.axes) == 1
    plt.close("all")


def test_1d_metric_gets_a_legend_naming_both_axes(results):
    ax = fplot.plot_1d(results[0], metric="accuracy")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "accuracy"]
    twin = next(a for a in ax.figure.axes if a is not ax)
    assert ax.get_zorder() > twin.get_zorder()  # the legend is drawn above the dashed curve
    plt.close("all")


def test_plot_monitor_draws_a_trace_with_its_standard_error_band():
    from flatness import Monitor

    monitor = Monitor(
        ce, classification_data(), every=1, measures=["loss", "trace"], options={"trace": {"n_hvp": 8}}
    )
    model = make_mlp(0)
    for _ in range(3):
        monitor.step(model)
        with torch.no_grad():
            model[0].weight.mul_(1.1)
    ax = fplot.plot_monitor(monitor)
    assert [line.get_label() for line in ax.lines] == ["loss", "trace"]  # no line of standard errors
    (band,) = ax.collections
    assert band.get_label() == "trace ± 1 s.e."
    ys = band.get_paths()[0].vertices[:, 1]
    tr = np.array([r["trace"] for r in monitor.records])
    se = np.array([r["trace_std_error"] for r in monitor.records])
    assert se.min() > 0
    np.testing.assert_allclose([ys.min(), ys.max()], [(tr - se).min(), (tr + se).max()])
    plt.close("all")
