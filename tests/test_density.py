"""Stochastic Lanczos quadrature against the moments of a known spectrum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatness.spectrum import slq_density


def operator(lam, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(lam), len(lam))))
    H = torch.from_numpy((Q * lam) @ Q.T)
    return lambda v: H @ v


def test_integrates_to_one_and_weights_sum_to_one():
    lam = np.concatenate([np.random.default_rng(0).normal(0, 0.1, 90), [5, 8, 12]])
    d = slq_density(operator(lam), 93, n_runs=4, n_steps=20)
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-6)
    assert float(d.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert d.n_matvec <= 4 * 20
    assert d.nodes.shape == d.weights.shape == (4, 20)


def test_moments_match_traces_within_expected_error():
    rng = np.random.default_rng(1)
    n = 120
    lam = np.concatenate([rng.uniform(-1, 2, n - 4), [20, 15, 10, 8]])
    d = slq_density(operator(lam), n, n_runs=30, n_steps=15, seed=3)
    nodes = torch.nan_to_num(d.nodes)
    per_run_1 = (d.weights * nodes).sum(1) * d.n_runs  # each run's vᵀHv
    per_run_2 = (d.weights * nodes**2).sum(1) * d.n_runs  # each run's vᵀH²v
    for per_run, exact in ((per_run_1, lam.mean()), (per_run_2, (lam**2).mean())):
        se = float(per_run.std() / np.sqrt(d.n_runs))
        assert abs(float(per_run.mean()) - exact) <= 4 * se + 1e-12


def test_small_operator_is_exact_and_nodes_are_eigenvalues():
    lam = np.array([-1.0, 0.5, 2.0, 3.0])
    d = slq_density(operator(lam), 4, n_runs=2, n_steps=10, grid=torch.linspace(-3, 5, 2001), sigma=0.05)
    assert d.n_steps == 4
    found = d.nodes[torch.isfinite(d.nodes)].numpy()
    assert np.all(np.min(np.abs(found[:, None] - lam[None, :]), axis=1) < 1e-8)
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"n_runs": 0}, ValueError, "n_runs"),
        ({"n_steps": -1}, ValueError, "n_steps"),
        ({"sigma": 0.0}, ValueError, "sigma"),
        ({"grid": 1}, ValueError, "grid"),
        ({"grid": "fine"}, TypeError, "grid"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        slq_density(operator(np.ones(5)), 5, **kwargs)
