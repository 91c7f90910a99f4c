"""Sharpness measures against exact oracles on quadratics and invariances."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import assert_untouched, classification_data, make_mlp, quadratic_problem, snapshot, split
from flatness import Objective, adaptive_sharpness, average_sharpness, sharpness
from flatness.algorithms.maximize import maximize_ball, maximize_box

D = torch.float64


# ---------------------------------------------------------------------------- oracles
def box_oracle(h: torch.Tensor, delta: torch.Tensor, e: torch.Tensor) -> float:
    """max over |y_i| ≤ e_i of ½ Σ h_i (δ_i + y_i)² (separable)."""
    pos = 0.5 * h * (delta.abs() + e) ** 2
    neg = 0.5 * h * (delta.abs() - e).clamp(min=0) ** 2
    return float(torch.where(h > 0, pos, torch.where(h < 0, neg, torch.zeros_like(h))).sum())


def keskar_oracle(h, x_star, c, theta, epsilon) -> float:
    delta = theta - x_star
    f0 = c + 0.5 * float((h * delta * delta).sum())
    fmax = c + box_oracle(h, delta, epsilon * (theta.abs() + 1))
    return (fmax - f0) / (1 + f0) * 100


def random_symmetric(n: int, eigenvalues, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=D)) @ q.T


@st.composite
def diagonal_problems(draw, positive: bool = False, at_min: bool | None = None):
    n = draw(st.integers(1, 5))
    # |h| >= 1e-2 or exactly 0: L-BFGS-B's stopping test is relative to max(|f|, 1), so
    # gains of ~1e-9 from curvatures of ~1e-7 are below what "rel err < 1e-6" can resolve.
    signed = st.one_of(st.floats(1e-2, 10), st.floats(-10, -1e-2), st.just(0.0))
    curv = st.floats(0.1, 10) if positive else signed
    h = torch.tensor(draw(st.lists(curv, min_size=n, max_size=n)), dtype=D)
    x_star = torch.tensor(draw(st.lists(st.floats(-2, 2), min_size=n, max_size=n)), dtype=D)
    at_min = draw(st.booleans()) if at_min is None else at_min
    if at_min:
        theta = x_star.clone()
    else:
        theta = x_star + torch.tensor(draw(st.lists(st.floats(-0.5, 0.5), min_size=n, max_size=n)), dtype=D)
    # A loss is >= 0 and 1 + f(x) > 0 in φ's denominator.
    c = 0.5 * float((h.abs() * (theta - x_star) ** 2).sum()) + draw(st.floats(0, 2))
    return h, x_star, c, theta


def close(a: float, b: float, rel: float, abs_: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


# ---------------------------------------------------------------------------- Keskar: oracles
@given(diagonal_problems(), st.floats(1e-2, 0.3), st.integers(0, 3))
def test_keskar_diagonal_closed_form(problem, epsilon, seed):
    h, x_star, c, theta = problem
    model, loss_fn, data = quadratic_problem(torch.diag(h), x_star, c, theta)
    res = sharpness(model, loss_fn, data, epsilon=epsilon, max_iter=500, tol=1e-15, seed=seed)
    expected = keskar_oracle(h, x_star, c, theta, epsilon)
    assert close(res.value, expected, 1e-6), (res.value, expected, res.message)
    assert close(res.loss, c + 0.5 * float((h * (theta - x_star) ** 2).sum()), 1e-12)


@given(diagonal_problems(positive=True, at_min=True), st.sampled_from([1e-3, 5e-4]))
def test_keskar_default_budget_at_minimum(problem, epsilon):
    h, x_star, c, theta = problem
    model, loss_fn, data = quadratic_problem(torch.diag(h), x_star, c, theta)
    res = sharpness(model, loss_fn, data, epsilon=epsilon)
    expected = keskar_oracle(h, x_star, c, theta, epsilon)
    assert expected > 0
    assert abs(res.value - expected) <= 0.1 * expected, (res.value, expected)


@given(st.integers(1, 5), st.integers(0, 10_000), st.floats(1e-3, 0.2))
def test_keskar_general_symmetric_at_minimum_bounds(n, seed, epsilon):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=g, dtype=D) * 3
    H = (b + b.T) / 2
    x_star = torch.randn(n, generator=g, dtype=D)
    model, loss_fn, data = quadratic_problem(H, x_star, 0.0)
    res = sharpness(model, loss_fn, data, epsilon=epsilon, seed=seed)
    gain = res.max_loss - res.loss
    e = epsilon * (x_star.abs() + 1)
    bound = 0.5 * max(float(torch.linalg.eigvalsh(H).max()), 0.0) * float(e @ e)
    assert -1e-15 <= gain <= bound * (1 + 1e-9) + 1e-15
    assert res.value >= 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keskar_non_decreasing_in_epsilon(seed):
    H = random_symmetric(6, [5.0, 3.0, 1.0, 0.5, -1.0, -2.0], seed)
    x_star = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=D)
    for theta in (x_star, x_star + 0.1):
        model, loss_fn, data = quadratic_problem(H, x_star, 0.5, theta)
        values = [
            sharpness(model, loss_fn, data, epsilon=eps, max_iter=200).value
            for eps in (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2)
        ]
        assert all(b >= a * (1 - 1e-9) for a, b in itertools.pairwise(values)), values
        assert values[0] > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_keskar_permutation_invariant(seed):
    n = 6
    H = random_symmetric(n, [4.0, 2.0, 1.0, 0.3, -0.5, -3.0], seed)
    g = torch.Generator().manual_seed(seed)
    x_star = torch.randn(n, generator=g, dtype=D)
    theta = x_star + 0.2 * torch.randn(n, generator=g, dtype=D)
    perm = torch.randperm(n, generator=g)
    ref = sharpness(*quadratic_problem(H, x_star, 1.0, theta), epsilon=0.05, max_iter=300)
    permuted = sharpness(
        *quadratic_problem(H[perm][:, perm], x_star[perm], 1.0, theta[perm]), epsilon=0.05, max_iter=300
    )
    assert close(permuted.value, ref.value, 1e-6)
    assert torch.allclose(permuted.perturbation["theta"], ref.perturbation["theta"][perm], atol=1e-6)


def test_keskar_zero_gradient_start_ascends():
    # At an exact minimum a start at y = 0 would report 0.
    H = random_symmetric(4, [2.0, 1.0, 0.5, 0.1], 0)
    res = sharpness(*quadratic_problem(H, torch.zeros(4, dtype=D), 0.0), epsilon=1e-3)
    assert res.value > 0.5 * 0.1 * 4 * 1e-6 * 100
    assert res.max_loss > res.loss


# ---------------------------------------------------------------------------- Keskar: subspace
def test_subspace_identity_reproduces_full_space():
    H = random_symmetric(5, [3.0, 1.0, 0.2, -0.4, -2.0], 3)
    x_star = torch.linspace(-1, 1, 5, dtype=D)
    for theta in (x_star, x_star + 0.3):
        problem = quadratic_problem(H, x_star, 1.0, theta)
        full = sharpness(*problem, epsilon=0.01, max_iter=50)
        sub = sharpness(*problem, epsilon=0.01, max_iter=50, subspace=torch.eye(5, dtype=D))
        assert close(sub.value, full.value, 1e-9)
        assert torch.allclose(sub.perturbation["theta"], full.perturbation["theta"], atol=1e-12)
        assert sub.subspace == 5 and full.subspace is None


def test_subspace_random_is_seeded_and_bounded():
    n, p = 8, 3
    H = random_symmetric(n, np.linspace(-1, 4, n), 0)
    x_star = torch.linspace(-1, 1, n, dtype=D)
    problem = quadratic_problem(H, x_star, 0.0)
    a = sharpness(*problem, epsilon=0.01, subspace=p, seed=5)
    b = sharpness(*problem, epsilon=0.01, subspace=p, seed=5)
    c = sharpness(*problem, epsilon=0.01, subspace=p, seed=6)
    assert a.value == b.value and torch.equal(a.perturbation["theta"], b.perturbation["theta"])
    assert a.value != c.value
    assert a.subspace == p
    # The perturbation lies in a p-dimensional subspace: at most λ_max⁺ of H times its size.
    d = a.perturbation["theta"]
    assert a.max_loss - a.loss <= 0.5 * 4 * float(d @ d) * (1 + 1e-9)
    assert a.value > 0


def test_subspace_numpy_matrix_and_rank_deficient():
    H = torch.diag(torch.tensor([2.0, 1.0, 3.0], dtype=D))
    x_star = torch.tensor([0.4, -1.0, 2.0], dtype=D)
    theta = torch.tensor([0.5, -1.0, 2.0], dtype=D)
    problem = quadratic_problem(H, x_star, 0.0, theta)
    # Only the first coordinate, given twice: A⁺x = (x₁/2, x₁/2), so e = ε(0.25 + 1) each.
    A = np.array([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    res = sharpness(*problem, epsilon=0.1, subspace=A, max_iter=50)
    e = 0.1 * (0.25 + 1)
    assert close(res.max_loss, 0.5 * 2.0 * (0.1 + 2 * e) ** 2, 1e-9)


# ---------------------------------------------------------------------------- adaptive / average
@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_l2_top_eigenvalue_of_CHC(adaptive, seed):
    n = 6
    H = random_symmetric(n, [5.0, 2.0, 1.0, 0.5, -1.0, -4.0], seed)
    x_star = torch.randn(n, generator=torch.Generator().manual_seed(seed + 10), dtype=D)
    C = torch.diag(x_star.abs()) if adaptive else torch.eye(n, dtype=D)
    rho = 0.3
    res = adaptive_sharpness(
        *quadratic_problem(H, x_star, 0.0), rho=rho, p=2, adaptive=adaptive, max_iter=400
    )
    expected = 0.5 * rho**2 * float(torch.linalg.eigvalsh(C @ H @ C).max())
    assert close(res.value, expected, 1e-6), (res.value, expected, res.message)
    z = res.perturbation["theta"] / torch.diagonal(C)
    assert float(z.norm()) <= rho * (1 + 1e-12)


def test_adaptive_l2_default_budget_is_close():
    H = random_symmetric(6, [5.0, 2.0, 1.0, 0.5, 0.2, -1.0], 4)
    x_star = torch.linspace(-2, 2, 6, dtype=D)
    C = torch.diag(x_star.abs())
    res = adaptive_sharpness(*quadratic_problem(H, x_star, 0.0), rho=0.1)
    expected = 0.5 * 0.01 * float(torch.linalg.eigvalsh(C @ H @ C).max())
    assert res.n_evals == 2 + res.nit <= 22
    assert abs(res.value - expected) <= 0.05 * expected


@given(diagonal_problems(), st.floats(1e-2, 0.5), st.floats(0, 0.5), st.sampled_from([math.inf, "inf"]))
def test_adaptive_linf_diagonal_closed_form(problem, rho, eta, p):
    h, x_star, c, theta = problem
    res = adaptive_sharpness(
        *quadratic_problem(torch.diag(h), x_star, c, theta), rho=rho, p=p, eta=eta, max_iter=500, tol=1e-15
    )
    expected = box_oracle(h, theta - x_star, rho * (theta.abs() + eta)) - 0.5 * float(
        (h * (theta - x_star) ** 2).sum()
    )
    assert close(res.value, expected, 1e-6), (res.value, expected, res.message)
    assert res.p == math.inf


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("at_min", [True, False])
def test_average_sharpness_closed_form(adaptive, at_min):
    n = 5
    H = random_symmetric(n, [3.0, 2.0, 1.0, 0.5, -0.5], 7)
    x_star = torch.linspace(-1.5, 1.5, n, dtype=D)
    theta = x_star if at_min else x_star + 0.2
    c = (theta.abs() if adaptive else torch.ones(n, dtype=D)) + 0.0
    rho = 0.2
    res = average_sharpness(
        *quadratic_problem(H, x_star, 0.0, theta), rho=rho, n_samples=800, adaptive=adaptive
    )
    # E[½(δ+u)ᵀH(δ+u)] − ½δᵀHδ = ½ ρ² Σ c_i² H_ii (the linear term vanishes in expectation).
    expected = 0.5 * rho**2 * float((c**2 * torch.diagonal(H)).sum())
    assert 0 < res.std_error < 0.15 * abs(expected)
    assert abs(res.value - expected) <= 4 * res.std_error
    assert res.n_evals == 801


# ---------------------------------------------------------------------------- Dinh et al.
def relu_net(alpha: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False)).to(D)
    with torch.no_grad():
        net[0].weight.mul_(alpha)
        net[2].weight.div_(alpha)
    return net


def test_dinh_rescaling_adaptive_invariant_keskar_not(ce):
    data = classification_data(n=20, d=4)
    net, scaled = relu_net(), relu_net(3.0)
    x, _ = data
    assert torch.allclose(net(x), scaled(x), atol=1e-12)  # the same function
    for p in (2, math.inf):
        a = adaptive_sharpness(net, ce, data, rho=0.05, p=p, max_iter=30)
        b = adaptive_sharpness(scaled, ce, data, rho=0.05, p=p, max_iter=30)
        assert a.value > 1e-4
        assert close(a.value, b.value, 1e-6), (p, a.value, b.value)
    avg_a = average_sharpness(net, ce, data, rho=0.05, n_samples=20)
    avg_b = average_sharpness(scaled, ce, data, rho=0.05, n_samples=20)
    assert close(avg_a.value, avg_b.value, 1e-8)
    k_a = sharpness(net, ce, data, epsilon=1e-2)
    k_b = sharpness(scaled, ce, data, epsilon=1e-2)
    assert k_a.value > 0 and abs(k_b.value - k_a.value) > 0.2 * k_a.value, (k_a.value, k_b.value)
    # The standard (non-adaptive) ball is not invariant either.
    s_a = adaptive_sharpness(net, ce, data, rho=0.05, adaptive=False)
    s_b = adaptive_sharpness(scaled, ce, data, rho=0.05, adaptive=False)
    assert abs(s_b.value - s_a.value) > 0.2 * s_a.value


# ---------------------------------------------------------------------------- networks
def test_full_data_size_weighted_and_consistent(ce):
    model = make_mlp()
    x, y = classification_data(n=23)
    whole = sharpness(model, ce, (x, y), epsilon=1e-2)
    batches = sharpness(model, ce, split(x, y, [10, 10, 3]), epsilon=1e-2)
    assert close(batches.value, whole.value, 1e-8)
    # max_loss is the loss at θ + perturbation.
    obj = Objective(model, ce, (x, y))
    assert close(float(obj.loss(obj.theta0 + obj.flatten(whole.perturbation))), whole.max_loss, 1e-12)
    assert whole.max_loss >= whole.loss
    assert whole.n_evals >= 2 and whole.max_iter == 10 and whole.epsilon == 1e-2
    json.dumps(whole.to_dict())
    assert set(whole.perturbation) == {n for n, _ in model.named_parameters()}


def test_n_evals_counts_every_pass(ce):
    model = make_mlp()
    calls = []

    def counting(out, y):
        calls.append(1)
        return ce(out, y)

    data = classification_data()
    res = sharpness(model, counting, data, epsilon=1e-2)
    assert len(calls) == res.n_evals
    calls.clear()
    res = adaptive_sharpness(model, counting, data, rho=0.05, max_iter=7)
    assert len(calls) == res.n_evals == 2 + res.nit  # at θ, at the start, one per step
    calls.clear()
    res = average_sharpness(model, counting, data, rho=0.05, n_samples=3)
    assert len(calls) == res.n_evals == 4


def test_model_untouched_and_global_rng_unused(ce):
    model = make_mlp()
    model.train()
    data = classification_data()
    before = snapshot(model)
    r1 = sharpness(model, ce, data, subspace=5)
    adaptive_sharpness(model, ce, data, rho=0.05)
    adaptive_sharpness(model, ce, data, rho=0.05, p="inf")
    average_sharpness(model, ce, data, rho=0.05, n_samples=3)
    assert_untouched(model, before)
    torch.manual_seed(123)
    r2 = sharpness(model, ce, data, subspace=5)
    assert r1.value == r2.value


def test_options_forwarded(ce):
    model = make_mlp().float()
    data = classification_data(dtype=torch.float32)
    res = sharpness(model, ce, data, dtype=torch.float64, params=["2.weight"])
    assert set(res.perturbation) == {"2.weight"}
    assert res.perturbation["2.weight"].dtype == torch.float64


@pytest.mark.parametrize(
    ("fn", "kwargs", "error"),
    [
        (sharpness, {"epsilon": 0.0}, ValueError),
        (sharpness, {"epsilon": -1e-3}, ValueError),
        (sharpness, {"epsilon": "big"}, TypeError),
        (sharpness, {"subspace": 0}, ValueError),
        (sharpness, {"subspace": -2}, ValueError),
        (sharpness, {"subspace": 10_000}, ValueError),
        (sharpness, {"subspace": torch.ones(5, 2, dtype=D)}, ValueError),
        (sharpness, {"subspace": torch.ones(3, dtype=D)}, ValueError),
        (sharpness, {"subspace": "random"}, TypeError),
        (sharpness, {"max_iter": 0}, ValueError),
        (sharpness, {"max_evals": 0}, ValueError),
        (sharpness, {"tol": -1.0}, ValueError),
        (adaptive_sharpness, {"rho": 0.0}, ValueError),
        (adaptive_sharpness, {"rho": -0.1}, ValueError),
        (adaptive_sharpness, {"rho": 0.1, "p": 1}, ValueError),
        (adaptive_sharpness, {"rho": 0.1, "p": "two"}, ValueError),
        (adaptive_sharpness, {"rho": 0.1, "eta": -1.0}, ValueError),
        (average_sharpness, {"rho": 0.1, "n_samples": 0}, ValueError),
        (average_sharpness, {"n_samples": 3, "rho": 0.0}, ValueError),
        (average_sharpness, {"rho": 0.1, "n_samples": 2.5}, TypeError),
    ],
)
def test_bad_input_raises_and_leaves_model_untouched(fn, kwargs, error, ce):
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(error) as info:
        fn(model, ce, classification_data(), **kwargs)
    # The message names the offending argument (the last one given in each case above).
    assert list(kwargs)[-1] in str(info.value)
    assert_untouched(model, before)


def test_non_finite_loss_raises_and_leaves_model_untouched(ce):
    model = make_mlp()
    x, y = classification_data()
    x = x.clone()
    x[3, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="batch 0"):
        sharpness(model, ce, (x, y))
    assert_untouched(model, before)


# ---------------------------------------------------------------------------- numerical layer
def test_maximize_box_evaluates_each_point_once_and_keeps_best():
    H = random_symmetric(5, [3.0, 1.0, -1.0, 0.5, -2.0], 1)
    seen = []

    def f_and_grad(x):
        seen.append(x.copy())
        return 0.5 * x @ H.numpy() @ x, H.numpy() @ x

    res = maximize_box(f_and_grad, -np.ones(5), np.ones(5), x0=np.full(5, 0.5), max_iter=50)
    assert res.nfev == len(seen)
    assert len({tuple(x) for x in seen}) == len(seen)
    assert res.fun == max(0.5 * x @ H.numpy() @ x for x in seen)
    assert np.all(np.abs(res.x) <= 1)


def test_maximize_ball_quadratic_form():
    H = random_symmetric(7, [2.0, 1.5, 1.0, 0.0, -1.0, -3.0, -6.0], 2).numpy()
    res = maximize_ball(lambda x: (0.5 * x @ H @ x, H @ x), radius=2.0, x0=np.ones(7), max_iter=500)
    assert close(res.fun, 0.5 * 4 * 2.0, 1e-8)
    assert res.nfev == 1 + res.nit
    assert np.linalg.norm(res.x) <= 2.0 * (1 + 1e-12)
    # A concave function with its maximum inside the ball.
    target = np.full(7, 0.1)
    res = maximize_ball(
        lambda x: (-float((x - target) @ (x - target)), -2 * (x - target)),
        radius=1.0,
        x0=-np.ones(7),
        max_iter=100,
    )
    assert np.allclose(res.x, target, atol=1e-8)


@given(n=st.integers(1, 30), seed=st.integers(0, 10_000), max_iter=st.integers(1, 25))
def test_lbfgsb_direct_driver_equals_scipy_minimize(n, seed, max_iter):
    """The O(n)-Python-free driver takes exactly scipy.optimize.minimize's iterates."""
    from scipy.optimize import Bounds, minimize

    from flatness.algorithms import maximize as _maximize

    if _maximize._setulb is None:
        pytest.skip("this scipy's L-BFGS-B kernel has another interface; minimize() is used")
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    H, b = a @ a.T / n + 0.1 * np.eye(n), 3 * rng.standard_normal(n)  # minimizer often outside the box
    lower = -rng.uniform(0.1, 2.0, n)
    upper = rng.uniform(0.1, 2.0, n)
    lower[::4], upper[1::5] = -np.inf, np.inf  # all four kinds of bound
    x0 = rng.uniform(-0.5, 0.5, n)

    def fun(x):
        return float(0.5 * x @ H @ x + b @ x), H @ x + b

    seen_direct, seen_scipy = [], []
    nit, status, message = _maximize._lbfgsb_direct(
        lambda x: (seen_direct.append(x.copy()), fun(x))[1],
        x0,
        lower,
        upper,
        maxiter=max_iter,
        ftol=1e-12,
        gtol=1e-10,
        maxcor=10,
        callback=lambda x: None,
    )
    res = minimize(
        lambda x: (seen_scipy.append(x.copy()), fun(x))[1],
        x0,
        jac=True,
        method="L-BFGS-B",
        bounds=Bounds(lower, upper),
        options={"maxiter": max_iter, "ftol": 1e-12, "gtol": 1e-10, "maxcor": 10},
    )
    assert (nit, status, message) == (res.nit, res.status, res.message)

    def distinct(points):
        # scipy's wrapper serves a point asked for again from its cache (so does maximize_box's
        # tracker); the driver's raw calls repeat it. Compare the sequences of distinct points.
        out = []
        for x in points:
            if not out or not np.array_equal(out[-1], x):
                out.append(x)
        return out

    seen_direct, seen_scipy = distinct(seen_direct), distinct(seen_scipy)
    assert len(seen_direct) == len(seen_scipy)
    for u, v in zip(seen_direct, seen_scipy, strict=True):
        np.testing.assert_array_equal(u, v)


def test_lbfgsb_direct_driver_at_a_vertex_where_scipy_caches_repeated_points():
    """The case hypothesis found: line searches at a vertex ask for the same point again."""
    test_lbfgsb_direct_driver_equals_scipy_minimize.hypothesis.inner_test(3, 121, 7)


def test_maximize_box_same_result_with_scipy_minimize(monkeypatch):
    from flatness.algorithms import maximize as _maximize

    rng = np.random.default_rng(0)
    H = np.diag(rng.uniform(-1, 3, 12))
    half = np.full(12, 0.3)

    def run():
        return maximize_box(lambda x: (0.5 * x @ H @ x, H @ x), -half, half, x0=half.copy(), max_iter=20)

    direct = run()
    monkeypatch.setattr(_maximize, "_setulb", None)
    fallback = run()
    np.testing.assert_array_equal(direct.x, fallback.x)
    assert (direct.fun, direct.nfev, direct.nit, direct.status, direct.message) == (
        fallback.fun,
        fallback.nfev,
        fallback.nit,
        fallback.status,
        fallback.message,
    )


def test_single_threaded_blas_restores_thread_counts():
    from flatness._blas import _controls, _loaded_openblas, single_threaded_blas

    libs = [c for c in map(_controls, _loaded_openblas()) if c is not None]
    before = [int(get()) for get, _ in libs]
    with pytest.raises(RuntimeError), single_threaded_blas():
        assert all(int(get()) == 1 for get, _ in libs)
        raise RuntimeError
    assert [int(get()) for get, _ in libs] == before
