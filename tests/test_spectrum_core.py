"""The composable spectrum core: topk / trace / density / by_block on an operator built once."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import flatness
from conftest import (
    assert_untouched,
    classification_data,
    dense_hessian_oracle,
    dense_jacobian_oracle,
    make_mlp,
    snapshot,
    split,
)
from flatness import (
    BlockSpectra,
    CurvatureDensity,
    CurvatureTopK,
    CurvatureTrace,
    HessianOperator,
    by_block,
    curvature_operator,
    density,
    hessian_density,
    hessian_topk,
    hessian_trace,
    topk,
    trace,
)

F = nn.functional


def _problem():
    model = make_mlp(0)
    x, y = classification_data(20)
    return model, x, y, split(x, y, [12, 8])


def _oracle(curvature, model, x, y):
    """The dense float64 matrix: the Hessian, or the softmax GGN Jᵀ H_ℓ J of the mean cross-entropy."""
    if curvature == "hessian":
        return dense_hessian_oracle(model, F.cross_entropy, x, y)[2]
    z, J = dense_jacobian_oracle(model, x)
    p = torch.softmax(z, dim=1)
    H = torch.block_diag(*[(torch.diag(pi) - torch.outer(pi, pi)) / len(p) for pi in p])
    return J.T @ H @ J


def _assert_same(a, b):
    """Every field equal, tensors bit for bit."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), f.name
        else:
            assert va == vb, f.name


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_operator_level_functions_equal_the_model_level_ones_bit_for_bit(curvature):
    model, x, y, data = _problem()
    before = snapshot(model)
    A = _oracle(curvature, model, x, y)
    op = curvature_operator(model, F.cross_entropy, data, curvature=curvature)

    top = topk(op, k=3, tol=1e-8)
    _assert_same(top, hessian_topk(model, F.cross_entropy, data, k=3, tol=1e-8, curvature=curvature))
    assert top.converged and top.curvature == curvature
    torch.testing.assert_close(top.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[:3], rtol=1e-7, atol=1e-10)

    tr = trace(op, n_matvec=30, seed=4)
    _assert_same(tr, hessian_trace(model, F.cross_entropy, data, n_hvp=30, seed=4, curvature=curvature))
    dens = density(op, n_runs=3, n_steps=15, seed=2)
    _assert_same(
        dens, hessian_density(model, F.cross_entropy, data, n_runs=3, n_steps=15, seed=2, curvature=curvature)
    )
    assert (tr.curvature, dens.curvature) == (curvature, curvature)
    assert_untouched(model, before)


def test_one_operator_runs_topk_trace_density_and_counts_add_up():
    model, x, y, data = _problem()
    H = _oracle("hessian", model, x, y)
    n = H.shape[0]
    op = HessianOperator(model, F.cross_entropy, data)
    top = topk(op, k=2, tol=1e-8)
    tr = trace(op, n_matvec=3 * n, seed=1)  # a sketch of n columns spans the space: exact
    dens = density(op, n_runs=2, n_steps=10)
    assert op.n_matvec == top.n_matvec + tr.n_matvec + dens.n_matvec
    assert tr.n_matvec == 3 * n and top.n_matvec > 0 and dens.n_matvec > 0
    assert abs(tr.estimate - float(H.trace())) < 1e-9 * max(1.0, abs(float(H.trace())))
    torch.testing.assert_close(top.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-7, atol=1e-10)
    # The operator's state carries nothing from one analysis to the next: same numbers as fresh ones.
    _assert_same(top, topk(HessianOperator(model, F.cross_entropy, data), k=2, tol=1e-8))
    _assert_same(dens, density(HessianOperator(model, F.cross_entropy, data), n_runs=2, n_steps=10))
    assert top.graph_reused and tr.graph_reused  # the gradient graphs are kept within each analysis


@pytest.mark.parametrize("blocks", ["module", "parameter"])
def test_by_block_equals_blocks_option_and_the_dense_blocks(blocks):
    model, x, y, data = _problem()
    before = snapshot(model)
    H = _oracle("hessian", model, x, y)
    op = HessianOperator(model, F.cross_entropy, data)
    for name, analysis, kwargs, fn, model_kwargs in [
        ("topk", topk, {"k": 2, "tol": 1e-9}, hessian_topk, {"k": 2, "tol": 1e-9}),
        ("trace", trace, {"n_matvec": 12}, hessian_trace, {"n_hvp": 12}),
        ("density", density, {"n_runs": 2, "n_steps": 6}, hessian_density, {"n_runs": 2, "n_steps": 6}),
    ]:
        by_name = by_block(op, blocks, name, **kwargs)
        by_fn = by_block(op, blocks, analysis, **kwargs)
        ref = fn(model, F.cross_entropy, data, blocks=blocks, **model_kwargs)
        assert isinstance(by_name, BlockSpectra) and list(by_name) == list(ref)
        assert by_name.params == ref.params and by_name.n_matvec == ref.n_matvec
        for key in ref:
            _assert_same(by_name[key], ref[key])
            _assert_same(by_fn[key], ref[key])
    # The blocks' eigenvalues are those of the dense diagonal blocks (dense or Lanczos path).
    sizes = [p.numel() for p in model.parameters()]
    offsets = torch.cumsum(torch.tensor([0, *sizes]), 0).tolist()
    spectra = by_block(op, blocks, "topk", k=2, tol=1e-9)
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    for key, members in spectra.params.items():
        idx = torch.cat([torch.arange(offsets[index[m]], offsets[index[m] + 1]) for m in members])
        exact = torch.linalg.eigvalsh(H[idx][:, idx]).flip(0)[:2]
        torch.testing.assert_close(spectra[key].eigenvalues, exact, rtol=1e-7, atol=1e-10)
        if len(idx) <= 20:  # at most ncv parameters: the dense block, one product per parameter
            assert spectra[key].n_matvec == len(idx) and spectra[key].n_restarts == 0
            assert spectra[key].ncv == len(idx) and spectra[key].residuals.max() < 1e-12
    assert_untouched(model, before)


def test_by_block_takes_any_analysis_and_refuses_bad_arguments():
    model, _, _, data = _problem()
    op = HessianOperator(model, F.cross_entropy, data)
    spectra = by_block(
        op, {"out": ["2.weight", "2.bias"]}, lambda o, n_matvec: trace(o, n_matvec=n_matvec), n_matvec=8
    )
    assert list(spectra) == ["out"] and spectra.n_matvec == 8 and spectra["out"].n_matvec == 8
    # A block smaller than k: all of its eigenpairs, from the dense block (Lanczos needs k < n).
    small = by_block(op, {"bias": ["2.bias"]}, "topk", k=5)
    assert small["bias"].k == 3 and small["bias"].eigenvalues.shape == (3,) and small.n_matvec == 3
    with pytest.raises(TypeError, match="v0: not supported per block"):
        by_block(op, "module", "topk", v0=torch.ones(66, dtype=torch.float64))
    with pytest.raises(TypeError, match="kk: not an option of topk"):
        by_block(op, "module", "topk", kk=2)
    with pytest.raises(ValueError, match="analysis"):
        by_block(op, "module", "eigenvalues")
    with pytest.raises(TypeError, match="analysis"):
        by_block(op, "module", 3)
    with pytest.raises(ValueError, match="blocks"):
        by_block(op, "layer", "trace")
    assert op.n_matvec == 0  # the blocks are operators of their own; the refused calls ran nothing


def test_core_functions_refuse_what_is_not_a_curvature_operator_and_bad_options():
    model, _, _, data = _problem()
    op = HessianOperator(model, F.cross_entropy, data)
    for fn in (topk, trace, density):
        with pytest.raises(TypeError, match="op: expected a curvature operator"):
            fn(torch.eye(4))
    with pytest.raises(TypeError, match="op: expected a curvature operator"):
        by_block(torch.eye(4), "module", "topk")
    with pytest.raises(ValueError, match="n_matvec: got 3; hutch\\+\\+ needs at least 4"):
        trace(op, n_matvec=3)
    with pytest.raises(ValueError, match="which"):
        topk(op, which="biggest")
    with pytest.raises(ValueError, match="max_matvec"):
        topk(op, max_matvec=0)
    assert op.n_matvec == 0


def test_results_name_their_matrix():
    model, _, _, data = _problem()
    ggn = hessian_topk(model, F.cross_entropy, data, k=1, curvature="ggn")
    assert ggn.curvature == "ggn" and not type(ggn).__name__.startswith("Hessian")
    assert isinstance(ggn, CurvatureTopK)
    fisher_tr = trace(curvature_operator(model, F.cross_entropy, data, curvature="fisher"), n_matvec=8)
    assert isinstance(fisher_tr, CurvatureTrace) and fisher_tr.curvature == "fisher"
    ef = hessian_density(model, F.cross_entropy, data, curvature="empirical_fisher", n_runs=1, n_steps=5)
    assert isinstance(ef, CurvatureDensity) and ef.curvature == "empirical_fisher"
    per_block = hessian_trace(model, F.cross_entropy, data, curvature="ggn", blocks="module", n_hvp=8)
    assert {r.curvature for r in per_block.values()} == {"ggn"}
    assert ggn.to_dict()["curvature"] == "ggn" and "CurvatureTopK(" in repr(ggn)


def test_deprecated_names_warn_and_give_the_same_numbers():
    model, _, _, data = _problem()
    op = HessianOperator(model, F.cross_entropy, data)
    results = [
        topk(op, k=1),
        trace(op, n_matvec=8),
        density(op, n_runs=1, n_steps=5),
        by_block(op, "module", "trace", n_matvec=4),
    ]
    for res in results:
        with pytest.warns(DeprecationWarning, match=r"n_hvp is deprecated .* use \.n_matvec"):
            old = res.n_hvp
        assert old == res.n_matvec > 0
        assert "n_hvp" not in res.to_dict() and res.to_dict()["n_matvec"] == res.n_matvec
    with pytest.warns(DeprecationWarning, match="HessianOperator.n_hvp"):
        assert op.n_hvp == op.n_matvec == sum(r.n_matvec for r in results[:3])
    assert flatness.spectrum.HessianTopK is CurvatureTopK and isinstance(
        results[0], flatness.spectrum.HessianTopK
    )
    assert flatness.spectrum.HessianTrace is CurvatureTrace
    assert flatness.spectrum.HessianDensity is CurvatureDensity


def test_the_library_itself_triggers_no_deprecation_warning():
    model, _, _, data = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for res in (
            hessian_topk(model, F.cross_entropy, data, k=1),
            hessian_trace(model, F.cross_entropy, data, n_hvp=8),
            hessian_density(model, F.cross_entropy, data, n_runs=1, n_steps=5, blocks="module"),
        ):
            repr(res), res.to_dict(), dataclasses.replace(res)
        monitor = flatness.Monitor(
            F.cross_entropy, data, measures=["top_eigenvalue", "trace"], options={"trace": {"n_hvp": 8}}
        )
        row = monitor.measure(model, step=0)
        assert set(row) >= {"top_eigenvalue", "trace"}
        repr(HessianOperator(model, F.cross_entropy, data))
