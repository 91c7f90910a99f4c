"""Every public result type has a short repr at a realistic size; BlockSpectra is a Mapping."""

from __future__ import annotations

import collections.abc
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from conftest import classification_data
from flatness import (
    adaptive_sharpness,
    average_sharpness,
    hessian_density,
    hessian_topk,
    hessian_trace,
    interpolate,
    landscape_1d,
    landscape_2d,
    pca_directions,
    sharpness,
)
from flatness.algorithms import lanczos_eigsh, maximize_box, slq_density, trace_estimate
from flatness.results import Result

ce = nn.functional.cross_entropy
LIMIT = 3000  # characters: "a few thousand", whatever the model's size


def deep_mlp(seed: int = 0) -> nn.Module:
    """8 linear layers (16 parameter tensors, 7,863 parameters) with long names."""
    torch.manual_seed(seed)
    widths = [5, 40, 40, 40, 40, 40, 20, 10, 3]
    layers: list[tuple[str, nn.Module]] = []
    for i in range(len(widths) - 1):
        layers += [
            (f"encoder_block_{i}_projection", nn.Linear(widths[i], widths[i + 1])),
            (f"act{i}", nn.Tanh()),
        ]
    return nn.Sequential(collections.OrderedDict(layers[:-1])).double()


@pytest.fixture(scope="module")
def results():
    model, data = deep_mlp(0), classification_data(40)
    n = sum(p.numel() for p in model.parameters())
    A = torch.randn(300, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A = A + A.T
    out = {
        "HessianTopK": hessian_topk(model, ce, data, k=5, tol=1e-2),
        "HessianTrace": hessian_trace(model, ce, data, n_hvp=8),
        # The case: the default grid of 1,000 points (427,052 characters before).
        "HessianDensity": hessian_density(model, ce, data, n_runs=4, n_steps=20),
        "BlockSpectra(density)": hessian_density(model, ce, data, n_runs=1, n_steps=4, blocks="parameter"),
        "BlockSpectra(topk)": hessian_topk(model, ce, data, k=1, tol=1e-1, blocks="parameter"),
        "SharpnessResult": sharpness(model, ce, data, epsilon=1e-3, max_iter=2),
        "AdaptiveSharpnessResult": adaptive_sharpness(model, ce, data, rho=1e-3, max_iter=2),
        "AverageSharpnessResult": average_sharpness(model, ce, data, rho=1e-3, n_samples=3),
        "LanczosResult": lanczos_eigsh(A, k=3),
        "TraceResult": trace_estimate(A, n_matvec=20),
        "DensityResult": slq_density(A, n_runs=4, n_steps=30),
        "MaximizeResult": maximize_box(
            lambda x: (float(-(x**2).sum()), -2 * x), -np.ones(n), np.ones(n), x0=np.full(n, 0.5), max_iter=3
        ),
        "Interpolation": interpolate(model, deep_mlp(1), ce, data, alphas=np.linspace(-1, 2, 61)),
        "Landscape1D": landscape_1d(model, ce, data, alphas=np.linspace(-1, 1, 41)),
        "Landscape2D": landscape_2d(
            model, ce, data, alphas=np.linspace(-1, 1, 21), betas=np.linspace(-1, 1, 21)
        ),
        "TrajectoryPCA": pca_directions(model, [deep_mlp(s) for s in (1, 2, 3)]),
    }
    return out


def test_every_public_result_type_is_covered(results):
    import flatness
    import flatness.algorithms
    import flatness.landscape
    import flatness.landscape.directions
    import flatness.sharpness
    import flatness.spectrum

    modules = (flatness, flatness.algorithms, flatness.landscape, flatness.landscape.directions)
    public = {
        obj
        for mod in (*modules, flatness.sharpness, flatness.spectrum)
        for obj in vars(mod).values()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and issubclass(obj, Result)
    }
    public -= {Result, flatness.landscape.LandscapeResult}  # the bases
    covered = {type(r) for r in results.values()}
    assert public <= covered, sorted(c.__name__ for c in public - covered)


def test_reprs_are_short_and_keep_the_answer(results):
    for name, result in results.items():
        text = repr(result)
        assert len(text) <= LIMIT and "\n" not in text, (name, len(text))
        assert text.startswith(type(result).__name__ + "(")
    density = repr(results["HessianDensity"])
    assert "grid=tensor(shape=(1000,), dtype=float64, min=" in density and "n_runs=4" in density
    # Up to 8 numbers are shown as numbers: the five eigenvalues are readable.
    top = results["HessianTopK"]
    assert repr(top.eigenvalues.detach()) in repr(top)
    assert "eigenvectors=tensor(shape=(5, 7863), dtype=float64" in repr(top)
    landscape = repr(results["Landscape2D"])
    assert (
        "loss=array(shape=(21, 21), dtype=float64" in landscape
        and "done=array(shape=(21, 21), dtype=bool, 441 true)" in landscape
    )
    blocks = repr(results["BlockSpectra(density)"])
    assert "… (+10 more)" in blocks  # 16 blocks: the first 6 shown
    # The fields themselves are untouched.
    assert results["HessianDensity"].grid.shape == (1000,)


def test_block_spectra_is_a_mapping(results):
    spectra = results["BlockSpectra(topk)"]
    assert isinstance(spectra, collections.abc.Mapping)
    names = [n for n, _ in deep_mlp().named_parameters()]
    assert list(spectra.keys()) == list(spectra) == names
    assert dict(spectra.items()) == spectra.blocks and list(spectra.values()) == list(spectra.blocks.values())
    assert names[0] in spectra and "nope" not in spectra and spectra.get("nope") is None
    assert len(spectra) == 16 and spectra[names[0]] is spectra.blocks[names[0]]
