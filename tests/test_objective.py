"""The objective core against exact oracles: dense float64 Hessians and closed forms."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import (
    SharedLinear,
    TiedModel,
    TinyTransformer,
    assert_untouched,
    classification_data,
    dense_hessian_oracle,
    image_data,
    make_cnn,
    make_frozen,
    make_mlp,
    quadratic_problem,
    snapshot,
    split,
)
from flatness import NonFiniteLossError, Objective

F = nn.functional


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def mse(out, target):
    # F.mse_loss has no forward-over-reverse support in torch 2.13 (see test_auto_falls_back).
    return ((out - target) ** 2).mean()


def tied_data(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, x.clone()


CASES = {
    "mlp": (lambda: make_mlp(1), F.cross_entropy, lambda: classification_data(23)),
    "cnn_bn": (lambda: make_cnn(2), F.cross_entropy, lambda: image_data(10)),
    "tied": (lambda: TiedModel().double(), mse, tied_data),
    "shared_module": (
        lambda: SharedLinear().double(),
        F.cross_entropy,
        lambda: classification_data(11, d=4, classes=2),
    ),
    "frozen": (lambda: make_frozen(3), F.cross_entropy, lambda: classification_data(17)),
    # Fused attention kernels have no second derivative: HVPs must use the math kernel.
    "attention": (
        lambda: torch.manual_seed(0) and TinyTransformer().double(),
        F.cross_entropy,
        lambda: (torch.randn(7, 3, 4, dtype=torch.float64), torch.arange(7) % 3),
    ),
}


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_grad_hvp_match_dense_hessian(case, mode):
    make_model, loss_fn, make_data = CASES[case]
    model = make_model()
    x, y = make_data()
    batches = split(x, y, [len(x) // 3, len(x) // 3, len(x) - 2 * (len(x) // 3)])
    obj = Objective(model, loss_fn, batches, hvp_mode=mode)
    loss, grad, hess = dense_hessian_oracle(model, loss_fn, x, y, names=obj.names)
    assert obj.n == hess.shape[0]
    l, g = obj.loss_and_grad()
    assert abs(float(l - loss)) <= 1e-12 * abs(float(loss))
    assert rel(g, grad) < 1e-10
    assert rel(obj.loss(), loss) < 1e-12
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(obj.n, generator=gen, dtype=torch.float64)
        assert rel(obj.hvp(v), hess @ v) < 1e-10
    assert obj.hvp_mode_used == mode
    # Away from θ₀ too (where a leaked tensor would differ from the model's): model untouched.
    before = snapshot(model)
    theta = obj.theta0 + 0.1
    obj.loss(theta), obj.loss_and_grad(theta), obj.hvp(torch.ones(obj.n, dtype=torch.float64), theta)
    assert_untouched(model, before)


def test_auto_uses_reverse_mode_where_forward_ad_fails():
    x, y = tied_data()
    model = TiedModel().double()
    obj = Objective(model, F.mse_loss, (x, y))
    _, _, hess = dense_hessian_oracle(model, F.mse_loss, x, y, names=obj.names)
    v = torch.linspace(-1, 1, obj.n, dtype=torch.float64)
    assert rel(obj.hvp(v), hess @ v) < 1e-10
    assert obj.hvp_mode_used == "reverse"
    # Asked for explicitly, forward mode falls back to double backward with a warning (torch
    # 2.13 raises "ZeroTensors are immutable" under jvp(grad) of F.mse_loss), still exact.
    forward = Objective(model, F.mse_loss, (x, y), hvp_mode="forward")
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="forward-mode AD fails"):
        hv = forward.hvp(v)
    assert rel(hv, hess @ v) < 1e-10
    assert forward.hvp_mode_used == "reverse" and forward.n_hvp == 1 and forward.n_passes == 1
    assert_untouched(model, before)


def test_frozen_parameters_are_excluded_and_tied_counted_once():
    model = make_frozen(0)
    obj = Objective(model, F.cross_entropy, classification_data(5))
    assert obj.names == ["2.weight", "2.bias"]
    tied = TiedModel().double()
    obj = Objective(tied, F.mse_loss, tied_data())
    assert obj.n == sum(p.numel() for p in tied.parameters())  # parameters() dedups the tie
    assert "dec.weight" not in obj.names


def test_quadratic_module_exact():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    H = a + a.T
    x_star = torch.randn(6, generator=gen, dtype=torch.float64)
    theta = torch.randn(6, generator=gen, dtype=torch.float64)
    model, loss_fn, data = quadratic_problem(H, x_star, c=0.7, theta=theta)
    obj = Objective(model, loss_fn, data)
    d = theta - x_star
    assert torch.allclose(obj.loss(), 0.5 * d @ H @ d + 0.7, rtol=1e-13, atol=0)
    assert rel(obj.grad(), H @ d) < 1e-12
    v = torch.randn(6, generator=gen, dtype=torch.float64)
    assert rel(obj.hvp(v), H @ v) < 1e-12
    # At another θ (passed explicitly), the model's θ0 is unchanged.
    t2 = torch.zeros(6, dtype=torch.float64)
    assert rel(obj.grad(t2), H @ (t2 - x_star)) < 1e-12
    assert torch.equal(obj.theta0, theta)


@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    reduction_mean=st.booleans(),
)
def test_batch_split_invariance(sizes, seed, reduction_mean):
    n = sum(sizes)
    x, y = classification_data(n, seed=seed)
    model = make_mlp(seed % 7)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=gen, dtype=torch.float64)
    if reduction_mean:
        one = Objective(model, F.cross_entropy, (x, y))
        many = Objective(model, F.cross_entropy, split(x, y, sizes))
    else:

        def summed(out, t):
            return F.cross_entropy(out, t, reduction="sum")

        one = Objective(model, summed, (x, y), reduction="sum")
        many = Objective(model, summed, split(x, y, sizes), reduction="sum")
    l1, g1 = one.loss_and_grad()
    l2, g2 = many.loss_and_grad()
    assert abs(float(l1 - l2)) <= 1e-10 * abs(float(l1))
    assert rel(g2, g1) < 1e-10
    assert rel(many.hvp(v), one.hvp(v)) < 1e-10


def test_dataloader_with_partial_last_batch_and_shuffle():
    x, y = classification_data(23)
    model = make_mlp(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True)
    obj = Objective(model, F.cross_entropy, loader)
    ref = Objective(model, F.cross_entropy, (x, y))
    assert rel(obj.grad(), ref.grad()) < 1e-12
    assert abs(float(obj.loss() - ref.loss())) < 1e-13


class NoisyData:
    """A re-iterable whose batches depend on the global RNG (random augmentation)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        perm = torch.randperm(len(self.x))
        for i in range(0, len(self.x), 4):
            idx = perm[i : i + 4]
            noise = torch.randn(len(idx), self.x.shape[1], dtype=self.x.dtype) * 0.1
            yield self.x[idx] + noise, self.y[idx]


def test_every_pass_sees_the_same_batches_and_rng_is_restored():
    x, y = classification_data(14)
    model = make_mlp(0)
    obj = Objective(model, F.cross_entropy, NoisyData(x, y))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = obj.loss()
    torch.randn(5)  # the user's RNG moves on between calls
    b = obj.loss()
    assert float(a) == float(b)
    # The augmentation really is random: another data seed gives another loss.
    other = Objective(model, F.cross_entropy, NoisyData(x, y), data_seed=1)
    assert float(other.loss()) != float(a)
    torch.set_rng_state(before)
    obj.loss()
    assert torch.equal(torch.get_rng_state(), before)


def test_loader_with_own_generator_replays_and_is_restored():
    x, y = classification_data(20)
    model = make_mlp(0)
    gen = torch.Generator().manual_seed(5)
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=True, generator=gen)
    seen = []

    def batch_loss(m, batch):
        seen.append(batch[1].clone())
        return F.cross_entropy(m(batch[0]), batch[1])

    obj = Objective(model, data=loader, batch_loss=batch_loss)
    state = gen.get_state()
    obj.loss()
    first = seen[:]
    seen.clear()
    obj.loss()
    assert all(torch.equal(a, b) for a, b in zip(first, seen, strict=True))
    assert torch.equal(gen.get_state(), state)


def test_dict_batches_with_batch_loss_and_max_batches():
    x, y = classification_data(12)
    model = make_mlp(0)
    batches = [{"x": x[i : i + 4], "y": y[i : i + 4]} for i in range(0, 12, 4)]

    def batch_loss(m, b):
        return F.cross_entropy(m(b["x"]), b["y"])

    obj = Objective(model, data=batches, batch_loss=batch_loss)
    ref = Objective(model, F.cross_entropy, (x, y))
    assert rel(obj.grad(), ref.grad()) < 1e-12
    first8 = Objective(model, data=batches, batch_loss=batch_loss, max_batches=2)
    assert abs(float(first8.loss() - Objective(model, F.cross_entropy, (x[:8], y[:8])).loss())) < 1e-13


def test_custom_batch_size_weights():
    x, y = classification_data(10)
    model = make_mlp(0)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    weighted = Objective(model, F.cross_entropy, batches, batch_size=lambda b: 1)
    l0 = Objective(model, F.cross_entropy, batches[0]).loss()
    l1 = Objective(model, F.cross_entropy, batches[1]).loss()
    assert abs(float(weighted.loss() - (l0 + l1) / 2)) < 1e-13


def test_param_selection_by_names_predicate_and_tensors():
    model = make_mlp(0)
    x, y = classification_data(9)
    by_name = Objective(model, F.cross_entropy, (x, y), params=["2.weight"])
    by_pred = Objective(model, F.cross_entropy, (x, y), params=lambda n, p: n == "2.weight")
    by_tensor = Objective(model, F.cross_entropy, (x, y), params=[model[2].weight])
    _, grad, hess = dense_hessian_oracle(model, F.cross_entropy, x, y, names=["2.weight"])
    for obj in (by_name, by_pred, by_tensor):
        assert obj.names == ["2.weight"]
        assert rel(obj.grad(), grad) < 1e-12
        # Not the ones vector: shifting all logits equally is in the Hessian's null space.
        v = torch.linspace(-1, 2, obj.n, dtype=torch.float64)
        assert rel(obj.hvp(v), hess @ v) < 1e-10


def test_float64_evaluation_of_a_float32_model_and_float32_default():
    x, y = classification_data(9, dtype=torch.float32)
    model = make_mlp(0, dtype=torch.float32)
    obj32 = Objective(model, F.cross_entropy, (x, y))
    obj64 = Objective(model, F.cross_entropy, (x, y), dtype=torch.float64)
    assert obj32.dtype == torch.float32 and obj64.dtype == torch.float64
    assert obj32.grad().dtype == torch.float32
    model64 = make_mlp(0, dtype=torch.float64)
    ref = Objective(model64, F.cross_entropy, (x.double(), y))
    assert rel(obj64.grad(), ref.grad()) < 1e-12
    assert rel(obj32.grad().double(), ref.grad()) < 1e-5
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_mixed_dtype_parameters():
    model = make_mlp(0, dtype=torch.float64)
    model[2].to(torch.float32)

    class Cast(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner[2](self.inner[1](self.inner[0](x)).float())

    wrapped = Cast(model)
    x, y = classification_data(9)
    obj = Objective(wrapped, F.cross_entropy, (x, y))
    assert obj.dtype == torch.float64
    g = obj.grad()
    assert g.dtype == torch.float64
    # Oracle: plain autograd on a copy of the model, each parameter in its own dtype.
    ref = copy.deepcopy(wrapped)
    F.cross_entropy(ref(x), y).backward()
    expected = torch.cat([p.grad.reshape(-1).double() for p in ref.parameters()])
    assert rel(g, expected) < 1e-6
    assert model[2].weight.dtype == torch.float32 and model[0].weight.dtype == torch.float64


def test_train_mode_uses_batch_statistics_and_keeps_buffers():
    model = make_cnn(0)
    x, y = image_data(8)
    before = snapshot(model)
    obj = Objective(model, F.cross_entropy, (x, y), train=True)
    eval_obj = Objective(model, F.cross_entropy, (x, y))
    assert float(obj.loss()) != float(eval_obj.loss())
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        expected = F.cross_entropy(ref(x), y)
    assert abs(float(obj.loss() - expected)) < 1e-12
    v = torch.ones(obj.n, dtype=torch.float64)
    assert torch.isfinite(obj.hvp(v)).all()
    assert obj.hvp_mode_used in ("forward", "reverse")
    assert_untouched(model, before)


def test_dropout_train_mode_is_deterministic_per_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    x, y = classification_data(12)
    obj = Objective(model, F.cross_entropy, (x, y), train=True)
    assert float(obj.loss()) == float(obj.loss())
    v = torch.ones(obj.n, dtype=torch.float64)
    assert torch.equal(obj.hvp(v), obj.hvp(v))


@pytest.mark.parametrize("train", [False, True])
def test_model_untouched_after_success(train):
    model = make_cnn(0)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 3.0)
    model.conv.bias.requires_grad_(False)
    model.train()
    model.bn.eval()
    x, y = image_data(8)
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    before = snapshot(model)
    obj = Objective(model, F.cross_entropy, [(x[:5], y[:5]), (x[5:], y[5:])], train=train)
    obj.loss()
    obj.loss_and_grad()
    obj.hvp(torch.ones(obj.n, dtype=torch.float64))
    assert_untouched(model, before)


def test_model_untouched_after_raising_loss():
    model = make_cnn(0)
    model.train()
    x, y = image_data(8)
    before = snapshot(model)

    def bad_loss(out, t):
        if len(t) == 5:
            raise RuntimeError("boom")
        return F.cross_entropy(out, t)

    obj = Objective(model, bad_loss, [(x[:3], y[:3]), (x[3:], y[3:])], train=True)
    with pytest.raises(RuntimeError, match="boom"):
        obj.loss()
    assert_untouched(model, before)
    with pytest.raises(RuntimeError, match="boom"):
        obj.loss_and_grad()
    with pytest.raises(RuntimeError, match="boom"):
        obj.hvp(torch.ones(obj.n, dtype=torch.float64))
    assert_untouched(model, before)


def test_non_finite_loss_names_the_batch():
    model = make_mlp(0)
    x, y = classification_data(9)
    x2 = x.clone()
    x2[6] = float("nan")
    before = snapshot(model)
    obj = Objective(model, F.cross_entropy, split(x2, y, [3, 3, 3]))
    with pytest.raises(NonFiniteLossError, match="batch 2"):
        obj.loss()
    with pytest.raises(NonFiniteLossError, match="batch 2"):
        obj.loss_and_grad()
    with pytest.raises(ValueError, match="batch 2"):
        obj.hvp(torch.ones(obj.n, dtype=torch.float64))
    assert_untouched(model, before)


def test_bad_inputs():
    model = make_mlp(0)
    x, y = classification_data(6)
    with pytest.raises(ValueError, match="no batches"):
        Objective(model, F.cross_entropy, []).loss()
    with pytest.raises(TypeError, match="one-shot"):
        Objective(model, F.cross_entropy, ((x, y) for _ in range(2)))
    with pytest.raises(TypeError, match="one-shot"):
        Objective(model, F.cross_entropy, iter([(x, y)]))
    with pytest.raises(TypeError, match="data"):
        Objective(model, F.cross_entropy, None)
    with pytest.raises(ValueError, match=r"loss_fn: .* shape \(6,\); expected one number .*reduction="):
        Objective(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), (x, y)).loss()
    for evaluate in (lambda o: o.loss(), lambda o: o.evaluate_many(o.theta0[None].repeat(2, 1))):
        with pytest.raises(
            TypeError, match=r"loss_fn: the loss of a batch is a float; expected a torch tensor"
        ):
            evaluate(Objective(model, lambda o, t: float(F.cross_entropy(o, t)), (x, y)))
    with pytest.raises(TypeError, match=r"batch_loss: .* is a float"):
        Objective(model, data=(x, y), batch_loss=lambda m, b: 1.0).loss()
    from flatness import hessian_topk, landscape_1d, sharpness

    with pytest.raises(
        TypeError,
        match=r"sharpness\(\) got an unexpected keyword argument 'epsilom' \(did you mean 'epsilon'\?\)",
    ):
        sharpness(model, F.cross_entropy, (x, y), epsilom=1e-3)
    with pytest.raises(TypeError, match=r"did you mean 'max_batches'"):
        hessian_topk(model, F.cross_entropy, (x, y), max_batch=2)
    with pytest.raises(TypeError, match=r"landscape_1d\(\) got an unexpected keyword argument 'foo'"):
        landscape_1d(model, F.cross_entropy, (x, y), alphas=[0.0], foo=1)
    frozen = make_mlp(0)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Objective(frozen, F.cross_entropy, (x, y))
    obj = Objective(model, F.cross_entropy, (x, y))
    with pytest.raises(ValueError, match=r"v: got shape \(3,\)"):
        obj.hvp(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="v: expected"):
        obj.hvp([1.0] * obj.n)
    with pytest.raises(ValueError, match="theta"):
        obj.loss(torch.ones(2, obj.n, dtype=torch.float64))
    with pytest.raises(TypeError, match="model"):
        Objective("net", F.cross_entropy, (x, y))
    with pytest.raises(TypeError, match="loss_fn"):
        Objective(model, None, (x, y))
    with pytest.raises(TypeError, match="loss_fn"):
        Objective(model, "ce", (x, y))
    with pytest.raises(ValueError, match="reduction"):
        Objective(model, F.cross_entropy, (x, y), reduction="avg")
    with pytest.raises(ValueError, match="hvp_mode"):
        Objective(model, F.cross_entropy, (x, y), hvp_mode="fast")
    with pytest.raises(ValueError, match="params: unknown"):
        Objective(model, F.cross_entropy, (x, y), params=["nope"])
    with pytest.raises(ValueError, match="max_batches"):
        Objective(model, F.cross_entropy, (x, y), max_batches=0)
    with pytest.raises(TypeError, match="dtype"):
        Objective(model, F.cross_entropy, (x, y), dtype=torch.int64)
    with pytest.raises(TypeError, match="inputs, targets"):
        Objective(model, F.cross_entropy, [(x, y, y)]).loss()


def test_numpy_vectors_and_flatten_roundtrip():
    model = make_mlp(0)
    obj = Objective(model, F.cross_entropy, classification_data(6))
    v = np.random.default_rng(0).standard_normal(obj.n)
    out = obj.hvp(v)
    assert isinstance(out, torch.Tensor)
    assert rel(out, obj.hvp(torch.from_numpy(v))) == 0.0
    d = obj.unflatten(obj.theta0)
    assert list(d) == obj.names
    assert torch.equal(obj.flatten(d), obj.theta0)
    with pytest.raises(ValueError, match="missing"):
        obj.flatten({"0.weight": d["0.weight"]})


def test_recurrent_model_with_tied_embedding_untouched_and_exact():
    """nn.LSTM keeps its own list of weight tensors; the embedding is tied to the output layer."""

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.lstm = nn.LSTM(4, 4, batch_first=True)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(self.lstm(self.emb(x))[0][:, -1])

    torch.manual_seed(0)
    model = TiedLM().double()
    x, y = torch.randint(0, 7, (9, 3)), torch.randint(0, 7, (9,))
    out0 = model(x).detach()
    before = snapshot(model)
    obj = Objective(model, F.cross_entropy, split(x, y, [4, 5]))
    loss, grad, hess = dense_hessian_oracle(model, F.cross_entropy, x, y, names=obj.names)
    assert obj.names.count("emb.weight") == 1 and "out.weight" not in obj.names
    l, g = obj.loss_and_grad()
    assert rel(l, loss) < 1e-12 and rel(g, grad) < 1e-10
    v = torch.randn(obj.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel(obj.hvp(v), hess @ v) < 1e-10
    theta = obj.theta0 + 0.2 * v
    losses, _ = obj.evaluate_many(torch.stack([theta, obj.theta0]))  # vmap fails on LSTM: loop
    assert obj.last_vectorized is False
    torch.testing.assert_close(losses, torch.stack([obj.loss(theta), l]), rtol=1e-12, atol=0)
    assert_untouched(model, before)
    assert torch.equal(model(x).detach(), out0)
    with torch.no_grad():  # the model still trains: in-place updates reach its forward
        model.lstm.weight_ih_l0.add_(0.5)
    assert not torch.equal(model(x).detach(), out0)


# ---------------------------------------------------------------------------- the user's own errors
class _FailsOnce(nn.Module):
    """Raises the user's RuntimeError (mentioning "forward") on its first call only."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.lin = nn.Linear(5, 3).double()
        self.error = error
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return self.lin(torch.tanh(x))


class _NoJvpTanh(torch.autograd.Function):
    """tanh with a backward but no jvp: forward-mode AD is not implemented for it."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _NoJvpNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(5, 4).double()
        self.l2 = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.l2(_NoJvpTanh.apply(self.l1(x)))


USER_ERRORS = [
    RuntimeError("my forward pass failed: input not supported (not implemented here)"),
    NotImplementedError("forward for this input is not implemented"),
    torch.OutOfMemoryError("CUDA out of memory during the forward pass"),
]


@pytest.mark.parametrize("error", USER_ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize(
    "options", [{"hvp_mode": "forward"}, {"curvature": "ggn"}, {"curvature": "fisher"}], ids=str
)
def test_user_errors_propagate_under_forward_mode(error, options):
    """Only torch's "forward AD is not implemented" falls back; the model's own errors propagate."""
    import flatness

    model = _FailsOnce(error)
    before = snapshot(model)
    with pytest.raises(type(error)) as info:
        flatness.hessian_topk(model, F.cross_entropy, classification_data(9), k=1, **options)
    assert info.value is error
    assert model.calls == 1  # not re-run by a fallback
    assert_untouched(model, before)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_forward_ad_gaps_still_fall_back(curvature):
    import flatness

    data = classification_data(9)
    model = _NoJvpNet()
    exact = flatness.hessian_topk(
        model, F.cross_entropy, data, k=2, tol=1e-10, curvature=curvature, hvp_mode="reverse"
    )
    if curvature == "hessian":
        with pytest.warns(RuntimeWarning, match="forward-mode AD fails.*jvp function"):
            top = flatness.hessian_topk(model, F.cross_entropy, data, k=2, tol=1e-10, hvp_mode="forward")
    else:  # the GGN's J v by the double-VJP route (also exact), silently
        top = flatness.hessian_topk(model, F.cross_entropy, data, k=2, tol=1e-10, curvature="ggn")
    assert torch.allclose(top.eigenvalues, exact.eigenvalues, rtol=1e-9)


def test_forward_ad_gap_messages_are_torchs():
    """The phrases the fallback matches are what this torch raises."""
    from flatness.objective._fd import forward_ad_unsupported

    x = torch.randn(3, dtype=torch.float64)
    caught = []
    for f in (
        lambda t: torch.cdist(t.view(1, 3, 1), torch.ones(1, 2, 1, dtype=t.dtype)).sum(),  # aten op
        lambda t: _NoJvpTanh.apply(t).sum(),  # custom Function without jvp
        lambda t: F.mse_loss(t, torch.zeros_like(t)),  # "ZeroTensors are immutable" (torch 2.13)
    ):
        try:
            torch.func.jvp(torch.func.grad(f), (x,), (torch.ones_like(x),))
        except (RuntimeError, NotImplementedError) as e:
            caught.append(e)
    assert len(caught) >= 2 and all(forward_ad_unsupported(e) for e in caught)
    assert not any(forward_ad_unsupported(e) for e in USER_ERRORS)


# ---------------------------------------------------------------------------- reduction, seeds
@pytest.mark.parametrize(
    ("loss_fn", "reduction", "fix"),
    [
        (nn.CrossEntropyLoss(reduction="sum"), "mean", "reduction='sum'"),
        (nn.CrossEntropyLoss(), "sum", "reduction='mean'"),
        (nn.CrossEntropyLoss(reduction="none"), "mean", "reduction='mean'"),
        (__import__("functools").partial(F.cross_entropy, reduction="sum"), "mean", "reduction='sum'"),
    ],
    ids=["sum-module", "mean-module", "none-module", "partial"],
)
def test_loss_reduction_contradicting_reduction_option_is_named(loss_fn, reduction, fix):
    import flatness

    x, y = classification_data(40)
    model = make_mlp()
    with pytest.raises(ValueError, match=rf"loss_fn: .*reduction=.*{fix}") as info:
        flatness.hessian_topk(model, loss_fn, split(x, y, [20, 20]), k=1, reduction=reduction)
    assert "reduction" in str(info.value)
    with pytest.raises(ValueError, match="loss_fn: "):
        Objective(model, loss_fn, (x, y), reduction=reduction)


def test_loss_reduction_that_agrees_is_accepted_and_exact():
    import flatness

    x, y = classification_data(40)
    model = make_mlp()
    data = split(x, y, [20, 20])
    mean = flatness.hessian_topk(model, F.cross_entropy, data, k=1, tol=1e-10).eigenvalues[0]
    summed = flatness.hessian_topk(
        model, nn.CrossEntropyLoss(reduction="sum"), data, k=1, tol=1e-10, reduction="sum"
    ).eigenvalues[0]
    assert float(summed) == pytest.approx(40 * float(mean), rel=1e-9)
    module = flatness.hessian_topk(model, nn.CrossEntropyLoss(), data, k=1, tol=1e-10).eigenvalues[0]
    assert float(module) == pytest.approx(float(mean), rel=1e-12)


@pytest.mark.parametrize("seed", [2**63, 2**64, 2**80, -1, np.uint64(2**64 - 1)])
def test_out_of_range_seeds_are_named(seed):
    import flatness

    model = make_mlp()
    data = classification_data(10)
    calls = {
        "hessian_topk": lambda: flatness.hessian_topk(model, F.cross_entropy, data, k=1, seed=seed),
        "hessian_trace": lambda: flatness.hessian_trace(model, F.cross_entropy, data, n_hvp=6, seed=seed),
        "landscape_2d": lambda: flatness.landscape_2d(
            model, F.cross_entropy, data, alphas=[0.0, 1.0], betas=[0.0, 1.0], seed=seed
        ),
        "sharpness": lambda: flatness.sharpness(model, F.cross_entropy, data, subspace=2, seed=seed),
        "data_seed": lambda: Objective(model, F.cross_entropy, data, data_seed=seed),
    }
    for name, call in calls.items():
        arg = "data_seed" if name == "data_seed" else "seed"
        with pytest.raises(ValueError, match=rf"^{arg}: got .*\[0, 2\*\*63 - 1\]"):
            call()
    # The largest accepted seed works.
    flatness.hessian_trace(model, F.cross_entropy, data, n_hvp=6, seed=2**63 - 1)
    flatness.landscape_1d(model, F.cross_entropy, data, alphas=[0.0, 1.0], seed=np.int64(2**63 - 1))


@pytest.mark.parametrize("mode", ["auto", "reverse", "forward", "finite_difference"])
def test_loss_linear_in_theta_has_zero_hessian(mode):
    """A gradient that does not depend on θ has no graph: H = 0 (was a raw autograd error)."""
    import flatness

    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, _ = classification_data(8, d=4)
    data = (x, torch.zeros(8, dtype=torch.float64))

    def linear(out, _target):
        return out.mean()

    obj = Objective(model, linear, data, hvp_mode=mode)
    assert torch.equal(
        obj.hvp(torch.ones(obj.n, dtype=torch.float64)), torch.zeros(obj.n, dtype=torch.float64)
    )
    top = flatness.hessian_topk(model, linear, data, k=1, hvp_mode=mode)
    assert float(top.eigenvalues[0]) == 0.0
    assert float(flatness.hessian_trace(model, linear, data, n_hvp=6, hvp_mode=mode).estimate) == 0.0
