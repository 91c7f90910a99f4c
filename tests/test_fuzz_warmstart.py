"""Fuzzing warm starts: eigenvalue crossings (plain matrices) and parameters unfrozen between records.

A warm start v0 is the previous top eigenvector; after a crossing it is the new *second*
eigenvector, and λ₁ must still be found (issue 19: ``Monitor`` and ``hessian_topk(v0=…)``
returned λ₂ with ``converged=True``). The matrices are tensors (the numerical layer takes them
as operators): dense random rotations for small n, diagonal ones with the top pair at random
positions for large n (Lanczos and Gaussian starts are rotation invariant).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import classification_data, dense_hessian_oracle
from flatness import Monitor
from flatness.algorithms import lanczos_eigsh

F = nn.functional


@st.composite
def crossings(draw):
    """(H, u₁, u₂, λ₁, λ₂, bulk top): λ₁ = 1 > λ₂ = 1 − gap > a bulk, and their eigenvectors."""
    dense = draw(st.booleans())
    n = draw(st.integers(40, 200)) if dense else draw(st.integers(300, 3000))
    # the hard regime (issue 19's): λ₁ − λ₂ = 4–10% of λ₁, the bulk reaching 90–96% of λ₂
    gap = draw(st.floats(0.04, 0.1))
    lam2 = 1.0 - gap
    top = draw(st.floats(0.9, 0.96)) * lam2  # the bulk's largest eigenvalue
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        bulk = rng.uniform(0.0, top, n - 2)
    else:  # classifier-like: a few outliers and a bulk near 0
        k = min(draw(st.integers(0, 12)), n - 3)
        bulk = np.concatenate([rng.uniform(0.1 * top, top, k), rng.exponential(0.01 * top, n - 2 - k)])
    lam = np.concatenate([[1.0, lam2], np.minimum(bulk, top)])
    if dense:
        Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    else:
        Q = np.eye(n)[:, rng.permutation(n)]
    if dense:
        H = torch.from_numpy((Q * lam) @ Q.T)
        H = (H + H.T) / 2
    else:
        d = np.empty(n)
        d[np.argmax(Q, axis=0)] = lam
        H = torch.diag(torch.from_numpy(d))
    u = torch.from_numpy(Q[:, :2].T.copy())
    # v0's own random part: none, 1e-3 per coordinate, or a unit vector of weight 0.1 / 0.01
    # (how Monitor built its warm starts before issue 19)
    drift = draw(st.sampled_from([0.0, 1e-3, 0.1, 0.01]))
    return H, u, lam2, drift, seed


@given(crossings())
@settings(max_examples=25)
def test_warm_start_finds_lambda_1_after_a_crossing(case):
    """v0 = λ₂'s eigenvector (the previous top one) plus a random part: λ₁ from every start."""
    H, u, lam2, drift, seed = case
    n = H.shape[0]
    for start in range(3):
        g = torch.Generator().manual_seed(seed + start)
        noise = torch.randn(n, generator=g, dtype=torch.float64)
        v0 = u[1] + (drift * noise if drift < 0.01 else drift * noise / noise.norm())
        res = lanczos_eigsh(H, k=1, tol=1e-3, v0=v0, seed=start)
        assert res.converged
        assert float(res.eigenvalues[0]) == pytest.approx(1.0, abs=1e-3), (n, lam2, start, res.n_matvec)


@given(crossings())
@settings(max_examples=10)
def test_warm_start_without_a_crossing(case):
    """v0 = λ₁'s eigenvector moved by 0.05: λ₁, in at most a cold start's products + 3."""
    H, u, _lam2, _drift, seed = case
    n = H.shape[0]
    g = torch.Generator().manual_seed(seed)
    drift = torch.randn(n, generator=g, dtype=torch.float64)
    v0 = u[0] + 0.05 * drift / drift.norm()
    warm = lanczos_eigsh(H, k=1, tol=1e-3, v0=v0, seed=1)
    cold = lanczos_eigsh(H, k=1, tol=1e-3, seed=1)
    assert warm.converged and float(warm.eigenvalues[0]) == pytest.approx(1.0, abs=1e-3)
    assert warm.n_matvec <= cold.n_matvec + 3, (warm.n_matvec, cold.n_matvec)


@given(st.lists(st.sets(st.sampled_from([0, 2])), min_size=2, max_size=4))
@settings(max_examples=5)
def test_monitor_with_parameters_frozen_and_unfrozen_between_records(frozen_per_record):
    """Any sequence of frozen layers between records: each λ₁ matches the dense float64 oracle
    of the Hessian in that record's trainable parameters (no crash on the stored vector)."""
    x, y = classification_data(8, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    monitor = Monitor(
        F.cross_entropy, (x, y), every=1, measures=["top_eigenvalue"], options={"*": {"tol": 1e-8}}
    )
    for frozen in frozen_per_record:
        if len(frozen) == 2:
            frozen = {0}  # something must stay trainable
        for i in (0, 2):
            for p in model[i].parameters():
                p.requires_grad_(i not in frozen)
        row = monitor.step(model)
        H = dense_hessian_oracle(model, F.cross_entropy, x, y)[2]
        assert row["top_eigenvalue"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)
