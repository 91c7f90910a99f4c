"""lanczos_eigsh against numpy.linalg.eigh on quadratic operators with known spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.sparse.linalg import LinearOperator, eigsh

from flatness.spectrum import lanczos_eigsh


def random_symmetric(lam: np.ndarray, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((len(lam), len(lam))))
    H = (Q * lam) @ Q.T
    return torch.from_numpy((H + H.T) / 2)


@st.composite
def spectra(draw, kinds=("separated", "clustered", "negative")):
    n = draw(st.integers(30, 80))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if kind == "separated":
        lam = np.sort(rng.uniform(0, 1, n)) * 10 + np.arange(n)
    elif kind == "clustered":
        # Tight clusters of distinct eigenvalues, gaps 0.05 (slow convergence). Gaps far below
        # tol·|λ| (0.01 here) make a pair indistinguishable to any Krylov method: see "near-repeated".
        centers = rng.uniform(-1, 5, 4)
        idx = rng.integers(0, 4, n)
        rank = np.array([np.sum(idx[:i] == idx[i]) for i in range(n)])
        lam = centers[idx] + 0.05 * rank
    elif kind == "near-repeated":
        centers = rng.uniform(-1, 5, 4)
        lam = centers[rng.integers(0, 4, n)] + 1e-7 * rng.standard_normal(n)
    elif kind == "repeated":
        lam = np.round(rng.uniform(-3, 6, n))  # many exact repeats
    else:
        # Indefinite, gaps ≥ 0.05 (relative 5e-3 at the ends): a Krylov method resolves
        # eigenvalues to the tolerance only where their gaps exceed it.
        lam = rng.permutation(-10 + np.cumsum(rng.uniform(0.05, 0.3, n)))
    return lam, seed


def check_against_eigh(lam, seed, k, which, tol):
    H = random_symmetric(lam, seed)
    res = lanczos_eigsh(lambda v: H @ v, len(lam), k, which=which, tol=tol, seed=seed)
    ev = np.linalg.eigvalsh(H.numpy())
    by_magnitude = ev[np.argsort(-np.abs(ev), kind="stable")]
    ref = {"largest": ev[::-1], "smallest": ev, "magnitude": by_magnitude}[which]
    assert res.converged
    vals = res.eigenvalues.numpy()
    scale = np.abs(ev).max()
    # |θ − λ| ≤ ‖r‖ (Weyl / Bauer–Fike for symmetric H); the residual is ≤ tol·max(|θ|, tiny).
    bound = tol * np.maximum(np.abs(vals), 1e-5 * scale) + 1e-12 * scale
    if which == "magnitude":
        assert np.all(np.abs(np.abs(vals) - np.abs(ref[:k])) <= bound), (vals, ref[:k])
    else:
        assert np.all(np.abs(vals - ref[:k]) <= bound), (vals, ref[:k])
    # The residuals reported are the true ones.
    V = res.eigenvectors
    true = (V @ H - res.eigenvalues[:, None] * V).norm(dim=1)
    assert torch.allclose(res.residuals, true, rtol=1e-6, atol=1e-12 * scale)
    assert torch.allclose(V @ V.T, torch.eye(k, dtype=V.dtype), atol=1e-8)
    return res


@given(spectra(), st.integers(1, 6), st.sampled_from(["largest", "smallest", "magnitude"]))
def test_matches_eigh(spec, k, which):
    lam, seed = spec
    check_against_eigh(lam, seed, k, which, 1e-6)


@given(spectra(), st.sampled_from([1e-2, 1e-3, 1e-8]))
def test_tolerance_is_respected(spec, tol):
    """Every returned pair is certified: true residual ≤ tol·|λ|, so |θ − λ_nearest| ≤ residual.

    (At loose tol a start vector nearly orthogonal to the top eigenvector can converge to the
    next one first — for ARPACK too — so ordering against eigh is asserted at tight tol above.)
    """
    lam, seed = spec
    H = random_symmetric(lam, seed)
    res = lanczos_eigsh(lambda v: H @ v, len(lam), 3, tol=tol, seed=seed)
    vals, r = res.eigenvalues.numpy(), res.residuals.numpy()
    assert res.converged
    assert np.all(r <= tol * np.abs(vals) + 1e-12)
    ev = np.linalg.eigvalsh(H.numpy())[::-1]
    assert np.all(np.min(np.abs(vals[:, None] - ev[None, :]), axis=1) <= r + 1e-12)
    assert np.all(vals <= ev[:3] + 1e-12)


@given(spectra(kinds=("repeated", "near-repeated")), st.integers(1, 4))
def test_repeated_spectrum_gives_true_extreme_eigenvalues(spec, k):
    """Exactly repeated eigenvalues: every returned value is an eigenvalue, the top one is right.

    A single-vector Krylov method (ARPACK too) may return a repeated eigenvalue fewer times than
    its multiplicity; what it returns is still certified by its true residual.
    """
    lam, seed = spec
    H = random_symmetric(lam, seed)
    res = lanczos_eigsh(lambda v: H @ v, len(lam), k, tol=1e-6, seed=seed)
    assert res.converged
    ev = np.linalg.eigvalsh(H.numpy())[::-1]
    vals = res.eigenvalues.numpy()
    bound = 1e-5 * np.abs(ev).max()
    assert abs(vals[0] - ev[0]) <= bound
    # Each value is an eigenvalue of H, and (Cauchy interlacing) none exceeds the true i-th.
    assert np.all(np.min(np.abs(vals[:, None] - ev[None, :]), axis=1) <= bound)
    assert np.all(vals <= ev[:k] + bound)
    assert np.all(np.diff(vals) <= 0)


def test_no_more_matvecs_than_eigsh():
    rng = np.random.default_rng(3)
    n = 300
    lam = np.concatenate([rng.exponential(1, n - 30), rng.uniform(5, 50, 30)])
    H = random_symmetric(lam, 3)
    for k in (1, 5, 10):
        ours = lanczos_eigsh(lambda v: H @ v, n, k, tol=1e-3)
        # ARPACK's count depends on its start vector (random by default, so a single run is a
        # flaky oracle): the median over five seeded Gaussian starts.
        counts = []
        for seed in range(5):
            count = [0]

            def mv(x, count=count):
                count[0] += 1
                return H.numpy() @ x

            v0 = np.random.default_rng(seed).standard_normal(n)
            eigsh(LinearOperator((n, n), matvec=mv, dtype=np.float64), k=k, which="LA", tol=1e-3, v0=v0)
            counts.append(count[0])
        assert ours.converged
        assert ours.n_matvec <= np.median(counts), (k, ours.n_matvec, counts)


def test_small_operator_and_invariant_start():
    H = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    # v0 = e_1 spans an invariant subspace at once: the solver must continue from a new direction.
    v0 = torch.zeros(5, dtype=torch.float64)
    v0[0] = 1.0
    res = lanczos_eigsh(lambda v: H @ v, 5, 2, tol=1e-8, v0=v0)
    assert res.converged
    assert torch.allclose(res.eigenvalues, torch.tensor([5.0, 4.0], dtype=torch.float64))


def test_budget_exhausted_reports_not_converged():
    H = random_symmetric(np.linspace(1, 1.001, 200), 0)
    res = lanczos_eigsh(lambda v: H @ v, 200, 3, tol=1e-12, max_matvec=25)
    assert not res.converged
    assert res.n_matvec == 25
    assert res.eigenvalues.shape == (3,)


def test_float32_and_seed_independent_of_global_rng():
    H = random_symmetric(np.linspace(-1, 10, 50), 1).float()
    state = torch.get_rng_state()
    a = lanczos_eigsh(lambda v: H @ v, 50, 2, dtype=torch.float32, seed=7)
    torch.manual_seed(123)
    b = lanczos_eigsh(lambda v: H @ v, 50, 2, dtype=torch.float32, seed=7)
    torch.set_rng_state(state)
    assert a.eigenvalues.dtype == torch.float32
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    assert a.converged


def test_progress_callback():
    H = random_symmetric(np.linspace(0, 1, 40), 0)
    calls = []
    lanczos_eigsh(lambda v: H @ v, 40, 1, progress=lambda s, t, info: calls.append((s, t, info)))
    assert calls and calls[-1][0] == len(calls) and "rel_residual" in calls[-1][2]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"k": 0}, ValueError, "k: got 0"),
        ({"k": 10}, ValueError, "k: got 10"),
        ({"k": 2.0}, TypeError, "k: expected an int"),
        ({"tol": 0.0}, ValueError, "tol: got 0.0"),
        ({"tol": -1.0}, ValueError, "tol"),
        ({"which": "LA"}, ValueError, "which: got 'LA'"),
        ({"ncv": 1}, ValueError, "ncv: got 1"),
        ({"max_matvec": 0}, ValueError, "max_matvec"),
        ({"v0": torch.zeros(10)}, ValueError, "v0"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    H = torch.eye(10, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        lanczos_eigsh(lambda v: H @ v, 10, **kwargs)


def test_bad_matvec():
    with pytest.raises(TypeError, match="matvec"):
        lanczos_eigsh("not callable", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="matvec: returned 3"):
        lanczos_eigsh(lambda v: v[:3], 10)
