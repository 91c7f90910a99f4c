"""The algorithm layer on plain matrices: every accepted operator form, one answer."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from flatness.algorithms import VectorSpace, as_operator, hutchpp, lanczos_eigsh, slq_density


def _spd(n=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(-1.0, 6.0, n, dtype=torch.float64)
    return q @ torch.diag(lam) @ q.T, lam


@pytest.mark.parametrize("form", ["tensor", "numpy", "scipy", "callable", "protocol"])
def test_lanczos_accepts_every_operator_form(form):
    A, lam = _spd()
    n = A.shape[0]
    if form == "tensor":
        op, size = A, None
    elif form == "numpy":
        op, size = A.numpy(), None
    elif form == "scipy":
        op, size = sla.aslinearoperator(A.numpy()), None
    elif form == "callable":
        op, size = (lambda v: A @ v), n
    else:

        class Op:
            shape = (n, n)
            dtype = torch.float64
            device = torch.device("cpu")

            def matvec(self, v):
                return A @ v

        op, size = Op(), None
    res = lanczos_eigsh(op, size, k=3, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, lam.flip(0)[:3], rtol=1e-9, atol=1e-12)
    assert res.converged


def test_trace_and_density_on_a_tensor():
    A, lam = _spd(12, 1)
    tr = hutchpp(A, n_matvec=36, seed=0)  # the sketch covers all 12 dimensions: exact
    assert abs(tr.estimate - float(lam.sum())) < 1e-9
    dens = slq_density(A, n_runs=2, n_steps=12, seed=0)
    # a full Krylov space: the Ritz values of every run are the eigenvalues, the weights sum to 1
    for r in range(2):
        torch.testing.assert_close(dens.nodes[r].sort().values, lam, rtol=1e-8, atol=1e-9)
    assert abs(float(dens.weights.sum()) - 1.0) < 1e-12


def test_operator_form_errors():
    with pytest.raises(ValueError, match="square"):
        as_operator(torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="n: a plain matvec"):
        as_operator(lambda v: v)
    with pytest.raises(ValueError, match="n: got 4"):
        as_operator(torch.eye(3, dtype=torch.float64), 4)
    with pytest.raises(TypeError, match="A: expected a linear operator"):
        as_operator("matrix")


def test_non_finite_products_are_reported():
    n = 6

    def mv(v):
        return torch.full_like(v, float("inf"))

    with pytest.raises(ValueError, match="non-finite"):
        lanczos_eigsh(mv, n, k=1)


class _CountingSpace(VectorSpace):
    """A space that counts its reductions: every vector combination goes through the space."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.reductions = 0

    def reduce(self, t):
        self.reductions += 1
        return t


def test_algorithms_combine_vectors_only_through_the_space():
    A, lam = _spd(10, 2)

    class Op:
        shape = (10, 10)
        dtype = torch.float64
        device = torch.device("cpu")
        space = _CountingSpace(10, dtype=torch.float64, device="cpu")

        def matvec(self, v):
            return A @ v

    op = Op()
    res = lanczos_eigsh(op, k=2, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, lam.flip(0)[:2], rtol=1e-9, atol=1e-12)
    assert op.space.reductions >= 2 * res.n_matvec
    before = op.space.reductions
    hutchpp(op, n_matvec=9)
    assert op.space.reductions > before
    assert np.isfinite(res.residuals.numpy()).all()
