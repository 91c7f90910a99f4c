"""Kept gradient graphs (Objective.reusing_graph): exact products, freed graphs, untouched models."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import flatness.objective._hvp as objective_module
from conftest import (
    TinyTransformer,
    assert_untouched,
    classification_data,
    dense_hessian_oracle,
    image_data,
    make_cnn,
    make_mlp,
    snapshot,
    split,
)
from flatness import (
    HessianOperator,
    NonFiniteLossError,
    Objective,
    hessian_density,
    hessian_topk,
    hessian_trace,
)

F = nn.functional


def _probe(n, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sizes", [(23,), (5, 11, 7)])
def test_kept_products_equal_dense_hessian_and_ordinary_products(reduction, sizes):
    model = make_mlp()
    x, y = classification_data()
    data = split(x, y, sizes) if len(sizes) > 1 else (x, y)
    loss_fn = (lambda o, t: F.cross_entropy(o, t, reduction="sum")) if reduction == "sum" else F.cross_entropy
    H = dense_hessian_oracle(model, F.cross_entropy, x, y)[2] * (len(x) if reduction == "sum" else 1)
    op = HessianOperator(model, loss_fn, data, reduction=reduction)
    vs = [_probe(op.shape[0], s) for s in range(3)]
    plain = [op @ v for v in vs]
    passes = op.objective.n_passes
    with op.reusing_graph():
        kept = [op @ v for v in vs]
        assert op.graph_reused
    assert op.objective.n_passes == passes + 1  # one pass builds the graphs, the rest reuse them
    for v, a, b in zip(vs, plain, kept, strict=True):
        assert torch.equal(a, b)  # the same operations on the same graphs: the same numbers
        assert torch.allclose(b, H @ v, rtol=1e-10, atol=1e-12)
    assert op.objective.n_hvp == 6


def test_train_mode_batchnorm_and_dropout_semantics_unchanged():
    """Train mode: batch statistics and dropout masks are those of the seeded pass, as every pass."""
    torch.manual_seed(0)
    model = nn.Sequential(make_cnn(), nn.Dropout(0.3), nn.Linear(3, 3)).double()
    x, y = image_data(12)
    data = split(x, y, [5, 7])
    before = snapshot(model)
    for seed in (0, 3):
        op = HessianOperator(model, F.cross_entropy, data, train=True, data_seed=seed)
        vs = [_probe(op.shape[0], s) for s in range(2)]
        plain = [op @ v for v in vs]
        with op.reusing_graph():
            kept = [op @ v for v in vs]
        assert all(torch.equal(a, b) for a, b in zip(plain, kept, strict=True))
    assert_untouched(model, before)


def test_attention_model():
    torch.manual_seed(0)
    model = TinyTransformer().double()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    H = dense_hessian_oracle(model, F.cross_entropy, x, y)[2]
    op = HessianOperator(model, F.cross_entropy, (x, y))
    v = _probe(op.shape[0])
    with op.reusing_graph():
        op @ v
        assert torch.allclose(op @ v, H @ v, rtol=1e-9, atol=1e-11)


class _Recording(nn.Module):
    """Keeps weak references to its outputs (tensors a kept graph holds on to)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.refs: list[weakref.ref] = []

    def forward(self, x):
        out = torch.tanh(self.inner(x))
        self.refs.append(weakref.ref(out))
        return out


def test_graphs_are_freed_after_the_call_and_on_error():
    torch.manual_seed(0)
    model = nn.Sequential(_Recording(nn.Linear(5, 7)), nn.Linear(7, 3)).double()
    x, y = classification_data()
    before = snapshot(model)
    res = hessian_topk(model, F.cross_entropy, (x, y), k=2, tol=1e-8)
    assert res.converged and res.graph_reused
    gc.collect()
    refs = model[0].refs
    assert refs and all(r() is None for r in refs)
    assert_untouched(model, before)

    refs.clear()

    def stop(step, total, info):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hessian_topk(model, F.cross_entropy, (x, y), k=1, progress=stop)
    gc.collect()
    assert refs and all(r() is None for r in refs)
    assert_untouched(model, before)


def test_spectrum_functions_report_it():
    model = make_mlp()
    x, y = classification_data()
    one = (x, y)
    top = hessian_topk(model, F.cross_entropy, one, k=1, tol=1e-8)
    assert top.graph_reused and top.to_dict()["graph_reused"] is True
    off = hessian_topk(model, F.cross_entropy, one, k=1, tol=1e-8, reuse_graph=False)
    assert not off.graph_reused and torch.equal(off.eigenvalues, top.eigenvalues)
    fwd = hessian_topk(model, F.cross_entropy, one, k=1, tol=1e-8, hvp_mode="forward")
    assert not fwd.graph_reused
    assert torch.allclose(fwd.eigenvalues, top.eigenvalues, rtol=1e-10)
    assert hessian_trace(model, F.cross_entropy, one, n_hvp=12).graph_reused
    assert hessian_density(model, F.cross_entropy, one, n_runs=2, n_steps=5).graph_reused
    ggn = hessian_topk(model, F.cross_entropy, one, k=1, curvature="ggn")
    assert not ggn.graph_reused
    blocks = hessian_topk(model, F.cross_entropy, one, k=1, blocks="module", ncv=30)
    assert [b.graph_reused for b in blocks.blocks.values()] == [True, True]
    assert blocks["2"].n_matvec == 24  # 24 ≤ ncv parameters: dense, one product each


def test_many_batches_or_too_large_graphs_are_not_kept(monkeypatch):
    model = make_mlp()
    x, y = classification_data()
    many = split(x, y, [2] * 10 + [3])  # 11 batches: more than "auto" keeps
    res = hessian_topk(model, F.cross_entropy, many, k=1, tol=1e-8)
    assert not res.graph_reused
    forced = hessian_topk(model, F.cross_entropy, many, k=1, tol=1e-8, reuse_graph=True)
    assert forced.graph_reused and torch.equal(forced.eigenvalues, res.eigenvalues)
    # A DataLoader: its passes are compared with each other, so "auto" does not keep graphs.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12)
    assert not hessian_topk(model, F.cross_entropy, loader, k=1, tol=1e-8).graph_reused
    forced = hessian_topk(model, F.cross_entropy, loader, k=1, tol=1e-8, reuse_graph=True)
    assert forced.graph_reused
    # Graphs larger than the memory budget: measured on the first product, then dropped.
    monkeypatch.setattr(objective_module, "_graph_budget", lambda device, theta_bytes: 0)
    small = hessian_topk(model, F.cross_entropy, (x, y), k=1, tol=1e-8)
    assert not small.graph_reused


def test_graph_bytes_measures_what_the_graph_holds():
    model = make_mlp(hidden=50, d_in=40)
    x, y = classification_data(n=200, d=40)
    obj = Objective(model, F.cross_entropy, (x, y))
    leaf = obj.theta0.detach().requires_grad_(True)
    loss = obj.backend.batch_loss(leaf, (x, y))
    (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
    held = objective_module.graph_bytes(g, {leaf.untyped_storage().data_ptr()})
    # At least g and the hidden activations (200 × 50) the second backward needs, in float64.
    assert held >= 8 * (obj.n + 200 * 50)
    assert held < 8 * (obj.n + 20 * 200 * 50)


def test_non_finite_products_and_bad_option():
    model = make_mlp()
    x, y = classification_data()
    op = HessianOperator(model, F.cross_entropy, (x, y))
    v = _probe(op.shape[0])
    with op.reusing_graph():
        op @ v
        bad = v.clone()
        bad[0] = float("inf")
        with pytest.raises(NonFiniteLossError, match="Hessian-vector product"):
            op @ bad
    with pytest.raises(TypeError, match="reuse_graph"):
        Objective(model, F.cross_entropy, (x, y), reuse_graph="always")


def test_other_theta_and_nesting():
    """Products at another θ do not use the graphs; nested blocks share the outer one."""
    model = make_mlp()
    x, y = classification_data()
    obj = Objective(model, F.cross_entropy, (x, y))
    other = obj.theta0 + 0.1
    v = _probe(obj.n)
    ref_other = obj.hvp(v, other)
    with obj.reusing_graph():
        a = obj.hvp(v)
        with obj.reusing_graph():
            b = obj.hvp(v)
        assert torch.equal(obj.hvp(v, other), ref_other)
        assert torch.equal(a, b) and obj.graph_reused
    assert obj._kept is None


def test_checkpointed_model_away_from_its_parameters():
    """Activation checkpointing recomputes a segment inside each kept backward: at θ, not the model's."""
    from test_finite_difference import _net_problem

    plain, model, x, y = _net_problem("nonreentrant")
    ref = Objective(plain, F.cross_entropy, (x, y))
    theta = ref.theta0 + 0.3 * _probe(ref.n, 5)
    v = _probe(ref.n, 6)
    expected = ref.hvp(v, theta)
    before = snapshot(model)
    op = HessianOperator.from_objective(Objective(model, F.cross_entropy, (x, y)), theta)
    with op.reusing_graph():
        op @ v
        kept = op @ v
        assert op.graph_reused
    assert torch.allclose(kept, expected, rtol=1e-12, atol=1e-14)
    assert_untouched(model, before)
