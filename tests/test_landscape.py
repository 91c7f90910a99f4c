"""Loss landscapes: exact quadratic oracles, filter normalization, vectorized = looped, save/resume."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import (
    assert_untouched,
    classification_data,
    image_data,
    make_cnn,
    make_mlp,
    quadratic_problem,
    snapshot,
    split,
)
from flatness import (
    Objective,
    eigen_directions,
    interpolate,
    landscape_1d,
    landscape_2d,
    load_landscape,
    pca_directions,
    random_direction,
)
from flatness.landscape import Interpolation, Landscape1D, Landscape2D, accuracy, normalize_direction

ce = nn.functional.cross_entropy


def sym(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (a + a.T) / 2


def vec(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- Objective.evaluate_many
@pytest.mark.parametrize("maker,data", [(make_mlp, classification_data), (make_cnn, image_data)])
def test_evaluate_many_matches_loss_loop(maker, data):
    model = maker()
    x, y = data()
    obj = Objective(model, ce, split(x, y, [4, len(x) - 4]))
    thetas = obj.theta0 + 0.3 * torch.randn(
        7, obj.n, generator=torch.Generator().manual_seed(1), dtype=obj.dtype
    )
    expected = torch.stack([obj.loss(t) for t in thetas])
    model.eval()  # the oracle below calls the model directly; Objective evaluates in eval mode
    for vectorize in (True, False):
        losses, metrics = obj.evaluate_many(
            thetas, metrics={"acc": accuracy}, vectorize=vectorize, chunk_size=3
        )
        assert obj.last_vectorized is vectorize
        torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
        acc = [
            sum(
                len(xb) * float(accuracy(torch.func.functional_call(model, obj.unflatten(t), (xb,)), yb))
                for xb, yb in split(x, y, [4, len(x) - 4])
            )
            / len(x)
            for t in thetas
        ]
        np.testing.assert_allclose(metrics["acc"].numpy(), acc, rtol=1e-12)


def test_evaluate_many_falls_back_to_loop_and_keeps_nan():
    class ItemModel(nn.Module):  # .item() cannot be vmapped
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3).double()

        def forward(self, x):
            return self.lin(x) * (1.0 if self.lin.weight.sum().item() > -1e9 else 0.0)

    torch.manual_seed(0)
    model = ItemModel()
    x, y = classification_data()
    obj = Objective(model, ce, (x, y))
    thetas = torch.stack([obj.theta0, obj.theta0 * float("nan"), obj.theta0 * 2])
    losses, _ = obj.evaluate_many(thetas)
    assert obj.last_vectorized is False
    assert torch.isnan(losses[1])
    torch.testing.assert_close(losses[[0, 2]], torch.stack([obj.loss(thetas[0]), obj.loss(thetas[2])]))


def test_evaluate_many_errors_and_train_mode():
    model = make_mlp()
    x, y = classification_data()
    obj = Objective(model, ce, (x, y))
    with pytest.raises(ValueError, match="thetas"):
        obj.evaluate_many(torch.zeros(2, obj.n + 1, dtype=obj.dtype))
    with pytest.raises(ValueError, match="buffers"):
        obj.evaluate_many(obj.theta0[None], buffers={"nope": torch.zeros(1)})
    bl = Objective(model, data=(x, y), batch_loss=lambda m, b: ce(m(b[0]), b[1]))
    with pytest.raises(TypeError, match="batch_loss"):
        bl.evaluate_many(bl.theta0[None], metrics={"acc": accuracy})
    # Train mode with dropout: looped points replay the batch's random stream like single passes.
    torch.manual_seed(0)
    drop = nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.5), nn.Linear(7, 3)).double()
    tr = Objective(drop, ce, split(x, y, [10, 13]), train=True)
    with pytest.raises(ValueError, match="vectorize"):
        tr.evaluate_many(tr.theta0[None], vectorize=True)
    thetas = tr.theta0 + 0.1 * torch.randn(
        3, tr.n, dtype=tr.dtype, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(tr.evaluate_many(thetas)[0], torch.stack([tr.loss(t) for t in thetas]))


def test_evaluate_many_auto_picks_loop_for_large_batches_and_convolutions():
    torch.manual_seed(0)
    model = nn.Linear(4_000, 3).double()
    thetas = model.weight.new_zeros(3, 12_003)
    for rows, expected in ((1, True), (64, False)):  # 4,000 float64 inputs: vmap; 64 × 4,000: loop
        x = torch.randn(rows, 4_000, dtype=torch.float64)
        y = torch.zeros(rows, dtype=torch.long)
        obj = Objective(model, ce, (x, y))
        obj.evaluate_many(thetas)
        assert obj.last_vectorized is expected
    # Convolutions on the CPU: the loop even for a tiny batch; vmap when asked.
    cnn = make_cnn()
    x, y = image_data(2)
    obj = Objective(cnn, ce, (x, y))
    obj.evaluate_many(obj.theta0[None].repeat(3, 1))
    assert obj.last_vectorized is False
    obj.evaluate_many(obj.theta0[None].repeat(3, 1), vectorize=True)
    assert obj.last_vectorized is True


def test_evaluate_many_along_directions_equals_dense_points():
    model = make_cnn()
    x, y = image_data()
    obj = Objective(model, ce, split(x, y, [3, len(x) - 3]))
    g = torch.Generator().manual_seed(2)
    D = 0.1 * torch.randn(2, obj.n, generator=g, dtype=obj.dtype)
    C = torch.randn(5, 2, generator=g, dtype=obj.dtype)
    origin = obj.theta0 + 0.05 * torch.randn(obj.n, generator=g, dtype=obj.dtype)
    expected = torch.stack([obj.loss(obj.theta0 + c @ D) for c in C])
    expected_o = torch.stack([obj.loss(origin + c @ D) for c in C])
    for vectorize in (True, False):
        losses, _ = obj.evaluate_many(C, directions=D, vectorize=vectorize, chunk_size=2)
        assert obj.last_vectorized is vectorize
        torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
        losses, _ = obj.evaluate_many(C.numpy(), directions=D, origin=origin, vectorize=vectorize)
        torch.testing.assert_close(losses, expected_o, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="directions"):
        obj.evaluate_many(C, directions=D[:, :-1])
    with pytest.raises(ValueError, match="thetas"):
        obj.evaluate_many(C[:, :1], directions=D)
    with pytest.raises(TypeError, match="origin"):
        obj.evaluate_many(obj.theta0[None], origin=origin)
    with pytest.raises(ValueError, match="origin"):
        obj.evaluate_many(C, directions=D, origin=origin[:-1])


def test_evaluate_many_loop_with_mixed_dtypes_and_stateful_buffers():
    class Counter(nn.Module):
        """Its output depends on a buffer its forward updates in place (train mode only)."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)  # float32
            self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))
            self.register_buffer("count", torch.zeros((), dtype=torch.float64))

        def forward(self, x):
            if self.training:
                self.count += 1
            return self.lin(x.float()).double() * self.scale * (1 + self.count)

    torch.manual_seed(0)
    x, y = classification_data()
    for train in (False, True):
        model = Counter()
        before = snapshot(model)
        obj = Objective(model, ce, split(x, y, [10, 13]), train=train)
        assert obj.dtype == torch.float64
        thetas = obj.theta0 + 0.2 * torch.randn(4, obj.n, dtype=obj.dtype, generator=torch.Generator())
        losses, _ = obj.evaluate_many(thetas, vectorize=False)
        torch.testing.assert_close(losses, torch.stack([obj.loss(t) for t in thetas]))
        assert_untouched(model, before)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # weight_norm under vmap
@pytest.mark.parametrize("kind", ["tied", "shared", "frozen", "parametrized"])
def test_evaluate_many_loop_and_vmap_on_shared_frozen_and_parametrized_weights(kind):
    from conftest import SharedLinear, TiedModel, make_frozen

    torch.manual_seed(0)
    if kind == "tied":
        model, x = TiedModel().double(), torch.randn(9, 4, dtype=torch.float64)
        loss_fn = lambda out, t: ((out - t) ** 2).mean()  # noqa: E731
        y = torch.randn(9, 4, dtype=torch.float64)
    elif kind == "shared":
        model, x = SharedLinear().double(), torch.randn(9, 4, dtype=torch.float64)
        loss_fn, y = ce, torch.randint(0, 2, (9,))
    elif kind == "frozen":
        (x, y), model, loss_fn = classification_data(9), make_frozen(), ce
    else:
        model = make_mlp()
        nn.utils.parametrizations.weight_norm(model[0])
        (x, y), loss_fn = classification_data(9), ce
    before = snapshot(model)
    obj = Objective(model, loss_fn, split(x, y, [4, 5]))
    thetas = obj.theta0 + 0.3 * torch.randn(
        4, obj.n, dtype=obj.dtype, generator=torch.Generator().manual_seed(3)
    )
    expected = torch.stack([obj.loss(t) for t in thetas])
    for vectorize in (False, True):
        losses, _ = obj.evaluate_many(thetas, vectorize=vectorize)
        torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    assert_untouched(model, before)


def test_evaluate_many_loop_restores_model_when_forward_raises():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3).double()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return self.lin(x)

    model = Fails()
    weight = model.lin.weight
    before = snapshot(model)
    x, y = classification_data()
    obj = Objective(model, ce, (x, y))
    with pytest.raises(RuntimeError, match="boom"):
        obj.evaluate_many(obj.theta0[None].repeat(5, 1), vectorize=False)
    assert model.lin.weight is weight and isinstance(model.lin._parameters["weight"], nn.Parameter)
    assert_untouched(model, before)


# ---------------------------------------------------------------------------- quadratic oracles
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000), scale=st.floats(0.1, 3.0))
def test_slice_1d_is_exact_on_quadratic(n, seed, scale):
    H, x_star, theta, d = sym(n, seed), vec(n, seed + 1), vec(n, seed + 2), scale * vec(n, seed + 3)
    model, loss_fn, data = quadratic_problem(H, x_star, 0.7, theta)
    alphas = np.linspace(-2, 2, 9)
    r = landscape_1d(model, loss_fn, data, alphas=alphas, direction={"theta": d}, normalization=None)
    delta = theta - x_star
    f0 = 0.5 * delta @ H @ delta + 0.7
    g = H @ delta
    expected = [float(f0 + a * (g @ d) + 0.5 * a * a * (d @ H @ d)) for a in alphas]
    np.testing.assert_allclose(r.loss, expected, rtol=1e-10, atol=1e-10)
    assert r.center_loss == pytest.approx(float(f0), rel=1e-12, abs=1e-12)
    assert isinstance(r, Landscape1D) and r.n_nonfinite == 0 and r.complete


@given(n=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_slice_2d_is_the_quadratic_form(n, seed):
    H, x_star, theta = sym(n, seed), vec(n, seed + 1), vec(n, seed + 2)
    d1, d2 = vec(n, seed + 3), vec(n, seed + 4)
    model, loss_fn, data = quadratic_problem(H, x_star, -0.2, theta)
    alphas, betas = np.linspace(-1, 1, 5), np.array([-1.5, 0.0, 0.25, 2.0])
    r = landscape_2d(
        model, loss_fn, data, alphas=alphas, betas=betas, directions=[{"theta": d1}, d2], normalization=None
    )
    delta = theta - x_star
    g = H @ delta
    D = torch.stack([d1, d2], 1)
    M = D.T @ H @ D
    f0 = float(0.5 * delta @ H @ delta - 0.2)
    expected = np.empty((5, 4))
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            c = torch.tensor([a, b], dtype=torch.float64)
            expected[i, j] = f0 + float(c @ (D.T @ g)) + 0.5 * float(c @ M @ c)
    assert r.loss.shape == (5, 4)
    np.testing.assert_allclose(r.loss, expected, rtol=1e-10, atol=1e-10)


@given(n=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_interpolation_is_the_exact_parabola(n, seed):
    H, x_star = sym(n, seed), vec(n, seed + 1)
    ta, tb = vec(n, seed + 2), vec(n, seed + 3)
    ma, loss_fn, data = quadratic_problem(H, x_star, 0.0, ta)
    mb, _, _ = quadratic_problem(H, x_star, 0.0, tb)
    alphas = np.linspace(-1, 2, 7)
    r = interpolate(ma, mb, loss_fn, data, alphas=alphas)

    def f(t):
        return float(0.5 * (t - x_star) @ H @ (t - x_star))

    expected = [f((1 - a) * ta + a * tb) for a in alphas]
    np.testing.assert_allclose(r.loss, expected, rtol=1e-10, atol=1e-10)
    # ... a parabola: the second difference is constant (dᵀHd Δα²).
    d = tb - ta
    np.testing.assert_allclose(np.diff(r.loss, 2), float(d @ H @ d) * 0.5**2, rtol=1e-8, atol=1e-8)
    assert isinstance(r, Interpolation)
    torch.testing.assert_close(r.directions[0]["theta"], d)


# ---------------------------------------------------------------------------- directions
def test_filter_normalization_scales_with_its_filter():
    model = make_cnn()
    d0 = random_direction(model, seed=3)
    factor = 3.7
    with torch.no_grad():
        model.conv.weight[1] *= factor
        model.fc.weight[2] *= factor
    d1 = random_direction(model, seed=3)
    torch.testing.assert_close(d1["conv.weight"][1], factor * d0["conv.weight"][1], rtol=1e-12, atol=0)
    torch.testing.assert_close(d1["fc.weight"][2], factor * d0["fc.weight"][2], rtol=1e-12, atol=0)
    for name, j in (("conv.weight", 1), ("fc.weight", 2)):
        others = [i for i in range(d0[name].shape[0]) if i != j]
        assert torch.equal(d1[name][others], d0[name][others])
    # each filter has the norm of its weights
    w = model.conv.weight.detach()
    torch.testing.assert_close(d1["conv.weight"].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1))


def test_one_d_parameters_zero_by_default_and_configurable():
    model = make_cnn()
    d = random_direction(model)
    for name in ("conv.bias", "bn.weight", "bn.bias", "fc.bias"):
        assert torch.count_nonzero(d[name]) == 0
    kept = random_direction(model, ignore_1d=False)
    for name in ("conv.bias", "bn.weight", "fc.bias"):
        assert torch.count_nonzero(kept[name]) > 0
        torch.testing.assert_close(kept[name].norm(), dict(model.named_parameters())[name].detach().norm())
    # other tensors do not depend on ignore_1d (every tensor is drawn)
    assert torch.equal(kept["conv.weight"], d["conv.weight"])


def test_seeded_directions_reproducible_and_rng_untouched():
    model = make_mlp()
    before = snapshot(model)
    a, b, c = (
        random_direction(model, seed=5),
        random_direction(model, seed=5),
        random_direction(model, seed=6),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    assert list(a) == [n for n, _ in model.named_parameters()]
    assert_untouched(model, before)


def test_layer_normalization_uses_whole_tensors():
    model = make_mlp()
    raw = random_direction(model, normalization=None, ignore_1d=False, seed=1)
    layer = random_direction(model, normalization="layer", seed=1)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.count_nonzero(layer[name]) == 0
            continue
        torch.testing.assert_close(layer[name].norm(), p.detach().norm())
        # one factor for the whole tensor: proportional to the raw draw
        ratio = layer[name] / raw[name]
        torch.testing.assert_close(ratio, ratio.flatten()[0].expand_as(ratio))
    filt = random_direction(model, normalization="filter", seed=1)
    assert not torch.allclose(filt["0.weight"], layer["0.weight"])
    # normalize_direction applies the same rule to a given direction
    again = normalize_direction(raw, model, normalization="layer")
    assert all(torch.allclose(again[k], layer[k]) for k in layer)


def test_eigen_and_pca_directions():
    model = make_mlp()
    obj = Objective(model, ce, classification_data())
    vecs = torch.randn(3, obj.n, dtype=torch.float64)
    ds = eigen_directions(model, vecs)
    assert len(ds) == 3
    torch.testing.assert_close(obj.flatten(ds[1]), vecs[1])

    class Fake:
        eigenvectors = vecs[:2]

    assert len(eigen_directions(model, Fake())) == 2
    with pytest.raises(ValueError, match="eigenvectors"):
        eigen_directions(model, torch.zeros(2, obj.n + 1))
    # a trajectory along two fixed orthogonal directions: PCA finds their span
    u, v = torch.linalg.qr(torch.randn(obj.n, 2, dtype=torch.float64))[0].T
    ckpts = []
    for t in range(6):
        theta = obj.theta0 + (6 - t) * u + 0.3 * np.sin(t) * v
        ckpts.append({k: t_.clone() for k, t_ in obj.unflatten(theta).items()})
    pca = pca_directions(model, ckpts, n_components=2)
    basis = torch.stack([obj.flatten(d) for d in pca.directions])
    torch.testing.assert_close(basis @ basis.T, torch.eye(2, dtype=torch.float64))
    proj = basis.T @ (basis @ torch.stack([u, v], 1))
    torch.testing.assert_close(proj, torch.stack([u, v], 1), atol=1e-8, rtol=1e-8)
    assert pca.explained_variance_ratio[0] > 0.9 and pca.coordinates.shape == (6, 2)
    with pytest.raises(ValueError, match="checkpoints"):
        pca_directions(model, ckpts[:2], n_components=2)


# ---------------------------------------------------------------------------- grids on real models
def test_vectorized_and_looped_grids_agree_and_model_untouched():
    model = make_cnn()
    data = split(*image_data(), [6, 4])
    before = snapshot(model)
    kw = dict(alphas=np.linspace(-1, 1, 4), betas=np.linspace(-1, 1, 3), metrics={"acc": accuracy})
    fast = landscape_2d(model, ce, data, vectorize=True, chunk_size=5, **kw)
    slow = landscape_2d(model, ce, data, vectorize=False, points_per_pass=4, **kw)
    assert fast.vectorized is True and slow.vectorized is False
    assert fast.n_passes == 1 and slow.n_passes == 3
    np.testing.assert_allclose(fast.loss, slow.loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(fast.metrics["acc"], slow.metrics["acc"])
    obj = Objective(model, ce, data)
    d1, d2 = obj.flatten(fast.directions[0]), obj.flatten(fast.directions[1])
    assert float(fast.loss[1, 2]) == pytest.approx(float(obj.loss(obj.theta0 + kw["alphas"][1] * d1 + d2)))
    assert fast.center_loss == pytest.approx(float(obj.loss()))
    assert_untouched(model, before)


def test_save_load_roundtrip_and_json(tmp_path):
    model = make_mlp()
    r = landscape_1d(model, ce, classification_data(), alphas=[-1, 0, 1], metrics={"accuracy": accuracy})
    path = tmp_path / "r.npz"
    r.save(path)
    back = load_landscape(path)
    assert type(back) is Landscape1D and type(Landscape1D.load(path)) is Landscape1D
    np.testing.assert_array_equal(back.loss, r.loss)
    np.testing.assert_array_equal(back.metrics["accuracy"], r.metrics["accuracy"])
    assert all(torch.equal(back.directions[0][k], r.directions[0][k]) for k in r.directions[0])
    assert (back.center_loss, back.seed, back.normalization) == (r.center_loss, 0, "filter")
    json.dumps(r.to_dict())
    two = landscape_2d(model, ce, classification_data(), alphas=[0, 1], betas=[0, 1, 2])
    two.save(tmp_path / "two.npz")
    again = load_landscape(tmp_path / "two.npz")
    assert type(again) is Landscape2D and again.loss.shape == (2, 3)
    np.testing.assert_array_equal(again.betas, [0, 1, 2])


def test_checkpoint_and_resume(tmp_path):
    model = make_mlp()
    data = classification_data()
    kw = dict(alphas=np.linspace(-1, 1, 3), betas=np.linspace(-1, 1, 4))
    full = landscape_2d(model, ce, data, **kw)
    ckpt = tmp_path / "grid.npz"
    calls = []

    def interrupt(step, total, info):
        calls.append(step)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        landscape_2d(model, ce, data, checkpoint=ckpt, progress=interrupt, **kw)
    partial = load_landscape(ckpt)
    assert partial.done.sum() == 8 and not partial.complete  # two rows of four
    assert np.isnan(partial.loss[2]).all()
    resumed = landscape_2d(model, ce, data, resume_from=ckpt, checkpoint=ckpt, **kw)
    assert resumed.n_evaluated == 4 and resumed.complete and resumed.n_passes == 3
    np.testing.assert_allclose(resumed.loss, full.loss, rtol=1e-12)
    assert resumed.center_loss == pytest.approx(full.center_loss)
    with pytest.raises(ValueError, match="grid"):
        landscape_2d(model, ce, data, resume_from=ckpt, alphas=[0, 1], betas=kw["betas"])
    with pytest.raises(ValueError, match="directions"):
        landscape_2d(model, ce, data, resume_from=ckpt, seed=9, **kw)


def test_interpolation_interpolates_batchnorm_buffers():
    ma, mb = make_cnn(0), make_cnn(1)
    with torch.no_grad():
        mb.bn.running_var.uniform_(1.0, 3.0)
    data = split(*image_data(), [5, 5])
    alphas = [-0.5, 0.3, 1.0, 1.5]
    sa, sb = snapshot(ma), snapshot(mb)
    r = interpolate(ma, mb, ce, data, alphas=alphas, metrics={"acc": accuracy})
    assert_untouched(ma, sa)
    assert_untouched(mb, sb)
    for i, a in enumerate(alphas):
        hand = make_cnn(0)
        with torch.no_grad():
            for (_, t), (_, ta), (_, tb) in zip(
                hand.state_dict().items(), ma.state_dict().items(), mb.state_dict().items(), strict=True
            ):
                if t.is_floating_point():
                    t.copy_((1 - a) * ta + a * tb)
        assert r.loss[i] == pytest.approx(float(Objective(hand, ce, data).loss()), rel=1e-12)
    keep = interpolate(ma, mb, ce, data, alphas=[0.3], interpolate_buffers=False)
    assert keep.loss[0] != pytest.approx(r.loss[1])
    assert r.loss[2] == pytest.approx(float(Objective(mb, ce, data).loss()), rel=1e-12)
    assert r.center_loss == pytest.approx(float(Objective(ma, ce, data).loss()), rel=1e-12)
    # Extrapolating a running variance far enough makes it negative: NaN, with the cause named.
    with torch.no_grad():
        mb.bn.running_var.fill_(5.0)
        ma.bn.running_var.fill_(1.0)
    with pytest.warns(RuntimeWarning, match="interpolate_buffers=False"):
        far = interpolate(ma, mb, ce, data, alphas=[-1.0, 0.0])
    assert np.isnan(far.loss[0]) and np.isfinite(far.loss[1])


def test_clear_errors_and_model_untouched_after_errors():
    model = make_mlp()
    data = classification_data()
    wider, cnn = make_mlp(hidden=8), make_cnn()
    before = snapshot(model)
    with pytest.raises(ValueError, match="alphas"):
        landscape_1d(model, ce, data, alphas=[])
    with pytest.raises(ValueError, match="betas"):
        landscape_2d(model, ce, data, alphas=[0], betas=np.array([]))
    with pytest.raises(ValueError, match="keys"):
        landscape_1d(model, ce, data, alphas=[0, 1], direction={"0.weight": torch.zeros(7, 5)})
    bad = {n: torch.zeros(p.shape) for n, p in model.named_parameters()}
    bad["2.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="shape"):
        landscape_1d(model, ce, data, alphas=[0, 1], direction=bad)
    with pytest.raises(ValueError, match="two"):
        landscape_2d(model, ce, data, alphas=[0], betas=[0], directions=[bad])
    with pytest.raises(ValueError, match="normalization"):
        random_direction(model, normalization="bogus")
    with pytest.raises(ValueError, match="model_b"):
        interpolate(model, wider, ce, data, alphas=[0, 1])
    with pytest.raises(ValueError, match="model_b"):
        interpolate(model, cnn, ce, data, alphas=[0, 1])
    with pytest.raises(TypeError, match="metrics"):
        landscape_1d(model, ce, data, alphas=[0], metrics=[accuracy])

    def broken(outputs, targets):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        landscape_1d(model, ce, data, alphas=[0, 1], metrics={"b": broken})
    assert_untouched(model, before)


def test_non_finite_points_are_nan_and_reported():
    model = make_mlp()
    direction = {n: torch.full_like(p, 1e300) for n, p in model.named_parameters()}
    with pytest.warns(RuntimeWarning, match="non-finite"):
        r = landscape_1d(
            model, ce, classification_data(), alphas=[0.0, 1e10], direction=direction, normalization=None
        )
    assert np.isfinite(r.loss[0]) and not np.isfinite(r.loss[1]) and r.n_nonfinite == 1


def test_options_forwarded_and_progress():
    model = make_mlp()
    x, y = classification_data()
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = landscape_1d(
            model,
            ce,
            split(x, y, [10, 13]),
            alphas=np.linspace(-1, 1, 5),
            params=["2.weight"],
            max_batches=1,
            reduction="sum",
            points_per_pass=2,
            progress=lambda s, t, info: seen.append((s, t)),
        )
    assert list(r.directions[0]) == ["2.weight"]
    assert seen == [(2, 5), (4, 5), (5, 5)]
    with torch.no_grad():
        assert r.center_loss == pytest.approx(float(ce(model(x[:10]), y[:10])))


def test_landscape_2d_takes_the_largest_seed_and_names_one_out_of_range():
    """The second direction's seed is seed + 1 (modulo 2**63): seed = 2**63 - 1 is valid, 2**63 is not."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    grid = dict(alphas=torch.linspace(-1, 1, 3), betas=torch.linspace(-1, 1, 3))
    top = landscape_2d(model, ce, data, **grid, seed=2**63 - 1)
    assert np.isfinite(top.loss).all()
    with pytest.raises(ValueError, match=r"^seed: got 9223372036854775808"):
        landscape_2d(model, ce, data, **grid, seed=2**63)
