"""HessianOperator against the dense float64 Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn

from conftest import assert_untouched, dense_hessian_oracle, image_data, make_cnn, quadratic_problem, snapshot
from flatness import HessianOperator, Objective

F = nn.functional


def test_operator_matches_dense_hessian_torch_and_numpy():
    model = make_cnn(0)
    x, y = image_data(9)
    before = snapshot(model)
    op = HessianOperator(model, F.cross_entropy, [(x[:4], y[:4]), (x[4:], y[4:])])
    _, _, hess = dense_hessian_oracle(model, F.cross_entropy, x, y)
    n = hess.shape[0]
    assert op.shape == (n, n)
    assert torch.allclose(op.dense(), hess, rtol=0, atol=1e-12)
    assert op.n_matvec == n
    v = np.random.default_rng(0).standard_normal(n)
    out = op @ v
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    assert np.allclose(out, hess.numpy() @ v, rtol=1e-10, atol=1e-13)
    block = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(op @ block, hess @ block, atol=1e-12)
    assert_untouched(model, before)


def test_to_scipy_eigsh_finds_the_quadratic_spectrum():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    lam = torch.tensor([9.0, 5.0, 3.0] + [0.5] * 8 + [-2.0], dtype=torch.float64)
    H = q @ torch.diag(lam) @ q.T
    op = HessianOperator(*quadratic_problem(H))
    vals = sla.eigsh(op.to_scipy(), k=2, which="LA", return_eigenvectors=False)
    assert np.allclose(np.sort(vals), [5.0, 9.0], rtol=1e-8)


def test_operator_is_at_construction_parameters():
    H = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
    model, loss_fn, data = quadratic_problem(H)
    op = HessianOperator(model, loss_fn, data)
    with torch.no_grad():
        model.theta.add_(1.0)  # the user trains on; the operator keeps its snapshot
    assert torch.equal(op.theta, torch.zeros(2, dtype=torch.float64))
    obj = Objective(model, loss_fn, data)
    op2 = HessianOperator.from_objective(obj, torch.ones(2, dtype=torch.float64))
    assert torch.allclose(
        op2 @ torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    )


def test_operator_bad_vectors():
    H = torch.eye(3, dtype=torch.float64)
    op = HessianOperator(*quadratic_problem(H))
    with pytest.raises(ValueError, match="v: got shape"):
        op @ torch.ones(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="v: expected"):
        op @ [1.0, 2.0, 3.0]
