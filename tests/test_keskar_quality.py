"""Quality of Keskar's φ with the default start on quadratics it was not tuned on.

At a minimum x* of f(θ) = ½ (θ − x*)ᵀ H (θ − x*) with H ⪰ 0, φ's maximum over the box
|y_i| ≤ ε(|x_i| + 1) lies at a vertex (a convex function peaks at a corner), so the exact φ is
a search over all 2ⁿ vertices (2ⁿ⁻¹: f is even in y). The families below (dimension 3–12;
log-uniform, power-law, near-singular, clustered, Wishart and two-level spectra; Haar,
Givens-product and block rotations; centres from 1e-3 to heavy-tailed, so box widths vary by
orders of magnitude; ε from 1e-4 to 1e-2) were written after the search was tuned, on other
families (``benchmarks/bench_keskar_quality.py``). Every φ goes through :func:`sharpness` on a
model whose full-data loss is the quadratic.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import quadratic_problem
from flatness import sharpness
from flatness.algorithms.maximize import vertex_search

D = torch.float64
SPECTRA = ("logwide", "power", "nearsingular", "cluster", "wishart", "twolevel")
ROTATIONS = ("haar", "givens", "blocks")
CENTRES = ("gauss", "tiny", "cauchy", "spread")


def _rotation(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    if kind == "haar":
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return q * np.sign(np.diag(r))
    if kind == "givens":  # a product of 3n plane rotations: sparser couplings
        q = np.eye(n)
        for _ in range(3 * n):
            i, j = rng.choice(n, 2, replace=False)
            c, s = math.cos(a := rng.uniform(0, 2 * math.pi)), math.sin(a)
            qi, qj = q[:, i].copy(), q[:, j].copy()
            q[:, i], q[:, j] = c * qi - s * qj, s * qi + c * qj
        return q
    # Haar blocks of 2–4 coordinates on a random permutation.
    q, start, perm = np.zeros((n, n)), 0, rng.permutation(n)
    while start < n:
        size = min(int(rng.integers(2, 5)), n - start)
        block, r = np.linalg.qr(rng.standard_normal((size, size)))
        idx = perm[start : start + size]
        q[np.ix_(idx, idx)] = block * np.sign(np.diag(r))
        start += size
    return q


def held_out_problem(seed: int, n: int, spectrum: str, rotation: str, centre: str) -> tuple:
    """(H, x, ε): a PSD H, the centre x = x* and the box size."""
    rng = np.random.default_rng(seed)
    if spectrum == "wishart":
        b = rng.standard_normal((n, int(rng.integers(max(1, n // 2), 2 * n + 1))))
        h = b @ b.T / b.shape[1]
    else:
        if spectrum == "logwide":
            lam = 10 ** rng.uniform(-5, 1, n)
        elif spectrum == "power":
            lam = np.arange(1, n + 1) ** -rng.uniform(0.5, 4)
        elif spectrum == "nearsingular":
            lam = np.full(n, 10 ** rng.uniform(-9, -5))
            r = int(rng.integers(1, n))
            lam[:r] = rng.uniform(0.1, 3, r)
        elif spectrum == "cluster":
            lam = rng.uniform(0, 0.5, n)
            lam[: int(rng.integers(2, 4))] = rng.uniform(0.95, 1.0)
        else:  # two levels far apart
            lam = np.where(rng.random(n) < 0.5, 1.0, 10 ** rng.uniform(-4, -1))
        q = _rotation(rng, n, rotation)
        h = (q * lam) @ q.T
    h = (h + h.T) / 2
    if centre == "gauss":
        x = rng.standard_normal(n)
    elif centre == "tiny":
        x = 1e-3 * rng.standard_normal(n)
    elif centre == "cauchy":
        x = rng.standard_cauchy(n)
    else:  # per-coordinate scales over five decades: box widths differ by up to ~100x
        x = rng.standard_normal(n) * 10 ** rng.uniform(-3, 2, n)
    return h, x, float(10 ** rng.uniform(-4, -2))


def exact_phi(h: np.ndarray, x: np.ndarray, epsilon: float) -> float:
    """φ at the minimum (f(x) = 0): 100 · max over the 2ⁿ⁻¹ vertex pairs of ½ yᵀHy."""
    e = epsilon * (np.abs(x) + 1)
    signs = np.array(list(itertools.product((-1.0, 1.0), repeat=len(e) - 1)))
    y = np.column_stack([np.ones(len(signs)), signs]) * e
    return 100 * float(np.max(0.5 * np.einsum("ij,jk,ik->i", y, h, y)))


def ratio(seed: int, n: int, spectrum: str, rotation: str, centre: str) -> tuple[float, int]:
    h, x, epsilon = held_out_problem(seed, n, spectrum, rotation, centre)
    exact = exact_phi(h, x, epsilon)
    res = sharpness(*quadratic_problem(torch.tensor(h), torch.tensor(x), 0.0), epsilon=epsilon, seed=seed)
    assert res.value <= exact * (1 + 1e-9), (res.value, exact)  # never above the true maximum
    return res.value / exact, res.n_evals


CASES = [
    (1000 + i, 3 + i % 10, SPECTRA[i % 6], ROTATIONS[(i // 6) % 3], CENTRES[(i // 18) % 4]) for i in range(72)
]


def test_default_start_on_held_out_quadratics():
    # 72 fixed problems: every spectrum × rotation × centre, dimensions 3–12. Measured with
    # the default start: mean 0.996, worst 0.824 (a clustered spectrum), mean n_evals 8.4; the
    # previous default (the better of the gradient and curvature vertices): mean 0.969, worst
    # 0.708, 7.8 evaluations (fails); start="keskar": mean 0.875, worst 0.249.
    results = [ratio(*case) for case in CASES]
    ratios = [r for r, _ in results]
    assert np.mean(ratios) >= 0.95, np.mean(ratios)
    assert min(ratios) >= 0.8, (min(ratios), CASES[int(np.argmin(ratios))])
    assert np.mean([e for _, e in results]) <= 12  # the pass at x included


@st.composite
def families(draw: st.DrawFn) -> list[tuple[int, int, str, str, str]]:
    """A batch of 12 held-out problems: seeds, dimensions and family parts drawn at random."""
    return [
        (
            draw(st.integers(0, 2**31 - 1)),
            draw(st.integers(3, 12)),
            draw(st.sampled_from(SPECTRA)),
            draw(st.sampled_from(ROTATIONS)),
            draw(st.sampled_from(CENTRES)),
        )
        for _ in range(12)
    ]


@settings(max_examples=6, derandomize=True, deadline=None, database=None)
@given(families())
def test_default_start_on_held_out_families_hypothesis(batch):
    # A fixed (derandomized) set of 6 batches of 12: each batch's mean ≥ 0.95, each ratio ≥ 0.8.
    # Measured: mean 0.9985, worst 0.925 over the 72; the previous default: worst 0.760 (fails
    # in three of the six batches).
    ratios = [ratio(*case)[0] for case in batch]
    assert np.mean(ratios) >= 0.95, (np.mean(ratios), batch)
    assert min(ratios) >= 0.8, (min(ratios), batch[int(np.argmin(ratios))])


# ---------------------------------------------------------------------------- vertex_search
def _quadratic(h: np.ndarray, g: np.ndarray):
    calls = []

    def f(y: np.ndarray) -> tuple[float, np.ndarray]:
        calls.append(np.array(y))
        return float(g @ y + 0.5 * y @ h @ y), g + h @ y

    return f, calls


def test_vertex_search_finds_the_exact_vertex_of_a_low_rank_quadratic():
    # Rank 2: the model is exact after two Lanczos steps, and the model's best vertex (a
    # Goemans–Williamson rounding plus the sign iteration) is the exact maximizer.
    rng = np.random.default_rng(0)
    n = 12
    b = rng.standard_normal((n, 2))
    h, half = b @ b.T, rng.uniform(0.5, 2, n)
    f, calls = _quadratic(h, np.zeros(n))
    s, used = vertex_search(f, half, g0=np.zeros(n), z0=np.ones(n), steps=3, probes=4, rng=rng)
    assert used == len(calls) <= 7
    m = (half[:, None] * h) * half[None, :]
    signs = np.array(list(itertools.product((-1.0, 1.0), repeat=n)))
    exact = float(np.max(0.5 * np.einsum("ij,jk,ik->i", signs, m, signs)))
    assert np.all(np.abs(s) == 1)
    assert math.isclose(0.5 * s @ m @ s, exact, rel_tol=1e-12)


def test_vertex_search_follows_the_gradient_and_counts_its_calls():
    # A linear function: the maximum is the gradient-sign vertex, found at the first call.
    rng = np.random.default_rng(1)
    n = 7
    g, half = rng.standard_normal(n), rng.uniform(0.1, 1, n)
    f, calls = _quadratic(np.zeros((n, n)), g)
    s, used = vertex_search(f, half, g0=g, z0=np.sign(g), steps=5, probes=4, rng=rng)
    np.testing.assert_array_equal(s, np.sign(g))
    assert used == len(calls) <= 9


def test_vertex_search_indefinite_model_may_stop_inside_a_face():
    # H = diag(1, −1): the maximum of ½(y₁² − y₂²) over the square is at y = (±1, 0), inside
    # an edge. The search returns a point of the box, not a vertex, there.
    h = np.diag([1.0, -1.0])
    f, _ = _quadratic(h, np.zeros(2))
    s, _ = vertex_search(
        f,
        np.ones(2),
        g0=np.zeros(2),
        z0=np.array([1.0, 1.0]),
        steps=2,
        probes=3,
        rng=np.random.default_rng(0),
    )
    assert abs(abs(s[0]) - 1) < 1e-9 and abs(s[1]) < 1e-6, s


@pytest.mark.parametrize("probes", [0, 2])
def test_vertex_search_respects_its_budget(probes):
    rng = np.random.default_rng(2)
    n = 10
    b = rng.standard_normal((n, n))
    f, calls = _quadratic(b @ b.T, np.zeros(n))
    _, used = vertex_search(f, np.ones(n), g0=np.zeros(n), z0=np.ones(n), steps=3, probes=probes, rng=rng)
    assert used == len(calls) <= 3 + probes


@pytest.mark.parametrize("max_evals", [1, 2, 3, 5, 9, 12])
def test_default_start_keeps_the_evaluation_cap(max_evals):
    # The search and L-BFGS-B share max_evals; the pass at x comes on top.
    h, x, epsilon = held_out_problem(7, 10, "cluster", "haar", "gauss")
    res = sharpness(
        *quadratic_problem(torch.tensor(h), torch.tensor(x), 0.0),
        epsilon=epsilon,
        max_evals=max_evals,
        seed=1,
    )
    assert 2 <= res.n_evals <= max_evals + 1
    assert 0 < res.value <= exact_phi(h, x, epsilon) * (1 + 1e-9)
