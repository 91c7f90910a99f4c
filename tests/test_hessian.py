"""Model-level hessian_topk / hessian_trace / hessian_density against dense float64 Hessians."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import (
    assert_untouched,
    classification_data,
    dense_hessian_oracle,
    image_data,
    make_cnn,
    make_mlp,
    quadratic_problem,
    snapshot,
)
from flatness import hessian_density, hessian_topk, hessian_trace


@pytest.mark.parametrize(
    ("net", "which"), [("mlp", "largest"), ("mlp", "smallest"), ("mlp", "magnitude"), ("cnn", "largest")]
)
def test_topk_matches_dense_hessian(net, which, ce):
    if net == "mlp":
        model, (x, y) = make_mlp(), classification_data()
    else:
        model, (x, y) = make_cnn(), image_data()
    _, _, Hd = dense_hessian_oracle(model, ce, x, y)
    ev = torch.linalg.eigvalsh(Hd)
    ref = {"largest": ev.flip(0), "smallest": ev, "magnitude": ev[torch.argsort(ev.abs(), descending=True)]}
    before = snapshot(model)
    res = hessian_topk(model, ce, (x, y), k=3, which=which, tol=1e-8)
    assert_untouched(model, before)
    assert res.converged
    assert torch.allclose(res.eigenvalues, ref[which][:3], rtol=1e-6, atol=1e-8)
    true = (res.eigenvectors @ Hd - res.eigenvalues[:, None] * res.eigenvectors).norm(dim=1)
    assert torch.allclose(res.residuals, true, rtol=1e-5, atol=1e-10)
    dicts = res.eigenvector_dicts()
    assert [list(d) for d in dicts] == [[n for n, _ in model.named_parameters()]] * 3
    assert all(d[n].shape == p.shape for d in dicts for n, p in model.named_parameters())
    full = res.to_dict()
    assert full["eigenvalues"] == res.eigenvalues.tolist()
    assert len(full["eigenvectors"]) == 3 and len(full["eigenvectors"][0]) == res.eigenvectors.shape[1]
    small = res.to_dict(max_array_size=10)
    assert small["eigenvalues"] == full["eigenvalues"]  # 3 numbers: kept
    vec = small["eigenvectors"]
    assert vec["omitted"] is True and vec["shape"] == list(res.eigenvectors.shape)
    assert vec["norm"] == pytest.approx(float(res.eigenvectors.norm()))
    assert len(json.dumps(small)) < len(json.dumps(full)) / 5
    with pytest.raises(ValueError, match="max_array_size"):
        res.to_dict(max_array_size=-1)


def test_topk_on_quadratic_and_options_forwarded():
    lam = torch.tensor([4.0, -2.0, 1.0, 0.5, 0.1, 3.0], dtype=torch.float64)
    model, loss, data = quadratic_problem(torch.diag(lam))
    res = hessian_topk(model, loss, data, k=2, tol=1e-10, params=["theta"], dtype=torch.float64)
    assert torch.allclose(res.eigenvalues, torch.tensor([4.0, 3.0], dtype=torch.float64))
    assert res.n_matvec >= 1 and res.ncv == 6


def test_trace_and_density_on_a_net(ce):
    model, (x, y) = make_mlp(), classification_data()
    _, _, Hd = dense_hessian_oracle(model, ce, x, y)
    before = snapshot(model)
    t = hessian_trace(model, ce, (x, y), n_hvp=60, seed=1)
    assert abs(t.estimate - float(torch.trace(Hd))) <= 5 * t.std_error + 1e-8
    assert t.n_matvec == 60
    d = hessian_density(model, ce, (x, y), n_runs=3, n_steps=30)
    assert_untouched(model, before)
    assert float(torch.trapezoid(d.density, d.grid)) == pytest.approx(1.0, abs=1e-6)
    ev = torch.linalg.eigvalsh(Hd)
    nodes = d.nodes[torch.isfinite(d.nodes)]
    assert float(nodes.min()) >= float(ev.min()) - 1e-8 and float(nodes.max()) <= float(ev.max()) + 1e-8
    assert d.n_matvec <= 90
    json.dumps(t.to_dict())
    json.dumps(d.to_dict())


def test_progress_is_opt_in(ce, capsys):
    model, (x, y) = make_mlp(), classification_data()
    calls = []
    hessian_topk(model, ce, (x, y), progress=lambda *a: calls.append(a))
    assert calls
    hessian_topk(model, ce, (x, y))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("fn", "kwargs", "exc", "match"),
    [
        (hessian_topk, {"k": 0}, ValueError, "k: got 0"),
        (hessian_topk, {"k": 10_000}, ValueError, "k: got 10000"),
        (hessian_topk, {"tol": 0}, ValueError, "tol: got 0"),
        (hessian_topk, {"which": "LM"}, ValueError, "which: got 'LM'"),
        (hessian_topk, {"max_hvp": 0}, ValueError, "max_hvp"),
        (hessian_topk, {"reduction": "max"}, ValueError, "reduction"),
        (hessian_trace, {"method": "exact"}, ValueError, "method: got 'exact'"),
        (hessian_trace, {"n_hvp": 2}, ValueError, "n_hvp: got 2"),
        (hessian_trace, {"n_hvp": 0}, ValueError, "n_hvp"),
        (hessian_density, {"n_runs": 0}, ValueError, "n_runs"),
        (hessian_density, {"sigma": -1.0}, ValueError, "sigma"),
    ],
)
def test_bad_inputs_leave_model_untouched(fn, kwargs, exc, match, ce):
    model, (x, y) = make_mlp(), classification_data()
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        fn(model, ce, (x, y), **kwargs)
    assert_untouched(model, before)


def test_train_mode_model_restored(ce):
    model, (x, y) = make_cnn(), image_data()
    model.train()
    before = snapshot(model)
    res = hessian_topk(model, ce, (x, y), k=1)
    assert_untouched(model, before)
    assert np.isfinite(res.eigenvalues.numpy()).all()


def test_topk_passes_the_lanczos_memory_options(ce):
    model, (x, y) = make_mlp(), classification_data()
    _, _, Hd = dense_hessian_oracle(model, ce, x, y)
    top = float(torch.linalg.eigvalsh(Hd)[-1])
    base = hessian_topk(model, ce, (x, y), k=1, tol=1e-6)
    host = hessian_topk(model, ce, (x, y), k=1, tol=1e-6, basis_device="cpu", keep_products=False)
    late = hessian_topk(model, ce, (x, y), k=1, tol=1e-6, min_steps=30)
    for res in (base, host, late):
        assert res.converged and abs(float(res.eigenvalues[0]) - top) <= 1e-6 * top
    assert host.eigenvectors.device.type == "cpu"
    assert host.n_matvec == base.n_matvec + 1  # the stored products spare the confirming one
    assert late.n_matvec >= 30 > base.n_matvec
    with pytest.raises(ValueError, match="min_steps"):
        hessian_topk(model, ce, (x, y), min_steps=0)
    with pytest.raises(TypeError, match="keep_products"):
        hessian_topk(model, ce, (x, y), keep_products=None)
