"""Hutchinson and Hutch++ against exact traces of quadratic operators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatness.spectrum import hutchinson, hutchpp, trace_estimate


def operator(lam, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(lam), len(lam))))
    H = torch.from_numpy((Q * lam) @ Q.T)
    return (lambda v: H @ v), H


@pytest.mark.parametrize("fn", [hutchinson, hutchpp])
def test_unbiased_over_seeds(fn):
    lam = np.random.default_rng(1).uniform(-1, 3, 60)
    mv, _ = operator(lam)
    runs = [fn(mv, 60, n_matvec=12, seed=s) for s in range(150)]
    est = np.array([r.estimate for r in runs])
    se = est.std(ddof=1) / np.sqrt(len(est))
    assert abs(est.mean() - lam.sum()) <= 4 * se
    # The reported std_error matches the spread of the estimates (within a factor 1.5).
    reported = np.sqrt(np.mean([r.std_error**2 for r in runs]))
    assert 1 / 1.5 <= reported / est.std(ddof=1) <= 1.5


def test_hutchpp_beats_hutchinson_with_a_few_large_eigenvalues():
    rng = np.random.default_rng(2)
    lam = np.concatenate([rng.uniform(0, 0.1, 195), [100, 80, 60, 40, 20]])
    mv, _ = operator(lam)
    exact = lam.sum()
    err_h = np.mean([abs(hutchinson(mv, 200, n_matvec=30, seed=s).estimate - exact) for s in range(20)])
    err_pp = np.mean([abs(hutchpp(mv, 200, n_matvec=30, seed=s).estimate - exact) for s in range(20)])
    assert err_pp < err_h / 10


def test_hutchpp_exact_when_sketch_covers_the_space():
    mv, H = operator(np.linspace(-2, 5, 6))
    r = hutchpp(mv, 6, n_matvec=30)
    assert r.sketch_size == 6
    assert abs(r.estimate - float(torch.trace(H))) < 1e-10


def test_counts_and_dispatch():
    mv, _ = operator(np.ones(10))
    r = trace_estimate(mv, 10, method="hutch++", n_matvec=10)
    assert (r.method, r.n_matvec, r.sketch_size, r.n_probes) == ("hutch++", 10, 3, 4)
    assert trace_estimate(mv, 10, method="hutchinson", n_matvec=5).estimate == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"method": "xtrace", "n_matvec": 10}, ValueError, "method: got 'xtrace'"),
        ({"method": "hutch++", "n_matvec": 3}, ValueError, "n_matvec: got 3"),
        ({"method": "hutchinson", "n_matvec": 1}, ValueError, "n_matvec: got 1"),
        ({"method": "hutchinson", "n_matvec": 0}, ValueError, "n_matvec"),
        ({"method": "hutchinson", "n_matvec": 2.5}, TypeError, "n_matvec"),
        ({"method": "hutchinson", "n_matvec": 4, "seed": "a"}, TypeError, "seed"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    mv, _ = operator(np.ones(5))
    with pytest.raises(exc, match=match):
        trace_estimate(mv, 5, **kwargs)


def test_probes_one_at_a_time_are_the_probes_drawn_at_once():
    """Memory: one probe in memory at a time, yet the same probes (and estimates) as drawn at once."""
    from flatness.algorithms import VectorSpace, hutchinson, hutchpp
    from flatness.algorithms._linalg import generator

    g = torch.Generator().manual_seed(0)
    B = torch.randn(60, 60, generator=g, dtype=torch.float64)
    A = B @ B.T / 60 + torch.diag(torch.linspace(0, 5, 60, dtype=torch.float64))
    space = VectorSpace(60, dtype=torch.float64, device="cpu")
    Z = space.rademacher(generator(4), 9)
    at_once = float(torch.stack([z @ A @ z for z in Z]).mean())
    assert hutchinson(A, n_matvec=9, seed=4).estimate == pytest.approx(at_once, rel=1e-14)
    # Hutch++: the sketch, then the residual probes, from one stream in that order.
    gen = generator(4)
    S = space.rademacher(gen, 3)
    Q = torch.linalg.qr(A @ S.T).Q.T
    G = space.rademacher(gen, 3)
    G = G - (G @ Q.T) @ Q
    ref = float(torch.trace(Q @ A @ Q.T)) + float(torch.stack([x @ A @ x for x in G]).mean())
    assert hutchpp(A, n_matvec=9, seed=4).estimate == pytest.approx(ref, rel=1e-12)
