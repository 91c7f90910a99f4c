"""Curvature operators (GGN, Fisher, empirical Fisher, blocks) against dense float64 oracles.

The oracles are built here, independently of flatness: J from torch.autograd.functional.jacobian of a deep copy
of the model, H_ℓ in closed form (softmax: (diag(p) − ppᵀ)/N per sample; MSE: 2/(N·d) I),
per-sample gradients from the Jacobian of the per-sample losses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import (
    _output_function,
    assert_untouched,
    classification_data,
    dense_hessian_oracle,
    dense_jacobian_oracle,
    image_data,
    make_cnn,
    make_mlp,
    snapshot,
    split,
)
from flatness import (
    BlockSpectra,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    NonFiniteLossError,
    curvature_operator,
    hessian_density,
    hessian_topk,
    hessian_trace,
)

F = nn.functional


def softmax_ggn_oracle(model, x, y):
    """G = Jᵀ H_ℓ J for the mean cross-entropy over all of x, H_ℓ = blockdiag(diag(p) − ppᵀ)/N."""
    z, J = dense_jacobian_oracle(model, x)
    p = torch.softmax(z, dim=1)
    N = p.shape[0]
    H = torch.block_diag(*[(torch.diag(pi) - torch.outer(pi, pi)) / N for pi in p])
    return J.T @ H @ J


def mse_ggn_oracle(model, x):
    z, J = dense_jacobian_oracle(model, x)
    return J.T @ J * (2.0 / z.numel())


@pytest.mark.parametrize("maker,data_fn", [(make_mlp, classification_data), (make_cnn, image_data)])
def test_ggn_matches_jacobian_oracle_with_partial_batches(maker, data_fn):
    model = maker(0)
    x, y = data_fn(11)
    before = snapshot(model)
    op = GGNOperator(model, F.cross_entropy, split(x, y, [4, 4, 3]))
    G = softmax_ggn_oracle(model, x, y)
    torch.testing.assert_close(op.dense(), G, rtol=1e-10, atol=1e-12)
    assert op.n_matvec == G.shape[0]
    assert_untouched(model, before)


def test_ggn_equals_hessian_for_mse_at_zero_residual():
    model = make_mlp(1)
    x, _ = classification_data(9)
    with torch.no_grad():
        y = model(x)  # a perfect fit: the residual term of the Hessian vanishes
    G = GGNOperator(model, F.mse_loss, split(x, y, [5, 4])).dense()
    _, _, H = dense_hessian_oracle(model, F.mse_loss, x, y)
    torch.testing.assert_close(G, H, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(G, mse_ggn_oracle(model, x), rtol=1e-10, atol=1e-12)


def test_ggn_differs_from_hessian_away_from_zero_residual():
    """The test above can fail: with a residual, H = G + Σ r ∇²z ≠ G."""
    model = make_mlp(1)
    x, y = classification_data(9)
    G = GGNOperator(model, F.cross_entropy, (x, y)).dense()
    _, _, H = dense_hessian_oracle(model, F.cross_entropy, x, y)
    assert float((G - H).abs().max()) > 1e-4
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-12  # PSD for a convex loss


def test_fisher_exact_equals_ggn_for_cross_entropy_and_mse():
    model = make_mlp(2)
    x, y = classification_data(10)
    data = split(x, y, [6, 4])
    torch.testing.assert_close(
        FisherOperator(model, F.cross_entropy, data).dense(),
        softmax_ggn_oracle(model, x, y),
        rtol=1e-9,
        atol=1e-12,
    )
    yr = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        FisherOperator(model, nn.MSELoss(), split(x, yr, [6, 4])).dense(),
        mse_ggn_oracle(model, x),
        rtol=1e-9,
        atol=1e-12,
    )


@pytest.mark.parametrize("loss_fn,targets", [(F.cross_entropy, "labels"), (F.mse_loss, "regression")])
def test_monte_carlo_fisher_converges_to_the_exact_fisher(loss_fn, targets):
    model = make_mlp(3)
    x, y = classification_data(8)
    if targets == "regression":
        y = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = FisherOperator(model, loss_fn, (x, y)).dense()
    mc = FisherOperator(model, loss_fn, (x, y), mc_samples=2000, mc_seed=5).dense()
    torch.testing.assert_close(mc, mc.T, rtol=0, atol=1e-12)  # a fixed symmetric matrix
    assert float(torch.linalg.eigvalsh(mc).min()) > -1e-12
    assert float((mc - exact).norm() / exact.norm()) < 0.1
    # unbiased: the errors of one-sample estimates along v shrink like 1/√(number of seeds) when
    # averaged, towards zero — not towards a bias
    v = torch.randn(exact.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fv = exact @ v
    products = torch.stack(
        [FisherOperator(model, loss_fn, (x, y), mc_samples=1, mc_seed=s) @ v for s in range(200)]
    )
    single = float((products[0] - fv).norm() / fv.norm())
    mean = float((products.mean(0) - fv).norm() / fv.norm())
    assert mean < 0.2 and mean < single / 3, (mean, single)


def test_monte_carlo_fisher_is_the_same_matrix_in_every_product():
    model = make_mlp(3)
    x, y = classification_data(8)
    op = FisherOperator(model, F.cross_entropy, split(x, y, [3, 5]), mc_samples=3)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert torch.equal(op @ v, op @ v)


def test_empirical_fisher_matches_per_sample_gradients():
    model = make_cnn(4)
    x, y = image_data(9)
    before = snapshot(model)
    op = EmpiricalFisherOperator(model, F.cross_entropy, split(x, y, [4, 5]))
    z, J = dense_jacobian_oracle(model, x)
    # per-sample losses ℓ_i(z_i) = CE(z_i, y_i): g_i = J_iᵀ (p_i − e_{y_i})
    p = torch.softmax(z, dim=1)
    r = p - F.one_hot(y, 3).double()
    Jr = J.reshape(9, 3, -1)
    g = torch.einsum("ic,icn->in", r, Jr)
    torch.testing.assert_close(op.dense(), g.T @ g / 9, rtol=1e-9, atol=1e-12)
    assert_untouched(model, before)


def test_empirical_fisher_with_batch_loss_and_sum_reduction():
    model = make_mlp(5)
    x, y = classification_data(7)
    data = [{"x": a, "y": b} for a, b in split(x, y, [3, 4])]
    op = EmpiricalFisherOperator(
        model,
        data=data,
        batch_loss=lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="sum"),
        reduction="sum",
    )
    ref = EmpiricalFisherOperator(model, F.cross_entropy, (x, y)).dense() * 7
    torch.testing.assert_close(op.dense(), ref, rtol=1e-9, atol=1e-12)


def test_batch_outputs_states_the_split_for_dict_batches():
    model = make_mlp(6)
    x, y = classification_data(10)
    data = [{"inputs": a, "labels": b} for a, b in split(x, y, [5, 5])]
    op = GGNOperator(model, F.cross_entropy, data, batch_outputs=lambda m, b: (m(b["inputs"]), b["labels"]))
    torch.testing.assert_close(op.dense(), softmax_ggn_oracle(model, x, y), rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="batch_outputs=lambda model, batch"):
        GGNOperator(model, data=data, batch_loss=lambda m, b: F.cross_entropy(m(b["inputs"]), b["labels"]))
    with pytest.raises(TypeError, match="batch_outputs"):
        hessian_topk(
            model,
            None,
            data,
            curvature="fisher",
            batch_loss=lambda m, b: F.cross_entropy(m(b["inputs"]), b["labels"]),
        )
    with pytest.raises(TypeError, match="batch_outputs: needs loss_fn"):
        GGNOperator(model, data=data, batch_outputs=lambda m, b: (m(b["inputs"]), b["labels"]))


def test_fisher_errors():
    model = make_mlp(0)
    x, y = classification_data(6)
    with pytest.raises(ValueError, match="likelihood: cannot tell"):
        FisherOperator(model, lambda z, t: F.cross_entropy(z, t), (x, y))
    op = FisherOperator(model, lambda z, t: F.cross_entropy(z, t) ** 2, (x, y), likelihood="categorical")
    with pytest.raises(ValueError, match="not that of a categorical"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    with pytest.raises(ValueError, match="likelihood: got"):
        FisherOperator(model, F.cross_entropy, (x, y), likelihood="poisson")
    with pytest.raises(ValueError, match="mc_samples"):
        FisherOperator(model, F.cross_entropy, (x, y), mc_samples=0)
    with pytest.raises(TypeError, match="mc_samples: an option of another curvature"):
        hessian_topk(model, F.cross_entropy, (x, y), mc_samples=3)
    with pytest.raises(ValueError, match="curvature: got"):
        hessian_trace(model, F.cross_entropy, (x, y), curvature="gauss-newton")


def test_fisher_follows_ignore_index_and_label_smoothing():
    """The weights come from the loss itself: ignored targets count zero, smoothing keeps H_ℓ."""
    model = make_mlp(7)
    x, y = classification_data(8)
    y_ignored = y.clone()
    y_ignored[:3] = -100
    fisher = FisherOperator(model, nn.CrossEntropyLoss(ignore_index=-100), (x, y_ignored)).dense()
    torch.testing.assert_close(fisher, softmax_ggn_oracle(model, x[3:], y[3:]), rtol=1e-9, atol=1e-12)
    smooth = FisherOperator(model, nn.CrossEntropyLoss(label_smoothing=0.1), (x, y)).dense()
    torch.testing.assert_close(smooth, softmax_ggn_oracle(model, x, y), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator])
def test_each_block_is_the_dense_diagonal_block(cls):
    model = make_mlp(8)
    x, y = classification_data(9)
    op = cls(model, F.cross_entropy, split(x, y, [5, 4]))
    full = op.dense()
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    offsets = np.cumsum([0, *sizes])
    for i in (0, 3):
        sub = op.block([names[i]]).dense()
        sl = slice(offsets[i], offsets[i + 1])
        torch.testing.assert_close(sub, full[sl, sl], rtol=1e-10, atol=1e-12)
    both = op.block([names[1], names[2]]).dense()
    idx = torch.cat([torch.arange(offsets[1], offsets[2]), torch.arange(offsets[2], offsets[3])])
    torch.testing.assert_close(both, full[idx][:, idx], rtol=1e-10, atol=1e-12)


def test_top5_ggn_eigenvalues_match_dense_oracle():
    model = make_mlp(9, hidden=12)
    x, y = classification_data(30)
    top = hessian_topk(model, F.cross_entropy, split(x, y, [16, 14]), k=5, curvature="ggn", tol=1e-9)
    exact = torch.linalg.eigvalsh(softmax_ggn_oracle(model, x, y)).flip(0)[:5]
    assert top.converged and top.curvature == "ggn"
    torch.testing.assert_close(top.eigenvalues, exact, rtol=1e-6, atol=0)
    assert "n_hvp" not in top.to_dict() and top.to_dict()["n_matvec"] == top.n_matvec


def test_per_block_spectra_in_one_call():
    model = make_mlp(10)
    x, y = classification_data(12)
    before = snapshot(model)
    data = split(x, y, [6, 6])
    _, _, H = dense_hessian_oracle(model, F.cross_entropy, x, y)
    sizes = [p.numel() for _, p in model.named_parameters()]
    offsets = np.cumsum([0, *sizes])
    res = hessian_topk(model, F.cross_entropy, data, k=2, blocks="module", tol=1e-8)
    assert isinstance(res, BlockSpectra) and list(res) == ["0", "2"]
    assert res.params["0"] == ("0.weight", "0.bias")
    for name, (a, b) in zip(["0", "2"], [(0, 2), (2, 4)], strict=True):
        sl = slice(offsets[a], offsets[b])
        exact = torch.linalg.eigvalsh(H[sl, sl]).flip(0)[:2]
        torch.testing.assert_close(res[name].eigenvalues, exact, rtol=1e-6, atol=1e-10)
    per_param = hessian_trace(model, F.cross_entropy, data, blocks="parameter", n_hvp=60)
    for i, name in enumerate(n for n, _ in model.named_parameters()):
        sl = slice(offsets[i], offsets[i + 1])
        if sizes[i] <= 20:  # Hutch++'s sketch covers a small block: its trace is exact
            assert abs(per_param[name].estimate - float(H[sl, sl].trace())) < 1e-9
    dens = hessian_density(
        model, F.cross_entropy, data, blocks={"first": ["0.weight"], "last": ["2.weight", "2.bias"]}, n_runs=2
    )
    assert set(dens.blocks) == {"first", "last"} and dens.n_matvec == sum(
        d.n_matvec for d in dens.blocks.values()
    )
    with pytest.raises(ValueError, match="not among the measured"):
        hessian_trace(model, F.cross_entropy, data, blocks={"x": ["nope"]})
    with pytest.raises(ValueError, match="more than one block"):
        hessian_trace(model, F.cross_entropy, data, blocks={"a": ["0.weight"], "b": ["0.weight"]})
    with pytest.raises(ValueError, match="blocks: got"):
        hessian_trace(model, F.cross_entropy, data, blocks="layer")
    assert_untouched(model, before)


def test_curvature_operator_by_name_and_model_untouched_on_error():
    model = make_cnn(1)
    x, y = image_data(6)
    before = snapshot(model)
    op = curvature_operator(model, F.cross_entropy, (x, y), curvature="ggn")
    assert isinstance(op, GGNOperator) and op.to_scipy().shape == op.shape
    bad = (x * float("nan"), y)
    from flatness import NonFiniteLossError

    with pytest.raises(NonFiniteLossError):
        hessian_topk(model, F.cross_entropy, bad, curvature="ggn")
    assert_untouched(model, before)


def test_float32_ggn_agrees_with_float64():
    model = make_mlp(11, dtype=torch.float32)
    x, y = classification_data(10, dtype=torch.float32)
    g32 = GGNOperator(model, F.cross_entropy, (x, y)).dense()
    g64 = GGNOperator(model, F.cross_entropy, (x, y), dtype=torch.float64).dense()
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-6)


def test_plot_block_densities_draws_each_block_on_a_shared_axis():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from flatness.plot import plot_block_densities

    model = make_mlp(12)
    x, y = classification_data(10)
    res = hessian_density(model, F.cross_entropy, (x, y), blocks="module", n_runs=2, n_steps=10, grid=50)
    axes = plot_block_densities(res)
    assert [ax.get_title() for ax in axes] == list(res.blocks)
    for ax, block in zip(axes, res.blocks.values(), strict=True):
        line = ax.get_lines()[0]
        np.testing.assert_allclose(line.get_xdata(), block.grid.numpy())
    assert len({ax.get_xlim() for ax in axes}) == 1
    with pytest.raises(TypeError, match="densities per block"):
        plot_block_densities(hessian_trace(model, F.cross_entropy, (x, y), blocks="module", n_hvp=6))


# ---------------------------------------------------------------- log-probability models (NLL)
def log_probability_model(seed):
    """(logits model, the same model ending with LogSoftmax): they share their parameters."""
    logits = make_mlp(seed)
    return logits, nn.Sequential(logits, nn.LogSoftmax(dim=1))


def test_fisher_of_log_probability_outputs_with_nll_is_the_softmax_fisher():
    """F.nll_loss on log-probabilities is linear in the outputs: the Fisher is that of softmax(z)."""
    logits, model = log_probability_model(13)
    x, y = classification_data(10)
    data = split(x, y, [6, 4])
    before = snapshot(model)
    oracle = softmax_ggn_oracle(logits, x, y)
    for loss_fn in (F.nll_loss, nn.NLLLoss()):  # likelihood inferred, as for cross-entropy
        torch.testing.assert_close(
            FisherOperator(model, loss_fn, data).dense(), oracle, rtol=1e-9, atol=1e-12
        )
    lam = lambda z, t: F.nll_loss(z, t)  # noqa: E731 - not inferable: stated
    torch.testing.assert_close(
        FisherOperator(model, lam, data, likelihood="categorical").dense(), oracle, rtol=1e-9, atol=1e-12
    )
    top = hessian_topk(model, F.nll_loss, data, k=3, curvature="fisher", tol=1e-10)
    exact = torch.linalg.eigvalsh(oracle).flip(0)[:3]
    torch.testing.assert_close(top.eigenvalues, exact, rtol=1e-6, atol=0)
    tr = hessian_trace(model, F.nll_loss, data, curvature="fisher", n_hvp=3 * oracle.shape[0])
    assert tr.estimate == pytest.approx(float(oracle.trace()), rel=0.05)
    mc = FisherOperator(model, F.nll_loss, data, mc_samples=500, mc_seed=1).dense()
    assert float((mc - oracle).norm() / oracle.norm()) < 0.15
    assert_untouched(model, before)


def test_fisher_of_nll_follows_ignore_index_and_refuses_outputs_that_are_not_log_probabilities():
    logits, model = log_probability_model(14)
    x, y = classification_data(8)
    y_ignored = y.clone()
    y_ignored[:3] = -100
    fisher = FisherOperator(model, nn.NLLLoss(ignore_index=-100), (x, y_ignored)).dense()
    torch.testing.assert_close(fisher, softmax_ggn_oracle(logits, x[3:], y[3:]), rtol=1e-9, atol=1e-12)
    # NLL of raw logits is not a likelihood: refused rather than a Fisher of nothing
    op = FisherOperator(logits, F.nll_loss, (x, y))
    with pytest.raises(ValueError, match="not log-probabilities"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)


def test_monte_carlo_fisher_with_a_nan_parameter_names_the_cause():
    model = make_mlp(15)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    x, y = classification_data(6)
    before = [p.detach().clone() for p in model.parameters()]
    op = FisherOperator(model, F.cross_entropy, (x, y), mc_samples=2)
    with pytest.raises(NonFiniteLossError, match=r"mc_samples: .*not finite"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    for p, b in zip(model.parameters(), before, strict=True):  # NaN ≠ NaN: compare bits
        assert torch.equal(p.detach().nan_to_num(7.0), b.nan_to_num(7.0))


# ---------------------------------------------------------------- empirical Fisher: ignored targets
def per_sample_gradients(model, samples, loss_fn, names=None):
    """(rows, n): ∇θ loss_fn(model(x_i), y_i) of each sample run alone (an independent oracle)."""
    grads = []
    for xi, yi in samples:
        f, theta0 = _output_function(model, xi, names)
        grads.append(torch.autograd.functional.jacobian(lambda t, f=f, yi=yi: loss_fn(f(t), yi), theta0))
    return torch.stack(grads)


def test_empirical_fisher_with_ignored_rows_weights_the_rows_with_a_loss():
    """Rows whose target is ignore_index have no loss (0/0): they count nothing; each batch's
    rows with a loss share its weight, as in the loss itself."""
    model = make_mlp(16)
    x, y = classification_data(9)
    y = y.clone()
    y[[0, 2, 7]] = -100
    loss_fn = nn.CrossEntropyLoss()
    before = snapshot(model)
    data = split(x, y, [4, 5])
    op = EmpiricalFisherOperator(model, loss_fn, data)
    oracle = 0
    for xb, yb in data:  # batch weight m_b/M = rows/9, then 1/(rows with a loss) within the batch
        keep = yb != -100
        g = per_sample_gradients(
            model, [(xb[i : i + 1], yb[i : i + 1]) for i in keep.nonzero()[:, 0]], loss_fn
        )
        oracle = oracle + (len(yb) / 9) * g.T @ g / int(keep.sum())
    torch.testing.assert_close(op.dense(), oracle, rtol=1e-9, atol=1e-12)
    assert_untouched(model, before)


class SequenceTagger(nn.Module):
    """(N, T, d) -> (N, C, T) logits, per token with a causal running mean (tokens interact)."""

    def __init__(self, d=3, classes=4):
        super().__init__()
        self.inp = nn.Linear(d, 5)
        self.out = nn.Linear(5, classes)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
        return self.out(h).transpose(1, 2)


def tagging_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (7, 4), generator=g)
    y[0, 2:] = -100  # padded positions
    y[1] = -100  # a fully padded sequence: no loss
    y[4, 1:] = -100
    y[5, :3] = -100
    return x, y


def test_empirical_fisher_with_token_weighted_batch_size_and_padded_sequences():
    """The batch_size recipe counting predicted tokens: each sequence's gradient (of its token
    mean) weighs its tokens' share, Σᵢ (nᵢ/N) gᵢ gᵢᵀ; a fully padded sequence counts nothing."""
    torch.manual_seed(0)
    model = SequenceTagger().double()
    x, y = tagging_data()
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    tokens = lambda b: int((b[1] != -100).sum())  # noqa: E731
    data = split(x, y, [3, 4])
    op = EmpiricalFisherOperator(model, loss_fn, data, batch_size=tokens)
    counts = (y != -100).sum(1)
    keep = counts.nonzero()[:, 0]
    g = per_sample_gradients(model, [(x[i : i + 1], y[i : i + 1]) for i in keep], loss_fn)
    oracle = g.T @ (g * (counts[keep, None] / counts.sum()))
    torch.testing.assert_close(op.dense(), oracle, rtol=1e-9, atol=1e-12)
    # default sizes: every sequence with a loss weighs the same within its batch (per row)
    per_row = EmpiricalFisherOperator(model, loss_fn, data).dense()
    ref = 0
    for (_xb, yb), rows in zip(data, ([0, 2], [3, 4, 5, 6]), strict=True):
        gb = per_sample_gradients(model, [(x[i : i + 1], y[i : i + 1]) for i in rows], loss_fn)
        ref = ref + (len(yb) / 7) * gb.T @ gb / len(rows)
    torch.testing.assert_close(per_row, ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="batch_size: the empirical Fisher splits a batch into its 3 rows"):
        EmpiricalFisherOperator(model, loss_fn, data, batch_size=lambda b: 2 * len(b[0]) + 1) @ torch.ones(
            op.shape[0], dtype=torch.float64
        )


def test_empirical_fisher_with_a_nan_input_still_blames_the_loss():
    model = make_mlp(17)
    x, y = classification_data(6)
    x = x.clone()
    x[2, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="the loss is nan"):
        EmpiricalFisherOperator(model, F.cross_entropy, (x, y)) @ torch.ones(
            sum(p.numel() for p in model.parameters()), dtype=torch.float64
        )


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def test_empirical_fisher_of_a_recurrent_model():
    """vmap has no batching rule for aten::gru: samples are run one at a time, same matrix."""
    torch.manual_seed(1)
    model = GRUClassifier().double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    before = snapshot(model)
    names = ["gru.bias_hh_l0", "head.bias"]  # θ: a recurrent bias and the head's bias
    op = EmpiricalFisherOperator(model, F.cross_entropy, split(x, y, [2, 3]), params=names)
    gr = per_sample_gradients(model, [(x[i : i + 1], y[i : i + 1]) for i in range(5)], F.cross_entropy, names)
    torch.testing.assert_close(op.dense(), gr.T @ gr / 5, rtol=1e-9, atol=1e-12)
    assert_untouched(model, before)


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher", "empirical_fisher"])
def test_non_reentrant_checkpointing_gives_the_plain_models_matrix(curvature):
    """Activation checkpointing (use_reentrant=False) recomputes a segment in the backward without
    the forward pass's dual numbers (the GGN / Fisher raised CheckpointError) or outside vmap (the
    empirical Fisher raised 'escaped from inside a function being vmapped'): each matrix must
    equal the same model's without checkpointing, dense in float64."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self, ckpt: bool) -> None:
            super().__init__()
            self.a, self.b, self.ckpt = nn.Linear(4, 6), nn.Linear(6, 3), ckpt

        def forward(self, x):
            if self.ckpt:
                h = checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=False)
            else:
                h = torch.tanh(self.a(x))
            return self.b(h)

    plain = Net(False).double()
    ckpt = Net(True).double()
    ckpt.load_state_dict(plain.state_dict())
    data = [(torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))) for _ in range(2)]
    want = curvature_operator(plain, F.cross_entropy, data, curvature=curvature).dense()
    got = curvature_operator(ckpt, F.cross_entropy, data, curvature=curvature).dense()
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
