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
    np.testing.assert_allclose(ax.lines[0].get_ydata(), results[0].loss)
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
    ax = fplot.plot_contour(results[1], log=True, filled=True)
    star = [line for line in ax.lines if line.get_marker() == "*"]
    assert star and tuple(star[0].get_xydata()[0]) == (0.0, 0.0)
    assert fplot.plot_contour(results[1]).figure is not None
    ax3 = fplot.plot_surface(results[1])
    assert ax3.name == "3d"
    with pytest.raises(TypeError, match="2-D"):
        fplot.plot_contour(results[0])
    plt.close("all")


def test_spectrum_and_density_from_arrays_and_objects():
    class Spectrum:
        eigenvalues = torch.tensor([3.0, -1.0, 0.5])
        grid = np.linspace(-2, 4, 50)
        density = np.exp(-((np.linspace(-2, 4, 50) - 1) ** 2))

    assert fplot.plot_spectrum(Spectrum()).figure is not None
    assert fplot.plot_spectrum(np.array([1.0, 2.0]), log=True).figure is not None
    assert fplot.plot_density(Spectrum()).figure is not None
    t = np.linspace(-1, 1, 201)
    ax = fplot.plot_density(t, np.exp(-(t**2) / 1e-3))  # tails down to ~1e-434 (0 in float64)
    assert ax.get_ylim()[0] == pytest.approx(1e-10, rel=1e-6)
    ax = fplot.plot_spectrum(np.array([3.0, 2.0, 1.0]))
    assert all(float(v).is_integer() for v in ax.get_xticks())
    assert fplot.plot_density(Spectrum.grid, Spectrum.density, log=False).figure is not None
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
